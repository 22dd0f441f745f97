"""How much one VM may get away with in dom0, and what dom0 counts of it. No I/O.

The numbers every `VmSession` enforces (docs/protocol.md has the table), and
the counters `qvaudio status` shows.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """How much a guest may get away with before it is cut off."""

    handshake_timeout: float = 5.0
    #: A frame begun and not finished within this long is a stalled guest.
    partial_frame_timeout: float = 5.0
    control_frames_per_second: float = 50.0
    control_burst: float = 200.0
    #: Audio is read at most this many times real time. Faster than real time
    #: lets a guest's backlog (after a host stall, say) drain; anything beyond is
    #: throttled by not reading, and a guest that gets `flood_grace` seconds of
    #: audio ahead of the clock (5 s at twice real time) is flooding.
    read_rate_factor: float = 2.0
    flood_grace: float = 5.0
    #: A guest whose microphone ring stays full this long is not reading it.
    capture_stall_timeout: float = 5.0
    position_interval: float = 0.25
    idle_position_interval: float = 1.0
    #: The least audio dom0 queues for a VM's host stream. The bound itself
    #: (`VmSession.playback_queue_limit`) is the larger of this and the jitter
    #: reserve + 2 x `trim_margin_ms` + `host_buffer_ms`, which the host takes
    #: in blocks: 80 ms at the defaults, 170 ms with the reserve at its most.
    #: Beyond it the oldest audio is dropped: late audio is worse than a skip,
    #: and memory stays bounded.
    playback_queue_ms: int = 60
    #: The host stream's buffer: audio arriving later than this after the
    #: previous audio played out means the host ran dry (an underrun).
    host_buffer_ms: int = 30
    #: Adaptive jitter buffer: audio held in dom0 on top of the host buffer.
    #: It starts at `jitter_start_ms`, grows by `jitter_step_ms` with every
    #: underrun but a lone one (`jitter_gaps_to_grow`) up to `jitter_max_ms`,
    #: and shrinks by a step after each `jitter_decay_s` without one: a quiet
    #: machine keeps its low latency, a busy one trades some latency for no
    #: crackle. A gap soon after a step down doubles that wait, up to
    #: `jitter_max_decay_s` (JitterReserve).
    jitter_start_ms: int = 10
    jitter_step_ms: int = 10
    jitter_max_ms: int = 100
    jitter_decay_s: float = 120.0
    jitter_max_decay_s: float = 480.0
    #: Underruns this close together are one stall, and grow the reserve once.
    jitter_same_stall_s: float = 0.25
    #: Gaps it takes to grow the reserve, each within the quiet wait of the
    #: one before: a gap alone after a quiet while is forgiven (the delay is
    #: put back where it was), so a VM stalled once in a few minutes does not
    #: move its delay up and, minutes later, down again.
    jitter_gaps_to_grow: int = 2
    #: A backlog this far above the jitter target, kept for `trim_after_s`,
    #: is dropped down to the target (latency recovers after a stall).
    trim_margin_ms: int = 20
    trim_after_s: float = 0.5
    #: Every frame costs dom0 the same fixed work whatever it carries, so frames
    #: are budgeted too, not only bytes. A PCM frame carries at least 1 ms, so
    #: an honest guest sends at most 1000 a second at real time and 2000 while
    #: catching up at the read limit, plus a few control frames. Out of budget,
    #: it is not read; still pushing after `work_grace` seconds, it is cut off.
    frames_per_second: float = 2100.0
    work_grace: float = 1.0
    #: Host streams (re)opened for this VM by what it asks: format changes and
    #: microphone starts. Opening a stream costs the host server real work,
    #: and a storm of them would cost every VM's sound.
    host_opens_per_minute: float = 12.0
    #: Desktop notifications caused by this VM: the user's screen, and the
    #: global notification budget, are shared with every other VM.
    notifications_per_minute: float = 4.0
    #: PCM frames shorter than this are joined before gain and the host stream.
    coalesce_ms: int = 4
    #: After the host server refused to open a stream for this VM's format,
    #: wait this long before trying again (doubling up to `host_retry_max`).
    host_retry_first: float = 5.0
    host_retry_max: float = 60.0


@dataclass(slots=True)
class Counters:
    bytes_received: int = 0
    frames_played: int = 0
    bytes_discarded: int = 0
    capture_bytes_sent: int = 0
    capture_bytes_dropped: int = 0
    #: Audio from the guest that came after the audio before it had played out.
    underruns: int = 0
    #: Times the host stream ran dry while the VM played (what a listener hears).
    host_underruns: int = 0
    #: Of those, the times the VM's audio was waiting in dom0 (dom0 or the host was late).
    host_stalls: int = 0
