"""qvaudio.vchan against the real libxenvchan, on a machine without Xen.

Without Xen the init functions fail, so these tests check what can be checked
here: that the library loads, that failures become the typed errors with the
right hints, that our struct layout matches gcc's view of the real header, and
that a Vchan whose peer is gone (a ring in process memory) behaves.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cffi
import pytest

from qvaudio import vchan
from qvaudio.core.xen import vchan_path
from qvaudio.transport.base import StreamClosed, StreamState, TransportError
from qvaudio.transport.xen import XenListener, XenStream
from qvaudio.vchan import (
    LibraryNotFoundError,
    Vchan,
    VchanClosedError,
    VchanError,
    VchanPeerNotFoundError,
    VchanQuotaError,
    VchanState,
    XenUnavailableError,
    ffi,
)

HEADER = Path("/usr/include/libxenvchan.h")
GUEST, PORT = 5, 4790
GUEST_PATH = f"/local/domain/{GUEST}/data/vchan/0/{PORT}"


def test_no_xen_here() -> None:
    # The ENOENT tests below are only meaningful on a machine without Xen.
    assert not os.path.exists("/dev/xen/gntalloc"), "this machine has Xen: tests assume none"
    assert not os.path.exists("/dev/xen/gntdev")


# -------------------------------------------------------------------- loading
def test_library_loads_from_the_real_soname() -> None:
    lib = vchan.load_library()
    assert lib is vchan.load_library()  # loaded once
    assert callable(lib.libxenvchan_server_init)
    real = ffi.dlopen("libxenvchan.so.4.17")
    for name in (
        "server_init",
        "client_init",
        "close",
        "recv",
        "read",
        "send",
        "write",
        "wait",
        "fd_for_select",
        "is_open",
        "data_ready",
        "buffer_space",
    ):
        assert getattr(real, f"libxenvchan_{name}") is not None


def test_sonames_try_the_tested_release_first_and_the_dev_link_last() -> None:
    assert vchan.SONAMES[0] == "libxenvchan.so.4.17"
    assert vchan.SONAMES[-1] == "libxenvchan.so"
    assert {"libxenvchan.so.4.18", "libxenvchan.so.4.19", "libxenvchan.so.4.16"} <= set(
        vchan.SONAMES
    )


def test_missing_library_is_a_typed_error_with_install_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(vchan, "_lib", None)
    monkeypatch.setenv(vchan.ENV_LIBRARY, "/nonexistent/libxenvchan.so.9")
    with pytest.raises(LibraryNotFoundError) as info:
        Vchan.client(GUEST, port=PORT)
    assert info.value.errno == errno.ENOENT
    assert "libxenmisc4.17" in info.value.hint
    assert "xen-libs" in info.value.hint
    assert "/nonexistent/libxenvchan.so.9" in str(info.value)


def test_env_override_loads_the_given_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vchan, "_lib", None)
    monkeypatch.setenv(vchan.ENV_LIBRARY, "/usr/lib/x86_64-linux-gnu/libxenvchan.so.4.17")
    assert callable(vchan.load_library().libxenvchan_is_open)


# -------------------------------------------------------- init without Xen
def test_server_without_xen_says_not_in_a_xen_domain() -> None:
    with pytest.raises(XenUnavailableError) as info:
        Vchan.server(0, port=PORT, self_domid=GUEST)
    assert info.value.errno == errno.ENOENT
    assert info.value.hint == "not running in a Xen domain (no /dev/xen/gntalloc)"
    assert GUEST_PATH in str(info.value)


def test_server_refuses_to_start_without_event_channels(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "gntalloc").touch()
    monkeypatch.setattr(vchan, "_GNTALLOC", str(tmp_path / "gntalloc"))
    monkeypatch.setattr(vchan, "_EVTCHN", str(tmp_path / "evtchn"))
    with pytest.raises(XenUnavailableError) as info:
        Vchan.server(0, port=PORT, self_domid=GUEST)
    assert info.value.errno == errno.ENOENT
    assert "xen_evtchn" in info.value.hint


def test_client_without_xen_says_no_xenstore(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XENSTORED_PATH", raising=False)
    with pytest.raises(XenUnavailableError) as info:
        Vchan.client(GUEST, port=PORT)
    assert info.value.errno == errno.ENOENT
    assert info.value.hint == (
        "no XenStore reachable (not in a Xen domain, or xenstored not running)"
    )
    assert GUEST_PATH in str(info.value)


class FakeXenstored:
    """Answers every XenStore request with ENOENT, on a Unix socket (wire format
    of xen/io/xs_wire.h: four u32 header fields, then the payload)."""

    XS_ERROR = 16

    def __init__(self, path: str) -> None:
        self.path = path
        self.requests: list[bytes] = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(path)
        self._server.listen(1)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._server.accept()
        with conn:
            while header := conn.recv(16, socket.MSG_WAITALL):
                _type, req_id, tx_id, length = struct.unpack("<4I", header)
                self.requests.append(conn.recv(length, socket.MSG_WAITALL) if length else b"")
                reply = b"ENOENT\0"
                conn.sendall(struct.pack("<4I", self.XS_ERROR, req_id, tx_id, len(reply)) + reply)

    def close(self) -> None:
        self._server.close()


def test_client_with_xenstore_but_no_server_says_peer_not_found(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    store = FakeXenstored(str(tmp_path / "xenstored.sock"))
    monkeypatch.setenv("XENSTORED_PATH", store.path)
    fake_gntdev = tmp_path / "gntdev"
    fake_gntdev.touch()
    monkeypatch.setattr(vchan, "_GNTDEV", str(fake_gntdev))
    try:
        with pytest.raises(VchanPeerNotFoundError) as info:
            Vchan.client(GUEST, port=PORT)
    finally:
        store.close()
    assert info.value.errno == errno.ENOENT
    assert GUEST_PATH in info.value.hint
    assert f"domain {GUEST}" in info.value.hint
    # The real library asked our XenStore for the server's ring reference.
    assert store.requests and store.requests[0] == f"{GUEST_PATH}/ring-ref\0".encode()


def test_stale_ring_is_peer_not_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # On real Xen, client_init fails with EINVAL when the server's process died
    # without removing its entries: nobody is listening, the modules are fine.
    fake_gntdev = tmp_path / "gntdev"
    fake_gntdev.touch()
    monkeypatch.setattr(vchan, "_GNTDEV", str(fake_gntdev))
    monkeypatch.setenv("XENSTORED_PATH", str(fake_gntdev))
    ffi.errno = errno.EINVAL
    with pytest.raises(VchanPeerNotFoundError) as info:
        vchan.check(ffi.NULL, "client_init", path=GUEST_PATH, domain=GUEST)
    assert info.value.errno == errno.EINVAL
    assert "stale" in info.value.hint and f"domain {GUEST}" in info.value.hint


def test_quota_errno_becomes_quota_error() -> None:
    ffi.errno = errno.ENOSPC
    with pytest.raises(VchanQuotaError) as info:
        vchan.check(ffi.NULL, "server_init", path=GUEST_PATH, domain=0)
    assert info.value.errno == errno.ENOSPC
    assert "quota" in info.value.hint


def test_success_passes_through_check() -> None:
    assert vchan.check(7, "read") == 7


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give xs_path, or port"),
        ({"port": PORT}, "self_domid"),
        ({"xs_path": "relative/path"}, "absolute"),
        ({"xs_path": "/a", "port": 1}, "not both"),
        ({"port": PORT, "self_domid": GUEST, "read_min": (1 << 20) + 1}, "read_min"),
        ({"port": PORT, "self_domid": GUEST, "write_min": 0}, "write_min"),
    ],
)
def test_server_arguments_are_checked_before_the_library_sees_them(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Vchan.server(0, **kwargs)


def test_domid_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="domain id"):
        Vchan.client(0x7FF0, port=PORT)


def test_conventional_path() -> None:
    assert vchan_path(GUEST, 0, PORT) == GUEST_PATH


# ------------------------------------------------------------ struct layout
LAYOUT_PROGRAM = r"""
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <libxenvchan.h>
int main(void) {
    struct libxenvchan v;
    memset(&v, 0, sizeof v);
    v.blocking = 1;
    const unsigned char *raw = (const unsigned char *)&v;
    for (size_t i = 0; i < sizeof v; i++)
        if (raw[i]) printf("blocking_byte %zu %u\n", i, raw[i]);
    printf("size %zu\n", sizeof(struct libxenvchan));
    printf("ring_size %zu\n", sizeof(struct libxenvchan_ring));
    printf("ring %zu\n", offsetof(struct libxenvchan, ring));
    printf("event %zu\n", offsetof(struct libxenvchan, event));
    printf("event_port %zu\n", offsetof(struct libxenvchan, event_port));
    printf("read %zu\n", offsetof(struct libxenvchan, read));
    printf("write %zu\n", offsetof(struct libxenvchan, write));
    printf("xs_path %zu\n", offsetof(struct libxenvchan, xs_path));
    printf("order %zu\n", offsetof(struct libxenvchan_ring, order));
    printf("cli_live %zu\n", offsetof(struct vchan_interface, cli_live));
    printf("srv_live %zu\n", offsetof(struct vchan_interface, srv_live));
    return 0;
}
"""


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    assert HEADER.exists(), f"{HEADER} missing: install libxen-dev"
    work = tmp_path_factory.mktemp("layout")
    (work / "layout.c").write_text(LAYOUT_PROGRAM)
    subprocess.run(
        ["gcc", "-Wall", "-o", str(work / "layout"), str(work / "layout.c")],
        check=True,
        capture_output=True,
    )
    out = subprocess.run([str(work / "layout")], check=True, capture_output=True, text=True)
    return dict(line.split(" ", 1) for line in out.stdout.splitlines())


def test_struct_layout_matches_the_real_header(c_layout: dict[str, str]) -> None:
    assert int(c_layout["size"]) == ffi.sizeof("struct libxenvchan")
    assert int(c_layout["ring_size"]) == ffi.sizeof("struct libxenvchan_ring")
    for field in ("ring", "event", "event_port", "read", "write", "xs_path"):
        assert int(c_layout[field]) == ffi.offsetof("struct libxenvchan", field), field
    assert int(c_layout["order"]) == ffi.offsetof("struct libxenvchan_ring", "order")


def test_blocking_bitfield_is_the_same_bit(c_layout: dict[str, str]) -> None:
    ours: Any = ffi.new("struct libxenvchan *")
    ours.blocking = 1
    raw = bytes(ffi.buffer(ours))
    nonzero = [f"{i} {b}" for i, b in enumerate(raw) if b]
    assert nonzero == [c_layout["blocking_byte"]]


def test_fake_ring_offsets_match_the_header(c_layout: dict[str, str]) -> None:
    assert int(c_layout["cli_live"]) == CLI_LIVE
    assert int(c_layout["srv_live"]) == SRV_LIVE


# ------------------------------------- a Vchan over a ring in process memory
CLI_LIVE, SRV_LIVE = 20, 21  # offsets in struct vchan_interface
_libc_ffi = cffi.FFI()
_libc_ffi.cdef("void *calloc(size_t nmemb, size_t size); char *strdup(const char *s);")
_libc: Any = _libc_ffi.dlopen(None)


class MemoryVchan(Vchan):
    """A Vchan whose shared page is ordinary memory: no Xen needed, as long as
    nobody triggers a notification. libxenvchan frees the struct, so it comes
    from calloc; close() detaches the fake page, which Xen never mapped. The
    event fd is a pipe that never becomes readable (there is no event channel)."""

    page: Any
    event_fd: int

    def fileno(self) -> int:
        self._live()
        return self.event_fd

    def close(self) -> None:
        if self._ctrl is not None:
            self._ctrl.ring = ffi.NULL
        super().close()


@pytest.fixture
def memory_vchan() -> Iterator[Any]:
    made: list[MemoryVchan] = []
    pipes: list[int] = []

    def make(*, server: bool, peer_live: int) -> MemoryVchan:
        page = ffi.new("uint8_t[4096]")
        page[CLI_LIVE if server else SRV_LIVE] = peer_live
        address = int(
            _libc_ffi.cast("uintptr_t", _libc.calloc(1, ffi.sizeof("struct libxenvchan")))
        )
        ctrl: Any = ffi.cast("struct libxenvchan *", address)
        ctrl.ring = ffi.cast("struct vchan_interface *", page)
        ctrl.read.shr = ffi.cast("struct ring_shared *", page)
        ctrl.write.shr = ffi.cast("struct ring_shared *", page + 8)
        ctrl.read.buffer = page + 1024
        ctrl.write.buffer = page + 2048
        ctrl.read.order = ctrl.write.order = 10
        ctrl.is_server = 1 if server else 0
        v = MemoryVchan(ctrl, path="/memory", domain=7, server=server)
        v.page = page
        v.event_fd, write_end = os.pipe()
        pipes.extend((v.event_fd, write_end))
        made.append(v)
        return v

    yield make
    for v in made:
        v.close()
    for fd in pipes:
        os.close(fd)


def test_peer_gone_is_closed_error_on_read_and_write(memory_vchan: Any) -> None:
    v = memory_vchan(server=False, peer_live=0)
    assert v.state is VchanState.CLOSED
    with pytest.raises(VchanClosedError) as info:
        v.read(100)
    assert info.value.errno == errno.EPIPE
    with pytest.raises(VchanClosedError):
        v.write(b"x")


def test_waiting_server_reads_nothing_without_blocking(memory_vchan: Any) -> None:
    v = memory_vchan(server=True, peer_live=2)
    assert v.state is VchanState.WAITING_FOR_PEER
    assert v.blocking is False
    assert v.read(100) == b""
    assert v.recv(16) == b""
    assert v.data_ready() == 0
    assert v.read_capacity == v.write_capacity == 1024


def test_oversized_whole_messages_are_refused(memory_vchan: Any) -> None:
    v = memory_vchan(server=True, peer_live=1)
    with pytest.raises(ValueError, match="exceeds the write ring"):
        v.send(b"x" * 1025)
    with pytest.raises(ValueError, match="recv size"):
        v.recv(1025)


def test_blocking_flag_round_trips(memory_vchan: Any) -> None:
    v = memory_vchan(server=False, peer_live=1)
    v.blocking = True
    assert v.blocking is True
    v.blocking = False
    assert v.blocking is False


def test_closed_vchan_raises_clearly_and_close_is_idempotent(memory_vchan: Any) -> None:
    with memory_vchan(server=False, peer_live=1) as v:
        assert not v.closed
    assert v.closed
    v.close()
    assert v.state is VchanState.CLOSED
    for call in (lambda: v.read(1), lambda: v.write(b"x"), v.fileno, v.data_ready, v.wait):
        with pytest.raises(VchanClosedError) as info:
            call()
        assert info.value.errno == errno.EBADF
        assert "close() was called" in info.value.hint
    assert isinstance(info.value, VchanError)
    assert isinstance(info.value, OSError)


def test_xen_stream_maps_a_gone_peer_to_stream_closed(memory_vchan: Any) -> None:
    stream = XenStream(memory_vchan(server=False, peer_live=0), "xen:7:4790")
    assert stream.state is StreamState.CLOSED
    with pytest.raises(StreamClosed):
        stream.read(10)
    with pytest.raises(StreamClosed):
        stream.write(b"x")


def test_xen_stream_of_a_waiting_server(memory_vchan: Any) -> None:
    import selectors

    stream = XenStream(memory_vchan(server=True, peer_live=2), "xen:0:4790")
    assert stream.state is StreamState.WAITING
    assert stream.read(10) == b""
    assert stream.poll_events(want_write=True) == selectors.EVENT_READ
    stream.close()
    stream.close()
    with pytest.raises(StreamClosed):
        stream.read(10)


def test_xen_listener_hands_over_the_server_and_publishes_a_new_one(memory_vchan: Any) -> None:
    servers: list[MemoryVchan] = []

    def make_server() -> Vchan:
        server: MemoryVchan = memory_vchan(server=True, peer_live=2)
        server._ctrl.xs_path = _libc.strdup(GUEST_PATH.encode())
        servers.append(server)
        return server

    listener = XenListener("xen:0:4790", make_server)
    first_fd = listener.fileno()
    assert listener.accept() is None
    assert len(servers) == 1

    servers[0].page[CLI_LIVE] = 1  # dom0 connected
    stream = listener.accept()
    assert stream is not None
    assert stream.state is StreamState.CONNECTED
    # The next server waits at the same path; closing this connection must
    # not remove its XenStore entries, so the old server forgot the path.
    assert len(servers) == 2
    assert listener.fileno() != first_fd
    assert servers[0]._ctrl.xs_path == ffi.NULL

    servers[1].page[CLI_LIVE] = 0  # a client came and went before accept
    second_fd = listener.fileno()
    assert listener.accept() is None
    assert servers[1].closed
    assert len(servers) == 3
    assert listener.fileno() != second_fd

    listener.close()
    listener.close()
    assert servers[2].closed
    assert not servers[0].closed  # the accepted stream outlives its listener
    with pytest.raises(TransportError, match="listener was closed"):
        listener.accept()
    stream.close()
    assert servers[0].closed


def test_xen_listener_leaves_the_connect_event_to_the_stream(memory_vchan: Any) -> None:
    # dom0's connect and its first write can share one pending event, and
    # libxenvchan notifies a write only once until the reader reads again: if
    # accept() consumed that event, the bytes would wait with nothing to wake
    # the stream (a lost wake-up seen on real Xen, tests/xen/).
    consumed: list[int] = []

    class Counting(MemoryVchan):
        def wait_if_pending(self) -> bool:
            consumed.append(1)
            return False

    def make_server() -> Vchan:
        server: MemoryVchan = memory_vchan(server=True, peer_live=2)
        server.__class__ = Counting
        return server

    listener = XenListener("xen:0:4790", make_server)
    assert listener.accept() is None
    assert consumed == [1]  # waiting for a peer: spurious events are consumed
    listener._server.page[CLI_LIVE] = 1  # type: ignore[union-attr]  # dom0 connected
    stream = listener.accept()
    assert stream is not None and stream.state is StreamState.CONNECTED
    assert consumed == [1]  # the event is left pending for the stream's fd
    stream.close()
    listener.close()
