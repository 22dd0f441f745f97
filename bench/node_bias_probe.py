"""Where does a player's latency-based prediction stand at the guest's own node? A probe.

    .venv/bin/python -m bench.node_bias_probe [--impulses 100] [--published-ms 0]

The A/V sync bench (bench/avsync_bench.py) measures a VM player's
prediction against the host's speakers, through the whole path. This probe
splits off the first step: a private PipeWire with pipewire-pulse, the
guest's virtual output as qvaudio's own node (`SinkNode`) publishing a
fixed latency, the same stamping player as avsync_bench playing clicks
into it, and the node's monitor (what the guest agent reads) recorded with
capture stamps. Per click: heard at the monitor minus predicted, minus the
published figure, so 0 means PipeWire's own accounting up to the node is
exact and any bias seen end to end comes from the path the guest measures.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from bench.avsync_bench import heard_minus_predicted, predictions, stamping_player
from bench.latency_bench import SETTLE_S, onset_times, schedule, stats_ms
from bench.pipeline import FMT, Recorder, load_average, machine
from qvaudio.pulse.pipewire_node import SinkNode
from tests.audio_daemons import PipeWireServer

NODE = "qvaudio_probe"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impulses", type=int, default=100)
    parser.add_argument("--published-ms", type=float, default=0.0)
    args = parser.parse_args()
    starts = schedule(args.impulses)
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="qvaudio-probe-") as tmp:
        server = PipeWireServer("vm", Path(tmp) / "vm")
        server.start()
        try:
            remote = str(Path(server.env["PIPEWIRE_RUNTIME_DIR"]) / "pipewire-0")
            with SinkNode.open(NODE, "probe", FMT, remote=remote) as node:
                node.set_latency_ns(int(args.published_ms * 1e6))
                time.sleep(0.5)
                rec = Recorder(server, f"{NODE}.monitor", "node-monitor")
                rec.started.wait(10)
                if rec.error is not None:
                    raise rec.error
                time.sleep(SETTLE_S)
                # The player plays into the default sink: make it the node.
                subprocess.run(
                    ["pactl", "set-default-sink", NODE], env=server.full_env(), check=True
                )
                time.sleep(0.5)
                player, marks = stamping_player(server, starts)
                player.join(len(starts) * 0.4 + 30)
                time.sleep(1.0)
                rec.stop()
                quantum = node.cycle_frames
        finally:
            server.stop()
    predicted = predictions(starts, marks)
    heard, _ = onset_times(rec)
    # The player's predictions include what the node published; the monitor
    # hears the audio before that part of the path.
    published = args.published_ms / 1000
    errors = heard_minus_predicted([p - published for p in predicted], heard)
    print(json.dumps({
        "probe": "monitor of qvaudio's PipeWire node vs a player's prediction",
        "machine": machine(),
        "published_ms": args.published_ms,
        "graph_cycle_frames": quantum,
        "impulses_counted": len(starts),
        "unpaired": sum(e is None for e in errors),
        "heard_minus_predicted_ms": stats_ms(errors),
        "player_reported_latency_ms_median": round(
            sorted(m[2] for m in marks)[len(marks) // 2] * 1000, 1
        ),
        "load_avg_before": load_before,
        "load_avg_after": load_average(),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
