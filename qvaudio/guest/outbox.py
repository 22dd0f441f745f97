"""Frames waiting for the transport, with a bound on how much audio may wait.

When dom0 reads slower than the VM plays (a stalled vchan, a busy dom0),
queuing everything would turn into ever-growing latency. Beyond
`max_audio_bytes` of queued PCM the oldest PCM frames are dropped (counted,
and logged once per backlog); control frames are never dropped, and a frame
the transport has started to take is always finished.
"""

from __future__ import annotations

import collections
import logging
from typing import Protocol

from qvaudio.core.events import HEADER_SIZE, FrameType

log = logging.getLogger(__name__)


class Writable(Protocol):
    def write(self, data: bytes | bytearray | memoryview) -> int: ...


class Outbox:
    def __init__(self, max_audio_bytes: int) -> None:
        self.max_audio_bytes = max_audio_bytes
        #: (frame, PCM bytes in it; 0 for control frames)
        self._frames: collections.deque[tuple[bytes, int]] = collections.deque()
        self._head: memoryview | None = None
        self.queued_bytes = 0
        self.audio_bytes = 0
        self.dropped_audio_bytes = 0
        self._dropping = False

    def __bool__(self) -> bool:
        return self._head is not None or bool(self._frames)

    def put(self, frame: bytes) -> int:
        """Queue one encoded frame; returns how many PCM bytes were dropped to make room."""
        pcm = len(frame) - HEADER_SIZE if frame[0] == FrameType.PLAYBACK_PCM else 0
        self._frames.append((frame, pcm))
        self.queued_bytes += len(frame)
        self.audio_bytes += pcm
        if self.audio_bytes <= self.max_audio_bytes:
            return 0
        return self._drop_oldest_audio()

    def _drop_oldest_audio(self) -> int:
        dropped = 0
        kept: collections.deque[tuple[bytes, int]] = collections.deque()
        for frame, pcm in self._frames:
            if pcm and self.audio_bytes > self.max_audio_bytes:
                self.audio_bytes -= pcm
                self.queued_bytes -= len(frame)
                dropped += pcm
            else:
                kept.append((frame, pcm))
        self._frames = kept
        if dropped and not self._dropping:
            log.warning(
                "dom0 does not keep up: dropping the oldest audio (more than %d bytes waiting)",
                self.max_audio_bytes,
            )
        self._dropping = self._dropping or dropped > 0
        self.dropped_audio_bytes += dropped
        return dropped

    def flush(self, stream: Writable) -> None:
        """Write as much as the transport takes now (raises what `stream.write` raises)."""
        while True:
            if self._head is None:
                if not self._frames:
                    self._dropping = False  # caught up: a later backlog is news again
                    return
                frame, pcm = self._frames.popleft()
                self.audio_bytes -= pcm
                self._head = memoryview(frame)
            written = stream.write(self._head)
            self.queued_bytes -= written
            if written < len(self._head):
                self._head = self._head[written:]
                return
            self._head = None

    def clear(self) -> None:
        self._frames.clear()
        self._head = None
        self.queued_bytes = self.audio_bytes = 0
        self._dropping = False
