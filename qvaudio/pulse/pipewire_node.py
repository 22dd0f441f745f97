"""The guest's virtual output as a PipeWire node of its own, which reports the path behind it.

An application asks its audio server how late its sound will be heard
(`pa_stream_get_latency`, PipeWire's stream time). A null sink can only
answer for itself: the VM's transport, dom0's queue and the host's stream
behind it are invisible. On PipeWire a node may publish a `Latency`
parameter on its input port, and PipeWire adds it to the delay of every
stream linked to it, pipewire-pulse's clients included (PipeWire's own
pulse tunnel does this with the remote server's latency). So on PipeWire
the guest agent makes its virtual output a `pw_stream` of class
`Audio/Sink` and keeps its `Latency` equal to what the guest measures from
there to the host's speakers (`set_latency_ns`).

The node only consumes: what applications play reaches the agent, as
before, through the node's monitor (pipewire-pulse's `NAME.monitor`), so
the rest of the guest is the same on both servers.

Bound with cffi's ABI mode like libpulse (`qvaudio/decl/libpipewire.h`):
no compiler at install time; the declarations are checked against the
real headers where they are installed. Every failure becomes a
`PipeWireError`; `close` is idempotent.
"""

from __future__ import annotations

import errno as errno_mod
import logging
import math
import os
import re
import threading
import time
from collections.abc import Mapping
from importlib import resources
from typing import Any, ClassVar, Final, Self

import cffi

from qvaudio.common.closing import Closing
from qvaudio.core import spa_pod
from qvaudio.core.errors import QvaudioError
from qvaudio.core.formats import AudioFormat

log = logging.getLogger(__name__)

SONAME: Final = "libpipewire-0.3.so.0"
#: How long `open` waits for the server to take the node.
OPEN_TIMEOUT_S: Final = 5.0
#: A source's first cycle, before the graph says how much it wants (1024 s16 stereo frames).
DEFAULT_CYCLE_BYTES: Final = 4096
#: The oldest libpipewire with `pw_buffer.requested`, which a source node reads.
MIN_SOURCE_VERSION: Final = (0, 3, 49)
#: A full feed looks at the node this often, in case it went away.
WRITE_WAKE_S: Final = 0.1
#: Audio a source node kept while nothing recorded is from an earlier recording,
#: not the start of this one, when nothing was written for this long.
STALE_S: Final = 0.1

_PW_VERSION_STREAM_EVENTS: Final = 2
_PW_DIRECTION_INPUT: Final = 0
_PW_DIRECTION_OUTPUT: Final = 1
_SPA_PROP_RATE: Final = 0x10C
_PW_ID_ANY: Final = 0xFFFFFFFF
_PW_STREAM_FLAG_AUTOCONNECT: Final = 1 << 0
_PW_STREAM_FLAG_MAP_BUFFERS: Final = 1 << 2
_STATE_ERROR: Final = -1
_STATE_UNCONNECTED: Final = 0
_STATE_PAUSED: Final = 2
_STATE_STREAMING: Final = 3
_STATE_NAMES: Final = {-1: "error", 0: "unconnected", 1: "connecting", 2: "paused", 3: "streaming"}

ffi: Final = cffi.FFI()
ffi.cdef(resources.files("qvaudio").joinpath("decl/libpipewire.h").read_text("utf-8"))

_load_lock = threading.Lock()
_lib: Any = None


class PipeWireError(QvaudioError, OSError):
    """libpipewire failed, or the PipeWire server refused or dropped the node."""


def _load() -> Any:
    """dlopen libpipewire and initialise it once, on first use, so importing never fails."""
    global _lib
    with _load_lock:
        if _lib is None:
            try:
                lib: Any = ffi.dlopen(SONAME)
            except OSError as exc:
                raise PipeWireError(
                    errno_mod.ENOENT, f"cannot load {SONAME} ({exc}): install libpipewire"
                ) from None
            lib.pw_init(ffi.NULL, ffi.NULL)
            _lib = lib
        return _lib


def check(result: int, action: str) -> int:
    """libpipewire returns -errno on failure: turn that into a `PipeWireError`."""
    if result < 0:
        raise PipeWireError(-result, f"{action}: {os.strerror(-result)}")
    return result


def _dict(items: Mapping[str, str]) -> tuple[Any, list[Any]]:
    """A `spa_dict` of `items`, and the C strings that must outlive it."""
    keep = [ffi.new("char[]", text.encode()) for pair in items.items() for text in pair]
    entries = ffi.new("struct spa_dict_item[]", len(items))
    for i in range(len(items)):
        entries[i].key = keep[2 * i]
        entries[i].value = keep[2 * i + 1]
    spa_dict = ffi.new("struct spa_dict *", {"n_items": len(items), "items": entries})
    return spa_dict, [*keep, entries]


def _callback_failed(exc_type: Any, value: Any, _tb: Any) -> None:
    log.error("PipeWire callback failed: %s: %s", getattr(exc_type, "__name__", exc_type), value)


# The loop thread calls these with the loop's lock held; each finds its node by handle.


@ffi.callback("void(void *, int, int, const char *)", onerror=_callback_failed)
def _on_state(data: Any, _old: int, state: int, error: Any) -> None:
    node: _Node = ffi.from_handle(data)
    node._state = state
    if error != ffi.NULL:
        text: Any = ffi.string(error)
        node._error = text.decode("utf-8", "backslashreplace")
    node._state_changed(state)
    node._changed.set()


@ffi.callback("void(void *)", onerror=_callback_failed)
def _on_process(data: Any) -> None:
    node: _Node = ffi.from_handle(data)
    node._process()


_EVENTS: Final = ffi.new(
    "struct pw_stream_events *",
    {
        "version": _PW_VERSION_STREAM_EVENTS,
        "state_changed": _on_state,
        "process": _on_process,
    },
)


class _Node(Closing):
    """A PipeWire node of the agent's own, publishing the latency of the path behind it.

    `set_latency_ns` and `close` may come from different threads. No `__del__`:
    the node holds a handle to itself, so only the cycle collector could
    finalise it, on whatever thread it runs, the loop's own included, which
    cannot stop itself; whoever opens a node closes it."""

    _MEDIA_CLASS: ClassVar[str]
    _DIRECTION: ClassVar[int]

    def __init__(self) -> None:
        self._loop: Any = ffi.NULL
        self._stream: Any = ffi.NULL
        self._handle: Any = None
        self._state = _STATE_UNCONNECTED
        self._error = ""
        self._changed = threading.Event()
        self._latency_ns = -1
        self._cycle_bytes = 0
        self._frame_size = 1
        self._closed = False
        # Between `close` freeing the loop and a latency update using it.
        self._lifetime = threading.Lock()
        self.name = ""
        self.format: AudioFormat | None = None

    @classmethod
    def open(
        cls,
        name: str,
        description: str,
        fmt: AudioFormat,
        *,
        remote: str | None = None,
        timeout: float = OPEN_TIMEOUT_S,
    ) -> Self:
        """Create the node `name` taking or giving `fmt`; `PipeWireError` if the server
        does not take it.

        `remote` names the PipeWire socket (libpipewire's default otherwise:
        `$PIPEWIRE_REMOTE`, then `pipewire-0` in the runtime directory)."""
        node = cls()
        try:
            node._open(name, description, fmt, remote, timeout)
        except BaseException:
            node.close()
            raise
        return node

    def _latency_pod(self, latency_ns: int) -> bytes:
        raise NotImplementedError

    def _state_changed(self, state: int) -> None:
        """The server moved the node to `state` (on the loop's thread)."""

    def _process(self) -> None:
        raise NotImplementedError

    def _open(
        self, name: str, description: str, fmt: AudioFormat, remote: str | None, timeout: float
    ) -> None:
        lib = _load()
        self.name = name
        self.format = fmt
        self._frame_size = fmt.frame_size
        self._loop = lib.pw_thread_loop_new(b"qvaudio-pw", ffi.NULL)
        if self._loop == ffi.NULL:
            raise PipeWireError(ffi.errno, "cannot create a PipeWire thread loop")
        props = {
            "media.type": "Audio",
            "media.class": self._MEDIA_CLASS,
            "node.name": name,
            "node.description": description,
            # Applications and the session manager see a device, not a stream.
            "node.virtual": "false",
            "device.class": "sound",
        }
        if remote:
            props["remote.name"] = remote
        spa_dict, _keep = _dict(props)
        properties = lib.pw_properties_new_dict(spa_dict)  # copies them
        self._handle = ffi.new_handle(self)
        lib.pw_thread_loop_lock(self._loop)
        try:
            # Takes the properties whatever happens.
            self._stream = lib.pw_stream_new_simple(
                lib.pw_thread_loop_get_loop(self._loop), name.encode(), properties, _EVENTS,
                self._handle,
            )  # fmt: skip
            if self._stream == ffi.NULL:
                raise PipeWireError(ffi.errno, f"cannot create the PipeWire node {name!r}")
            params, _keep_params = _params(spa_pod.audio_format(fmt), self._latency_pod(0))
            check(
                lib.pw_stream_connect(
                    self._stream, self._DIRECTION, _PW_ID_ANY,
                    _PW_STREAM_FLAG_AUTOCONNECT | _PW_STREAM_FLAG_MAP_BUFFERS, params, 2,
                ),
                f"cannot connect the PipeWire node {name!r}",
            )  # fmt: skip
            self._latency_ns = 0
        finally:
            lib.pw_thread_loop_unlock(self._loop)
        check(lib.pw_thread_loop_start(self._loop), "cannot start the PipeWire thread loop")
        self._wait_taken(timeout)

    def _wait_taken(self, timeout: float) -> None:
        """Until the server has made the node (paused: it exists, nothing plays yet)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self._state
            if state == _STATE_ERROR:
                raise PipeWireError(
                    errno_mod.EIO, f"PipeWire refused the node {self.name!r}: {self._error}"
                )
            if state >= _STATE_PAUSED:
                return
            self._changed.wait(0.05)
            self._changed.clear()
        raise PipeWireError(
            errno_mod.ETIMEDOUT,
            f"PipeWire did not take the node {self.name!r} within {timeout:.0f} s "
            f"(state {_STATE_NAMES.get(self._state, self._state)})",
        )

    @property
    def alive(self) -> bool:
        """False once the server has dropped the node (it went away, or refused it)."""
        return not self._closed and self._state not in (_STATE_ERROR, _STATE_UNCONNECTED)

    @property
    def streaming(self) -> bool:
        """The graph runs the node: something plays into it, or records from it."""
        return not self._closed and self._state == _STATE_STREAMING

    @property
    def cycle_frames(self) -> int:
        """Frames the node took or gave in its last graph cycle (0 before any audio)."""
        return self._cycle_bytes // self._frame_size

    @property
    def latency_ns(self) -> int:
        """What the node reports now, in nanoseconds."""
        return self._latency_ns

    def set_latency_ns(self, latency_ns: int) -> None:
        """Report `latency_ns` as the path behind this node, to everything linked to it."""
        if latency_ns == self._latency_ns:
            return
        params, _keep = _params(self._latency_pod(latency_ns))
        lib = _load()
        with self._lifetime:
            if self._closed or self._stream == ffi.NULL:
                raise PipeWireError(errno_mod.EBADF, f"the node {self.name!r} is closed")
            lib.pw_thread_loop_lock(self._loop)
            try:
                check(
                    lib.pw_stream_update_params(self._stream, params, 1),
                    f"cannot update the latency of {self.name!r}",
                )
                self._latency_ns = latency_ns
            finally:
                lib.pw_thread_loop_unlock(self._loop)

    def close(self) -> None:
        with self._lifetime:
            if self._closed:
                return
            self._closed = True
            if self._loop == ffi.NULL:
                return
            lib = _load()
            # Stopping the loop first: no callback runs while the stream goes.
            lib.pw_thread_loop_stop(self._loop)
            if self._stream != ffi.NULL:
                lib.pw_stream_destroy(self._stream)
                self._stream = ffi.NULL
            lib.pw_thread_loop_destroy(self._loop)
            self._loop = ffi.NULL


class SinkNode(_Node):
    """An `Audio/Sink` node: its `Latency` is the path from it to the host's speakers."""

    _MEDIA_CLASS = "Audio/Sink"
    _DIRECTION = _PW_DIRECTION_INPUT

    def _latency_pod(self, latency_ns: int) -> bytes:
        return spa_pod.playback_latency(latency_ns)

    def _process(self) -> None:
        # The audio is read from the node's monitor; here the buffers go straight back.
        lib = _lib
        buffer = lib.pw_stream_dequeue_buffer(self._stream)
        if buffer != ffi.NULL:
            # One buffer per graph cycle: its size is the cycle's length.
            self._cycle_bytes = int(buffer.buffer.datas[0].chunk.size)
            lib.pw_stream_queue_buffer(self._stream, buffer)


class SourceNode(_Node):
    """An `Audio/Source` node the agent feeds: its `Latency` is the path from the host's
    microphone to it.

    Applications record from it; the agent writes into it through `feed`,
    which behaves like a playback stream of a given buffer and prebuffer
    (`qvaudio.pulse.feed` drives both alike). Each graph cycle takes what
    is buffered; nothing fed, or not yet the prebuffer, is silence. A cycle
    that finds less than it needs after playing is an underflow, counted
    and timed as the server would, and the next audio waits for the
    prebuffer and a whole cycle again."""

    _MEDIA_CLASS = "Audio/Source"
    _DIRECTION = _PW_DIRECTION_OUTPUT

    def __init__(self) -> None:
        super().__init__()
        self._cond = threading.Condition()
        self._ring = bytearray()
        self._feed: NodeFeed | None = None
        self._playing = False
        self.underflows = 0
        self.last_underflow_at = 0.0
        #: Times a recorder came: the graph began running the node after it had not.
        self.recordings = 0
        self._recorder_came = False
        #: The least the buffer held at a cycle beyond what the cycle took, since
        #: the feed last asked (`NodeFeed.slack_us`); None: no cycle played.
        self._least_spare: int | None = None
        self._zeros = b""

    def _latency_pod(self, latency_ns: int) -> bytes:
        return spa_pod.capture_latency(latency_ns)

    def _state_changed(self, state: int) -> None:
        if state == _STATE_STREAMING:
            with self._cond:
                self._recorder_came = True

    def _open(
        self, name: str, description: str, fmt: AudioFormat, remote: str | None, timeout: float
    ) -> None:
        # How much a cycle wants is `pw_buffer.requested`, which 0.3.49 added
        # at the end of the struct: an older library has no such field.
        version = library_version()
        if _version_tuple(version) < MIN_SOURCE_VERSION:
            raise PipeWireError(
                errno_mod.ENOTSUP,
                f"libpipewire {version} is too old for a source node "
                f"(needs {'.'.join(map(str, MIN_SOURCE_VERSION))})",
            )
        super()._open(name, description, fmt, remote, timeout)

    def feed(self, buffer_bytes: int, prebuf_bytes: int) -> NodeFeed:
        """Start feeding the node: the stream-like end a writer uses (one at a time)."""
        with self._cond:
            if self._feed is not None:
                self._feed._close_locked()
            self._ring.clear()
            self._playing = False
            self._feed = NodeFeed(self, buffer_bytes, prebuf_bytes)
            return self._feed

    def _process(self) -> None:
        lib = _lib
        buffer = lib.pw_stream_dequeue_buffer(self._stream)
        if buffer == ffi.NULL:
            return
        data = buffer.buffer.datas[0]
        if data.data != ffi.NULL:
            frame = self._frame_size
            want = int(buffer.requested) * frame or self._cycle_bytes or DEFAULT_CYCLE_BYTES
            want = min(want, int(data.maxsize)) // frame * frame
            pcm = self._take(want)
            out = ffi.cast("uint8_t *", data.data)
            ffi.memmove(out, pcm, len(pcm))
            if len(pcm) < want:
                if len(self._zeros) < want:
                    self._zeros = bytes(want)
                ffi.memmove(out + len(pcm), self._zeros, want - len(pcm))
            chunk = data.chunk
            chunk.offset = 0
            chunk.size = want
            chunk.stride = frame
            self._cycle_bytes = want
        lib.pw_stream_queue_buffer(self._stream, buffer)

    def _take(self, want: int) -> bytes:
        """Up to `want` bytes of what was fed, for one graph cycle."""
        with self._cond:
            feed = self._feed
            if feed is None:
                return b""
            ring = self._ring
            if self._recorder_came:
                self._recorder_came = False
                self.recordings += 1
                # While nothing recorded, the buffer kept the newest audio, up
                # to its size (20 ms for the microphone): played from its
                # front, all of it would stay in the recording's latency.
                # The newest of it, enough to start and to wait for the next
                # write (the writer may be sleeping out a paced one), is what a
                # recorder wants, unless it is from an earlier recording: then
                # none of it.
                fresh = time.monotonic() - feed.last_write_at < STALE_S
                keep = feed.prebuf_bytes + want + feed.last_write_bytes if fresh else 0
                excess = (len(ring) - keep) // self._frame_size * self._frame_size
                if excess > 0:
                    del ring[:excess]
                self._playing = False
                self._cond.notify_all()
            # A whole cycle on top of the prebuffer: a cycle is longer than
            # the chunks the writer brings (512 frames against 480 in 10 ms),
            # so starting on the prebuffer alone would run short every cycle
            # and put a little silence into each.
            if not self._playing and len(ring) >= feed.prebuf_bytes + want:
                self._playing = True
            if not self._playing:
                return b""
            spare = len(ring) - want
            if self._least_spare is None or spare < self._least_spare:
                self._least_spare = spare
            pcm = bytes(ring[:want])
            del ring[:want]
            if len(pcm) < want:
                self.underflows += 1
                self.last_underflow_at = time.monotonic()
                self._playing = False
            self._cond.notify_all()
            return pcm

    def _set_rate_ratio(self, ratio: float) -> None:
        with self._lifetime:
            if self._closed or self._stream == ffi.NULL:
                raise PipeWireError(errno_mod.EBADF, f"the node {self.name!r} is closed")
            lib = _load()
            lib.pw_thread_loop_lock(self._loop)
            try:
                # A client's stream gets no rate-match area from the server
                # (only clock and position): the stream's resampler control it is.
                value = ffi.new("float *", ratio)
                check(
                    lib.pw_stream_set_control(
                        self._stream, _SPA_PROP_RATE, 1, value, ffi.cast("int", 0)
                    ),
                    f"cannot set the rate of {self.name!r}",
                )
            finally:
                lib.pw_thread_loop_unlock(self._loop)


class NodeFeed(Closing):
    """The writing end of a `SourceNode`, shaped like a playback stream for `feed`.

    `write` blocks while the buffer is full, as a stream's write does. While
    nothing records from the node the graph does not run it: then the
    buffer keeps the newest audio, and writes are paced at the audio's own
    speed, so a recorder that comes gets the latest sound at once."""

    def __init__(self, node: SourceNode, buffer_bytes: int, prebuf_bytes: int) -> None:
        fmt = node.format
        assert fmt is not None
        self._node = node
        self.format = fmt
        self.rate = fmt.rate
        self.buffer_bytes = max(buffer_bytes, fmt.frame_size)
        self.prebuf_bytes = min(max(prebuf_bytes, 0), self.buffer_bytes)
        #: When audio was last written (monotonic), and how much.
        self.last_write_at = -math.inf
        self.last_write_bytes = 0
        self._closed = False

    @property
    def underflows(self) -> int:
        return self._node.underflows

    @property
    def last_underflow_at(self) -> float:
        return self._node.last_underflow_at

    @property
    def starts(self) -> int:
        """Times a recorder came to the node, which then starts afresh from the newest audio."""
        return self._node.recordings

    def write(self, pcm: bytes) -> None:
        node = self._node
        paced = False
        with node._cond:
            while True:
                if self._closed:
                    raise PipeWireError(errno_mod.EBADF, f"the feed of {node.name!r} is closed")
                if not node.alive:
                    raise PipeWireError(errno_mod.EPIPE, f"PipeWire dropped the node {node.name!r}")
                ring = node._ring
                # Room for the prebuffer and a whole graph cycle, whatever the
                # quantum: a node waiting for them must be able to get them.
                limit = max(self.buffer_bytes, self.prebuf_bytes + node._cycle_bytes + len(pcm))
                if len(ring) + len(pcm) <= limit:
                    ring += pcm
                    break
                if not node.streaming:
                    del ring[: len(ring) + len(pcm) - limit]
                    ring += pcm
                    paced = True
                    break
                node._cond.wait(WRITE_WAKE_S)
            self.last_write_at = time.monotonic()
            self.last_write_bytes = len(pcm)
        if paced:
            time.sleep(len(pcm) / self.format.bytes_per_second)

    def latency_us(self) -> int:
        """How long audio written now waits before a recorder gets it: what is buffered,
        and one graph cycle, since the node fills a cycle's buffer outside the graph's
        thread and PipeWire hands it on in the cycle after (any thread)."""
        node = self._node
        with node._cond:
            buffered = len(node._ring)
        return (buffered + node._cycle_bytes) * 1_000_000 // self.format.bytes_per_second

    def slack_us(self) -> int | None:
        """The least audio the node held at a graph cycle beyond what the cycle took,
        since the last call (None: no cycle played since): how much of the buffer
        was never needed, however unevenly the feed and the graph ran meanwhile."""
        node = self._node
        with node._cond:
            spare, node._least_spare = node._least_spare, None
        if spare is None:
            return None
        return max(spare, 0) * 1_000_000 // self.format.bytes_per_second

    def set_rate(self, rate: int) -> None:
        """Take the audio as if it came at `rate` Hz: a little over its rate drains the buffer."""
        # Above 1 the stream's resampler takes more of the feed per graph cycle
        # (tests/test_pipewire_node.py measures it).
        self._node._set_rate_ratio(rate / self.format.rate)
        log.debug("%s takes its feed at %d Hz", self._node.name, rate)
        self.rate = rate

    def _close_locked(self) -> None:
        self._closed = True
        self._node._ring.clear()
        self._node._playing = False
        self._node._cond.notify_all()
        if self._node._feed is self:
            self._node._feed = None

    def close(self) -> None:
        with self._node._cond:
            if not self._closed:
                self._close_locked()


def _params(*pods: bytes) -> tuple[Any, list[Any]]:
    """A `const struct spa_pod *[]` over copies of `pods`, and what must outlive it."""
    buffers = [ffi.new("uint8_t[]", pod) for pod in pods]
    array = ffi.new("const struct spa_pod *[]", [ffi.cast("struct spa_pod *", b) for b in buffers])
    return array, [*buffers, array]


def _version_tuple(version: str) -> tuple[int, ...]:
    """(0, 3, 65) for "0.3.65"; a suffix ("-rc1") after a part's digits ends it."""
    parts = []
    for part in version.split(".")[:3]:
        digits = re.match(r"\d*", part)
        parts.append(int(digits.group() or 0) if digits else 0)
    return tuple(parts)


def library_version() -> str:
    version: Any = ffi.string(_load().pw_get_library_version())
    return str(version.decode())
