"""dom0's per-VM enforcement, driven byte by byte with no I/O."""

from __future__ import annotations

import array
import logging
from pathlib import Path
from typing import TypeVar

import pytest

from qvaudio.core.actions import Log, Notify, Send
from qvaudio.core.codec import encode, encode_pcm
from qvaudio.core.connection import Connection
from qvaudio.core.dom0_actions import (
    Action,
    Disconnect,
    Play,
    StartCapture,
    StartPlayback,
    StopCapture,
    StopPlayback,
)
from qvaudio.core.dom0_backoff import Backoff
from qvaudio.core.dom0_grants import MicGrants
from qvaudio.core.dom0_limits import Limits
from qvaudio.core.dom0_session import VmSession
from qvaudio.core.events import (
    CaptureData,
    CaptureRequest,
    CaptureState,
    Cork,
    Event,
    FormatAccept,
    FormatOffer,
    FormatRefuse,
    Goodbye,
    GoodbyeCode,
    Hello,
    PlaybackData,
    PlaybackState,
    Position,
    Role,
    StreamKind,
    StreamStatus,
)
from qvaudio.core.formats import AudioFormat, SampleFormat
from qvaudio.core.gain import peak
from qvaudio.core.policy import Policy, VmIdentity
from qvaudio.core.policy_parser import parse_policy_text

S16 = AudioFormat(48000, SampleFormat.S16LE, 2)
F32 = AudioFormat(48000, SampleFormat.F32LE, 2)
WORK = VmIdentity("work")

A = TypeVar("A", bound=Action)
E = TypeVar("E", bound=Event)


def policy(text: str) -> Policy:
    return Policy(parse_policy_text(text.encode(), "test.yaml"), ("test.yaml",))


ALLOW_ALL = policy("rules:\n- vm: '*'\n  playback: allow\n  capture: allow\n")
CAPPED = policy("rules:\n- vm: work\n  playback: allow\n  volume: {default: 20, max: 50}\n")
DENY_ALL = policy("rules:\n- vm: '*'\n  playback: deny\n  capture: deny\n")
ON_REQUEST = policy("rules:\n- vm: work\n  playback: allow\n  capture: attach-on-request\n")
S16_ONLY = policy(
    "rules:\n- vm: '*'\n  playback: allow\n  formats: {sample_formats: [s16le], max_channels: 2}\n"
)


class Harness:
    """A VmSession wired to a real guest-side Connection."""

    def __init__(self, pol: Policy, *, vm: VmIdentity = WORK, **kwargs: object) -> None:
        self.now = 100.0
        self.session = VmSession(vm, pol, self.now, **kwargs)  # type: ignore[arg-type]
        self.guest = Connection(Role.GUEST)
        self.actions: list[Action] = []
        self.received: list[Event] = []
        self.run(self.session.start(self.now))

    def run(self, actions: list[Action]) -> list[Action]:
        self.actions += actions
        for action in actions:
            if isinstance(action, Send):
                self.received += self.guest.receive_data(action.data)
        return actions

    def send(self, *events: Event) -> list[Action]:
        return self.run(
            self.session.receive(b"".join(self.guest.send(e) for e in events), self.now)
        )

    def raw(self, data: bytes) -> list[Action]:
        return self.run(self.session.receive(data, self.now))

    def handshake(self) -> None:
        self.send(Hello())

    def negotiate(self, playback: AudioFormat = S16, capture: AudioFormat | None = S16) -> None:
        self.handshake()
        self.send(FormatOffer(StreamKind.PLAYBACK, (playback,)))
        if capture is not None:
            self.send(FormatOffer(StreamKind.CAPTURE, (capture,)))

    def of(self, kind: type[A]) -> list[A]:
        return [a for a in self.actions if isinstance(a, kind)]

    def last_received(self, kind: type[E]) -> E:
        """The last event the guest received, which is a `kind`."""
        event = self.received[-1]
        assert isinstance(event, kind), event
        return event


def tone(fmt: AudioFormat, amplitude: int = 20000, frames: int = 480) -> bytes:
    return array.array("h", [amplitude, -amplitude] * frames * (fmt.channels // 2)).tobytes()


def test_allowed_playback_reaches_the_host_stream() -> None:
    h = Harness(ALLOW_ALL)
    h.negotiate()
    assert FormatAccept(StreamKind.PLAYBACK, S16) in h.received
    assert h.of(StartPlayback) == [StartPlayback(S16, 1.0)]
    pcm = tone(S16)
    played = h.send(PlaybackData(pcm))
    assert played == [Play(pcm, after_idle=True)], "the first audio follows silence"
    assert h.send(PlaybackData(pcm)) == [Play(pcm, after_idle=False)]
    assert h.session.counters.bytes_received == 2 * len(pcm)
    h.send(Cork(True))
    h.now += 5.0
    assert h.send(Cork(False), PlaybackData(pcm))[-1] == Play(pcm, after_idle=True)


def test_volume_cap_is_applied_to_the_samples() -> None:
    h = Harness(CAPPED)
    h.negotiate(capture=None)
    (start,) = h.of(StartPlayback)
    assert start.format == S16
    # Both are the mixer's percent (default 20, max 50): the samples are scaled
    # as the mixer's 50 % would, 0.5 ** 3, and the stream starts at 20/50 of
    # its own range, so it sounds like the mixer's 20 %.
    assert start.initial_volume == pytest.approx(0.4)
    (play,) = h.send(PlaybackData(tone(S16, amplitude=32767)))
    assert isinstance(play, Play)
    assert peak(play.pcm, S16) == pytest.approx(0.125, abs=0.001)


def test_float_pcm_is_sanitised_even_uncapped() -> None:
    h = Harness(ALLOW_ALL)
    h.negotiate(playback=F32, capture=None)
    hostile = array.array("f", [float("nan"), float("inf"), -1e30, 0.25]).tobytes()
    # Two audio frames: a short frame, so it must end the sound (and is played then).
    (play,) = [a for a in h.send(PlaybackData(hostile), Cork(True)) if isinstance(a, Play)]
    assert list(array.array("f", play.pcm)) == [0.0, 1.0, -1.0, 0.25]


def test_denied_playback_is_refused_and_never_played() -> None:
    h = Harness(DENY_ALL)
    h.negotiate(capture=None)
    refusal = [e for e in h.received if isinstance(e, FormatRefuse)]
    assert refusal and "playback deny by test.yaml:2" in refusal[0].reason
    assert h.of(StartPlayback) == [] and h.of(Play) == []
    warnings = [a for a in h.of(Log) if isinstance(a, Log) and a.level == logging.WARNING]
    assert len(warnings) == 1
    # Re-offering in a loop does not flood the log.
    for _ in range(5):
        h.send(FormatOffer(StreamKind.PLAYBACK, (S16,)))
    assert len([a for a in h.of(Log) if isinstance(a, Log) and a.level == logging.WARNING]) == 1


def test_format_outside_policy_is_refused_with_reason() -> None:
    h = Harness(S16_ONLY)
    h.handshake()
    h.send(FormatOffer(StreamKind.PLAYBACK, (F32, AudioFormat(48000, SampleFormat.S16LE, 6))))
    (refusal,) = [e for e in h.received if isinstance(e, FormatRefuse)]
    assert "sample format f32le not allowed" in refusal.reason
    assert "channels" in refusal.reason


def test_live_policy_change_stops_and_resumes_playback() -> None:
    h = Harness(ALLOW_ALL)
    h.negotiate(capture=None)
    in_flight = h.guest.send(PlaybackData(tone(S16)))
    h.run(h.session.update_policy(DENY_ALL, h.now))
    assert h.of(StopPlayback)
    assert PlaybackState(StreamStatus.DENIED, "playback deny by test.yaml:2") in h.received
    # Audio already in flight is read and discarded, not played.
    assert h.raw(in_flight) == []
    assert h.session.counters.bytes_discarded == len(tone(S16))
    h.run(h.session.update_policy(ALLOW_ALL, h.now))
    assert PlaybackState(StreamStatus.RUNNING) in h.received
    assert len(h.of(StartPlayback)) == 2


def test_audio_discarded_still_counts_as_received_in_position_reports() -> None:
    """The guest counts what it sent minus `received_frames` as in flight: audio
    dom0 read and discarded must not stay "in flight" for ever (seen: every
    figure the guest published afterwards was ~10 ms too large)."""
    h = Harness(ALLOW_ALL)
    h.negotiate(capture=None)
    in_flight = h.guest.send(PlaybackData(tone(S16)))
    h.run(h.session.update_policy(DENY_ALL, h.now))
    h.raw(in_flight)
    h.run(h.session.update_policy(ALLOW_ALL, h.now))
    h.send(PlaybackData(tone(S16)))
    h.run(h.session.tick(h.now + 5))
    positions = [event for event in h.received if isinstance(event, Position)]
    assert positions[-1].received_frames == 2 * len(tone(S16)) // S16.frame_size


def test_capture_allowed_runs_and_stops_on_request() -> None:
    h = Harness(ALLOW_ALL)
    h.negotiate()
    h.send(CaptureRequest(True))
    assert h.of(StartCapture) == [StartCapture(S16)]
    assert CaptureState(StreamStatus.RUNNING) in h.received
    assert any(isinstance(a, Notify) and "is recording" in a.summary for a in h.actions)
    mic = tone(S16)
    h.run(h.session.capture_pcm(mic, room=1 << 20, now=h.now))
    assert CaptureData(mic) in h.received
    h.send(CaptureRequest(False))
    assert h.of(StopCapture)
    assert h.received[-1] == CaptureState(StreamStatus.STOPPED, "the VM stopped recording")


def test_capture_denied_is_refused_logged_and_notified() -> None:
    h = Harness(DENY_ALL)
    h.negotiate()
    h.send(CaptureRequest(True))
    assert h.of(StartCapture) == []
    assert isinstance(h.received[-1], CaptureState)
    assert h.received[-1].status is StreamStatus.DENIED
    assert any(isinstance(a, Notify) and "refused" in a.summary for a in h.actions)
    assert h.run(h.session.capture_pcm(tone(S16), room=1 << 20, now=h.now)) == []


def test_attach_on_request_waits_for_the_user_and_detach_revokes() -> None:
    h = Harness(ON_REQUEST)
    h.negotiate()
    h.send(CaptureRequest(True))
    assert h.received[-1] == CaptureState(
        StreamStatus.DENIED, "microphone not attached (run: qvaudio mic attach work)"
    )
    h.run(h.session.set_mic_attached(True, h.now))
    assert h.of(StartCapture) == [StartCapture(S16)]
    assert h.received[-1] == CaptureState(StreamStatus.RUNNING)
    h.run(h.session.set_mic_attached(False, h.now))
    assert h.of(StopCapture)
    assert h.last_received(CaptureState).status is StreamStatus.DENIED
    # No later sample reaches the guest.
    assert h.run(h.session.capture_pcm(tone(S16), room=1 << 20, now=h.now)) == []


def test_policy_revocation_stops_capture_at_once() -> None:
    h = Harness(ALLOW_ALL)
    h.negotiate()
    h.send(CaptureRequest(True))
    h.run(h.session.update_policy(DENY_ALL, h.now))
    assert h.of(StopCapture)
    assert h.last_received(CaptureState).status is StreamStatus.DENIED
    assert h.run(h.session.capture_pcm(tone(S16), room=1 << 20, now=h.now)) == []


def assert_cut_off(h: Harness, code: GoodbyeCode, fragment: str) -> None:
    (disconnect,) = h.of(Disconnect)
    assert isinstance(disconnect, Disconnect)
    assert disconnect.code is code and fragment in disconnect.reason
    goodbye = h.received[-1]
    assert isinstance(goodbye, Goodbye) and goodbye.code is code
    assert h.session.closed
    assert h.run(h.session.receive(b"anything", h.now)) == []


@pytest.mark.parametrize(
    ("garbage", "fragment"),
    [
        (b"\x7f\x00\x00\x00", "unknown frame type"),
        (encode(Hello()) + encode(PlaybackData(b"\0\0\0\0")), "before a format"),
        (encode(Hello()) + b"\x20\x00\xff\xff", "exceeds"),
        (encode(Cork(True)), "before hello"),
    ],
)
def test_protocol_violations_cut_the_guest_off(garbage: bytes, fragment: str) -> None:
    h = Harness(ALLOW_ALL)
    h.raw(garbage)
    assert_cut_off(h, GoodbyeCode.PROTOCOL_ERROR, fragment)


def test_silent_guest_is_cut_off_after_the_handshake_timeout() -> None:
    h = Harness(ALLOW_ALL)
    assert h.run(h.session.tick(h.now + 4.9)) == []
    h.run(h.session.tick(h.now + 5.1))
    assert_cut_off(h, GoodbyeCode.TIMEOUT, "no hello")


def test_dribbling_guest_is_cut_off() -> None:
    h = Harness(ALLOW_ALL)
    h.negotiate()
    h.raw(encode(PlaybackData(tone(S16)))[:10])
    h.run(h.session.tick(h.now + 6))
    assert_cut_off(h, GoodbyeCode.TIMEOUT, "incomplete")


def test_partial_frames_at_read_boundaries_are_not_a_stall() -> None:
    h = Harness(ALLOW_ALL)
    h.negotiate(capture=None)
    wire = b"".join(encode(PlaybackData(tone(S16))) for _ in range(40))
    for i in range(0, len(wire), 1000):  # every read ends mid-frame
        h.now += 0.5
        h.raw(wire[i : i + 1000])
        h.run(h.session.tick(h.now))
    assert not h.session.closed


def test_control_frame_flood_is_cut_off() -> None:
    h = Harness(ALLOW_ALL)
    h.handshake()
    h.raw(encode(Cork(True)) * 500)
    assert_cut_off(h, GoodbyeCode.RATE_EXCEEDED, "control frames per second")


def test_audio_is_read_at_most_twice_real_time_and_a_flood_is_cut_off() -> None:
    h = Harness(ALLOW_ALL)
    h.negotiate(capture=None)
    burst = h.session.read_budget(h.now, queued_bytes=0)
    assert burst == S16.bytes_per_second * 2 // 5  # 200 ms of tokens at 2x real time
    h.send(*[PlaybackData(tone(S16, frames=4800)) for _ in range(4)])  # 400 ms at once
    assert h.session.read_budget(h.now, queued_bytes=0) == 0, "out of tokens: throttled"
    refilled = h.session.read_budget(h.now + 0.1, queued_bytes=0)
    assert refilled == pytest.approx(S16.bytes_per_second * 2 // 10, abs=2)
    # Read at twice real time, the guest gains almost a second on the clock
    # every second: after 4 s it is 4.2 s ahead (with its first 400 ms), and
    # at 5 s of audio ahead it is cut off.
    start = h.now
    for step in range(1, 41):
        h.now = start + step * 0.1
        read_at_the_limit(h)
    assert not h.session.closed
    for step in range(41, 61):
        h.now = start + step * 0.1
        read_at_the_limit(h)
        if h.session.closed:
            break
    assert 4.5 < h.now - start < 5.5
    assert_cut_off(h, GoodbyeCode.RATE_EXCEEDED, "faster than real time")


def read_at_the_limit(h: Harness) -> None:
    """What the shell does with a guest that always has more: read all it may."""
    budget = h.session.read_budget(h.now, queued_bytes=0)
    frames = budget // S16.frame_size
    if frames >= S16.min_pcm_bytes // S16.frame_size:
        h.raw(b"".join(encode_pcm(StreamKind.PLAYBACK, bytes(frames * 4), S16.frame_size)))


def test_a_guest_at_real_time_with_more_waiting_or_a_fast_clock_is_no_flood() -> None:
    """A dom0 too busy to read all at once (many VMs), or a VM clock 1000 ppm
    fast for ten minutes, blames no guest: only audio far ahead of the clock does."""
    h = Harness(ALLOW_ALL)
    h.negotiate(capture=None)
    ten_ms = encode(PlaybackData(tone(S16, frames=480)))
    for _ in range(60_000):  # ten minutes of 10 ms periods, 1 ms a second early
        h.now += 0.01 * (1 - 0.001)
        h.raw(ten_ms)
        h.run(h.session.note_backlog(h.now, guest_has_more=True))
    assert not h.session.closed


def test_a_flood_is_cut_off_even_while_no_host_stream_plays() -> None:
    """dom0 reads at twice real time whether or not the host plays (what it
    cannot play is dropped), so a backlog is the guest's doing either way. A
    guest flooding while its host stream could not open was never cut off."""
    h = Harness(ALLOW_ALL)
    h.negotiate(capture=None)
    h.run(h.session.host_playback_failed("Invalid argument", h.now))
    assert not h.session.playback_active
    start = h.now
    for step in range(1, 80):
        h.now = start + step * 0.1
        read_at_the_limit(h)  # discarded, but read, and more keeps coming
        if h.session.closed:
            break
    assert_cut_off(h, GoodbyeCode.RATE_EXCEEDED, "faster than real time")


def test_guest_not_reading_the_microphone_loses_audio_then_is_cut_off() -> None:
    h = Harness(ALLOW_ALL)
    h.negotiate()
    h.send(CaptureRequest(True))
    assert h.run(h.session.capture_pcm(tone(S16), room=0, now=h.now)) == []
    assert h.session.counters.capture_bytes_dropped == len(tone(S16))
    h.run(h.session.capture_pcm(tone(S16), room=0, now=h.now + 6))
    assert_cut_off(h, GoodbyeCode.TIMEOUT, "microphone")


def test_position_reports_follow_the_host() -> None:
    h = Harness(ALLOW_ALL)
    h.negotiate(capture=None)
    h.send(PlaybackData(tone(S16)))
    h.session.host_status(played_frames=240, playback_latency_us=15000, capture_latency_us=0)
    h.run(h.session.tick(h.now + 0.3))
    assert h.received[-1] == Position(480, 240, 15000, 0)
    assert h.session.counters.frames_played == 240
    assert h.run(h.session.tick(h.now + 0.4)) == []  # not yet due again


def test_position_reports_carry_the_microphone_latency_without_playback() -> None:
    """Found by bench/capture_bench.py: a VM that only records was told 0."""
    h = Harness(ALLOW_ALL)
    h.negotiate()
    h.send(CaptureRequest(True))
    h.session.host_capture_status(12000)
    h.run(h.session.tick(h.now + 5))
    positions = [event for event in h.received if isinstance(event, Position)]
    assert positions and positions[-1].capture_latency_us == 12000


def test_guest_goodbye_closes_without_reply() -> None:
    h = Harness(ALLOW_ALL)
    h.negotiate()
    sent_before = len(h.of(Send))
    h.send(Goodbye(GoodbyeCode.SHUTDOWN, "vm shutting down"))
    assert h.of(StopPlayback)
    assert h.of(Disconnect)
    assert len(h.of(Send)) == sent_before
    assert h.session.closed


def test_identity_comes_from_the_shell_only() -> None:
    # There is no protocol field for a VM name: a guest "claiming" another VM
    # can only put the name in free text, which changes no decision.
    h = Harness(CAPPED, vm=VmIdentity("untrusted"))
    h.handshake()
    h.send(Goodbye(GoodbyeCode.NORMAL, "I am work"))
    h2 = Harness(CAPPED, vm=VmIdentity("untrusted"))
    h2.negotiate(capture=None)
    assert any(isinstance(e, FormatRefuse) for e in h2.received)
    assert h2.session.status()["playback"] == {
        "decision": "deny",
        "rule": "playback deny: no rule for 'untrusted' sets it",
        "active": False,
        "format": None,
        "volume_default": 100,
        "volume_max": 100,
        "host_refused": None,
        "jitter_buffer_ms": 10,
        "jitter_decay_s": 120.0,
        "corked": False,
        "latency_us": 0,
    }


@pytest.mark.parametrize(
    ("host_ms", "reserve_ms", "bound_ms"),
    # docs/xen.md: reserve + 40 ms + the host stream's latency, at least 60 ms.
    [(60, 10, 110), (60, 100, 200), (30, 10, 80), (5, 0, 60)],
)
def test_playback_queue_bound_is_the_one_docs_state(
    host_ms: int, reserve_ms: int, bound_ms: int
) -> None:
    h = Harness(ALLOW_ALL, limits=Limits(host_buffer_ms=host_ms, jitter_start_ms=reserve_ms))
    h.negotiate(capture=None)
    h.session.jitter_ms = reserve_ms
    assert h.session.playback_queue_limit() == S16.bytes_for_ms(bound_ms)
    xen_md = " ".join((Path(__file__).parent.parent / "docs" / "xen.md").read_text().split())
    assert "That is 110 ms with `--latency-ms 60` (200 ms with the reserve at its most)" in xen_md


def test_limits_are_configurable() -> None:
    h = Harness(ALLOW_ALL, limits=Limits(handshake_timeout=1.0))
    h.run(h.session.tick(h.now + 1.5))
    assert_cut_off(h, GoodbyeCode.TIMEOUT, "no hello within 1 s")


def test_backoff_reconnects_healthy_guests_at_once() -> None:
    backoff = Backoff()
    backoff.ended(100.0, lasted=60.0, code=None)
    assert backoff.next_attempt == pytest.approx(100.1) and not backoff.misbehaved
    backoff.failed(101.0)
    backoff.failed(101.5)
    assert backoff.next_attempt == pytest.approx(102.0)  # 0.25 then 0.5 s


def test_backoff_after_a_cut_off_grows() -> None:
    backoff = Backoff()
    backoff.ended(100.0, lasted=3.0, code=GoodbyeCode.PROTOCOL_ERROR)
    assert backoff.misbehaved and backoff.next_attempt == 105.0
    backoff.ended(106.0, lasted=3.0, code=GoodbyeCode.RATE_EXCEEDED)
    assert backoff.next_attempt == 116.0
    for _ in range(10):
        backoff.ended(200.0, lasted=3.0, code=GoodbyeCode.PROTOCOL_ERROR)
    assert backoff.next_attempt == 260.0
    # Only a healthy session forgives; one that merely worked does not.
    backoff.connected()
    backoff.ended(300.0, lasted=3.0, code=GoodbyeCode.PROTOCOL_ERROR)
    assert backoff.next_attempt == 360.0
    backoff.ended(400.0, lasted=60.0, code=None)
    backoff.ended(500.0, lasted=3.0, code=GoodbyeCode.PROTOCOL_ERROR)
    assert backoff.next_attempt == 505.0


def test_backoff_tries_a_republished_guest_at_once_unless_it_misbehaved() -> None:
    backoff = Backoff()
    backoff.failed(100.0)
    backoff.published("ring 2")
    assert backoff.next_attempt == 0.0, "a new endpoint: try at once"
    backoff.ended(110.0, lasted=3.0, code=GoodbyeCode.PROTOCOL_ERROR)
    backoff.published("ring 3")
    assert backoff.next_attempt == 115.0, "a cut-off guest waits, published or not"


def test_backoff_waits_of_one_restart_do_not_carry_into_the_next() -> None:
    # Found by test_repeated_guest_restarts_leak_nothing_in_dom0: a guest agent
    # restarted every two seconds never has a "healthy" (10 s) session, and the
    # attempts that met its stale socket during each restart used to double one
    # wait that nothing reset, until dom0 waited 5 s to reconnect after every
    # restart (and sometimes twice that).
    backoff = Backoff()
    now = 100.0
    for _ in range(20):
        backoff.ended(now, lasted=2.0, code=None)
        for _ in range(3):  # the old socket refuses until the agent is back
            backoff.failed(backoff.next_attempt)
        backoff.connected()
        now += 3.0
    backoff.ended(now, lasted=2.0, code=None)
    backoff.failed(backoff.next_attempt)
    assert not backoff.misbehaved
    assert backoff.next_attempt == pytest.approx(now + 0.1 + 0.25)


def test_backoff_notices_a_reconnect_loop() -> None:
    backoff = Backoff()
    now = 100.0
    for _ in range(9):
        backoff.ended(now, lasted=0.05, code=None)
        now += 0.2
    assert not backoff.looping and backoff.next_attempt == pytest.approx(now - 0.2 + 0.1)
    backoff.ended(now, lasted=0.05, code=None)
    assert backoff.looping and backoff.misbehaved
    assert backoff.next_attempt == pytest.approx(now + 5.0)
    # Thirty quiet seconds later the loop is forgiven.
    backoff.ended(now + 40, lasted=0.05, code=None)
    assert not backoff.looping


def test_request_and_goodbye_in_one_read_do_not_raise() -> None:
    # Found by tests/test_fuzz_dom0.py: the answer to the request used to be
    # sent on a connection the goodbye had already closed, and raised.
    h = Harness(ALLOW_ALL)
    wire = encode(Hello()) + encode(CaptureRequest(False)) + encode(Goodbye(GoodbyeCode.NORMAL))
    actions = h.raw(wire)
    assert isinstance(actions[-1], Disconnect)
    assert h.session.closed


def test_underruns_count_late_audio_but_not_idle_time() -> None:
    h = Harness(ALLOW_ALL)
    h.negotiate(capture=None)
    ten_ms = tone(S16, frames=480)
    for _ in range(5):  # on time
        h.send(PlaybackData(ten_ms))
        h.now += 0.010
    assert h.session.counters.underruns == 0
    h.now += 0.045  # 45 ms late: beyond the host's margin and the 10 ms reserve
    h.send(PlaybackData(ten_ms))
    assert h.session.counters.underruns == 1
    h.send(Cork(True))
    h.now += 5.0
    h.send(Cork(False), PlaybackData(ten_ms))
    assert h.session.counters.underruns == 1, "a corked guest is idle, not late"


def playing_for_30_ms() -> tuple[Harness, bytes]:
    """A session playing on time, and the 10 ms chunk it plays."""
    h = Harness(ALLOW_ALL)
    h.negotiate(capture=None)
    ten_ms = tone(S16, frames=480)
    for _ in range(3):
        h.send(PlaybackData(ten_ms))
        h.now += 0.010
    return h, ten_ms


def test_host_underruns_grow_the_reserve_once_per_stall() -> None:
    h, ten_ms = playing_for_30_ms()
    # The host ran dry with nothing to give it: the first gap after a quiet
    # while is forgiven (the delay is put back after it).
    h.session.host_underruns(1, 0, h.now)
    assert h.session.counters.host_underruns == 1 and h.session.jitter_ms == 10
    h.session.host_underruns(1, 0, h.now + 1)  # the same count again: nothing new
    assert h.session.jitter_ms == 10
    # A late arrival and the host running dry because of it: one stall, one step.
    h.now += 2.0
    h.send(PlaybackData(ten_ms))
    assert h.session.counters.underruns == 1 and h.session.jitter_ms == 20
    h.session.host_underruns(2, 0, h.now + 0.02)
    assert h.session.counters.host_underruns == 2 and h.session.jitter_ms == 20
    # A new host stream (another format) counts from zero again.
    h.send(FormatOffer(StreamKind.PLAYBACK, (F32,)))
    h.session.host_underruns(1, 0, h.now + 5)
    assert h.session.counters.host_underruns == 3 and h.session.jitter_ms == 30


def test_host_stalls_are_counted_but_leave_the_reserve() -> None:
    """A gap with the VM's audio waiting in dom0 was dom0's or the host's: a larger
    reserve would not have reached the server sooner, and would only move the delay."""
    h, _ = playing_for_30_ms()
    h.session.host_underruns(1, 1, h.now)
    h.session.host_underruns(2, 2, h.now + 1)
    counters = h.session.counters
    assert (counters.host_underruns, counters.host_stalls, h.session.jitter_ms) == (2, 2, 10)
    h.session.host_underruns(3, 2, h.now + 2)  # then two from late audio
    h.session.host_underruns(4, 2, h.now + 3)
    assert (counters.host_underruns, counters.host_stalls, h.session.jitter_ms) == (4, 2, 20)


def test_the_same_format_offered_again_keeps_the_host_stream() -> None:
    h = Harness(ALLOW_ALL)
    h.negotiate(capture=None)
    h.actions.clear()
    h.send(FormatOffer(StreamKind.PLAYBACK, (S16,)))
    assert [type(a) for a in h.actions if not isinstance(a, Log)] == [Send]
    assert h.session.playback_active


def test_jitter_buffer_grows_with_underruns_and_shrinks_when_quiet() -> None:
    h = Harness(ALLOW_ALL)
    h.negotiate(capture=None)
    assert h.session.jitter_ms == 10 and h.session.playback_hold() == S16.bytes_for_ms(10)
    ten_ms = tone(S16, frames=480)
    for _ in range(4):  # four late arrivals: four underruns, the first forgiven
        h.send(PlaybackData(ten_ms))
        h.now += 0.5
    h.send(PlaybackData(ten_ms))
    assert h.session.counters.underruns == 4
    assert h.session.jitter_ms == 40
    assert h.session.playback_hold() == S16.bytes_for_ms(40)
    assert h.session.playback_trim() == S16.bytes_for_ms(40 + 20 + 30)
    assert h.session.playback_queue_limit() == S16.bytes_for_ms(40 + 40 + 30)
    # A chunk 45 ms late is now within the margin (15 ms) plus the reserve.
    h.now += 0.055
    h.send(PlaybackData(ten_ms))
    assert h.session.counters.underruns == 4
    h.run(h.session.tick(h.now + 119))
    assert h.session.jitter_ms == 40, "2 minutes without a gap before a step down"
    h.run(h.session.tick(h.now + 121))
    assert h.session.jitter_ms == 30
    for step in range(2, 12):
        h.run(h.session.tick(h.now + 121 * step))
    assert h.session.jitter_ms == 10, "back to one period, not below"
    for _ in range(20):
        h.now += 0.5
        h.send(PlaybackData(ten_ms))
    assert h.session.jitter_ms == 100, "capped"


def test_a_deny_ends_the_microphone_attachment() -> None:
    h = Harness(ON_REQUEST)
    h.negotiate()
    h.run(h.session.set_mic_attached(True, h.now))
    h.run(h.session.update_policy(DENY_ALL, h.now))
    assert not h.session.mic_attached
    h.run(h.session.update_policy(ON_REQUEST, h.now))
    h.send(CaptureRequest(True))
    assert h.last_received(CaptureState).status is StreamStatus.DENIED
    assert not h.session.capture_running


def test_a_grant_outlives_the_session_and_a_deny_ends_it_for_every_session() -> None:
    grants = MicGrants()
    assert grants.request(True, WORK, ON_REQUEST) is None
    first = Harness(ON_REQUEST, grants=grants)
    assert first.session.mic_attached
    first.run(first.session.shutdown("the VM went away"))
    second = Harness(ON_REQUEST, grants=grants)
    second.negotiate()
    second.send(CaptureRequest(True))
    assert second.of(StartCapture) == [StartCapture(S16)], (
        "the grant is the user's, not a session's"
    )
    second.run(second.session.update_policy(DENY_ALL, second.now))
    assert "work" not in grants and not second.session.capture_running


def test_attaching_is_for_attach_on_request_only() -> None:
    grants = MicGrants()
    refused = grants.request(True, WORK, ALLOW_ALL)
    assert refused is not None and "already allowed" in refused
    refused = grants.request(True, WORK, DENY_ALL)
    assert refused is not None and "denied" in refused
    assert "work" not in grants
    grants.set("work", True)
    grants.policy_changed(DENY_ALL, {})
    assert "work" not in grants, "a VM dom0 is not connected to is judged by its name"


# --- what one VM may cost dom0 (#17) ---------------------------------------------


def test_frames_beyond_the_work_budget_are_throttled_then_cut_off() -> None:
    h = Harness(ALLOW_ALL)
    h.negotiate(capture=None)
    one_ms = PlaybackData(bytes(S16.min_pcm_bytes))
    # 5000 frames a second, each exactly 1 ms (within the protocol, beyond any
    # honest guest): the budget runs out at once and reading stops.
    for step in range(5):
        h.now = 100.0 + step * 0.1
        h.send(*[one_ms] * 500)
        assert h.session.read_budget(h.now, 0) == 0, f"still read at step {step}"
        h.run(h.session.note_backlog(h.now, guest_has_more=True))
    assert not h.session.closed, "throttled first, not cut off at once"
    for step in range(5, 12):
        h.now = 100.0 + step * 0.1
        h.send(*[one_ms] * 500)
        h.run(h.session.note_backlog(h.now, guest_has_more=True))
    assert_cut_off(h, GoodbyeCode.RATE_EXCEEDED, "more than 2100 frames a second")


def test_an_honest_guest_catching_up_stays_within_the_work_budget() -> None:
    h = Harness(ALLOW_ALL)
    h.negotiate(capture=None)
    ten_ms = PlaybackData(tone(S16, frames=480))
    # Twice real time in 10 ms frames for 10 s: 200 frames a second.
    for step in range(1000):
        h.now = 100.0 + step * 0.05
        h.send(ten_ms, ten_ms) if step % 10 == 0 else h.send(ten_ms)
        assert h.session.read_budget(h.now, 0) > 0 or step % 10 == 0
    assert not h.session.closed


def test_a_format_storm_is_cut_off_after_a_dozen_host_stream_opens() -> None:
    h = Harness(ALLOW_ALL)
    h.negotiate(capture=None)  # one host stream opened
    for i in range(11):
        h.now += 0.1
        h.send(FormatOffer(StreamKind.PLAYBACK, (F32 if i % 2 == 0 else S16,)))
    assert not h.session.closed and len(h.of(StartPlayback)) == 12
    h.now += 0.1
    h.send(FormatOffer(StreamKind.PLAYBACK, (S16,)))
    assert_cut_off(h, GoodbyeCode.RATE_EXCEEDED, "open host streams more than 12 times a minute")
    assert len(h.of(StartPlayback)) == 12


def test_a_microphone_storm_is_cut_off_and_notifies_only_a_few_times() -> None:
    h = Harness(ALLOW_ALL)
    h.negotiate(playback=S16, capture=S16)  # playback's host stream is the first open
    for _ in range(11):
        h.now += 0.05
        h.send(CaptureRequest(True))
        h.now += 0.05
        h.send(CaptureRequest(False))
    assert not h.session.closed and len(h.of(StartCapture)) == 11
    assert len(h.of(Notify)) == 4, "the user is told a few times a minute, not 22"
    h.send(CaptureRequest(True))
    assert_cut_off(h, GoodbyeCode.RATE_EXCEEDED, "more than 12 times a minute")


def test_a_stream_the_host_refuses_stops_playback_and_is_retried_with_a_growing_wait() -> None:
    h = Harness(ALLOW_ALL)
    h.negotiate(capture=None)
    h.actions.clear()
    h.run(h.session.host_playback_failed("Invalid argument", h.now))
    assert [type(a) for a in h.actions] == [StopPlayback, Send, Log]
    state = h.received[-1]
    assert state == PlaybackState(
        StreamStatus.STOPPED, "the host audio server refused the stream: Invalid argument"
    )
    assert not h.session.playback_active
    # Its audio is no longer played, and nothing is retried before 5 s.
    assert h.raw(encode(PlaybackData(tone(S16)))) == []
    h.run(h.session.tick(h.now + 4.9))
    assert len(h.of(StartPlayback)) == 0
    h.actions.clear()
    h.run(h.session.tick(h.now + 5.1))
    assert h.of(StartPlayback) == [StartPlayback(S16, 1.0)]
    assert h.received[-1] == PlaybackState(StreamStatus.RUNNING)
    # Refused again: the next wait is twice as long.
    h.now += 5.1
    h.run(h.session.host_playback_failed("Invalid argument", h.now))
    h.actions.clear()
    h.run(h.session.tick(h.now + 9.9))
    assert h.of(StartPlayback) == []
    h.run(h.session.tick(h.now + 10.1))
    assert len(h.of(StartPlayback)) == 1
    # Once it opens, the wait starts again from 5 s.
    h.session.host_playback_opened()
    h.now += 10.1
    h.run(h.session.host_playback_failed("Invalid argument", h.now))
    h.actions.clear()
    h.run(h.session.tick(h.now + 5.1))
    assert len(h.of(StartPlayback)) == 1


def test_an_offer_while_the_host_refuses_is_agreed_but_not_played() -> None:
    h = Harness(ALLOW_ALL)
    h.negotiate(capture=None)
    h.run(h.session.host_playback_failed("Invalid argument", h.now))
    h.actions.clear()
    h.received.clear()
    h.send(FormatOffer(StreamKind.PLAYBACK, (F32,)))
    assert h.of(StartPlayback) == []
    assert h.received[0] == FormatAccept(StreamKind.PLAYBACK, F32)
    assert isinstance(h.received[1], PlaybackState)
    assert h.received[1].status is StreamStatus.STOPPED


def test_a_microphone_the_host_refuses_stops_capture_with_the_reason() -> None:
    h = Harness(ALLOW_ALL)
    h.negotiate(playback=S16, capture=S16)
    h.send(CaptureRequest(True))
    assert h.session.capture_running
    h.actions.clear()
    h.run(h.session.host_capture_failed("Invalid argument", h.now))
    assert h.of(StopCapture) and not h.session.capture_running
    state = h.received[-1]
    assert isinstance(state, CaptureState) and state.status is StreamStatus.STOPPED
    assert "refused the microphone stream: Invalid argument" in state.reason
    # The VM may ask again.
    h.send(CaptureRequest(True))
    assert h.session.capture_running


def test_short_frames_are_joined_before_gain_and_the_host_stream() -> None:
    h = Harness(ALLOW_ALL)
    h.negotiate(capture=None)
    one_ms = tone(S16, frames=48)
    h.actions.clear()
    for _ in range(3):
        h.send(PlaybackData(one_ms))
    assert h.of(Play) == [], "3 ms waits for more"
    h.send(PlaybackData(one_ms))
    assert h.of(Play) == [Play(one_ms * 4, after_idle=True)], "4 ms go to the host in one piece"
    # The tail of a sound goes at the cork, or once it has waited 4 ms.
    h.send(PlaybackData(one_ms), Cork(True))
    assert h.of(Play)[-1] == Play(one_ms, after_idle=False)
    h.send(Cork(False), PlaybackData(one_ms))
    h.run(h.session.tick(h.now + 0.003))
    assert len(h.of(Play)) == 2
    h.run(h.session.tick(h.now + 0.005))
    assert h.of(Play)[-1] == Play(one_ms, after_idle=True)
    # Whole 10 ms periods (what guests send) pass at once.
    ten_ms = tone(S16, frames=480)
    assert h.send(PlaybackData(ten_ms)) == [Play(ten_ms, after_idle=False)]
