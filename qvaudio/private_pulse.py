"""A private PulseAudio daemon in a folder of its own (for `qvaudio demo`).

Everything the daemon uses (runtime dir, home, socket) lives under `base`, so
several run side by side and none touches the user's own audio server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

SINK = "null"


class PulseUnavailable(RuntimeError):
    """PulseAudio is not installed or would not start; the message says which."""


class PrivatePulse:
    def __init__(self, base: Path, name: str) -> None:
        self.base = base / name
        self.name = name
        self.socket = self.base / "native"
        self.server = f"unix:{self.socket}"
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
        log = (self.base / "daemon.log").open("wb")
        self.proc = subprocess.Popen(
            # --disable-shm: PulseAudio 16's shared-memory import can abort the
            # daemon when a client leaves mid-stream; copying costs nothing here.
            [binary, "-n", "--daemonize=no", "--exit-idle-time=-1", "--disallow-exit",
             "--use-pid-file=no", "--log-target=stderr", "--disable-shm=yes", "-F", str(script)],
            env=self.full_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.base / "daemon.log").read_text(errors="replace")[-1500:]
                self.stop()
                raise PulseUnavailable(f"PulseAudio ({self.name}) did not start:\n{tail}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
