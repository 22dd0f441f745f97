"""Blocking PCM streams to and from a PulseAudio-protocol server.

Both agents move PCM through the PulseAudio native protocol: the guest
records the monitor of its virtual sink, dom0 plays each VM's audio into the
host server. Why libpulse-simple, through cffi in ABI mode:

* pulsectl (which qvaudio uses for control) cannot read or write PCM.
* cffi is already a dependency, and ABI mode (``dlopen``) needs no compiler
  and no headers at install time; the declarations live in one file,
  ``qvaudio/decl/libpulse_simple.h``.
* ``pa_simple`` is the smallest and most stable part of libpulse (unchanged
  for well over a decade) and behaves the same against PulseAudio 16 and
  pipewire-pulse, since both speak the same protocol to the same client
  library. Each call blocks in C; cffi releases the GIL around it, so one
  thread per stream is cheap.

Stream properties. ``pa_simple_new`` takes only an application name and a
stream name, and hides its context, so there is no way to hand it a
``pa_proplist``. libpulse itself, however, fills every new context's
property list from the environment (``PULSE_PROP_<key>``,
``PULSE_PROP_OVERRIDE_<key>`` and the ``PULSE_PROP`` string), and servers
attach the client's properties to each of its streams. So extra properties are
set as ``PULSE_PROP_OVERRIDE_<key>=<value>`` variables for exactly the
duration of ``pa_simple_new``, under a module lock, and restored afterwards.
One variable per key means values need no quoting; the ``OVERRIDE`` form
means our values win over a ``PULSE_PROP`` inherited from the user's session.
This was chosen over the asynchronous API (``pa_threaded_mainloop`` plus
``pa_stream_new_with_proplist``), which would have meant re-implementing the
blocking read/write/drain/latency logic of pa_simple with callbacks; the
tests check that the properties are visible on both PulseAudio and PipeWire.
The price is that no other stream may be opened while the variables are
set (it would take them as its own), and that nothing may create a libpulse
context while they are being written or removed: glibc's ``setenv`` is not
safe against a concurrent ``getenv`` at all. So a stream opening holds
`STREAM_LOCK` for the whole of ``pa_simple_new``, and `ENV_LOCK` while it
writes and while it removes the variables; every other context qvaudio
creates (`pulse_devices.connect`) is made under `ENV_LOCK` alone. A control
connection may then carry an opening stream's properties, which is
harmless for a connection that opens no stream, and it is never held up by
an opening that waits: a passive stream on PipeWire waits until its graph
runs, which on an idle sink is at the next sound.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from importlib import resources
from typing import Any, Final, Self

import cffi

from qvaudio.common.closing import Closing
from qvaudio.core.errors import QvaudioError
from qvaudio.core.formats import AudioFormat, SampleFormat

log = logging.getLogger(__name__)

_ffi: Final = cffi.FFI()
_ffi.cdef(resources.files("qvaudio").joinpath("decl/libpulse_simple.h").read_text("utf-8"))

_PA_SAMPLE: Final[dict[SampleFormat, str]] = {
    SampleFormat.S16LE: "PA_SAMPLE_S16LE",
    SampleFormat.S32LE: "PA_SAMPLE_S32LE",
    SampleFormat.F32LE: "PA_SAMPLE_FLOAT32LE",
}
#: pa_buffer_attr's "let the server choose".
_DEFAULT: Final = 0xFFFFFFFF
#: pa_simple_get_latency's error return, (pa_usec_t) -1.
_LATENCY_ERROR: Final = 0xFFFFFFFFFFFFFFFF
_PROP_PREFIX: Final = "PULSE_PROP_OVERRIDE_"

_libs: tuple[Any, Any] | None = None
_libs_lock = threading.Lock()
#: Held by a stream opening for as long as its properties are in the
#: environment (see module doc), so that no other stream takes them.
STREAM_LOCK = threading.Lock()
#: Held while the environment is written, and by every other libpulse context
#: creation in the process: glibc's setenv may move the environment under a
#: concurrent getenv, which libpulse calls while it creates a context, and
#: that is a crash, not just a wrong property.
ENV_LOCK = threading.Lock()


def _load() -> tuple[Any, Any]:
    """dlopen both libraries once, on first use, so importing never fails."""
    global _libs
    with _libs_lock:
        if _libs is None:
            _libs = (_ffi.dlopen("libpulse-simple.so.0"), _ffi.dlopen("libpulse.so.0"))
        return _libs


class PulseError(QvaudioError):
    """A libpulse call failed; `code` is the PA_ERR_* value, `message` pa_strerror's text."""

    def __init__(self, code: int, message: str, action: str) -> None:
        super().__init__(f"{action}: {message} (pa error {code})")
        self.code = code
        self.message = message
        self.action = action


def strerror(code: int) -> str:
    """pa_strerror's text for a PA_ERR_* code."""
    text = _load()[1].pa_strerror(code)
    if text == _ffi.NULL:
        return "unknown error"
    raw = _ffi.string(text)  # bytes for a char *
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw


def check(failed: bool, error: Any, action: str) -> None:
    """Turn a failed libpulse call into PulseError; `error` is the call's int* out-argument.

    Every pa_simple call reports failure its own way (negative int, NULL,
    (pa_usec_t)-1) but all fill in the same error code, so callers decide
    `failed` and this one place builds the exception.
    """
    if failed:
        code = int(error[0])
        raise PulseError(code, strerror(code), action)


def channel_map_of(fmt: AudioFormat) -> Any:
    """`fmt`'s channel order (formats.CHANNEL_POSITIONS) as a pa_channel_map.

    Always passed explicitly: with none, libpulse has no default for 7 or 8
    channels and the server refuses the stream ("Invalid argument")."""
    channel_map: Any = _ffi.new("pa_channel_map *")
    if _load()[1].pa_channel_map_parse(channel_map, fmt.channel_map.encode()) == _ffi.NULL:
        raise ValueError(f"libpulse does not know the channel map {fmt.channel_map!r}")
    return channel_map


def channel_map_text(channel_map: Any) -> str:
    """libpulse's own rendering of a pa_channel_map (for checks and logs)."""
    buf = _ffi.new("char[]", 336)  # PA_CHANNEL_MAP_SNPRINT_MAX
    _load()[1].pa_channel_map_snprint(buf, len(buf), channel_map)
    raw = _ffi.string(buf)
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _validate_props(props: Mapping[str, str]) -> None:
    for key, value in props.items():
        if not key or "=" in key or "\0" in key or any(c.isspace() for c in key):
            raise ValueError(f"invalid stream property name {key!r}")
        if "\0" in value:
            raise ValueError(f"stream property {key!r} contains NUL")


@contextmanager
def _properties_in_environment(props: Mapping[str, str]) -> Iterator[None]:
    """Expose `props` to libpulse's context creation, then put the environment back.

    STREAM_LOCK is taken even without properties: a stream opened while
    another thread's properties are set would take them as its own."""
    with STREAM_LOCK:
        saved = {key: os.environ.get(_PROP_PREFIX + key) for key in props}
        try:
            with ENV_LOCK:
                for key, value in props.items():
                    os.environ[_PROP_PREFIX + key] = value
            yield
        finally:
            with ENV_LOCK:
                for key, old in saved.items():
                    if old is None:
                        os.environ.pop(_PROP_PREFIX + key, None)
                    else:
                        os.environ[_PROP_PREFIX + key] = old


def _enc(text: str | None) -> Any:
    return _ffi.NULL if text is None else text.encode("utf-8")


class PcmStream(Closing):
    """One blocking playback or record stream (a pa_simple connection).

    `read`, `write`, `drain`, `flush` and `latency_us` may be called from
    different threads (libpulse locks internally). `close` waits for calls
    in progress to return before freeing the connection, so stop the thread
    blocked in `read`/`write` first (a record stream returns within one
    fragment; a playback stream as soon as there is buffer space).
    """

    def __init__(self, handle: Any, fmt: AudioFormat, playback: bool, description: str) -> None:
        self._handle = handle
        self.format = fmt
        self.is_playback = playback
        self._description = description
        self._cond = threading.Condition()
        self._busy = 0
        self._closed = False

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
    ) -> Self:
        """Play into `device` (a sink; None: the default). Unset sizes: server's choice."""
        attr: Any = _ffi.new("pa_buffer_attr *")
        attr.maxlength = attr.fragsize = _DEFAULT
        attr.tlength = cls._frames(fmt, tlength_bytes, "tlength_bytes")
        attr.prebuf = _DEFAULT if prebuf_bytes is None else prebuf_bytes
        attr.minreq = _DEFAULT if minreq_bytes is None else minreq_bytes
        return cls._open(server, device, fmt, app_name, stream_name, attr, True, props)

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
    ) -> Self:
        lib = _load()[0]
        props = dict(props or {})
        _validate_props(props)
        spec: Any = _ffi.new("pa_sample_spec *")
        spec.format = getattr(lib, _PA_SAMPLE[fmt.sample_format])
        spec.rate = fmt.rate
        spec.channels = fmt.channels
        channel_map = channel_map_of(fmt)
        error = _ffi.new("int *")
        direction = lib.PA_STREAM_PLAYBACK if playback else lib.PA_STREAM_RECORD
        kind = "playback" if playback else "record"
        where = (
            f"{kind} stream {stream_name!r} on {device or 'default device'}"
            f" at {server or 'default server'}"
        )
        with _properties_in_environment(props):
            handle = lib.pa_simple_new(
                _enc(server),
                _enc(app_name),
                direction,
                _enc(device),
                _enc(stream_name),
                spec,
                channel_map,
                attr,
                error,
            )
        check(handle == _ffi.NULL, error, f"opening {where}")
        log.debug("opened %s (%s)", where, fmt)
        return cls(handle, fmt, playback, where)

    # -- I/O --------------------------------------------------------------

    @contextmanager
    def _call(self) -> Iterator[Any]:
        """Keep the handle alive for one call; refuse calls after close()."""
        with self._cond:
            if self._closed:
                raise ValueError(f"I/O on closed {self._description}")
            self._busy += 1
        try:
            yield self._handle
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()

    def read(self, nbytes: int) -> bytes:
        """Block until exactly `nbytes` have been recorded and return them."""
        buf = bytearray(nbytes)
        self.readinto(buf)
        return bytes(buf)

    def readinto(self, buf: bytearray | memoryview) -> int:
        """Fill all of `buf` with recorded audio (no copy); returns its length."""
        error = _ffi.new("int *")
        cbuf = _ffi.from_buffer(buf, require_writable=True)
        with self._call() as handle:
            rc = _load()[0].pa_simple_read(handle, cbuf, len(cbuf), error)
        check(rc < 0, error, f"reading {self._description}")
        return len(cbuf)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue whole frames for playback; blocks while the server's buffer is full."""
        cbuf = _ffi.from_buffer(data)
        if len(cbuf) % self.format.frame_size:
            raise ValueError(f"write of {len(cbuf)} bytes is not whole {self.format} frames")
        error = _ffi.new("int *")
        with self._call() as handle:
            rc = _load()[0].pa_simple_write(handle, cbuf, len(cbuf), error)
        check(rc < 0, error, f"writing {self._description}")

    def drain(self) -> None:
        """Block until everything written so far has been played."""
        error = _ffi.new("int *")
        with self._call() as handle:
            rc = _load()[0].pa_simple_drain(handle, error)
        check(rc < 0, error, f"draining {self._description}")

    def flush(self) -> None:
        """Discard what is buffered (unplayed, or recorded but not yet read)."""
        error = _ffi.new("int *")
        with self._call() as handle:
            rc = _load()[0].pa_simple_flush(handle, error)
        check(rc < 0, error, f"flushing {self._description}")

    def latency_us(self) -> int:
        """Playback: how long until a byte written now is heard. Record: how
        long ago the oldest unread byte was captured. Microseconds."""
        error = _ffi.new("int *")
        with self._call() as handle:
            usec = int(_load()[0].pa_simple_get_latency(handle, error))
        check(usec == _LATENCY_ERROR, error, f"querying latency of {self._description}")
        return usec

    # -- lifetime -----------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Disconnect; safe to call more than once."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            while self._busy:
                self._cond.wait()
            handle, self._handle = self._handle, None
        _load()[0].pa_simple_free(handle)
        log.debug("closed %s", self._description)

    def __del__(self) -> None:
        # A forgotten stream would otherwise keep its server connection forever.
        if getattr(self, "_closed", True) is False and self._busy == 0:
            with suppress(Exception):  # at interpreter exit the library may be gone
                self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<PcmStream {state} {self._description} {self.format}>"
