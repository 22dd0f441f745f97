"""The guest agent's logic for one connection to dom0. No I/O, no clock.

`GuestSession` is driven by bytes from dom0, PCM recorded from the virtual
sink's monitor, the number of applications recording from the virtual
microphone, and time. It answers with actions for the guest agent's shell:
bytes to send, microphone PCM to feed to the virtual source, log lines, one
desktop notice when the microphone is refused, the true end-to-end latency.

Idle handling: after `idle_timeout` seconds of digital silence (or when the
shell says nothing plays), the stream is corked and nothing is sent; the
first non-silent period uncorks it, so sound resumes within one period.

An idle agent must also cost no CPU, so its monitor stream must deliver
nothing while no application plays: `qvaudio.core.guest_idle` decides how,
per audio server.
"""

from __future__ import annotations

import collections
import logging
import statistics
from dataclasses import dataclass
from enum import StrEnum

from qvaudio.core.actions import Log, Notify, Send
from qvaudio.core.codec import pcm_chunks
from qvaudio.core.connection import ConnectionState
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
    RemoteProtocolError,
    Role,
    StreamKind,
    StreamStatus,
    clip_reason,
)
from qvaudio.core.formats import AudioFormat
from qvaudio.core.session import Session

#: In-flight audio is judged by the least of this many of dom0's last reports.
IN_FLIGHT_REPORTS = 8


@dataclass(frozen=True, slots=True)
class StartMonitor:
    """Record the virtual sink's monitor in this format (dom0 accepted it)."""

    format: AudioFormat


@dataclass(frozen=True, slots=True)
class StopMonitor:
    reason: str


@dataclass(frozen=True, slots=True)
class MicAudio:
    """Microphone PCM from dom0 for the virtual source."""

    pcm: bytes


@dataclass(frozen=True, slots=True)
class MicFormat:
    """The virtual microphone's PCM is in this format from now on."""

    format: AudioFormat


@dataclass(frozen=True, slots=True)
class Disconnect:
    reason: str


Action = Send | StartMonitor | StopMonitor | MicAudio | MicFormat | Log | Notify | Disconnect


@dataclass(frozen=True, slots=True)
class GuestConfig:
    playback_formats: tuple[AudioFormat, ...]
    capture_formats: tuple[AudioFormat, ...]
    #: Silence for this long corks the stream.
    idle_timeout: float = 2.0
    #: dom0 reports position at least once a second; this long without a
    #: frame from dom0 means the transport is dead (suspend, migration).
    peer_timeout: float = 5.0


class GuestState(StrEnum):
    """What the guest agent is doing, as its status file says."""

    NO_AUDIO_SERVER = "no-audio-server"
    WAITING_FOR_DOM0 = "waiting-for-dom0"
    STREAMING = "streaming"
    IDLE = "idle"
    CONNECTED = "connected"

    @classmethod
    def of(cls, session: GuestSession | None, audio_server: bool) -> GuestState:
        """The agent's state: without an audio server or dom0, there is no session to ask."""
        if not audio_server:
            return cls.NO_AUDIO_SERVER
        if session is None:
            return cls.WAITING_FOR_DOM0
        return session.state


class GuestSession(Session):
    """Everything the guest agent decides about its connection to dom0."""

    def __init__(self, config: GuestConfig, now: float) -> None:
        super().__init__(Role.GUEST)
        self.config = config
        self.mic_users = 0
        self.bytes_sent = 0
        self.frames_sent = 0
        self.last_position: Position | None = None
        #: Frames in flight by each of the last few reports: sent by us when the
        #: report arrived, not yet received by dom0 when it wrote it.
        self._in_flight: collections.deque[int] = collections.deque(maxlen=IN_FLIGHT_REPORTS)
        #: dom0's own share in its last reports: its median is what counts.
        self._dom0_share: collections.deque[int] = collections.deque(maxlen=IN_FLIGHT_REPORTS)
        self._last_heard = now
        self._last_sound = now
        self._mic_refusal_told = False
        #: `frames_sent` when the sound now flowing began; None while none flows.
        self._sound_from: int | None = None
        #: dom0 has reported on audio of that sound: the latency means something.
        self._latency_known = False

    # -- queries -----------------------------------------------------------------------

    @property
    def playback_format(self) -> AudioFormat | None:
        return self.conn.format(StreamKind.PLAYBACK)

    @property
    def streaming(self) -> bool:
        """PCM from the monitor goes to dom0 now."""
        return (
            not self.closed
            and self.playback_format is not None
            and self.conn.playback_status is StreamStatus.RUNNING
            and not self.conn.corked
        )

    def latency_us(self, local_us: int) -> int | None:
        """End-to-end playback latency: our buffering, in flight, and dom0's.

        `local_us` is the guest-side part (the monitor's record latency plus
        anything queued for the transport). None unless sound is flowing and
        dom0 has reported on some of it: before that, the figure is of
        nothing (at connect, an idle null sink's monitor alone says ~2 s, and
        dom0's host stream has not played).
        """
        fmt, position = self.playback_format, self.last_position
        if fmt is None or position is None or not self._latency_known:
            return None
        # In flight when dom0 reported, not now: what was sent since its
        # report is unknown to it, and counting it would inflate the figure
        # by up to a whole report interval. The least of the last few: audio
        # the loop sent before it got to a report already waiting for it
        # counts as in flight though dom0 wrote the report before it was
        # sent (on PipeWire, whose graph cycles beat against the period,
        # that made the figure ~10 ms too large); a real backlog in the
        # transport stays in every report and so in the least of them.
        in_flight = min(self._in_flight, default=0)
        # dom0's share depends on where between its writes a report falls (its
        # host stream drains a chunk between them): the median of the last
        # few, so the figure does not move with each report's phase.
        dom0_us = int(statistics.median(self._dom0_share or [position.playback_latency_us]))
        return local_us + in_flight * 1_000_000 // fmt.rate + dom0_us

    def end_to_end_us(self, period_ms: int, waiting_bytes: int) -> int | None:
        """`latency_us`, the guest's part worked out: one period (the reader hands
        audio over a period at a time) and `waiting_bytes` of audio that wait
        for the transport.

        Not the monitor stream's own latency figure: on PulseAudio a monitor
        opened on a suspended sink (as the idle virtual output is) reports the
        whole time since it opened, seconds or hours, and works that off only
        at real time once sound flows (measured: 7.0 s after a 7 s suspension,
        6.4 s half a second into the sound, 0 after 7 s), while the audio
        itself arrives at once.
        """
        fmt = self.playback_format
        local_us = 0 if fmt is None else period_ms * 1000 + fmt.duration_us(waiting_bytes)
        return self.latency_us(local_us)

    def capture_latency_us(self, local_us: int) -> int | None:
        """How old microphone audio is as an application reads it: dom0's part (the age
        of the audio when dom0 sent it) plus `local_us`, the guest's own buffering.

        None unless dom0 is capturing for us and has reported since."""
        position = self.last_position
        if position is None or self.conn.capture_status is not StreamStatus.RUNNING:
            return None
        return position.capture_latency_us + local_us

    # -- inputs --------------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        self._last_heard = now
        actions: list[Action] = [*self._send(Hello())]
        actions += self._send(FormatOffer(StreamKind.PLAYBACK, self.config.playback_formats))
        if self.config.capture_formats:
            actions += self._send(FormatOffer(StreamKind.CAPTURE, self.config.capture_formats))
        return actions

    def receive(self, data: bytes, now: float) -> list[Action]:
        if self.closed:
            return []
        self._last_heard = now
        try:
            events = self.conn.receive_data(data)
        except RemoteProtocolError as exc:
            return self._close(
                f"dom0 broke the protocol: {exc}", goodbye=self.conn.goodbye_for(exc)
            )
        actions: list[Action] = []
        for event in events:
            actions += self._handle(event)
        return actions

    def audio(self, pcm: bytes, now: float) -> list[Action]:
        """PCM recorded from the virtual sink's monitor."""
        fmt = self.playback_format
        if self.closed or fmt is None or self.conn.playback_status is not StreamStatus.RUNNING:
            return []
        # bytes.count is C-speed; digital silence from a null sink is all zeros.
        silent = pcm.count(0) == len(pcm)
        actions: list[Action] = []
        if not silent:
            self._last_sound = now
            if self.conn.corked:
                actions += [*self._send(Cork(False)), Log(logging.DEBUG, "uncorked")]
            if self._sound_from is None:
                self._sound_from = self.frames_sent
                self._latency_known = False
        elif not self.conn.corked and now - self._last_sound >= self.config.idle_timeout:
            return self._cork("idle: corked")
        if self.conn.corked:
            return actions
        for chunk in pcm_chunks(pcm, fmt.frame_size):
            actions += self._send(PlaybackData(chunk))
        self.bytes_sent += len(pcm)
        self.frames_sent += len(pcm) // fmt.frame_size
        return actions

    def forget_unsent(self, pcm_bytes: int) -> None:
        """The shell dropped this much PCM before it reached the transport.

        It never arrives at dom0, so it must not count as in flight.
        """
        fmt = self.playback_format
        if fmt is None:
            return
        self.bytes_sent = max(0, self.bytes_sent - pcm_bytes)
        self.frames_sent = max(0, self.frames_sent - pcm_bytes // fmt.frame_size)

    def nothing_playing(self, now: float) -> list[Action]:
        """The shell saw the sink go idle (no application plays): cork at once."""
        if self.closed or self.conn.corked or self.conn.state is not ConnectionState.OPEN:
            return []
        return self._cork("sink idle: corked")

    def _cork(self, why: str) -> list[Action]:
        self._sound_ended()
        return [*self._send(Cork(True)), Log(logging.DEBUG, why)]

    def _sound_ended(self) -> None:
        """No sound flows any more (corked, or the monitor stops or restarts)."""
        self._sound_from = None
        self._latency_known = False
        self._in_flight.clear()
        self._dom0_share.clear()

    def set_mic_users(self, count: int, now: float) -> list[Action]:
        """How many applications record from the virtual microphone now."""
        before, self.mic_users = self.mic_users, count
        if self.closed or self.conn.state is not ConnectionState.OPEN:
            return []
        if before == 0 and count > 0:
            return [
                *self._send(CaptureRequest(True)),
                Log(logging.INFO, "an application opened the microphone: asking dom0"),
            ]
        if before > 0 and count == 0:
            return [
                *self._send(CaptureRequest(False)),
                Log(logging.INFO, "microphone closed by the last application"),
            ]
        return []

    def tick(self, now: float) -> list[Action]:
        if self.closed:
            return []
        if now - self._last_heard > self.config.peer_timeout:
            return self._close(
                f"nothing heard from dom0 for {self.config.peer_timeout:g} s", goodbye=None
            )
        if (
            not self.conn.corked
            and self.conn.state is ConnectionState.OPEN
            and now - self._last_sound >= self.config.idle_timeout
        ):
            # A suspended monitor delivers no silence to time out on, and
            # the shell's count of playing applications is the only other
            # way to learn that the sound has ended.
            return self._cork("no sound: corked")
        return []

    def shutdown(self, reason: str) -> list[Action]:
        if self.closed:
            return []
        goodbye = self.conn.send(Goodbye(GoodbyeCode.SHUTDOWN, clip_reason(reason)))
        return self._close(reason, goodbye=goodbye)

    # -- events from dom0 --------------------------------------------------------------------

    def _handle(self, event: Event) -> list[Action]:
        match event:
            case Hello(version=version):
                actions: list[Action] = [Log(logging.INFO, f"dom0 speaks protocol {version}")]
                if self.mic_users:
                    # Applications were already recording when we (re)connected.
                    actions += self._send(CaptureRequest(True))
                return actions
            case FormatAccept(stream=StreamKind.PLAYBACK, format=fmt):
                self._sound_ended()
                return [Log(logging.INFO, f"playback format {fmt}"), StartMonitor(fmt)]
            case FormatAccept(stream=StreamKind.CAPTURE, format=fmt):
                return [Log(logging.INFO, f"microphone format {fmt}"), MicFormat(fmt)]
            case FormatRefuse(stream=StreamKind.PLAYBACK, reason=reason):
                self._sound_ended()
                return [
                    Log(logging.WARNING, f"dom0 refused playback: {reason}"),
                    StopMonitor(reason),
                    Notify("Sound from this VM is not allowed", reason),
                ]
            case FormatRefuse(stream=StreamKind.CAPTURE, reason=reason):
                return [Log(logging.WARNING, f"dom0 refused the microphone format: {reason}")]
            case PlaybackState(status=status, reason=reason):
                self._sound_ended()
                if status is StreamStatus.RUNNING:
                    current = self.playback_format
                    assert current is not None  # the connection checked it
                    return [Log(logging.INFO, "dom0 allows playback again"), StartMonitor(current)]
                return [
                    Log(logging.WARNING, f"dom0 stopped playback: {reason}"),
                    StopMonitor(reason),
                    Notify("Sound from this VM was stopped", reason),
                ]
            case CaptureState(status=status, reason=reason):
                return self._capture_state(status, reason)
            case CaptureData(pcm=pcm):
                return [MicAudio(pcm)]
            case Position(received_frames=received):
                self.last_position = event
                self._in_flight.append(max(0, self.frames_sent - received))
                self._dom0_share.append(event.playback_latency_us)
                if self._sound_from is not None and received > self._sound_from:
                    self._latency_known = True
                return []
            case Goodbye(code=code, reason=reason):
                return self._close(f"dom0 said goodbye ({code.name.lower()}: {reason})", None)
        return [Log(logging.DEBUG, f"ignored {type(event).__name__}")]

    def _capture_state(self, status: StreamStatus, reason: str) -> list[Action]:
        if status is StreamStatus.RUNNING:
            self._mic_refusal_told = False
            return [Log(logging.INFO, "microphone audio flows from dom0")]
        if status is StreamStatus.STOPPED:
            return [Log(logging.INFO, f"microphone stopped{': ' + reason if reason else ''}")]
        # Applications keep reading silence; the user is told once, not on
        # every retry, until the microphone has worked again.
        if self._mic_refusal_told:
            return [Log(logging.DEBUG, f"microphone still refused: {reason}")]
        self._mic_refusal_told = True
        return [
            Log(logging.WARNING, f"the microphone is not allowed for this VM: {reason}"),
            Notify("Microphone not allowed for this VM", reason),
        ]

    @property
    def state(self) -> GuestState:
        """Streaming, idle (corked: nothing plays) or connected (neither, e.g. denied)."""
        if self.streaming:
            return GuestState.STREAMING
        if self.conn.corked:
            return GuestState.IDLE
        return GuestState.CONNECTED

    def _close(self, reason: str, goodbye: bytes | None) -> list[Action]:
        self._end(reason)
        actions: list[Action] = [Log(logging.WARNING, reason)]
        if goodbye is not None:
            actions.append(Send(goodbye))
        actions.append(Disconnect(reason))
        return actions


class LatencyReport:
    """When the end-to-end latency is worth a log line.

    Every `every` seconds, or at once when it moved by more than `change_us`
    since the last line: steady figures stay quiet, a jump is news.
    """

    def __init__(self, every: float = 30.0, change_us: int = 20_000) -> None:
        self.every = every
        self.change_us = change_us
        self._last_value: int | None = None
        self._last_time = 0.0

    def due(self, latency_us: int | None, now: float) -> bool:
        if latency_us is None:
            return False
        if (
            self._last_value is None
            or abs(latency_us - self._last_value) > self.change_us
            or now - self._last_time >= self.every
        ):
            self._last_value = latency_us
            self._last_time = now
            return True
        return False

    def reset(self) -> None:
        """A new connection: its first figure is news."""
        self._last_value = None
