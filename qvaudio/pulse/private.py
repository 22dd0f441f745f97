"""A private PulseAudio daemon in a folder of its own (for `qvaudio demo`).

Everything the daemon uses (runtime dir, home, socket) lives under `base`, so
several run side by side and none touches the user's own audio server.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from qvaudio.core.errors import QvaudioError

SINK = "null"
#: prctl(2) option: the signal a process gets when the thread that started it ends.
PR_SET_PDEATHSIG = 1


class PulseUnavailable(QvaudioError, RuntimeError):
    """PulseAudio is not installed or would not start; the message says which."""


def die_with_parent() -> Callable[[], None]:
    """A `preexec_fn` that makes the child get SIGKILL when its parent ends.

    The demo's cleanup runs on a normal exit, an error, SIGTERM and SIGINT;
    this covers the ways it cannot run (SIGKILL, a crash), so no daemon or
    agent outlives the demo. The kernel sends the signal when the *thread*
    that forked the child ends: start children from the main thread.
    """
    # Loaded here, in the parent: between fork and exec only the prctl call runs.
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        # The parent may have ended before prctl: then nobody would signal us.
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def log_tail(path: Path, lines: int = 12, chars: int = 1500) -> str:
    """The end of a log file, for telling a person why something stopped."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc.strerror})"
    kept = [line for line in text[-chars:].splitlines() if line.strip()][-lines:]
    return "\n".join(kept) if kept else "(its log is empty)"


class PrivatePulse:
    def __init__(self, base: Path, name: str) -> None:
        self.base = base / name
        self.name = name
        self.socket = self.base / "native"
        self.server = f"unix:{self.socket}"
        self.log = self.base / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {
            "PULSE_SERVER": self.server,
            "PULSE_CLIENTCONFIG": str(self.base / "client.conf"),
            "XDG_RUNTIME_DIR": str(self.base / "xdg"),
            "PULSE_RUNTIME_PATH": str(self.base / "xdg" / "pulse"),
            "HOME": str(self.base / "home"),
        }

    def full_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PULSE_")}
        env.pop("DBUS_SESSION_BUS_ADDRESS", None)
        env.update(self.env)
        return env

    def start(self, timeout: float = 15.0) -> None:
        binary = shutil.which("pulseaudio")
        if binary is None:
            raise PulseUnavailable(
                "PulseAudio is not installed (Debian/Ubuntu: apt-get install pulseaudio "
                "pulseaudio-utils; Fedora: dnf install pulseaudio pulseaudio-utils)"
            )
        for sub in ("xdg", "home"):
            (self.base / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.base / "client.conf").write_text("autospawn = no\n")
        script = self.base / "default.pa"
        script.write_text(
            f"load-module module-native-protocol-unix auth-anonymous=1 socket={self.socket}\n"
            f"load-module module-null-sink sink_name={SINK} rate=48000 channels=2\n"
            f"set-default-sink {SINK}\n"
        )
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                # --disable-shm: PulseAudio 16's shared-memory import can abort the
                # daemon when a client leaves mid-stream; copying costs nothing here.
                [binary, "-n", "--daemonize=no", "--exit-idle-time=-1", "--disallow-exit",
                 "--use-pid-file=no", "--log-target=stderr", "--disable-shm=yes",
                 "-F", str(script)],
                env=self.full_env(), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent(),
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = log_tail(self.log)
                self.stop()
                raise PulseUnavailable(f"PulseAudio ({self.name}) did not start:\n{tail}")
            time.sleep(0.05)

    def exit_status(self) -> int | None:
        """The daemon's exit status if it has stopped since `start`, else None."""
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
