"""Real, private audio servers for tests (a pytest plugin).

Each daemon gets its own runtime dir, home and socket under pytest's tmp
dir, so tests never touch (or depend on) a desktop session's audio server,
and several can run side by side (dom0 tests need a guest and a host).
Both kinds expose the same interface: `.server` ("unix:/path"), `.env`
(for subprocesses such as pactl), `.start()`, `.stop()`, `.kill()`,
`.restart()`, `.alive`, `.log_text()`. Each first comes up with a null
sink "null" (monitor "null.monitor") as the default sink; a restart keeps
the home directory, so PipeWire's session manager restores whatever default
it remembered, as it would on a desktop.

A daemon that does not start fails the test with its log: a missing audio
server is a broken test environment, not a reason to skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pulsectl
import pytest

from tests.waiting import WaitTimeout, wait_until

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
LOG_TAIL_CHARS = 6000
NULL_SINK = "null"


class AudioServer:
    """A private daemon (process group) serving the PulseAudio protocol on a Unix socket."""

    kind = "abstract"

    def __init__(self, name: str, base: Path) -> None:
        self.name = name
        self.base = base
        self.runtime_dir = base / "xdg"
        self.home = base / "home"
        self.socket = base / "native"
        self.server = f"unix:{self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        client_conf = base / "client.conf"
        self.env = {
            "PULSE_SERVER": self.server,
            "PULSE_CLIENTCONFIG": str(client_conf),
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "PULSE_RUNTIME_PATH": str(self.runtime_dir / "pulse"),
            "PIPEWIRE_RUNTIME_DIR": str(self.runtime_dir),
            "HOME": str(self.home),
        }
        base.mkdir(parents=True, exist_ok=True)
        # Clients must never autospawn a daemon of the user's when ours is down.
        client_conf.write_text("autospawn = no\n")

    # -- what subclasses provide --------------------------------------------------

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _log_files(self) -> list[Path]:
        raise NotImplementedError

    def _after_ready(self, pulse: pulsectl.Pulse, first: bool) -> None:
        """Bring the server to the documented initial state (`first`) or back up."""

    # -- lifecycle -------------------------------------------------------------

    def full_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PULSE_", "PIPEWIRE_"))}
        env.pop("DBUS_SESSION_BUS_ADDRESS", None)
        env.update(self.env)
        return env

    def start(self) -> None:
        if self.alive:
            return
        # A restart keeps the user's home, as a real one does: the session
        # manager's remembered default devices live there.
        fresh = (self.runtime_dir, self.home) if self.starts == 0 else (self.runtime_dir,)
        for path in fresh:
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(mode=0o700, parents=True)
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.starts += 1
        self.socket.unlink(missing_ok=True)
        with (self.base / "daemon.log").open("ab") as out:
            out.write(f"\n===== start {time.strftime('%H:%M:%S')} =====\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self._command(),
                cwd=self.base,
                env=self.full_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop/kill reach every child
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        last_error = "never tried"
        ready = False

        def up_or_exited() -> bool:
            """True once the server answers (`ready`) or its process has exited."""
            nonlocal last_error, ready
            if self.proc is not None and self.proc.poll() is not None:
                last_error = f"daemon exited with status {self.proc.returncode}"
                return True
            if self.socket.exists():
                try:
                    with pulsectl.Pulse(f"qvaudio-test-probe-{self.name}", server=self.server) as p:
                        p.server_info()
                        self._after_ready(p, first=self.starts == 1)
                    ready = True
                    return True
                except pulsectl.PulseError as exc:
                    last_error = repr(exc)
            return False

        # On a timeout, fail as below: with the daemon's log, and the daemon killed.
        with contextlib.suppress(WaitTimeout):
            wait_until(
                up_or_exited, f"{self.kind} server {self.name!r}", START_TIMEOUT_S, interval=0.05
            )
        if ready:
            return
        log = self.log_text()
        self.kill()
        pytest.fail(
            f"{self.kind} server {self.name!r} did not come up ({last_error}); log:\n{log}",
            pytrace=False,
        )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT_S)

    def stop(self) -> None:
        """Terminate cleanly (the daemon unloads its modules, clients see a disconnect)."""
        self._signal(signal.SIGTERM)
        self.proc = None

    def kill(self) -> None:
        """Die the way a crashed server does."""
        self._signal(signal.SIGKILL)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def ensure_running(self) -> None:
        """Bring the daemon back if an earlier test stopped or killed it."""
        if not self.alive:
            self.start()

    def log_text(self, limit: int = LOG_TAIL_CHARS) -> str:
        parts = []
        for path in self._log_files():
            if path.exists():
                text = path.read_text("utf-8", "replace")
                parts.append(f"--- {path.name} ---\n{text[-limit:]}")
        return "\n".join(parts) or "(no log)"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.server} alive={self.alive}>"


class PulseAudioServer(AudioServer):
    """PulseAudio 16 as root, no D-Bus, no autospawn, config from our own .pa file."""

    kind = "pulseaudio"

    def _command(self) -> list[str]:
        script = self.base / "default.pa"
        script.write_text(
            f"load-module module-native-protocol-unix auth-anonymous=1 socket={self.socket}\n"
            f"load-module module-null-sink sink_name={NULL_SINK} rate=48000 channels=2\n"
            f"set-default-sink {NULL_SINK}\n"
        )
        # Root is refused only with a warning without --system; -n skips the
        # system default.pa, --use-pid-file=no lets several daemons coexist.
        return [
            "pulseaudio",
            "-n",
            "--daemonize=no",
            "--exit-idle-time=-1",
            "--disallow-exit",
            "--use-pid-file=no",
            "--log-target=stderr",
            # Every block copied over the socket, none shared: PulseAudio 16's
            # shared-memory import (memblock.c) aborted the daemon once here
            # when a client left while the sink still held its blocks.
            "--disable-shm=yes",
            "-F",
            str(script),
        ]

    def _log_files(self) -> list[Path]:
        return [self.base / "daemon.log"]


class PipeWireServer(AudioServer):
    """pipewire + wireplumber + pipewire-pulse on a private D-Bus session bus."""

    kind = "pipewire"

    def _command(self) -> list[str]:
        script = self.base / "run-pipewire.sh"
        pw_socket = self.runtime_dir / "pipewire-0"
        # wireplumber and pipewire-pulse need the pipewire socket; wireplumber
        # is what makes default-device changes work.
        script.write_text(
            "#!/bin/sh\n"
            "pipewire > pipewire.log 2>&1 &\n"
            "i=0\n"
            f'while [ ! -S "{pw_socket}" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done\n'
            "wireplumber > wireplumber.log 2>&1 &\n"
            "pipewire-pulse > pipewire-pulse.log 2>&1 &\n"
            "wait\n"
        )
        return ["dbus-run-session", "--", "sh", str(script)]

    def _wait_ready(self) -> None:
        # pipewire-pulse listens on $PULSE_RUNTIME_PATH/native; a symlink puts
        # it where every AudioServer's socket is.
        real = self.runtime_dir / "pulse" / "native"

        def listening_or_exited() -> bool:
            return real.exists() or (self.proc is not None and self.proc.poll() is not None)

        # Not there in time: the wait below fails with the daemons' logs.
        with contextlib.suppress(WaitTimeout):
            wait_until(
                listening_or_exited, "pipewire-pulse's socket", START_TIMEOUT_S, interval=0.05
            )
        if real.exists() and not self.socket.exists():
            self.socket.symlink_to(real)
        super()._wait_ready()

    def _after_ready(self, pulse: pulsectl.Pulse, first: bool) -> None:
        if not any(s.name == NULL_SINK for s in pulse.sink_list()):
            pulse.module_load(
                "module-null-sink", f"sink_name={NULL_SINK} rate=48000 channels=2 format=s16le"
            )

        # The default moves only once wireplumber is up: wait for it. After a
        # restart wireplumber restores the remembered default by itself, and
        # setting ours again and again would fight a running guest agent that
        # is making its own device the default, as a real session would not.
        def default_chosen() -> bool:
            if first:
                with contextlib.suppress(pulsectl.PulseOperationFailed):
                    pulse.sink_default_set(NULL_SINK)
            default = pulse.server_info().default_sink_name
            return default == NULL_SINK or (not first and _names_a_sink(pulse, default))

        try:
            wait_until(default_chosen, "a default sink", START_TIMEOUT_S, interval=0.1)
        except WaitTimeout:
            # A PulseError: _wait_ready records it and tries again until its own deadline.
            raise pulsectl.PulseError(
                "no default sink was chosen (wireplumber not running?)"
            ) from None

    def _log_files(self) -> list[Path]:
        return [
            self.base / name
            for name in ("daemon.log", "pipewire.log", "wireplumber.log", "pipewire-pulse.log")
        ]


def _names_a_sink(pulse: pulsectl.Pulse, name: str | None) -> bool:
    return bool(name) and any(s.name == name for s in pulse.sink_list())


def _require(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.fail(f"audio test daemons need {', '.join(missing)} (run make deps)", pytrace=False)


def _started(server: AudioServer, registry: list[AudioServer]) -> AudioServer:
    registry.append(server)
    server.start()
    return server


_all_servers: list[AudioServer] = []


@pytest.fixture(scope="session")
def pulse_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PulseAudioServer]:
    """A private PulseAudio 16 daemon for the whole session."""
    _require("pulseaudio")
    server = PulseAudioServer("pulse", tmp_path_factory.mktemp("pa"))
    _started(server, _all_servers)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pipewire_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PipeWireServer]:
    """A private PipeWire (with wireplumber and pipewire-pulse) for the whole session."""
    _require("dbus-run-session", "pipewire", "wireplumber", "pipewire-pulse")
    server = PipeWireServer("pipewire", tmp_path_factory.mktemp("pw"))
    _started(server, _all_servers)
    yield server
    server.stop()


@pytest.fixture(params=["pulseaudio", "pipewire"])
def audio_server(request: pytest.FixtureRequest) -> AudioServer:
    """Each test using this runs once against PulseAudio and once against PipeWire."""
    fixture = "pulse_server" if request.param == "pulseaudio" else "pipewire_server"
    server: AudioServer = request.getfixturevalue(fixture)
    server.ensure_running()
    return server


@pytest.fixture(scope="session")
def make_pulse_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[str], PulseAudioServer]]:
    """Factory for more independent PulseAudio daemons (all stopped at session end)."""
    _require("pulseaudio")
    made: list[AudioServer] = []

    def make(name: str) -> PulseAudioServer:
        server = PulseAudioServer(name, tmp_path_factory.mktemp(f"pa-{name}"))
        _started(server, made)
        _all_servers.append(server)
        return server

    yield make
    for server in made:
        server.stop()


_FIXTURES = {"pulse_server", "pipewire_server", "audio_server", "make_pulse_server"}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the daemons' logs to the report of a failing test that used them."""
    report = yield
    uses_servers = _FIXTURES.intersection(getattr(item, "fixturenames", ()))
    if report.failed and uses_servers:
        for server in _all_servers:
            report.sections.append((f"{server.kind} {server.name} log", server.log_text()))
    return report
