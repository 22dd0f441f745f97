"""The guest agent's decisions, driven byte by byte against a real dom0 Connection."""

from __future__ import annotations

import array
import dataclasses

from qvaudio.core.actions import Notify, Send
from qvaudio.core.connection import Connection
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
from qvaudio.core.guest_idle import IdleMethod, idle_method, sink_suspension
from qvaudio.core.guest_session import (
    IN_FLIGHT_REPORTS,
    Action,
    Disconnect,
    GuestConfig,
    GuestSession,
    GuestState,
    LatencyReport,
    MicAudio,
    MicFormat,
    StartMonitor,
    StopMonitor,
)

S16 = AudioFormat(48000, SampleFormat.S16LE, 2)
CONFIG = GuestConfig(playback_formats=(S16,), capture_formats=(S16,), idle_timeout=2.0)
SOUND = array.array("h", [1000, -1000] * 480).tobytes()
SILENCE = bytes(len(SOUND))


class Harness:
    def __init__(self) -> None:
        self.now = 10.0
        self.session = GuestSession(CONFIG, self.now)
        self.dom0 = Connection(Role.DOM0)
        self.to_dom0: list[Event] = []
        self.actions: list[Action] = []
        self.run(self.session.start(self.now))

    def run(self, actions: list[Action]) -> list[Action]:
        self.actions += actions
        for action in actions:
            if isinstance(action, Send):
                self.to_dom0 += self.dom0.receive_data(action.data)
        return actions

    def last_sent(self) -> Event:
        """The last event dom0 received (a call: each one looks again)."""
        return self.to_dom0[-1]

    def from_dom0(self, *events: Event) -> list[Action]:
        return self.run(self.session.receive(b"".join(self.dom0.send(e) for e in events), self.now))

    def accept_all(self) -> None:
        self.from_dom0(
            Hello(),
            FormatAccept(StreamKind.PLAYBACK, S16),
            FormatAccept(StreamKind.CAPTURE, S16),
        )


def test_start_offers_both_streams() -> None:
    h = Harness()
    assert h.to_dom0 == [
        Hello(),
        FormatOffer(StreamKind.PLAYBACK, (S16,)),
        FormatOffer(StreamKind.CAPTURE, (S16,)),
    ]
    h.accept_all()
    assert StartMonitor(S16) in h.actions and MicFormat(S16) in h.actions


def test_sound_streams_and_silence_corks_then_sound_uncorks_at_once() -> None:
    h = Harness()
    h.accept_all()
    h.run(h.session.audio(SOUND, h.now))
    assert h.last_sent() == PlaybackData(SOUND)
    h.run(h.session.audio(SILENCE, h.now + 1.0))
    assert h.last_sent() == PlaybackData(SILENCE)  # short silence still flows
    h.run(h.session.audio(SILENCE, h.now + 2.5))
    assert h.last_sent() == Cork(True)
    sent = len(h.to_dom0)
    for i in range(10):
        h.run(h.session.audio(SILENCE, h.now + 3 + i))
    assert len(h.to_dom0) == sent, "nothing is sent while idle"
    h.run(h.session.audio(SOUND, h.now + 20))
    assert h.to_dom0[-2:] == [Cork(False), PlaybackData(SOUND)]


def test_sink_idle_corks_immediately() -> None:
    h = Harness()
    h.accept_all()
    h.run(h.session.nothing_playing(h.now))
    assert h.to_dom0[-1] == Cork(True)
    assert h.run(h.session.nothing_playing(h.now)) == []


def test_microphone_users_drive_capture_requests_and_refusal_is_told_once() -> None:
    h = Harness()
    h.accept_all()
    h.run(h.session.set_mic_users(1, h.now))
    assert h.to_dom0[-1] == CaptureRequest(True)
    h.run(h.session.set_mic_users(2, h.now))
    assert h.to_dom0[-1] == CaptureRequest(True), "a second recorder asks nothing new"
    for _ in range(3):
        h.from_dom0(CaptureState(StreamStatus.DENIED, "policy says no"))
    notices = [a for a in h.actions if isinstance(a, Notify)]
    assert notices == [Notify("Microphone not allowed for this VM", "policy says no")]
    h.run(h.session.set_mic_users(0, h.now))
    assert h.to_dom0[-1] == CaptureRequest(False)


def test_microphone_audio_is_handed_to_the_virtual_source() -> None:
    h = Harness()
    h.accept_all()
    h.run(h.session.set_mic_users(1, h.now))
    h.from_dom0(CaptureState(StreamStatus.RUNNING), CaptureData(SOUND))
    assert h.actions[-1] == MicAudio(SOUND)


def test_capture_latency_is_dom0s_part_plus_ours_while_dom0_captures() -> None:
    h = Harness()
    h.accept_all()
    report = Position(received_frames=0, played_frames=0, playback_latency_us=0,
                      capture_latency_us=12000)  # fmt: skip
    assert h.session.capture_latency_us(8000) is None, "dom0 has said nothing"
    h.from_dom0(report)
    assert h.session.capture_latency_us(8000) is None, "dom0 is not capturing"
    h.run(h.session.set_mic_users(1, h.now))
    h.from_dom0(CaptureState(StreamStatus.RUNNING), report)
    assert h.session.capture_latency_us(8000) == 20000
    h.from_dom0(CaptureState(StreamStatus.DENIED, "revoked"))
    assert h.session.capture_latency_us(8000) is None, "revoked: no path to tell"


def test_reconnect_with_recorders_present_asks_again() -> None:
    h = Harness()
    h.run(h.session.set_mic_users(1, h.now))  # before the handshake: nothing sent
    assert CaptureRequest(True) not in h.to_dom0
    h.accept_all()
    assert CaptureRequest(True) in h.to_dom0


def test_refused_and_stopped_playback_stop_the_monitor() -> None:
    h = Harness()
    h.from_dom0(Hello(), FormatRefuse(StreamKind.PLAYBACK, "playback deny by 30-x.yaml:3"))
    assert StopMonitor("playback deny by 30-x.yaml:3") in h.actions
    h2 = Harness()
    h2.accept_all()
    h2.from_dom0(PlaybackState(StreamStatus.DENIED, "policy changed"))
    assert StopMonitor("policy changed") in h2.actions
    assert h2.run(h2.session.audio(SOUND, h2.now)) == []
    h2.from_dom0(PlaybackState(StreamStatus.RUNNING))
    assert h2.actions[-1] == StartMonitor(S16)


def test_latency_is_end_to_end() -> None:
    h = Harness()
    h.accept_all()
    assert h.session.latency_us(5000) is None
    for _ in range(10):  # 100 ms sent
        h.run(h.session.audio(SOUND, h.now))
    h.from_dom0(
        Position(
            received_frames=4320,
            played_frames=4000,
            playback_latency_us=20000,
            capture_latency_us=0,
        )
    )
    # 480 frames (10 ms) still in flight + 20 ms in dom0 + 5 ms local.
    assert h.session.latency_us(5000) == 35000
    # Sent after dom0's report: not counted until the next report covers it.
    h.run(h.session.audio(SOUND, h.now))
    assert h.session.latency_us(5000) == 35000


def test_in_flight_is_the_least_of_the_last_reports() -> None:
    """Audio the loop sent before it read a report already waiting makes that
    report's in-flight figure too large; a backlog shows in every report."""
    h = Harness()
    h.accept_all()
    for _ in range(10):  # 100 ms sent
        h.run(h.session.audio(SOUND, h.now))
    report = Position(received_frames=4800, played_frames=4000, playback_latency_us=20000,
                      capture_latency_us=0)  # fmt: skip
    h.from_dom0(report)  # nothing in flight
    h.run(h.session.audio(SOUND, h.now))
    h.from_dom0(report)  # 10 ms sent before the report was read
    assert h.session.latency_us(0) == 20000
    for _ in range(IN_FLIGHT_REPORTS):
        h.from_dom0(report)  # ...and in every report since: a backlog
    assert h.session.latency_us(0) == 30000


def test_dom0s_share_is_the_median_of_its_last_reports() -> None:
    """Where a report falls between dom0's writes moves its figure by up to a chunk:
    the median of the last reports, not each one, so the published path holds still."""
    h = Harness()
    h.accept_all()
    for _ in range(10):
        h.run(h.session.audio(SOUND, h.now))
    report = Position(received_frames=4800, played_frames=4000, playback_latency_us=0,
                      capture_latency_us=0)  # fmt: skip
    for share in (20000, 24000, 21000):
        h.from_dom0(dataclasses.replace(report, playback_latency_us=share))
    assert h.session.latency_us(0) == 21000
    for _ in range(IN_FLIGHT_REPORTS):  # a larger buffer since: it takes over
        h.from_dom0(dataclasses.replace(report, playback_latency_us=120000))
    assert h.session.latency_us(0) == 120000


def test_latency_means_something_only_once_dom0_reported_on_sound() -> None:
    h = Harness()
    h.accept_all()
    report = Position(received_frames=0, played_frames=0, playback_latency_us=20000,
                      capture_latency_us=0)  # fmt: skip
    h.from_dom0(report)
    assert h.session.latency_us(5000) is None, "connected, nothing played yet"
    h.run(h.session.audio(SILENCE, h.now))
    h.from_dom0(dataclasses.replace(report, received_frames=480))
    assert h.session.latency_us(5000) is None, "silence is no sound"
    h.run(h.session.audio(SOUND, h.now))
    h.from_dom0(dataclasses.replace(report, received_frames=480))
    assert h.session.latency_us(5000) is None, "dom0 has not had any of the sound yet"
    h.from_dom0(dataclasses.replace(report, received_frames=960))
    assert h.session.latency_us(5000) == 25000
    h.now += 3.0  # past the idle timeout, well within dom0's liveness
    h.run(h.session.tick(h.now))
    assert h.to_dom0[-1] == Cork(True)
    assert h.session.latency_us(5000) is None, "corked: no sound flows"


def test_silent_dom0_means_a_dead_transport() -> None:
    h = Harness()
    h.accept_all()
    assert not [a for a in h.run(h.session.tick(h.now + 4)) if isinstance(a, Disconnect)]
    actions = h.run(h.session.tick(h.now + 6))
    assert isinstance(actions[-1], Disconnect)
    assert h.session.closed


def test_dom0_protocol_error_closes_with_goodbye() -> None:
    h = Harness()
    actions = h.run(h.session.receive(b"\x20\x00\x02\x00ab", h.now))
    assert isinstance(actions[-1], Disconnect)
    assert isinstance(h.to_dom0[-1], Goodbye)
    assert h.to_dom0[-1].code is GoodbyeCode.PROTOCOL_ERROR


def test_dropped_pcm_does_not_count_as_in_flight() -> None:
    h = Harness()
    h.accept_all()
    h.run(h.session.audio(SOUND, h.now))
    sent = h.session.frames_sent
    assert sent == len(SOUND) // S16.frame_size
    h.session.forget_unsent(len(SOUND))
    assert h.session.frames_sent == 0
    assert h.session.bytes_sent == 0


def test_latency_is_logged_on_change_or_every_so_often() -> None:
    report = LatencyReport(every=30.0, change_us=20_000)
    assert not report.due(None, 0.0)
    assert report.due(50_000, 0.0)
    assert not report.due(60_000, 1.0)  # small move: quiet
    assert report.due(75_000, 2.0)  # moved > 20 ms since the last line
    assert not report.due(75_000, 20.0)
    assert report.due(75_000, 32.0)  # steady, but 30 s passed
    report.reset()
    assert report.due(75_000, 33.0)


def test_idle_method_follows_the_server() -> None:
    assert idle_method("pulseaudio") is IdleMethod.SUSPEND_SINK
    assert idle_method("PulseAudio (on PipeWire 0.3.65)") is IdleMethod.PASSIVE_MONITOR


def test_pulseaudio_sink_is_suspended_exactly_while_nothing_plays() -> None:
    method = IdleMethod.SUSPEND_SINK
    assert sink_suspension(method, players=0, suspended=False) is True
    assert sink_suspension(method, players=0, suspended=True) is None
    assert sink_suspension(method, players=1, suspended=True) is False
    assert sink_suspension(method, players=2, suspended=False) is None


def test_pipewire_sink_is_never_suspended_by_us() -> None:
    for players in (0, 1):
        for suspended in (False, True):
            assert sink_suspension(IdleMethod.PASSIVE_MONITOR, players, suspended) is None


def test_no_audio_at_all_corks_on_tick() -> None:
    h = Harness()
    h.accept_all()
    h.run(h.session.audio(SOUND, h.now))
    assert h.run(h.session.tick(h.now + 1.0)) == []
    h.from_dom0(Position(0, 0, 0, 0))  # dom0 still alive
    h.now += 2.5
    h.from_dom0(Position(0, 0, 0, 0))
    h.run(h.session.tick(h.now))
    assert h.to_dom0[-1] == Cork(True)
    h.run(h.session.audio(SOUND, h.now + 0.1))
    assert h.to_dom0[-2:] == [Cork(False), PlaybackData(SOUND)]


def test_shutdown_with_any_reason_says_goodbye() -> None:
    # Reasons are clipped in bytes: 200 characters of "é" would be 400 bytes.
    h = Harness()
    h.accept_all()
    h.run(h.session.shutdown("é" * 200))
    assert isinstance(h.to_dom0[-1], Goodbye)
    assert h.to_dom0[-1].reason == "é" * 100


def test_the_agents_state_comes_from_the_session() -> None:
    assert GuestState.of(None, audio_server=False) is GuestState.NO_AUDIO_SERVER
    assert GuestState.of(None, audio_server=True) is GuestState.WAITING_FOR_DOM0
    h = Harness()
    assert GuestState.of(h.session, audio_server=False) is GuestState.NO_AUDIO_SERVER
    h.accept_all()
    h.run(h.session.audio(SOUND, h.now))
    assert GuestState.of(h.session, audio_server=True) is GuestState.STREAMING
    h.run(h.session.nothing_playing(h.now))
    assert h.session.state is GuestState.IDLE
    denied = Harness()
    denied.accept_all()
    denied.from_dom0(PlaybackState(StreamStatus.DENIED, "policy"))
    assert denied.session.state is GuestState.CONNECTED, "neither streaming nor corked"
    assert GuestState.STREAMING.value == "streaming"
