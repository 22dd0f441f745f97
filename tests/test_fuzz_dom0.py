"""Fuzzing dom0's side of the protocol: VmSession fed random and mutated streams.

Whatever a guest sends, in whatever pieces and at whatever times, dom0's
session must never raise, never buffer more than one frame, never play audio
it did not accept, and must end up either serving the guest or having cut it
off with a goodbye. CI runs a bounded number of examples; to fuzz longer:

    QVAUDIO_FUZZ_EXAMPLES=200000 .venv/bin/pytest tests/test_fuzz_dom0.py -q

(hypothesis keeps any failure it finds in .hypothesis/ and replays it first).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qvaudio.core.actions import Send
from qvaudio.core.codec import encode
from qvaudio.core.dom0_actions import Disconnect, Play, StartPlayback
from qvaudio.core.dom0_session import VmSession
from qvaudio.core.events import (
    MAX_FRAME,
    CaptureRequest,
    Cork,
    FormatOffer,
    Goodbye,
    GoodbyeCode,
    Hello,
    PlaybackData,
    StreamKind,
)
from qvaudio.core.formats import AudioFormat, SampleFormat
from qvaudio.core.policy import Policy, VmIdentity
from qvaudio.core.policy_parser import parse_policy_text

EXAMPLES = int(os.environ.get("QVAUDIO_FUZZ_EXAMPLES", "3000"))
POLICIES = [
    Policy(parse_policy_text(text.encode(), "fuzz.yaml"), ("fuzz.yaml",))
    for text in (
        "rules:\n- vm: '*'\n  playback: allow\n  capture: allow\n  volume: {max: 40}\n",
        "rules:\n- vm: '*'\n  playback: deny\n  capture: attach-on-request\n",
        "rules:\n- vm: '*'\n  playback: allow\n  formats: {sample_formats: [f32le]}\n",
    )
]
FORMATS = [AudioFormat(r, f, c) for r in (44100, 48000) for f in SampleFormat for c in (1, 2, 8)]

valid_frames = st.one_of(
    st.just(encode(Hello())),
    st.builds(
        lambda kind, fmts: encode(FormatOffer(kind, tuple(fmts))),
        st.sampled_from(list(StreamKind)),
        st.lists(st.sampled_from(FORMATS), min_size=1, max_size=4),
    ),
    st.builds(lambda n: encode(PlaybackData(bytes(n * 4))), st.integers(1, 600)),
    st.builds(lambda b: encode(Cork(b)), st.booleans()),
    st.builds(lambda b: encode(CaptureRequest(b)), st.booleans()),
    st.just(encode(Goodbye(GoodbyeCode.NORMAL, "bye"))),
)


@st.composite
def guest_streams(draw: st.DrawFn) -> bytes:
    """Plausible frame sequences, then mutated: the inputs that reach deep states."""
    data = bytearray(b"".join(draw(st.lists(valid_frames, max_size=25))))
    for _ in range(draw(st.integers(0, 4))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data += draw(st.binary(max_size=64))
    return bytes(data)


steps = st.lists(
    st.tuples(
        st.integers(1, 5000),  # bytes in this read
        st.floats(0.0, 2.0),  # seconds passing before it
        st.sampled_from(["none", "tick", "policy", "attach", "detach", "mic", "backlog"]),
    ),
    min_size=1,
    max_size=40,
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    st.one_of(guest_streams(), st.binary(max_size=4000)),
    steps,
    st.sampled_from(range(len(POLICIES))),
)
def test_dom0_session_survives_anything(
    stream: bytes, schedule: list[tuple[int, float, str]], policy_index: int
) -> None:
    now = 1000.0
    session = VmSession(VmIdentity("fuzzed"), POLICIES[policy_index], now)
    actions = session.start(now)
    offset = 0
    for size, elapsed, extra in schedule:
        now += elapsed
        match extra:
            case "tick":
                actions += session.tick(now)
            case "policy":
                actions += session.update_policy(POLICIES[int(now) % len(POLICIES)], now)
            case "attach" | "detach":
                actions += session.set_mic_attached(extra == "attach", now)
            case "mic":
                actions += session.capture_pcm(bytes(960), room=int(now) % 3 * 4096, now=now)
            case "backlog":
                actions += session.note_backlog(now, guest_has_more=True)
        budget = session.read_budget(now, queued_bytes=0)
        chunk = stream[offset : offset + min(size, max(budget, 0))]
        offset += len(chunk)
        actions += session.receive(chunk, now)
        assert session.conn.buffered < MAX_FRAME
        if session.closed:
            break
    played_format = None
    for action in actions:
        if isinstance(action, StartPlayback):
            played_format = action.format
        if isinstance(action, Play):
            assert played_format is not None, "audio played before a format was accepted"
            assert len(action.pcm) % played_format.frame_size == 0
        if isinstance(action, Send):
            assert len(action.data) <= MAX_FRAME
    disconnects = [a for a in actions if isinstance(a, Disconnect)]
    assert len(disconnects) <= 1
    assert bool(disconnects) == session.closed
