"""A scriptable guest for testing the dom0 agent: the protocol's guest end on a
Unix socket, as `qvaudio-guest --transport unix:PATH` would serve it.

It is a stand-in for a guest agent (whose own tests run it against real
audio servers), so that dom0's tests can script exactly what a guest sends,
including what a hostile guest would send (`send_raw`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from qvaudio.core.connection import Connection
from qvaudio.core.events import (
    CaptureData,
    Event,
    FormatOffer,
    Hello,
    PlaybackData,
    ProtocolError,
    RemoteProtocolError,
    Role,
    StreamKind,
)
from qvaudio.core.formats import AudioFormat
from tests.waiting import wait_until

#: One kind of protocol event (`wait_for_event(Goodbye)` returns a Goodbye).
E = TypeVar("E", bound=Event)
T = TypeVar("T")


def lower_priority(nice: int) -> None:
    """Make the calling thread (only it: Linux threads have their own niceness) nicer."""
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


class FakeGuest:
    def __init__(self, path: Path, *, hello: bool = True, nice: int = 0) -> None:
        self.path = path
        self.auto_hello = hello
        #: Scheduling niceness of its thread: another VM's work, which on a real
        #: machine runs on that VM's own virtual CPUs, not dom0's.
        self.nice = nice
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.conn: Connection | None = None
        self.sock: socket.socket | None = None
        self.events: list[tuple[float, Event]] = []
        self.connections = 0
        self.closed_by_peer = threading.Event()
        self.connected = threading.Event()
        self.error: Exception | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    # -- serving ---------------------------------------------------------------------

    def _serve(self) -> None:
        if self.nice:
            lower_priority(self.nice)
        with contextlib.suppress(OSError):  # closed under us by close()
            self._accept_loop()

    def _accept_loop(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                if self.sock is not None:
                    self.sock.close()
                self.sock = sock
                self.conn = Connection(Role.GUEST)
                self.connections += 1
                self.closed_by_peer.clear()
                if self.auto_hello:
                    sock.sendall(self.conn.send(Hello()))
            self.connected.set()
            self._receive(sock)

    def _receive(self, sock: socket.socket) -> None:
        sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            with self._lock:
                if self.conn is None or self.sock is not sock:
                    return
                try:
                    new = self.conn.receive_data(data)
                except RemoteProtocolError as exc:
                    self.error = exc
                    break
                now = time.monotonic()
                self.events.extend((now, e) for e in new)
        self.closed_by_peer.set()
        self.connected.clear()

    # -- scripting -------------------------------------------------------------------

    def send(self, *events: Event) -> None:
        with self._lock:
            assert self.conn is not None and self.sock is not None, "not connected"
            data = b"".join(self.conn.send(e) for e in events)
            sock = self.sock
        sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        with self._lock:
            assert self.sock is not None, "not connected"
            sock = self.sock
        with contextlib.suppress(OSError):
            sock.sendall(data)

    def offer(self, playback: AudioFormat | None, capture: AudioFormat | None = None) -> None:
        if playback is not None:
            self.send(FormatOffer(StreamKind.PLAYBACK, (playback,)))
        if capture is not None:
            self.send(FormatOffer(StreamKind.CAPTURE, (capture,)))

    def mark(self) -> int:
        """A position in the event log: `wait_for_event(..., after=mark)` looks only past it."""
        with self._lock:
            return len(self.events)

    def wait_for_event(
        self,
        kind: type[E],
        predicate: Callable[[E], bool] | None = None,
        timeout: float = 5.0,
        after: int = 0,
    ) -> E:
        """The first `kind` event past `after` (for which `predicate` holds, when given)."""

        def matching(events: list[Event]) -> list[E]:
            of_kind = [e for e in events if isinstance(e, kind)]
            return [e for e in of_kind if predicate is None or predicate(e)]

        what = f"a {kind.__name__}" + ("" if predicate is None else " that matches")
        return self._first(matching, what, timeout, after)

    def wait_for(
        self, predicate: Callable[[Event], bool], timeout: float = 5.0, after: int = 0
    ) -> Event:
        """The first event past `after` for which `predicate` holds (of any kind)."""

        def matching(events: list[Event]) -> list[Event]:
            return [e for e in events if predicate(e)]

        return self._first(matching, "a matching event", timeout, after)

    def _first(
        self, matching: Callable[[list[Event]], list[T]], what: str, timeout: float, after: int
    ) -> T:
        seen = after

        def new_matches() -> list[T]:
            nonlocal seen
            with self._lock:
                found = matching([e for _, e in self.events[seen:]])
                seen = len(self.events)
            return found

        def kinds() -> str:
            with self._lock:
                return f"saw {sorted({type(e).__name__ for _, e in self.events})}"

        matches = wait_until(
            new_matches, f"{self.path.name}: {what}", timeout, interval=0.01, context=kinds
        )
        return matches[0]

    def received(self, kind: type[E]) -> list[tuple[float, E]]:
        with self._lock:
            return [(t, e) for t, e in self.events if isinstance(e, kind)]

    def capture_pcm(self) -> bytes:
        return b"".join(e.pcm for _, e in self.received(CaptureData))

    def stream_pcm(
        self, pcm: bytes, fmt: AudioFormat, period_ms: int = 10, lead_ms: int = 0
    ) -> threading.Thread:
        """Send `pcm` in real time, one period at a time, from a thread;
        `lead_ms` of it at once first, as a guest with audio buffered would."""
        step = fmt.bytes_for_ms(period_ms)
        lead_s = lead_ms / 1000

        def pace() -> None:
            start = time.monotonic() - lead_s
            for i, offset in enumerate(range(0, len(pcm), step)):
                delay = start + i * period_ms / 1000 - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                try:
                    self.send(PlaybackData(pcm[offset : offset + step]))
                except (OSError, AssertionError, ProtocolError):
                    return  # disconnected, or playback was refused

        thread = threading.Thread(target=pace, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            if self.sock is not None:
                with contextlib.suppress(OSError):
                    self.sock.close()
            self.sock = None
        self.listener.close()
        self._thread.join(timeout=2)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
