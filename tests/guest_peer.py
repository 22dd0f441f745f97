"""A small dom0 stand-in for testing and benchmarking the guest agent.

It connects to the agent's Unix socket (the guest always listens), speaks
the real protocol through `Connection(Role.DOM0)`, accepts the agent's first
offered formats, reports its position twice a second (which is also how the
agent knows dom0 is alive), and records everything that arrives with the
time it arrived.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from qvaudio.core.connection import Connection
from qvaudio.core.events import (
    CaptureData,
    CaptureState,
    Event,
    FormatAccept,
    FormatOffer,
    Hello,
    PlaybackData,
    Position,
    Role,
    StreamKind,
    StreamStatus,
)
from qvaudio.core.formats import AudioFormat
from tests.waiting import wait_until

POSITION_EVERY_S = 0.5
CONNECT_TIMEOUT_S = 15.0

#: One kind of protocol event (`events_of(Cork)` holds Corks).
E = TypeVar("E", bound=Event)


@dataclass(frozen=True, slots=True)
class Arrival(Generic[E]):
    time: float
    event: E


class Dom0Peer:
    def __init__(self, socket_path: str) -> None:
        self.conn = Connection(Role.DOM0)
        self.sock = self._connect(socket_path)
        self.lock = threading.Lock()
        self.events: list[Arrival[Event]] = []
        self.pcm = bytearray()
        #: (arrival time, offset in `pcm` of the chunk's first byte, chunk length)
        self.chunks: list[tuple[float, int, int]] = []
        self.playback_format: AudioFormat | None = None
        self.capture_format: AudioFormat | None = None
        self.received_frames = 0
        #: What each POSITION says dom0's queue and host stream hold; a test may change it.
        self.playback_latency_us = 20_000
        #: What each POSITION says the host's microphone audio had waited when sent.
        self.capture_latency_us = 0
        self.closed = threading.Event()
        self.on_pcm: Callable[[float, bytes], None] | None = None
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._send(Hello())
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()
        self._ticker = threading.Thread(target=self._position_loop, daemon=True)
        self._ticker.start()

    @staticmethod
    def _connect(path: str) -> socket.socket:
        last_error: OSError | None = None

        def attempt() -> socket.socket | None:
            nonlocal last_error
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                last_error = exc
                return None

        return wait_until(
            attempt,
            f"the agent to accept a connection on {path}",
            CONNECT_TIMEOUT_S,
            interval=0.05,
            context=lambda: f"last error: {last_error!r}",
        )

    # -- sending ---------------------------------------------------------------------

    def _send(self, event: Event) -> None:
        with self._send_lock:
            data = self.conn.send(event)
            self.sock.sendall(data)

    def set_capture(self, status: StreamStatus, reason: str = "") -> None:
        self._send(CaptureState(status, reason))

    def send_mic(self, pcm: bytes, period_ms: int = 10, paced: bool = True) -> threading.Thread:
        """Send microphone PCM paced like a real microphone (or all at once), on a thread."""
        fmt = self.capture_format
        assert fmt is not None, "no capture format agreed"
        step = fmt.bytes_for_ms(period_ms)

        def pace() -> None:
            start = time.monotonic()
            for i, pos in enumerate(range(0, len(pcm), step)):
                if self._stop.is_set() or self.closed.is_set():
                    return
                delay = start + i * period_ms / 1000 - time.monotonic()
                if paced and delay > 0:
                    time.sleep(delay)
                self._send(CaptureData(pcm[pos : pos + step]))

        thread = threading.Thread(target=pace, daemon=True)
        thread.start()
        return thread

    # -- receiving -------------------------------------------------------------------

    def _read_loop(self) -> None:
        try:
            while not self._stop.is_set():
                data = self.sock.recv(65536)
                if not data:
                    break
                now = time.monotonic()
                for event in self.conn.receive_data(data):
                    self._handle(event, now)
        except OSError:
            pass
        finally:
            self.closed.set()

    def _handle(self, event: Event, now: float) -> None:
        if isinstance(event, FormatOffer):
            offered = event.formats[0]
            if event.stream is StreamKind.PLAYBACK:
                self.playback_format = offered
            else:
                self.capture_format = offered
            self._send(FormatAccept(event.stream, offered))
        if isinstance(event, PlaybackData):
            fmt = self.playback_format
            assert fmt is not None
            with self.lock:
                self.chunks.append((now, len(self.pcm), len(event.pcm)))
                self.pcm += event.pcm
                self.received_frames += len(event.pcm) // fmt.frame_size
            if self.on_pcm is not None:
                self.on_pcm(now, event.pcm)
            return
        with self.lock:
            self.events.append(Arrival(now, event))

    def _position_loop(self) -> None:
        while not self._stop.wait(POSITION_EVERY_S):
            if self.closed.is_set():
                return
            try:
                with self.lock:
                    frames = self.received_frames
                self._send(
                    Position(frames, frames, self.playback_latency_us, self.capture_latency_us)
                )
            except OSError:
                return

    # -- queries ---------------------------------------------------------------------

    def events_of(self, kind: type[E]) -> list[Arrival[E]]:
        with self.lock:
            return [Arrival(a.time, a.event) for a in self.events if isinstance(a.event, kind)]

    def pcm_since(self, offset: int) -> bytes:
        with self.lock:
            return bytes(self.pcm[offset:])

    @property
    def pcm_length(self) -> int:
        with self.lock:
            return len(self.pcm)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(2)
        self._ticker.join(2)
