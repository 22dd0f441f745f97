"""Both real agents between two real PulseAudio daemons, for end-to-end tests.

A VM's PulseAudio, qvaudio-guest in it, qvaudio-dom0 with its host PulseAudio,
a listener on the host sink and, optionally, a player in the VM.
"""

from __future__ import annotations

import array
import json
import math
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qvaudio.core.tone import generate_sine
from qvaudio.pulse.pcm import PcmStream, PulseError
from tests.audio_daemons import NULL_SINK, AudioServer, PulseAudioServer
from tests.dom0_harness import S16, Dom0
from tests.waiting import wait_until

#: A stretch of sound this long means audio flows (not a stray buffer).
FLOWING_S = 0.3


class HostListener:
    """Records dom0's host sink continuously, surviving host server restarts."""

    def __init__(self, host: PulseAudioServer) -> None:
        self.host = host
        self.levels: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        period = S16.bytes_for_ms(10)
        while not self._stop.is_set():
            try:
                with PcmStream.record(
                    self.host.server, f"{NULL_SINK}.monitor", S16, "test", "listen", period
                ) as stream:
                    while not self._stop.is_set():
                        samples = array.array("h", stream.read(period))
                        rms = math.sqrt(sum(x * x for x in samples) / len(samples)) / 32768
                        self.levels.append((time.monotonic(), rms))
            except PulseError:
                time.sleep(0.05)

    def sound_since(self, since: float) -> float | None:
        """When sound (FLOWING_S of it, unbroken) first began after `since`."""
        run_start: float | None = None
        for t, rms in list(self.levels):
            if t < since:
                continue
            if rms > 0.05:
                run_start = t if run_start is None else run_start
                if t - run_start >= FLOWING_S:
                    return run_start
            else:
                run_start = None
        return None

    def wait_flowing(self, since: float, what: str, timeout: float = 10.0) -> float:
        """Seconds from `since` until sound flows; fails after `timeout`."""
        start = wait_until(
            lambda: self.sound_since(since),
            f"sound on dom0's sink after {what}",
            timeout,
            interval=0.05,
        )
        return start - since

    def close(self) -> None:
        self._stop.set()
        self._thread.join(3)


class VmPlayer:
    """An ordinary application in the VM playing a tone, restarted if it dies."""

    def __init__(self, vm: AudioServer, base: Path) -> None:
        self.vm = vm
        self.tone = base / "tone.raw"
        self.tone.write_bytes(generate_sine(440, S16, 30.0, amplitude=0.5))
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.proc = subprocess.Popen(
                ["pacat", "--raw", "--format=s16le", "--rate=48000", "--channels=2",
                 "--latency-msec=20", str(self.tone)],
                env=self.vm.full_env(), stderr=subprocess.DEVNULL,
            )  # fmt: skip
            while self.proc.poll() is None and not self._stop.is_set():
                time.sleep(0.05)
            time.sleep(0.1)

    def close(self) -> None:
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
        self._thread.join(3)


class Guest:
    def __init__(self, vm: AudioServer, base: Path, socket_path: Path) -> None:
        self.vm, self.base, self.socket_path = vm, base, socket_path
        self.runtime = base / "guest-run"
        self.config = base / "guest.yaml"
        self.config.write_text("guest:\n  idle_timeout_s: 0.5\n")
        self.log = base / "guest.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = self.vm.full_env()
        env["XDG_RUNTIME_DIR"] = str(self.runtime)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "qvaudio.agent_guest", "--config", str(self.config),
                 "--transport", f"unix:{self.socket_path}"],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def status(self) -> dict[str, Any]:
        """The guest's status file ({} before it is written)."""
        try:
            return dict(json.loads((self.runtime / "qvaudio" / "guest-status.json").read_text()))
        except (FileNotFoundError, ValueError):
            return {}

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Pipeline:
    def __init__(self, base: Path, vm: AudioServer, host: PulseAudioServer) -> None:
        self.dom0 = Dom0(base, host)
        self.vm, self.host = vm, host
        self.guest = Guest(vm, base, self.dom0.vm_dir / "vm1")
        self.listener = HostListener(host)
        self.player: VmPlayer | None = None
        self.base = base

    def start(self, *, play: bool = True) -> None:
        self.dom0.start()
        self.guest.start()
        self.wait_ready()
        if play:
            self.player = VmPlayer(self.vm, self.base)
            self.listener.wait_flowing(time.monotonic() - 1, "start-up", timeout=20)

    def wait_ready(self, timeout: float = 15.0) -> None:
        """The guest's devices exist and dom0 serves the VM."""
        import pulsectl

        def up() -> bool:
            try:
                with pulsectl.Pulse("test", server=self.vm.server) as pulse:
                    has_mic = any(s.name == "qvaudio_mic" for s in pulse.source_list())
                vm = self.dom0.status()["vms"].get("vm1", {})
                return has_mic and vm.get("state") == "open"
            except (pulsectl.PulseError, OSError):
                return False

        wait_until(up, "the pipeline to come up", timeout, interval=0.1, context=self.logs)

    def logs(self) -> str:
        return (
            f"--- dom0 ---\n{self.dom0.log_text()}\n"
            f"--- guest ---\n{self.guest.log.read_text(errors='replace')[-4000:]}"
        )

    def close(self) -> None:
        if self.player is not None:
            self.player.close()
        self.guest.stop()
        self.listener.close()
        self.dom0.stop()


@pytest.fixture(scope="module")
def vm_server(make_pulse_server: Callable[[str], PulseAudioServer]) -> PulseAudioServer:
    return make_pulse_server("fault-vm")


@pytest.fixture(scope="module")
def host_server(make_pulse_server: Callable[[str], PulseAudioServer]) -> PulseAudioServer:
    return make_pulse_server("fault-host")


def _running(base: Path, vm: AudioServer, host: PulseAudioServer, play: bool) -> Iterator[Pipeline]:
    vm.ensure_running()
    host.ensure_running()
    pipe = Pipeline(base, vm, host)
    try:
        pipe.start(play=play)
        yield pipe
    finally:
        pipe.close()


@pytest.fixture
def idle_pipeline(
    tmp_path: Path, vm_server: PulseAudioServer, host_server: PulseAudioServer
) -> Iterator[Pipeline]:
    """Both agents running, nothing playing yet."""
    yield from _running(tmp_path, vm_server, host_server, play=False)


@pytest.fixture
def pipewire_idle_pipeline(
    tmp_path: Path, pipewire_server: AudioServer, host_server: PulseAudioServer
) -> Iterator[Pipeline]:
    """Both agents running, the VM's audio server PipeWire (the guest's nodes), idle."""
    yield from _running(tmp_path, pipewire_server, host_server, play=False)


@pytest.fixture
def pipeline(
    tmp_path: Path, vm_server: PulseAudioServer, host_server: PulseAudioServer
) -> Iterator[Pipeline]:
    """Both agents running and a tone playing in the VM."""
    yield from _running(tmp_path, vm_server, host_server, play=True)
