"""PCM streams to and from a PulseAudio-protocol server, on libpulse's asynchronous API.

Both agents move PCM through the PulseAudio native protocol: the guest
records the monitor of its virtual sink, dom0 plays each VM's audio into the
host server. Why libpulse's asynchronous API, through cffi in ABI mode:

* pulsectl (which qvaudio uses for control) cannot read or write PCM.
* cffi is already a dependency, and ABI mode (``dlopen``) needs no compiler
  and no headers at install time; the declarations live in one file,
  ``qvaudio/decl/libpulse.h``.
* The asynchronous API gives what the blocking ``pa_simple`` hides: stream
  properties (``pa_stream_new_with_proplist``, no environment variables), the
  server's underflow events, timing info, a variable rate for
  clock-drift control, the sink input's index (its volume is set on the same
  connection), and waits that another thread can interrupt. It behaves the
  same against PulseAudio 16 and pipewire-pulse, since both speak the same
  protocol to the same client library.

One `Engine` per server and process: a ``pa_threaded_mainloop`` (libpulse's
own thread) and one context, shared by every stream the process opens on
that server, and made again when the server went away. Streams keep the
blocking interface the agents' stream threads use (`read`, `write`, ...):
each call takes the mainloop's lock and waits on its condition, which the
callbacks signal. A call blocked in a wait returns at once, with
`StreamClosed`, when another thread calls `close`.

Callbacks are Python functions libpulse calls from its thread; each only
records an event and signals the condition, and none lets an exception
reach C (``onerror`` logs it). Each call takes the interpreter lock, so
the frequent ones (write and read requests, timing updates) are set only
while a call waits for them; state and underflow stay set.

A playback stream's latency is counted from the timing info's byte
indices rather than taken from ``pa_stream_get_latency``, which breaks
after a rate change (see `PcmStream._queued_us`).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Mapping
from contextlib import suppress
from importlib import resources
from typing import Any, ClassVar, Final, Self

import cffi

from qvaudio.common.closing import Closing
from qvaudio.core.errors import QvaudioError
from qvaudio.core.formats import AudioFormat, SampleFormat

log = logging.getLogger(__name__)

_ffi: Final = cffi.FFI()
_ffi.cdef(resources.files("qvaudio").joinpath("decl/libpulse.h").read_text("utf-8"))

_PA_SAMPLE: Final[dict[SampleFormat, str]] = {
    SampleFormat.S16LE: "PA_SAMPLE_S16LE",
    SampleFormat.S32LE: "PA_SAMPLE_S32LE",
    SampleFormat.F32LE: "PA_SAMPLE_FLOAT32LE",
}
#: pa_buffer_attr's "let the server choose".
_DEFAULT: Final = 0xFFFFFFFF
#: PA_VOLUME_NORM: 100 %.
VOLUME_NORM: Final = 0x10000
#: How long a context or a stream may take to become ready.
OPEN_TIMEOUT_S: Final = 10.0
#: A playback stream's timing older than this is refreshed (see `_queued_us`).
TIMING_REFRESH_S: Final = 0.05
#: Extrapolating a stream's timing further than this would be guessing.
TIMING_TRUST_S: Final = 2.0
#: The longest a stream's wait goes without looking again, had a wake-up been lost.
WAKE_CHECK_S: Final = 1.0
#: PA_ERR_* codes the module raises itself.
ERR_CONNECTIONTERMINATED: Final = 11
ERR_TIMEOUT: Final = 8
ERR_BADSTATE: Final = 15

_lib: Any = None
_lib_lock = threading.Lock()


def _load() -> Any:
    """dlopen libpulse once, on first use, so importing never fails."""
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _ffi.dlopen("libpulse.so.0")
        return _lib


class PulseError(QvaudioError):
    """A libpulse call failed; `code` is the PA_ERR_* value, `message` pa_strerror's text."""

    def __init__(self, code: int, message: str, action: str) -> None:
        super().__init__(f"{action}: {message} (pa error {code})")
        self.code = code
        self.message = message
        self.action = action


class StreamClosed(PulseError):
    """The stream was closed (by another thread) while a call waited on it."""


def strerror(code: int) -> str:
    """pa_strerror's text for a PA_ERR_* code."""
    text = _load().pa_strerror(code)
    if text == _ffi.NULL:
        return "unknown error"
    raw = _ffi.string(text)  # bytes for a char *
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw


def error(code: int, action: str) -> PulseError:
    """The one place a PA_ERR_* code becomes an exception."""
    return PulseError(code, strerror(code), action)


def channel_map_of(fmt: AudioFormat) -> Any:
    """`fmt`'s channel order (formats.CHANNEL_POSITIONS) as a pa_channel_map.

    Always passed explicitly: with none, libpulse has no default for 7 or 8
    channels and the server refuses the stream ("Invalid argument")."""
    channel_map: Any = _ffi.new("pa_channel_map *")
    if _load().pa_channel_map_parse(channel_map, fmt.channel_map.encode()) == _ffi.NULL:
        raise ValueError(f"libpulse does not know the channel map {fmt.channel_map!r}")
    return channel_map


def channel_map_text(channel_map: Any) -> str:
    """libpulse's own rendering of a pa_channel_map (for checks and logs)."""
    buf = _ffi.new("char[]", 336)  # PA_CHANNEL_MAP_SNPRINT_MAX
    _load().pa_channel_map_snprint(buf, len(buf), channel_map)
    raw = _ffi.string(buf)
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _validate_props(props: Mapping[str, str]) -> None:
    for key, value in props.items():
        if not key or "=" in key or "\0" in key or any(c.isspace() for c in key):
            raise ValueError(f"invalid stream property name {key!r}")
        if "\0" in value:
            raise ValueError(f"stream property {key!r} contains NUL")


def _enc(text: str | None) -> Any:
    return _ffi.NULL if text is None else text.encode("utf-8")


def _proplist(props: Mapping[str, str]) -> Any:
    """A pa_proplist holding `props`, freed with the returned cdata's owner."""
    lib = _load()
    proplist = _ffi.gc(lib.pa_proplist_new(), lib.pa_proplist_free)
    for key, value in props.items():
        if lib.pa_proplist_sets(proplist, key.encode(), value.encode()) < 0:
            raise ValueError(f"libpulse refuses the stream property {key!r}")
    return proplist


# -- callbacks: libpulse's thread calls them; each finds its object by handle --------


def _callback_failed(exc_type: Any, value: Any, _tb: Any) -> None:
    log.error("libpulse callback failed: %s: %s", getattr(exc_type, "__name__", exc_type), value)


@_ffi.callback("void(pa_context *, void *)", onerror=_callback_failed)
def _on_context_state(_context: Any, userdata: Any) -> None:
    engine: Engine = _ffi.from_handle(userdata)
    _load().pa_threaded_mainloop_signal(engine._mainloop, 0)


@_ffi.callback("void(pa_stream *, void *)", onerror=_callback_failed)
def _on_stream_signal(_stream: Any, userdata: Any) -> None:
    stream: PcmStream = _ffi.from_handle(userdata)
    stream._wakeup.set()


@_ffi.callback("void(pa_stream *, void *)", onerror=_callback_failed)
def _on_stream_state(pa_stream: Any, userdata: Any) -> None:
    lib = _load()
    stream: PcmStream = _ffi.from_handle(userdata)
    if lib.pa_stream_get_state(pa_stream) == lib.PA_STREAM_FAILED:
        # Read now: once this callback returns the stream leaves its
        # context, and with it the reason.
        context = lib.pa_stream_get_context(pa_stream)
        if context != _ffi.NULL:
            stream._failure = int(lib.pa_context_errno(context))
    stream._wakeup.set()
    lib.pa_threaded_mainloop_signal(stream._engine._mainloop, 0)


@_ffi.callback("void(pa_stream *, size_t, void *)", onerror=_callback_failed)
def _on_stream_request(_stream: Any, _nbytes: int, userdata: Any) -> None:
    stream: PcmStream = _ffi.from_handle(userdata)
    stream._wakeup.set()


@_ffi.callback("void(pa_stream *, void *)", onerror=_callback_failed)
def _on_underflow(_stream: Any, userdata: Any) -> None:
    stream: PcmStream = _ffi.from_handle(userdata)
    stream.last_underflow_at = time.monotonic()
    stream.underflows += 1
    stream._wakeup.set()
    _load().pa_threaded_mainloop_signal(stream._engine._mainloop, 0)


@_ffi.callback("void(pa_stream *, int, void *)", onerror=_callback_failed)
def _on_stream_success(_stream: Any, success: int, userdata: Any) -> None:
    waiter: _Waiter = _ffi.from_handle(userdata)
    waiter.done(bool(success))


@_ffi.callback("void(pa_context *, int, void *)", onerror=_callback_failed)
def _on_context_success(_context: Any, success: int, userdata: Any) -> None:
    waiter: _Waiter = _ffi.from_handle(userdata)
    waiter.done(bool(success))


@_ffi.callback(
    "void(pa_context *, const pa_sink_input_info *, int, void *)", onerror=_callback_failed
)
def _on_sink_input_info(_context: Any, info: Any, eol: int, userdata: Any) -> None:
    waiter: _Waiter = _ffi.from_handle(userdata)
    if eol or info == _ffi.NULL:
        waiter.done(eol > 0 and waiter.value is not None)
        return
    volume = info.volume
    waiter.value = [int(volume.values[i]) for i in range(volume.channels)]


class _Waiter:
    """The outcome of one libpulse operation, signalled from its callback."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.finished = False
        self.success = False
        self.value: Any = None
        self.handle = _ffi.new_handle(self)

    def done(self, success: bool) -> None:
        self.finished = True
        self.success = success
        _load().pa_threaded_mainloop_signal(self._engine._mainloop, 0)


class Engine:
    """libpulse's threaded main loop and one context to one server, for every stream on it.

    Made by `engine_for`, never freed before the process exits (an `atexit`
    hook stops its thread): streams come and go, the engine stays. When the
    server goes away the context fails; the next stream opened makes a new
    one, so a restarted server is found again.
    """

    def __init__(self, server: str | None) -> None:
        lib = _load()
        self.server = server
        self._mainloop = lib.pa_threaded_mainloop_new()
        if self._mainloop == _ffi.NULL:
            raise MemoryError("pa_threaded_mainloop_new failed")
        self._handle = _ffi.new_handle(self)
        self._context: Any = None
        #: Why the last context failed (PA_ERR_*).
        self._failure = ERR_CONNECTIONTERMINATED
        self._stopped = False
        if lib.pa_threaded_mainloop_start(self._mainloop) < 0:
            raise PulseError(10, "cannot start libpulse's thread", "starting libpulse")

    # The mainloop's lock, held for every call into libpulse from our threads.
    def lock(self) -> None:
        _load().pa_threaded_mainloop_lock(self._mainloop)

    def unlock(self) -> None:
        _load().pa_threaded_mainloop_unlock(self._mainloop)

    def wait(self) -> None:
        """Wait for any callback's signal; the lock is released meanwhile."""
        _load().pa_threaded_mainloop_wait(self._mainloop)

    def signal(self) -> None:
        _load().pa_threaded_mainloop_signal(self._mainloop, 0)

    def context(self, deadline: float) -> Any:
        """The ready context, connecting (again) if needed. Call with the lock held.

        Several threads may wait for the same connection; whichever sees it
        fail frees it, so the others must never touch it again: each
        compares the engine's context with the one it waited for."""
        lib = _load()
        where = f"connecting to {self.server or 'the default server'}"
        waited_for: Any = None
        while True:
            context = self._context
            if waited_for is not None and context is not waited_for:
                # Another waiter saw it fail and let it go.
                raise error(self._failure, where)
            if context is None:
                context = self._connect(where)
                waited_for = context  # a new connection that fails is an answer
            state = lib.pa_context_get_state(context)
            if state == lib.PA_CONTEXT_READY:
                return context
            if state in (lib.PA_CONTEXT_FAILED, lib.PA_CONTEXT_TERMINATED):
                self._failure = int(lib.pa_context_errno(context)) or ERR_CONNECTIONTERMINATED
                self._drop_context()
                if waited_for is None:
                    continue  # failed before this call: connect afresh
                raise error(self._failure, where)
            if time.monotonic() > deadline:
                raise error(ERR_TIMEOUT, where)
            waited_for = context
            self._timed_wait(deadline)

    def _connect(self, where: str) -> Any:
        """Start connecting a new context (the engine's from now on)."""
        lib = _load()
        if self._stopped:
            raise PulseError(ERR_BADSTATE, "libpulse has been stopped", where)
        # The client's own properties; each stream sets its name and more.
        props = _proplist({"application.name": "qvaudio", "application.id": "org.qvaudio"})
        api = lib.pa_threaded_mainloop_get_api(self._mainloop)
        context = lib.pa_context_new_with_proplist(api, b"qvaudio", props)
        if context == _ffi.NULL:
            raise MemoryError("pa_context_new_with_proplist failed")
        self._context = context
        lib.pa_context_set_state_callback(context, _on_context_state, self._handle)
        flags = lib.PA_CONTEXT_NOAUTOSPAWN
        if lib.pa_context_connect(context, _enc(self.server), flags, _ffi.NULL) < 0:
            self._failure = int(lib.pa_context_errno(context)) or ERR_CONNECTIONTERMINATED
            self._drop_context()
            raise error(self._failure, where)
        return context

    def _timed_wait(self, deadline: float) -> None:
        """Wait for a signal, or until shortly after `deadline` (a timer signals)."""
        _Timer.arm(self, deadline)
        self.wait()

    def _drop_context(self) -> None:
        lib = _load()
        context, self._context = self._context, None
        if context is not None:
            lib.pa_context_set_state_callback(context, _ffi.NULL, _ffi.NULL)
            lib.pa_context_disconnect(context)
            lib.pa_context_unref(context)

    def stop(self) -> None:
        """Stop libpulse's thread (at exit): no callback runs after this."""
        if self._stopped:
            return
        self.lock()
        try:
            self._stopped = True
            self._drop_context()
        finally:
            self.unlock()
        _load().pa_threaded_mainloop_stop(self._mainloop)


class _Timer:
    """Wakes waits that have a deadline: libpulse's condition has no timed wait.

    One daemon thread signals every engine with a deadline due; waits check
    the time when they wake. Deadlines are rare (opening streams, drains), so
    one thread for the process is enough."""

    _lock: ClassVar = threading.Lock()
    _due: ClassVar[dict[int, tuple[Engine, float]]] = {}
    _wake: ClassVar = threading.Event()
    _thread: ClassVar[threading.Thread | None] = None

    @classmethod
    def arm(cls, engine: Engine, deadline: float) -> None:
        with cls._lock:
            key = id(engine)
            known = cls._due.get(key)
            if known is None or known[1] > deadline:
                cls._due[key] = (engine, deadline)
            if cls._thread is None:
                cls._thread = threading.Thread(target=cls._run, name="libpulse-timer", daemon=True)
                cls._thread.start()
        cls._wake.set()

    @classmethod
    def _run(cls) -> None:
        while True:
            with cls._lock:
                now = time.monotonic()
                due = [engine for engine, when in cls._due.values() if when <= now]
                for engine in due:
                    del cls._due[id(engine)]
                nearest = min((when for _, when in cls._due.values()), default=now + 1.0)
            for engine in due:
                engine.signal()
            cls._wake.wait(max(0.001, min(nearest - time.monotonic() + 0.001, 1.0)))
            cls._wake.clear()


_engines: dict[tuple[int, str | None], Engine] = {}
_engines_lock = threading.Lock()


def engine_for(server: str | None) -> Engine:
    """The process's engine for `server` (None: libpulse's default server)."""
    # Keyed by pid too: a forked child cannot use its parent's libpulse thread.
    key = (os.getpid(), server)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = Engine(server)
        return engine


@atexit.register
def _stop_engines() -> None:
    # Before the interpreter goes: a callback into a finalizing Python crashes.
    with _engines_lock:
        engines = [engine for (pid, _), engine in _engines.items() if pid == os.getpid()]
    for engine in engines:
        engine.stop()


class PcmStream(Closing):
    """One playback or record stream with a blocking interface.

    `read`, `write`, `drain`, `flush`, `latency_us` and `set_rate` may be
    called from different threads. `close` may be called from any thread at
    any time: a call waiting on the stream returns with `StreamClosed`.
    """

    def __init__(self, engine: Engine, fmt: AudioFormat, playback: bool, description: str) -> None:
        self._engine = engine
        self.format = fmt
        self.is_playback = playback
        self._description = description
        self._handle = _ffi.new_handle(self)
        self._stream: Any = None
        self._closed = False
        self._busy = 0
        self._idle = threading.Condition()
        #: Set by this stream's callbacks (and `close`): what `_wait_for` waits on.
        self._wakeup = threading.Event()
        #: The server's events, counted by libpulse's thread.
        self.underflows = 0
        self.last_underflow_at = 0.0
        #: Why the server failed the stream (PA_ERR_*), 0 while it has not.
        self._failure = 0
        self.rate = fmt.rate
        #: The host stream's index on the server (its sink input / source output).
        self.index: int | None = None
        #: A playback stream plays what it is given from its first write on; it is
        #: never started afresh by the server (`qvaudio.pulse.feed.PlaybackStream`).
        self.starts = 0

    # -- construction -------------------------------------------------

    @classmethod
    def record(
        cls,
        server: str | None,
        device: str | None,
        fmt: AudioFormat,
        app_name: str,
        stream_name: str,
        fragsize_bytes: int,
        props: dict[str, str] | None = None,
    ) -> Self:
        """Record from `device` (a source, e.g. "vm.monitor"; None: the default)."""
        attr: Any = _ffi.new("pa_buffer_attr *")
        attr.maxlength = attr.tlength = attr.prebuf = attr.minreq = _DEFAULT
        attr.fragsize = cls._frames(fmt, fragsize_bytes, "fragsize_bytes")
        return cls._open(server, device, fmt, app_name, stream_name, attr, False, props)

    @classmethod
    def playback(
        cls,
        server: str | None,
        device: str | None,
        fmt: AudioFormat,
        app_name: str,
        stream_name: str,
        tlength_bytes: int,
        prebuf_bytes: int | None = None,
        minreq_bytes: int | None = None,
        props: dict[str, str] | None = None,
        *,
        variable_rate: bool = False,
    ) -> Self:
        """Play into `device` (a sink; None: the default). Unset sizes: server's choice.

        `variable_rate`: the stream's rate may be changed while it plays
        (`set_rate`), for clock-drift control."""
        attr: Any = _ffi.new("pa_buffer_attr *")
        attr.maxlength = attr.fragsize = _DEFAULT
        attr.tlength = cls._frames(fmt, tlength_bytes, "tlength_bytes")
        attr.prebuf = _DEFAULT if prebuf_bytes is None else prebuf_bytes
        attr.minreq = _DEFAULT if minreq_bytes is None else minreq_bytes
        return cls._open(
            server, device, fmt, app_name, stream_name, attr, True, props, variable_rate
        )

    @staticmethod
    def _frames(fmt: AudioFormat, nbytes: int, what: str) -> int:
        if nbytes <= 0 or nbytes % fmt.frame_size:
            raise ValueError(f"{what}={nbytes} is not a positive multiple of {fmt.frame_size}")
        return nbytes

    @classmethod
    def _open(
        cls,
        server: str | None,
        device: str | None,
        fmt: AudioFormat,
        app_name: str,
        stream_name: str,
        attr: Any,
        playback: bool,
        props: dict[str, str] | None,
        variable_rate: bool = False,
    ) -> Self:
        lib = _load()
        all_props = {"application.name": app_name, "media.name": stream_name, **(props or {})}
        _validate_props(all_props)
        proplist = _proplist(all_props)
        spec: Any = _ffi.new("pa_sample_spec *")
        spec.format = getattr(lib, _PA_SAMPLE[fmt.sample_format])
        spec.rate = fmt.rate
        spec.channels = fmt.channels
        channel_map = channel_map_of(fmt)
        kind = "playback" if playback else "record"
        where = (
            f"{kind} stream {stream_name!r} on {device or 'default device'}"
            f" at {server or 'default server'}"
        )
        engine = engine_for(server)
        self = cls(engine, fmt, playback, where)
        # What pa_simple asked for: the server sizes its buffers by ours
        # (ADJUST_LATENCY) and the latency is known between updates.
        flags = (
            lib.PA_STREAM_INTERPOLATE_TIMING
            | lib.PA_STREAM_ADJUST_LATENCY
            | lib.PA_STREAM_AUTO_TIMING_UPDATE
        )
        if variable_rate:
            flags |= lib.PA_STREAM_VARIABLE_RATE
        deadline = time.monotonic() + OPEN_TIMEOUT_S
        engine.lock()
        try:
            context = engine.context(deadline)
            stream = lib.pa_stream_new_with_proplist(
                context, stream_name.encode(), spec, channel_map, proplist
            )
            if stream == _ffi.NULL:
                raise error(lib.pa_context_errno(context), f"opening {where}")
            self._stream = stream
            lib.pa_stream_set_state_callback(stream, _on_stream_state, self._handle)
            lib.pa_stream_set_underflow_callback(stream, _on_underflow, self._handle)
            if playback:
                rc = lib.pa_stream_connect_playback(
                    stream, _enc(device), attr, flags, _ffi.NULL, _ffi.NULL
                )
            else:
                rc = lib.pa_stream_connect_record(stream, _enc(device), attr, flags)
            if rc < 0:
                raise error(lib.pa_context_errno(context), f"opening {where}")
            while (state := lib.pa_stream_get_state(stream)) != lib.PA_STREAM_READY:
                if state in (lib.PA_STREAM_FAILED, lib.PA_STREAM_TERMINATED):
                    raise error(self._errno(), f"opening {where}")
                if time.monotonic() > deadline:
                    raise error(ERR_TIMEOUT, f"opening {where}")
                engine._timed_wait(deadline)
            self.index = int(lib.pa_stream_get_index(stream))
        except BaseException:
            self._release()
            engine.unlock()
            raise
        engine.unlock()
        log.debug("opened %s (%s)", where, fmt)
        return self

    def _release(self) -> None:
        """Disconnect and free the stream; with the engine's lock held."""
        lib = _load()
        stream, self._stream = self._stream, None
        if stream is None:
            return
        for setter in (
            lib.pa_stream_set_state_callback,
            lib.pa_stream_set_latency_update_callback,
            lib.pa_stream_set_underflow_callback,
        ):
            setter(stream, _ffi.NULL, _ffi.NULL)
        lib.pa_stream_set_write_callback(stream, _ffi.NULL, _ffi.NULL)
        lib.pa_stream_set_read_callback(stream, _ffi.NULL, _ffi.NULL)
        if lib.pa_stream_get_state(stream) in (lib.PA_STREAM_CREATING, lib.PA_STREAM_READY):
            lib.pa_stream_disconnect(stream)
        lib.pa_stream_unref(stream)

    # -- I/O --------------------------------------------------------------

    def _enter(self, action: str) -> Any:
        """Take the lock for one call; the stream if it can be used, else raise."""
        with self._idle:
            if self._closed:
                raise ValueError(f"I/O on closed {self._description}")
            self._busy += 1
        self._engine.lock()
        try:
            return self._usable(action)
        except BaseException:
            self._exit()
            raise

    def _exit(self) -> None:
        self._engine.unlock()
        with self._idle:
            self._busy -= 1
            self._idle.notify_all()

    def _usable(self, action: str) -> Any:
        """The pa_stream, with the lock held; raise if it is closed or has failed."""
        lib = _load()
        if self._closed or self._stream is None:
            raise StreamClosed(
                ERR_CONNECTIONTERMINATED, "stream closed", f"{action} {self._description}"
            )
        stream = self._stream
        if lib.pa_stream_get_state(stream) != lib.PA_STREAM_READY:
            raise error(self._errno(), f"{action} {self._description}")
        return stream

    def read(self, nbytes: int) -> bytes:
        """Block until exactly `nbytes` have been recorded and return them."""
        buf = bytearray(nbytes)
        self.readinto(buf)
        return bytes(buf)

    def readinto(self, buf: bytearray | memoryview) -> int:
        """Fill all of `buf` with recorded audio; returns its length."""
        lib = _load()
        view = memoryview(buf).cast("B")
        want = len(view)
        got = 0
        data = _ffi.new("const void **")
        size = _ffi.new("size_t *")
        stream = self._enter("reading")
        try:
            while got < want:
                # Checked before every call: a call on a failed stream would
                # replace the context's error (why it failed) with its own.
                stream = self._usable("reading")
                if lib.pa_stream_readable_size(stream) == 0:
                    self._wait_for(lib.pa_stream_set_read_callback, _on_stream_request)
                    continue
                if lib.pa_stream_peek(stream, data, size) < 0:
                    raise error(self._errno(), f"reading {self._description}")
                available = int(size[0])
                if available == 0:
                    self._wait_for(lib.pa_stream_set_read_callback, _on_stream_request)
                    continue
                take = min(available - self._read_offset, want - got)
                if data[0] != _ffi.NULL:
                    chunk = _ffi.buffer(data[0], available)
                    view[got : got + take] = chunk[self._read_offset : self._read_offset + take]
                else:  # a hole in the recording: silence
                    view[got : got + take] = bytes(take)
                got += take
                if self._read_offset + take == available:
                    lib.pa_stream_drop(stream)
                    self._read_offset = 0
                else:
                    self._read_offset += take
        finally:
            self._exit()
        return want

    _read_offset = 0

    def _wait_for(self, set_callback: Any, callback: Any) -> None:
        """Wait (lock held) until the event `set_callback` reports, the
        stream's state changes, or `close`; the caller checks which.

        The callback is set only while someone waits: each call from
        libpulse's thread takes the interpreter lock, and a stream's requests
        come every few milliseconds (more when the server resamples it) while
        its writer seldom has to wait. No event is missed: nothing reaches
        libpulse's thread while this thread holds the lock, so the event is
        cleared and the callback set before any can come.

        Not the main loop's own wait: its signal wakes every thread waiting
        on any stream of the engine, so with N VMs each server request woke
        N writers, which all queued for the main loop's lock (16 VMs took
        90 % of a core and dropped audio)."""
        stream = self._stream
        self._wakeup.clear()
        set_callback(stream, callback, self._handle)
        try:
            self._engine.unlock()
            try:
                # The timeout is a safety net only: the caller looks again.
                self._wakeup.wait(WAKE_CHECK_S)
            finally:
                self._engine.lock()
        finally:
            if self._stream is not None:
                set_callback(self._stream, _ffi.NULL, _ffi.NULL)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue whole frames for playback; blocks while the server's buffer is full."""
        lib = _load()
        cbuf = _ffi.from_buffer(data)
        total = len(cbuf)
        if total % self.format.frame_size:
            raise ValueError(f"write of {total} bytes is not whole {self.format} frames")
        done = 0
        stream = self._enter("writing")
        try:
            while done < total:
                stream = self._usable("writing")
                room = int(lib.pa_stream_writable_size(stream))
                if room == 0:
                    self._wait_for(lib.pa_stream_set_write_callback, _on_stream_request)
                    continue
                take = min(room, total - done)
                # No free callback: libpulse copies the data.
                if (
                    lib.pa_stream_write(
                        stream, cbuf + done, take, _ffi.NULL, 0, lib.PA_SEEK_RELATIVE
                    )
                    < 0
                ):
                    raise error(self._errno(), f"writing {self._description}")
                done += take
        finally:
            self._exit()

    def _errno(self) -> int:
        """Why the last call failed (the context's error), with the lock held."""
        lib = _load()
        if self._failure:
            return self._failure
        context = None if self._stream is None else lib.pa_stream_get_context(self._stream)
        if context is None or context == _ffi.NULL:
            return ERR_CONNECTIONTERMINATED
        return int(lib.pa_context_errno(context)) or ERR_CONNECTIONTERMINATED

    def _operation(self, start: Any, action: str) -> None:
        """Run one stream operation (drain, flush, ...) and wait for its end."""
        stream = self._enter(action)
        waiter = _Waiter(self._engine)
        try:
            operation = start(stream, _on_stream_success, waiter.handle)
            self._wait_operation(operation, waiter, action)
        finally:
            self._exit()

    def drain(self) -> None:
        """Block until everything written so far has been played."""
        self._operation(_load().pa_stream_drain, "draining")

    def flush(self) -> None:
        """Discard what is buffered (unplayed, or recorded but not yet read)."""
        self._operation(_load().pa_stream_flush, "flushing")

    def latency_us(self) -> int:
        """Playback: how long until a byte written now is heard. Record: how
        long ago the oldest unread byte was captured. Microseconds."""
        lib = _load()
        usec = _ffi.new("pa_usec_t *")
        negative = _ffi.new("int *")
        stream = self._enter("querying latency of")
        try:
            if self.is_playback:
                while (queued := self._queued_us(stream)) is None:
                    # The first timing update is on its way.
                    self._wait_for(lib.pa_stream_set_latency_update_callback, _on_stream_signal)
                    stream = self._usable("querying latency of")
                return queued
            while lib.pa_stream_get_latency(stream, usec, negative) < 0:
                self._wait_for(lib.pa_stream_set_latency_update_callback, _on_stream_signal)
                stream = self._usable("querying latency of")
            return 0 if negative[0] else int(usec[0])
        finally:
            self._exit()

    def _queued_us(self, stream: Any) -> int | None:
        """What a playback stream holds, written but not heard, from the last timing update.

        Not pa_stream_get_latency: libpulse turns the stream's byte counts
        into time at the current rate, so every rate change (clock-drift
        control) moves its whole history, and its interpolation then
        reported seconds of latency that were not there (seen: 22 ms read as
        up to 2.5 s). Bytes are counted here instead, and what the server
        consumed since the update is estimated at the rate it plays now."""
        info = _load().pa_stream_get_timing_info(stream)
        if info == _ffi.NULL or info.write_index_corrupt or info.read_index_corrupt:
            return None
        lib = _load()
        bytes_per_s = self.rate * self.format.frame_size
        buffered = int(info.write_index) - int(info.read_index)
        stamp = info.timestamp.tv_sec + info.timestamp.tv_usec / 1e6
        age = max(0.0, time.time() - stamp)
        if age > TIMING_REFRESH_S:
            # libpulse's own updates slow down to one a second; ask for the
            # next one now (it is no wait: this answer is extrapolated).
            operation = lib.pa_stream_update_timing_info(stream, _ffi.NULL, _ffi.NULL)
            if operation != _ffi.NULL:
                lib.pa_operation_unref(operation)
        if info.playing:
            buffered -= round(min(age, TIMING_TRUST_S) * bytes_per_s)
        return max(0, round(buffered * 1e6 / bytes_per_s)) + int(info.sink_usec)

    def set_rate(self, rate: int) -> None:
        """Change the stream's rate (opened with `variable_rate`); does not wait."""
        lib = _load()
        stream = self._enter("changing the rate of")
        try:
            operation = lib.pa_stream_update_sample_rate(stream, rate, _ffi.NULL, _ffi.NULL)
            if operation == _ffi.NULL:
                raise error(self._errno(), f"changing the rate of {self._description}")
            lib.pa_operation_unref(operation)
            self.rate = rate
        finally:
            self._exit()

    def volume(self) -> list[int]:
        """The stream's volume per channel, in pa_volume_t (VOLUME_NORM is 100 %)."""
        lib = _load()
        stream = self._enter("querying volume of")
        try:
            waiter = _Waiter(self._engine)
            context = lib.pa_stream_get_context(stream)  # ready, as the stream is
            getter = lib.pa_context_get_sink_input_info if self.is_playback else None
            if getter is None:
                raise ValueError("only a playback stream's volume is read")
            operation = getter(
                context, int(lib.pa_stream_get_index(stream)), _on_sink_input_info, waiter.handle
            )
            self._wait_operation(operation, waiter, "querying volume of")
            return list(waiter.value or [])
        finally:
            self._exit()

    def set_volume(self, volume: int) -> None:
        """Set every channel to `volume` (pa_volume_t)."""
        lib = _load()
        stream = self._enter("setting volume of")
        try:
            cvolume: Any = _ffi.new("pa_cvolume *")
            cvolume.channels = self.format.channels
            for i in range(self.format.channels):
                cvolume.values[i] = volume
            waiter = _Waiter(self._engine)
            context = lib.pa_stream_get_context(stream)  # ready, as the stream is
            operation = lib.pa_context_set_sink_input_volume(
                context,
                int(lib.pa_stream_get_index(stream)),
                cvolume,
                _on_context_success,
                waiter.handle,
            )
            self._wait_operation(operation, waiter, "setting volume of")
        finally:
            self._exit()

    def _wait_operation(self, operation: Any, waiter: _Waiter, action: str) -> None:
        lib = _load()
        if operation == _ffi.NULL:
            raise error(self._errno(), f"{action} {self._description}")
        try:
            while not waiter.finished:
                self._engine.wait()
                self._usable(action)
        finally:
            if not waiter.finished:
                # No callback may come to a waiter that is gone.
                lib.pa_operation_cancel(operation)
            lib.pa_operation_unref(operation)
        if not waiter.success:
            raise error(ERR_BADSTATE, f"{action} {self._description}")

    # -- lifetime -----------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Disconnect; safe to call more than once, from any thread.

        A call waiting on the stream in another thread returns with
        `StreamClosed`; the stream is freed once it has."""
        with self._idle:
            if self._closed:
                return
            self._closed = True
        self._engine.lock()
        # Under the lock: after any waiter's clear (which it does holding it).
        self._wakeup.set()
        self._engine.signal()
        self._engine.unlock()
        with self._idle:
            while self._busy:
                self._idle.wait()
        self._engine.lock()
        try:
            self._release()
        finally:
            self._engine.unlock()
        log.debug("closed %s", self._description)

    def __del__(self) -> None:
        # A forgotten stream would otherwise keep its server connection forever.
        if getattr(self, "_closed", True) is False and getattr(self, "_busy", 1) == 0:
            with suppress(Exception):  # at interpreter exit the library may be gone
                self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<PcmStream {state} {self._description} {self.format}>"
