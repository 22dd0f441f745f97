"""How long sound takes to come back after each fault on the whole path.

    .venv/bin/python -m bench.recovery_bench [--cycles 10]

The test bed of tests/test_faults.py: a VM's PulseAudio with a player in it,
qvaudio-guest, qvaudio-dom0 and the host PulseAudio, a listener on the host
sink. Each cycle makes one fault and repairs it at once, as a supervisor
would (kill and restart qvaudio-dom0 or qvaudio-guest, kill and restart the
VM's or the host's audio server), then measures the time from the repair to
the first 0.3 s of unbroken sound on the host sink. Prints one JSON object
with every cycle's figure and the median, p95 and max per fault.

The alternative a user would pick (a `parec | pacat` bridge) has no figure
to set beside these: it exits with either audio server and comes back only
if something restarts it, and then only once the server is up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.pipeline import load_average, machine, percentile
from tests.audio_daemons import PulseAudioServer
from tests.dom0_harness import start_null_sink_clock_once_dom0_plays
from tests.pipeline_harness import Pipeline

SETTLE_S = 1.5  # past dom0's "reconnecting in a loop" mark (sessions under 1 s)


def faults(pipe: Pipeline) -> dict[str, Callable[[], None]]:
    def restart_dom0() -> None:
        assert pipe.dom0.proc is not None
        pipe.dom0.proc.kill()
        pipe.dom0.proc.wait()
        pipe.dom0.start()

    def restart_guest() -> None:
        pipe.guest.kill()
        pipe.guest.start()

    def restart_vm_server() -> None:
        pipe.vm.kill()
        pipe.vm.start()

    def restart_host_server() -> None:
        pipe.host.kill()
        pipe.host.start()
        start_null_sink_clock_once_dom0_plays(pipe.host)

    return {
        "dom0 agent killed and restarted": restart_dom0,
        "guest agent killed and restarted": restart_guest,
        "VM audio server killed and restarted": restart_vm_server,
        "host audio server killed and restarted": restart_host_server,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=10)
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_before = load_average()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="qv-recovery-") as tmp:
        base = Path(tmp)
        vm = PulseAudioServer("vm", base / "vm")
        host = PulseAudioServer("host", base / "host")
        vm.start()
        host.start()
        (base / "pipe").mkdir()
        pipe = Pipeline(base / "pipe", vm, host)
        try:
            pipe.start()
            for name, fault in faults(pipe).items():
                took: list[float] = []
                for number in range(args.cycles):
                    time.sleep(SETTLE_S)
                    repaired = time.monotonic()
                    fault()
                    took.append(pipe.listener.wait_flowing(repaired, f"{name} {number}", 20))
                results[name] = {
                    "seconds": [round(t, 3) for t in took],
                    "median_s": round(statistics.median(took), 3),
                    "p95_s": round(percentile(took, 95), 3),
                    "max_s": round(max(took), 3),
                }
        finally:
            pipe.close()
            vm.stop()
            host.stop()
    print(
        json.dumps(
            {
                "bench": "recovery",
                "started": started,
                "machine": machine(),
                "load_average": {"before": load_before, "after": load_average()},
                "cycles": args.cycles,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
