"""dom0's microphone side of one VM: format, requests, grants, the host stream. No I/O.

Part of `VmSession` (see `dom0_session`). The VM asks for the microphone
when an application of its records; dom0 records the host microphone for it
only while the policy allows (`allow`, or `attach-on-request` and the user
attached it), a format is agreed and the host opens the stream. Where the
microphone stands is one `MicState`. Every start, stop and refusal is
logged, and shown to the user (a few a minute per VM at most).
"""

from __future__ import annotations

import dataclasses
import enum
import logging

from qvaudio.core.actions import Log, Notify
from qvaudio.core.codec import pcm_chunks
from qvaudio.core.dom0_actions import Action, StartCapture, StopCapture
from qvaudio.core.dom0_base import VmSessionBase
from qvaudio.core.events import (
    MAX_PAYLOAD,
    CaptureData,
    CaptureState,
    FormatAccept,
    FormatRefuse,
    GoodbyeCode,
    StreamKind,
    StreamStatus,
    clip_reason,
)
from qvaudio.core.formats import AudioFormat
from qvaudio.core.policy import Access, choose_format


class MicState(enum.Enum):
    """Where one VM's microphone stands, in dom0."""

    #: The VM does not ask for it (no application of its records).
    OFF = "off"
    #: The VM asks, and it does not run: the policy, the user's grant, an agreed
    #: format or the host stands in the way (the VM was told which).
    REQUESTED = "requested"
    #: dom0 records the host microphone for the VM.
    RUNNING = "running"


class CaptureSide(VmSessionBase):
    """What dom0 decides about one VM's microphone."""

    def _init_capture(self) -> None:
        """The microphone side's state (`VmSession.__init__` calls it)."""
        self.mic = MicState.OFF
        self._capture_stalled_since: float | None = None

    # -- what the shell asks ---------------------------------------------------------

    @property
    def mic_attached(self) -> bool:
        """The user attached the microphone to this VM (`qvaudio mic attach`)."""
        return self.vm.name in self.grants

    @property
    def capture_wanted(self) -> bool:
        """The VM asks for the microphone (an application of its records)."""
        return self.mic is not MicState.OFF

    @property
    def capture_running(self) -> bool:
        """dom0 records the host microphone for this VM."""
        return self.mic is MicState.RUNNING

    def set_mic_attached(self, attached: bool, now: float) -> list[Action]:
        """`qvaudio mic attach|detach`: grant or revoke for attach-on-request VMs."""
        self.grants.set(self.vm.name, attached)
        if self.closed:
            return []
        return self._reconcile_capture(now, requested=False)

    def host_capture_failed(self, reason: str, now: float) -> list[Action]:
        """The host server refused this VM's microphone stream: capture stops, and
        the guest may ask again (within its budget of host stream opens)."""
        if self.closed or not self.capture_running:
            return []
        why = f"the host audio server refused the microphone stream: {reason}"
        return [
            *self._stop_capture_stream(why, wanted=False),
            *self._send(CaptureState(StreamStatus.STOPPED, clip_reason(why))),
            Log(logging.WARNING, f"microphone capture stopped: {why}"),
            *self._notify(f"{self.vm.name} stopped recording", why, now),
        ]

    def capture_pcm(self, pcm: bytes, room: int, now: float) -> list[Action]:
        """Microphone audio from the host, with `room` bytes free towards the guest.

        A guest that does not drain its microphone ring loses audio (never
        dom0's memory), and is cut off if it stays stalled.
        """
        if self.closed or not self.capture_running:
            return []
        fmt = self.capture_format
        if fmt is None:
            return []
        frame_overhead = 4 * (len(pcm) // MAX_PAYLOAD + 1)
        if room < len(pcm) + frame_overhead:
            self.counters.capture_bytes_dropped += len(pcm)
            if self._capture_stalled_since is None:
                self._capture_stalled_since = now
            elif now - self._capture_stalled_since > self.limits.capture_stall_timeout:
                return self._cut_off(
                    GoodbyeCode.TIMEOUT,
                    "stopped reading microphone audio for over "
                    f"{self.limits.capture_stall_timeout:g} s",
                )
            return []
        self._capture_stalled_since = None
        actions: list[Action] = []
        for chunk in pcm_chunks(pcm, fmt.frame_size):
            actions += self._send(CaptureData(chunk))
        self.counters.capture_bytes_sent += len(pcm)
        return actions

    # -- deciding -----------------------------------------------------------------------

    def _negotiate_capture(self, formats: tuple[AudioFormat, ...], now: float) -> list[Action]:
        # The format is agreed on its own merits; whether audio may flow is
        # decided per request, so that a later `mic attach` needs no re-offer.
        actions: list[Action] = []
        if self.capture_running:
            actions += self._stop_capture_stream("capture format renegotiated")
        as_if_allowed = dataclasses.replace(self._capture, access=Access.ALLOW)
        fmt, why = choose_format(formats, as_if_allowed)
        if fmt is None:
            actions += self._send(FormatRefuse(StreamKind.CAPTURE, clip_reason(why)))
            actions.append(Log(logging.INFO, f"capture format refused: {why}"))
            return actions
        actions += self._send(FormatAccept(StreamKind.CAPTURE, fmt))
        return actions + self._reconcile_capture(now, requested=False)

    def _capture_allowed(self) -> tuple[bool, str]:
        access = self._capture.access
        if access is Access.ALLOW:
            return True, self._capture.reason
        if access is Access.ATTACH_ON_REQUEST:
            if self.mic_attached:
                return True, "microphone attached by the user"
            return False, f"microphone not attached (run: qvaudio mic attach {self.vm.name})"
        return False, self._capture.reason

    def _reconcile_capture(
        self, now: float, *, requested: bool, wanted: bool | None = None
    ) -> list[Action]:
        """Start or stop the microphone as the VM asks (`wanted`, a new request, or
        its standing one) and as the policy and the user's grant allow."""
        running = self.mic is MicState.RUNNING
        if wanted is None:
            wanted = self.mic is not MicState.OFF
        if not running:
            self.mic = MicState.REQUESTED if wanted else MicState.OFF
        allowed, why = self._capture_allowed()
        fmt = self.capture_format
        name = self.vm.name
        if running and not (wanted and allowed and fmt):
            status = StreamStatus.STOPPED if not wanted else StreamStatus.DENIED
            reason = "the VM stopped recording" if not wanted else why
            return [
                *self._stop_capture_stream(reason, wanted=wanted),
                *self._send(CaptureState(status, clip_reason(reason))),
                Log(logging.INFO, f"microphone capture stopped: {reason}"),
                *self._notify(f"{name} stopped recording", reason, now),
            ]
        if not running and wanted and allowed and fmt is not None:
            if not self._meter.host_open(now):
                return self._too_many_host_opens()
            self.mic = MicState.RUNNING
            return [
                StartCapture(fmt),
                *self._send(CaptureState(StreamStatus.RUNNING)),
                Log(logging.INFO, f"microphone capture started ({why})"),
                *self._notify(f"{name} is recording from the microphone", why, now),
            ]
        if requested and wanted and not running:
            if fmt is None:
                why = "no capture format agreed"
            return [
                *self._send(CaptureState(StreamStatus.DENIED, clip_reason(why))),
                Log(logging.WARNING, f"microphone request refused: {why}"),
                *self._notify(f"{name} was refused the microphone", why, now),
            ]
        if requested and not wanted and not running:
            return [*self._send(CaptureState(StreamStatus.STOPPED))]
        return []

    def _notify(self, summary: str, body: str, now: float) -> list[Action]:
        if not self._meter.notification(now):
            return []
        return [Notify(summary, body)]

    def _stop_capture_stream(self, reason: str, *, wanted: bool = True) -> list[Action]:
        """Stop the host microphone stream; the VM still asks for it unless not `wanted`."""
        if self.mic is not MicState.RUNNING:
            return []
        self.mic = MicState.REQUESTED if wanted else MicState.OFF
        self._capture_stalled_since = None
        return [StopCapture(reason)]
