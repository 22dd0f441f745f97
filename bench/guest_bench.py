"""The guest agent's cost and added latency, next to a plain `parec` capture of the same monitor.

    .venv/bin/python -m bench.guest_bench [--server pulseaudio|pipewire] [--seconds 20]

Prints one JSON object. Runs a private audio server (the test fixtures'
daemons), the real `qvaudio-guest` process on a Unix socket, and a dom0
stand-in (`tests.guest_peer.Dom0Peer`) that timestamps every arrival.

* `idle_cpu_percent`: the agent's CPU (utime+stime from /proc) while dom0 is
  connected and nothing plays.
* `playback_cpu_s_per_min`: its CPU seconds per minute of 48 kHz stereo playback.
* start of sound (`start_of_sound`): after at least 6 s of idle (corked, the
  server's own idle suspension included), `pacat` plays a 1 s tone that is
  loud from its first sample. `first_pcm_ms` is from its sink input's
  creation to the arrival at the peer of the chunk holding the tone's first
  loud sample; `lost_ms` is how much of the tone never arrived (1 ms windows
  without sound), so a start cut off shows there. Repeated `--trials` times.
* latency: a click train (a 5 ms burst every 200 ms) is played with `pacat`
  into the sink; each click's send time is the moment `pacat`'s sink input
  started plus the click's position in the file, and its arrival is when the
  first sample of it reached the peer. `parec --latency-msec=10` records the
  same monitor at the same time and pipes raw bytes to the benchmark, timed
  the same way, as the baseline a minimal bridge achieves. The absolute
  figures include the playback client's own buffering before the sink (the
  same for both), so compare the two columns.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from pathlib import Path
from typing import Any

import pulsectl

from qvaudio.core.formats import AudioFormat, SampleFormat
from tests.audio_daemons import AudioServer, PipeWireServer, PulseAudioServer
from tests.guest_peer import Dom0Peer

FMT = AudioFormat(48000, SampleFormat.S16LE, 2)
CLICK_EVERY_S = 0.2
CLICK_MS = 5
CLICKS = 50
SINK = "qvaudio_out"
CLICKER = "qvaudio-bench-clicks"
TONE_APP = "qvaudio-bench-tone"
TONE_S = 1.0
IDLE_BEFORE_TONE_S = 6.0


def raw_args(program: str) -> list[str]:
    return [program, "--raw", "--format=s16le", "--rate=48000", "--channels=2"]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def click_train() -> bytes:
    frames = int(FMT.rate * (CLICK_EVERY_S * CLICKS + 0.5))
    samples = array("h", bytes(frames * FMT.frame_size))
    burst = int(FMT.rate * CLICK_MS / 1000)
    for n in range(CLICKS):
        start = int(FMT.rate * (0.25 + n * CLICK_EVERY_S))
        for i in range(burst):
            value = 20000 if i % 8 < 4 else -20000
            samples[(start + i) * 2] = samples[(start + i) * 2 + 1] = value
    return samples.tobytes()


def click_arrivals(chunks: list[tuple[float, bytes]]) -> list[float]:
    """Arrival time of each click's first loud sample (chunk arrival minus what follows it)."""
    found: list[float] = []
    last = -1.0
    for arrived, pcm in chunks:
        data = array("h", pcm)
        for i in range(0, len(data), 2):
            if abs(data[i]) > 10000:
                frames_after = (len(data) - i) // 2
                t = arrived - frames_after / FMT.rate
                if t - last > CLICK_EVERY_S / 2:
                    found.append(t)
                    last = t
                break
    return found


def sink_input_start(server: AudioServer, app: str, timeout: float = 5.0) -> float:
    """Poll until `app`'s sink input exists; its creation is the clock's zero."""
    deadline = time.monotonic() + timeout
    with pulsectl.Pulse("qvaudio-bench", server=server.server) as pulse:
        while time.monotonic() < deadline:
            if any(si.proplist.get("application.name") == app for si in pulse.sink_input_list()):
                return time.monotonic()
            time.sleep(0.001)
    raise RuntimeError(f"{app} never appeared")


def start_of_sound(
    server: AudioServer, env: dict[str, str], peer: Dom0Peer, raw: Path
) -> dict[str, float]:
    """One tone after a long idle: when its first sample arrived, and how much of it was lost."""
    time.sleep(IDLE_BEFORE_TONE_S)
    offset = peer.pcm_length
    player = subprocess.Popen([*raw_args("pacat"), f"--client-name={TONE_APP}", str(raw)], env=env)
    started = sink_input_start(server, TONE_APP)
    player.wait(30)
    time.sleep(0.5)
    with peer.lock:
        chunks = [(t, o, n) for t, o, n in peer.chunks if o + n > offset]
        received = bytes(peer.pcm)
    first = None
    for arrived, start, length in chunks:
        if any(abs(v) > 1000 for v in array("h", received[max(start, offset) : start + length])):
            first = arrived
            break
    pcm = received[offset:]
    samples = array("h", pcm)
    window = FMT.rate // 1000 * FMT.channels
    sounding = sum(
        1
        for i in range(0, len(samples) - window + 1, window)
        if any(abs(v) > 1000 for v in samples[i : i + window])
    )
    return {
        "first_pcm_ms": round((first - started) * 1000, 1) if first is not None else -1.0,
        "lost_ms": float(max(0, round(TONE_S * 1000) - sounding)),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(kind: str, seconds: float, trials: int) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="qvb-"))
    server: AudioServer = (PulseAudioServer if kind == "pulseaudio" else PipeWireServer)(
        "bench", base / "server"
    )
    server.start()
    env = server.full_env()
    env["XDG_RUNTIME_DIR"] = str(base / "run")
    sock = str(base / "guest.sock")
    agent = subprocess.Popen(
        [sys.executable, "-m", "qvaudio.agent_guest", "--transport", f"unix:{sock}"],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    peer = Dom0Peer(sock)
    try:
        deadline = time.monotonic() + 15
        while peer.playback_format is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(3.0)  # devices, streams, and the first cork settle

        # Idle: connected, nothing plays.
        before, t0 = cpu_seconds(agent.pid), time.monotonic()
        time.sleep(seconds)
        idle = (cpu_seconds(agent.pid) - before) / (time.monotonic() - t0) * 100

        tone_raw = base / "tone.raw"
        tone_raw.write_bytes(
            array("h", [8000, 8000, -8000, -8000] * int(FMT.rate * TONE_S // 2)).tobytes()
        )
        starts = [start_of_sound(server, env, peer, tone_raw) for _ in range(trials)]
        first_ms = [s["first_pcm_ms"] for s in starts]

        # Playback cost: a continuous tone.
        raw = base / "noise.raw"
        tone = array("h", [8000, 8000, -8000, -8000] * (FMT.rate * int(seconds + 2) // 2))
        raw.write_bytes(tone.tobytes())
        before, t0 = cpu_seconds(agent.pid), time.monotonic()
        subprocess.run(
            ["pacat", "--raw", "--format=s16le", "--rate=48000", "--channels=2", str(raw)],
            env=env,
            check=True,
        )
        busy_s = cpu_seconds(agent.pid) - before
        played_s = time.monotonic() - t0
        time.sleep(1.0)

        # Latency: agent vs parec, same clicks.
        parec_chunks: list[tuple[float, bytes]] = []
        parec = subprocess.Popen(
            [*raw_args("parec"), "-d", f"{SINK}.monitor", "--latency-msec=10"],
            env=env,
            stdout=subprocess.PIPE,
        )
        assert parec.stdout is not None
        stdout = parec.stdout

        def read_parec() -> None:
            while data := os.read(stdout.fileno(), 65536):
                parec_chunks.append((time.monotonic(), data))

        reader = threading.Thread(target=read_parec, daemon=True)
        reader.start()
        time.sleep(2.5)  # parec's stream settles
        agent_chunks: list[tuple[float, bytes]] = []
        peer.on_pcm = lambda t, pcm: agent_chunks.append((t, pcm))
        clicks = base / "clicks.raw"
        clicks.write_bytes(click_train())
        player = subprocess.Popen(
            [*raw_args("pacat"), "--latency-msec=20", f"--client-name={CLICKER}", str(clicks)],
            env=env,
        )
        started = sink_input_start(server, CLICKER)
        player.wait(60)
        time.sleep(0.5)
        parec.terminate()
        parec.wait(5)
        reader.join(2)
        sent = [started + 0.25 + n * CLICK_EVERY_S for n in range(CLICKS)]

        def delays(chunks: list[tuple[float, bytes]]) -> dict[str, Any]:
            arrived = click_arrivals(chunks)
            # Pair each click with the first arrival after it was due.
            values = []
            for due in sent:
                later = [t for t in arrived if t >= due - 0.05]
                if later:
                    values.append((later[0] - due) * 1000)
            if not values:
                return {"clicks": 0}
            return {
                "clicks": len(values),
                "median_ms": round(statistics.median(values), 1),
                "p99_ms": round(percentile(values, 0.99), 1),
            }

        agent_delay, parec_delay = delays(agent_chunks), delays(parec_chunks)
        added = None
        if "median_ms" in agent_delay and "median_ms" in parec_delay:
            added = round(agent_delay["median_ms"] - parec_delay["median_ms"], 1)
        return {
            "server": kind,
            "idle_seconds": seconds,
            "idle_cpu_percent": round(idle, 3),
            "start_of_sound": {
                "trials": trials,
                "first_pcm_ms_median": round(statistics.median(first_ms), 1),
                "first_pcm_ms_max": max(first_ms),
                "lost_ms_max": max(s["lost_ms"] for s in starts),
                "each": starts,
            },
            "playback_seconds": round(played_s, 1),
            "playback_cpu_s_per_min": round(busy_s / played_s * 60, 2),
            "playback_cpu_percent": round(busy_s / played_s * 100, 2),
            "latency_agent": agent_delay,
            "latency_parec_baseline": parec_delay,
            "agent_minus_parec_median_ms": added,
        }
    finally:
        peer.close()
        agent.terminate()
        agent.wait(10)
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=["pulseaudio", "pipewire", "both"], default="both")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--trials", type=int, default=5, help="start-of-sound repetitions")
    args = parser.parse_args()
    kinds = ["pulseaudio", "pipewire"] if args.server == "both" else [args.server]
    results = [run(kind, args.seconds, args.trials) for kind in kinds]
    json.dump({"guest_agent": results}, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
