"""The guest agent's outbox: bounded audio, control frames never dropped, partial writes."""

from __future__ import annotations

from qvaudio.core.codec import encode
from qvaudio.core.events import Cork, PlaybackData
from qvaudio.guest.outbox import Outbox


class Pipe:
    """A transport that takes at most `room` bytes per write."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.got = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        taken = bytes(data[: self.room])
        self.got += taken
        return len(taken)


def pcm(n: int, fill: int = 1) -> bytes:
    return encode(PlaybackData(bytes([fill]) * n))


def test_everything_goes_out_in_order_across_partial_writes() -> None:
    box = Outbox(max_audio_bytes=10_000)
    frames = [pcm(400, 1), encode(Cork(True)), pcm(400, 2)]
    for frame in frames:
        assert box.put(frame) == 0
    pipe = Pipe(room=150)
    while box:
        box.flush(pipe)
    assert bytes(pipe.got) == b"".join(frames)
    assert box.queued_bytes == 0 and box.audio_bytes == 0


def test_oldest_audio_is_dropped_but_control_frames_and_the_started_frame_are_kept() -> None:
    box = Outbox(max_audio_bytes=1000)
    first, cork = pcm(400, 1), encode(Cork(True))
    box.put(first)
    box.flush(Pipe(room=10))  # the transport has taken part of the first frame
    box.put(cork)
    box.put(pcm(400, 2))
    box.put(pcm(400, 3))
    dropped = box.put(pcm(400, 4))
    assert dropped == 400  # frame 2, the oldest not yet started
    assert box.dropped_audio_bytes == 400
    pipe = Pipe(room=100_000)
    box.flush(pipe)
    assert bytes(pipe.got) == first[10:] + cork + pcm(400, 3) + pcm(400, 4)
