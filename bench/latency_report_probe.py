"""Can the VM's audio server be told the latency behind its virtual output? A probe.

    .venv/bin/python -m bench.latency_report_probe

Issue 14 asks that what an application in the VM reads as its playback
latency include the whole path to the host's speakers. The guest's virtual
output is a null sink (PulseAudio's module-null-sink; on PipeWire the same
module through pipewire-pulse, a support.null-audio-sink node behind an
audio adapter). This probe starts a private server of each kind, plays into
such a sink with an ordinary client, samples the latency the client sees
(`PcmStream.latency_us`: the timing info's queued bytes plus the sink
latency, what `pa_stream_get_latency` reports), then tries the mechanism
each server offers for adding a latency to a device, and samples again:

* PulseAudio: a port latency offset (`pactl set-port-latency-offset CARD
  PORT USEC`), which needs the sink to belong to a card and have a port.
* PipeWire: the node's `ProcessLatency` parameter (`pw-cli set-param ID
  ProcessLatency '{ ns = N }'`), which PipeWire adds to the latency its
  ports report, and which its tunnel modules use.

It reports, per server, the client's median latency before and after and
whether the mechanism took (read back from the server), as one JSON object.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pulsectl

from bench.pipeline import load_average, machine
from qvaudio.core.formats import AudioFormat
from qvaudio.guest.devices import restart_sink_clock
from qvaudio.pulse.pcm import PcmStream, PulseError
from tests.audio_daemons import AudioServer, PipeWireServer, PulseAudioServer

FMT = AudioFormat.parse("s16le:48000:2")
SINK = "probe_vm"
ADDED_MS = 50
SAMPLES = 20


class Player:
    """An ordinary client playing silence into the sink, sampling its own latency."""

    def __init__(self, server: AudioServer) -> None:
        self.stream = PcmStream.playback(
            server.server, SINK, FMT, "probe", "probe", FMT.bytes_for_ms(40)
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        chunk = bytes(FMT.bytes_for_ms(10))
        try:
            while not self._stop.is_set():
                self.stream.write(chunk)
        except PulseError:
            pass

    def latency_ms(self) -> float:
        values = []
        for _ in range(SAMPLES):
            time.sleep(0.05)
            values.append(self.stream.latency_us() / 1000)
        return round(statistics.median(values), 1)

    def close(self) -> None:
        self._stop.set()
        self.stream.close()
        self._thread.join(2)


def _pulseaudio(server: AudioServer, player: Player) -> dict[str, Any]:
    with pulsectl.Pulse("probe", server=server.server) as pulse:
        sink = pulse.get_sink_by_name(SINK)
        ports = [p.name for p in sink.port_list]
        card = sink.card
    return {
        "mechanism": "pactl set-port-latency-offset CARD PORT USEC",
        "sink_card": None if card in (None, 0xFFFFFFFF) else card,
        "sink_ports": ports,
        "took": False,
        "why": "the null sink belongs to no card and has no port to carry an offset",
        "after_ms": player.latency_ms(),
    }


def _node_id(server: AudioServer) -> int | None:
    dump = json.loads(_run(server, ["pw-dump"]))
    for obj in dump:
        props = (obj.get("info") or {}).get("props") or {}
        if obj.get("type", "").endswith(":Node") and props.get("node.name") == SINK:
            return int(obj["id"])
    return None


def _run(server: AudioServer, argv: list[str]) -> str:
    done = subprocess.run(
        argv, env=server.full_env(), capture_output=True, text=True, timeout=10, check=False
    )
    return done.stdout + done.stderr


def _pipewire(server: AudioServer, player: Player) -> dict[str, Any]:
    node = _node_id(server)
    if node is None:
        return {"took": False, "why": f"no node named {SINK}"}
    ns = ADDED_MS * 1_000_000
    _run(server, ["pw-cli", "set-param", str(node), "ProcessLatency", f"{{ ns = {ns} }}"])
    time.sleep(0.5)
    readback = _run(server, ["pw-cli", "enum-params", str(node), "ProcessLatency"])
    return {
        "pipewire": _run(server, ["pipewire", "--version"]).split("\n")[-2:][0].strip(),
        "mechanism": "pw-cli set-param NODE ProcessLatency '{ ns = N }'",
        "node": node,
        "readback": " ".join(readback.split())[:300],
        "took": str(ns) in readback,
        "after_ms": player.latency_ms(),
    }


def probe(kind: str, base: Path) -> dict[str, Any]:
    make = PulseAudioServer if kind == "pulseaudio" else PipeWireServer
    server: AudioServer = make(kind, base / kind)
    server.start()
    try:
        with pulsectl.Pulse("probe", server=server.server) as pulse:
            pulse.module_load("module-null-sink", f"sink_name={SINK} rate=48000 channels=2")
            version = pulse.server_info().server_version
        player = Player(server)
        # An idle PulseAudio null sink renders 2 s blocks until restarted (the guest does this).
        restart_sink_clock(server.server, SINK)
        try:
            before = player.latency_ms()
            row = _pulseaudio(server, player) if kind == "pulseaudio" else _pipewire(server, player)
        finally:
            player.close()
    finally:
        server.stop()
    row.update(
        server_version=version,
        added_ms=ADDED_MS,
        before_ms=before,
        client_saw_it=row.get("after_ms", before) - before >= ADDED_MS * 0.8,
    )
    return row


def main() -> None:
    missing = [p for p in ("pulseaudio", "pipewire", "pw-cli", "pw-dump") if not shutil.which(p)]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)}")
    out: dict[str, Any] = {
        "benchmark": "can a null sink's latency, as a client sees it, be raised by the server?",
        "machine": machine(),
    }
    with tempfile.TemporaryDirectory(prefix="qvaudio-probe-") as tmp:
        out["pulseaudio"] = probe("pulseaudio", Path(tmp))
        out["pipewire"] = probe("pipewire", Path(tmp))
    out["load_avg_end"] = load_average()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
