"""qvaudio.transport: address parsing, stream semantics, and honest failures.

The stream semantics run over every socket transport. vsock needs a kernel
with a loopback transport (vsock_loopback); where the kernel refuses, each
semantics test instead asserts that the refusal is a TransportUnavailable
that explains itself. Nothing is skipped.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import selectors
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qvaudio import vchan
from qvaudio.transport import (
    DEFAULT_PORT,
    GUEST_FORMS,
    Address,
    Listener,
    PeerUnavailable,
    Stream,
    StreamClosed,
    StreamState,
    TransportError,
    TransportUnavailable,
    UnixAddress,
    VsockAddress,
    XenAddress,
    connect,
    listen,
    parse_address,
)
from qvaudio.transport.addresses import (
    QrexecSource,
    Source,
    UnixDirSource,
    VsockSource,
    XenSource,
    parse_source,
)
from tests.test_vchan import FakeXenstored
from tests.waiting import wait_until

TIMEOUT = 5.0
CHUNK = 64 * 1024


# ------------------------------------------------------------------ parsing
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("xen:0", XenAddress(0, DEFAULT_PORT)),
        ("xen:5", XenAddress(5, 4790)),
        ("xen:12:4800", XenAddress(12, 4800)),
        ("xen:32751:0", XenAddress(32751, 0)),
        ("vsock:2:4790", VsockAddress(2, 4790)),
        ("vsock:1:1024", VsockAddress(1, 1024)),
        ("vsock:4294967294:4294967294", VsockAddress(4294967294, 4294967294)),
        ("unix:/run/qvaudio/guest.sock", UnixAddress("/run/qvaudio/guest.sock")),
        ("unix:relative.sock", UnixAddress("relative.sock")),
        ("unix:/tmp/a:b", UnixAddress("/tmp/a:b")),
    ],
)
def test_parse_good_addresses(text: str, expected: Address) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "xen",
        "xen:",
        "xen:abc",
        "xen:-1",
        "xen:+5",
        "xen: 5",
        "xen:0x10",
        "xen:32752",
        "xen:5:65536",
        "xen:5:4790:1",
        "xen:٣",
        "vsock:2",
        "vsock::4790",
        "vsock:0:4790",
        "vsock:4294967295:1",
        "vsock:2:4294967295",
        "vsock:2:1:3",
        "unix:",
        "unix:/tmp/\0x",
        "unix:/" + "x" * 200,
        "tcp:localhost:4790",
        "/run/qvaudio.sock",
    ],
)
def test_parse_bad_addresses_name_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match="bad address") as info:
        parse_address(text)
    message = str(info.value)
    assert repr(text) in message
    if "must be" not in message and "path" not in message:
        assert GUEST_FORMS in message


@pytest.mark.parametrize("text", ["xen:5:4790", "vsock:2:4790", "unix:/tmp/x.sock"])
def test_addresses_print_as_they_parse(text: str) -> None:
    assert str(parse_address(text)) == text


def test_addresses_are_frozen() -> None:
    address = XenAddress(5)
    with pytest.raises(AttributeError):
        address.domid = 6  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("xen", XenSource()),
        ("qrexec", QrexecSource()),
        ("unix:/run/qvaudio/vms", UnixDirSource("/run/qvaudio/vms")),
        ("vsock:work=5,media=6", VsockSource({"work": 5, "media": 6})),
    ],
)
def test_dom0_sources_parse_and_print_back(text: str, expected: Source) -> None:
    # The one parser of dom0's transports: the config, the flags and the agent use it.
    assert parse_source(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize("text", ["xen:3", "vsock", "tcp:1.2.3.4", "vsock:work=2", ""])
def test_bad_dom0_sources_say_why(text: str) -> None:
    with pytest.raises(ValueError, match="is not"):
        parse_source(text)


def test_unknown_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        listen(UnixAddress(str(tmp_path / "s")), self_domid=3)
    with pytest.raises(TypeError):
        connect(UnixAddress(str(tmp_path / "s")), connect_timeout=1)


# ------------------------------------------------------------ helpers
@dataclass
class Pair:
    listener: Listener
    client: Stream  # the dom0 side (connect)
    server: Stream  # the guest side (accept)


def wait_readable(stream: Stream, timeout: float = TIMEOUT) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(stream.fileno(), stream.poll_events(want_write=False))
        assert sel.select(timeout), f"{stream} not readable within {timeout}s"
    stream.handle_wakeup()


def read_exactly(stream: Stream, size: int, timeout: float = TIMEOUT) -> bytes:
    data = bytearray()
    deadline = time.monotonic() + timeout
    while len(data) < size:
        assert time.monotonic() < deadline, f"only {len(data)} of {size} bytes arrived"
        chunk = stream.read(size - len(data))
        if chunk:
            data += chunk
        else:
            wait_readable(stream, deadline - time.monotonic())
    return bytes(data)


def fill(stream: Stream, pattern: bytes) -> tuple[int, list[int]]:
    """Write until the stream takes nothing; returns the total and each count."""
    counts: list[int] = []
    while True:
        n = stream.write(pattern)
        counts.append(n)
        if n == 0:
            # vsock credit updates can trail; one more try after a pause.
            time.sleep(0.05)
            n = stream.write(pattern)
            if n == 0:
                return sum(counts), counts
            counts.append(n)


def accept_within(listener: Listener, timeout: float = TIMEOUT) -> Stream:
    deadline = time.monotonic() + timeout
    while (stream := listener.accept()) is None:
        assert time.monotonic() < deadline, f"{listener}: nobody accepted within {timeout}s"
        with selectors.DefaultSelector() as sel:
            sel.register(listener.fileno(), selectors.EVENT_READ)
            sel.select(0.1)
    return stream


def free_vsock_port() -> int:
    return random.randint(20000, 60000)


def assert_explained_vsock_refusal(exc: TransportUnavailable) -> None:
    assert isinstance(exc, TransportUnavailable)
    assert "vsock" in str(exc)
    assert exc.hint, "a refusal must say what to do"
    assert "vsock" in exc.hint


@pytest.fixture(scope="session")
def vsock_refusal() -> TransportUnavailable | None:
    """Whether this kernel can connect vsock loopback; the refusal if not."""
    port = free_vsock_port()
    try:
        with listen(VsockAddress(1, port)) as listener:
            client = connect(VsockAddress(1, port), connect_timeout=1.0)
            client.close()
            assert listener.fileno() >= 0
    except TransportUnavailable as exc:
        return exc
    return None


@pytest.fixture(params=["unix", "vsock"])
def pair(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    vsock_refusal: TransportUnavailable | None,
) -> Iterator[Pair | TransportUnavailable]:
    address: Address
    if request.param == "unix":
        address = UnixAddress(str(tmp_path / "guest.sock"))
    elif vsock_refusal is not None:
        yield vsock_refusal
        return
    else:
        address = VsockAddress(1, free_vsock_port())
    listener = listen(address)
    client = connect(address)
    server = accept_within(listener)
    yield Pair(listener, client, server)
    for closable in (client, server, listener):
        closable.close()


def refused(pair: Pair | TransportUnavailable) -> bool:
    """True (after checking the refusal explains itself) if vsock is refused here."""
    if isinstance(pair, TransportUnavailable):
        assert_explained_vsock_refusal(pair)
        return True
    return False


# -------------------------------------------------------- stream semantics
def test_bytes_round_trip_both_ways(pair: Pair | TransportUnavailable) -> None:
    if refused(pair):
        return
    assert isinstance(pair, Pair)
    assert pair.client.state is pair.server.state is StreamState.CONNECTED
    assert pair.client.write(b"hello guest") == 11
    assert read_exactly(pair.server, 11) == b"hello guest"
    payload = os.urandom(300_000)  # more than one write's worth, so the loop interleaves
    sent, received = 0, bytearray()
    deadline = time.monotonic() + TIMEOUT
    while len(received) < len(payload):
        assert time.monotonic() < deadline
        if sent < len(payload):
            sent += pair.server.write(payload[sent : sent + CHUNK])
        chunk = pair.client.read(CHUNK)
        received += chunk
        if not chunk and sent == len(payload):
            wait_readable(pair.client)
    assert received == payload


def test_read_returns_empty_when_nothing_is_there(pair: Pair | TransportUnavailable) -> None:
    if refused(pair):
        return
    assert isinstance(pair, Pair)
    assert pair.server.read(100) == b""
    assert pair.server.data_ready() == 0


def test_data_ready_counts_pending_bytes(pair: Pair | TransportUnavailable) -> None:
    if refused(pair):
        return
    assert isinstance(pair, Pair)
    assert pair.client.write(b"x" * 1000) == 1000
    wait_readable(pair.server)
    wait_until(lambda: pair.server.data_ready() >= 1000, "1000 bytes ready", TIMEOUT, interval=0.01)
    assert pair.server.data_ready() == 1000


def test_partial_writes_then_zero_when_full(pair: Pair | TransportUnavailable) -> None:
    if refused(pair):
        return
    assert isinstance(pair, Pair)
    big = b"p" * (8 << 20)
    first = pair.client.write(big)
    assert 0 < first < len(big), "an 8 MiB write must be partial"
    _, counts = fill(pair.client, big)
    assert counts[-1] == 0
    assert pair.client.write(b"more") == 0


def test_backpressure_then_draining_resumes(pair: Pair | TransportUnavailable) -> None:
    if refused(pair):
        return
    assert isinstance(pair, Pair)
    writer, reader = pair.server, pair.client  # guest plays, dom0 reads
    roomy = writer.buffer_space()
    assert roomy > CHUNK
    pattern = bytes(range(256)) * (CHUNK // 256)
    written, _ = fill(writer, pattern)
    assert writer.write(pattern) == 0, "peer stopped reading: writes must return 0"
    assert writer.buffer_space() <= CHUNK, "a full stream must not claim room"
    # Drain everything; the writer can write again and nothing was lost.
    got = hashlib.sha256()
    got.update(read_exactly(reader, written))
    expected = hashlib.sha256()
    whole, rest = divmod(written, len(pattern))
    for _ in range(whole):
        expected.update(pattern)
    expected.update(pattern[:rest])
    assert got.hexdigest() == expected.hexdigest()
    resumed = wait_until(
        lambda: writer.write(b"again"), "writing to resume after draining", TIMEOUT, interval=0.01
    )
    assert resumed == 5
    assert writer.buffer_space() > CHUNK
    assert read_exactly(reader, 5) == b"again"


def test_peer_close_is_stream_closed_after_the_last_bytes(
    pair: Pair | TransportUnavailable,
) -> None:
    if refused(pair):
        return
    assert isinstance(pair, Pair)
    assert pair.client.write(b"bye") == 3
    pair.client.close()
    assert read_exactly(pair.server, 3) == b"bye"
    wait_readable(pair.server)
    with pytest.raises(StreamClosed) as info:
        pair.server.read(10)
    assert info.value.hint
    assert pair.server.state is StreamState.CLOSED
    with pytest.raises(StreamClosed):
        pair.server.read(10)


def test_writing_to_a_closed_peer_is_stream_closed(pair: Pair | TransportUnavailable) -> None:
    if refused(pair):
        return
    assert isinstance(pair, Pair)
    pair.server.close()

    def write_once() -> bool:
        pair.client.write(b"anyone there?")
        return False  # only StreamClosed ends the wait

    with pytest.raises(StreamClosed):
        wait_until(write_once, "a write to the closed peer to fail", TIMEOUT, interval=0.01)
    assert pair.client.state is StreamState.CLOSED


def test_close_twice_then_use_raises(pair: Pair | TransportUnavailable) -> None:
    if refused(pair):
        return
    assert isinstance(pair, Pair)
    pair.client.close()
    pair.client.close()
    assert pair.client.state is StreamState.CLOSED
    for use in (
        lambda: pair.client.read(1),
        lambda: pair.client.write(b"x"),
        pair.client.fileno,
        pair.client.data_ready,
        pair.client.buffer_space,
    ):
        with pytest.raises(StreamClosed, match="closed on this side"):
            use()


def test_context_manager_closes(pair: Pair | TransportUnavailable) -> None:
    if refused(pair):
        return
    assert isinstance(pair, Pair)
    with pair.client as stream:
        assert stream.state is StreamState.CONNECTED
    assert pair.client.state is StreamState.CLOSED


def test_accept_returns_none_when_nobody_connects(pair: Pair | TransportUnavailable) -> None:
    if refused(pair):
        return
    assert isinstance(pair, Pair)
    assert pair.listener.accept() is None
    assert pair.listener.accept() is None


def test_sockets_ask_for_write_events_only_when_wanted(
    pair: Pair | TransportUnavailable,
) -> None:
    if refused(pair):
        return
    assert isinstance(pair, Pair)
    assert pair.client.poll_events(want_write=False) == selectors.EVENT_READ
    both = selectors.EVENT_READ | selectors.EVENT_WRITE
    assert pair.client.poll_events(want_write=True) == both
    pair.client.handle_wakeup()  # a no-op for sockets, and must not block
    assert pair.client.state is StreamState.CONNECTED


# ------------------------------------------------------------------ unix only
def test_unix_socket_is_private_by_default(tmp_path: Path) -> None:
    path = tmp_path / "guest.sock"
    with listen(UnixAddress(str(path))):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with listen(UnixAddress(str(path)), mode=0o660):
        assert stat.S_IMODE(path.stat().st_mode) == 0o660


def test_unix_listener_removes_its_socket_on_close(tmp_path: Path) -> None:
    path = tmp_path / "guest.sock"
    listener = listen(UnixAddress(str(path)))
    fd = listener.fileno()
    assert listener.accept() is None
    assert listener.fileno() == fd
    listener.close()
    listener.close()
    assert not path.exists()
    with pytest.raises(TransportError, match="listener was closed"):
        listener.accept()


def test_unix_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "guest.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays behind, nobody listens
    address = UnixAddress(str(path))
    with (
        listen(address) as listener,
        connect(address) as client,
        accept_within(listener) as server,
    ):
        assert server.state is StreamState.CONNECTED
        assert client.state is StreamState.CONNECTED


def test_unix_refuses_to_steal_a_live_socket(tmp_path: Path) -> None:
    address = UnixAddress(str(tmp_path / "guest.sock"))
    with listen(address), pytest.raises(TransportError, match="already listening") as info:
        listen(address)
    assert info.value.hint


def test_unix_refuses_to_replace_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "important.txt"
    path.write_text("keep me")
    with pytest.raises(TransportError, match="not a socket"):
        listen(UnixAddress(str(path)))
    assert path.read_text() == "keep me"


def test_unix_connect_to_nobody_is_peer_unavailable(tmp_path: Path) -> None:
    with pytest.raises(PeerUnavailable) as info:
        connect(UnixAddress(str(tmp_path / "nobody.sock")))
    assert "nobody is listening" in str(info.value)
    assert "guest agent" in info.value.hint


def test_unix_listen_in_missing_directory_explains(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="cannot listen") as info:
        listen(UnixAddress(str(tmp_path / "missing" / "guest.sock")))
    assert "directory" in info.value.hint


# ----------------------------------------------------------------- vsock only
def test_vsock_loopback_works_or_is_explained(
    vsock_refusal: TransportUnavailable | None,
) -> None:
    port = free_vsock_port()
    try:
        listener = listen(VsockAddress(1, port))
    except TransportUnavailable as exc:  # bind refused (EPERM, EADDRNOTAVAIL...)
        assert vsock_refusal is not None, "vsock worked in the probe but not now"
        assert_explained_vsock_refusal(exc)
        return
    with listener:
        try:
            client = connect(VsockAddress(1, port), connect_timeout=1.0)
        except TransportUnavailable as exc:  # no loopback transport: no answer
            assert vsock_refusal is not None, "vsock worked in the probe but not now"
            assert_explained_vsock_refusal(exc)
            assert "vsock_loopback" in exc.hint
            return
        with client, accept_within(listener) as server:
            assert vsock_refusal is None
            assert server.address.startswith("vsock:1:")
            assert client.address == f"vsock:1:{port}"


def test_vsock_listener_refuses_other_cids(vsock_refusal: TransportUnavailable | None) -> None:
    if vsock_refusal is not None:
        assert_explained_vsock_refusal(vsock_refusal)
        return
    port = free_vsock_port()
    # The listener admits only the host (CID 2); a loopback peer is CID 1.
    with listen(VsockAddress(2, port)) as listener, connect(VsockAddress(1, port)) as intruder:
        time.sleep(0.2)
        assert listener.accept() is None
        with pytest.raises(StreamClosed):
            read_exactly(intruder, 1)


def test_vsock_connect_timeout_is_transport_unavailable_with_hint() -> None:
    # CID 4294967294 is never this machine or a reachable VM here... unless the
    # kernel answers at once (ECONNRESET), which is a PeerUnavailable instead.
    with pytest.raises((TransportUnavailable, PeerUnavailable)) as info:
        connect(VsockAddress(4294967294, 4790), connect_timeout=0.3)
    assert info.value.hint
    assert "vsock:4294967294:4790" in str(info.value)


# ------------------------------------------------------------------- xen
def test_xen_listen_without_xen_is_unavailable_with_vchan_hint() -> None:
    with pytest.raises(TransportUnavailable) as info:
        listen(XenAddress(0), self_domid=5)
    assert info.value.hint == "not running in a Xen domain (no /dev/xen/gntalloc)"
    assert "/local/domain/5/data/vchan/0/4790" in str(info.value)
    assert isinstance(info.value.__cause__, vchan.XenUnavailableError)
    assert info.value.__cause__.errno == errno.ENOENT


def test_xen_connect_without_xen_is_unavailable_with_xenstore_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("XENSTORED_PATH", raising=False)
    with pytest.raises(TransportUnavailable) as info:
        connect(XenAddress(5))
    assert info.value.hint == (
        "no XenStore reachable (not in a Xen domain, or xenstored not running)"
    )
    assert str(info.value).startswith("xen:5:4790:")


def test_xen_listen_without_domid_explains_how_to_skip_the_lookup() -> None:
    with pytest.raises(TransportUnavailable, match="/dev/xen/xenbus") as info:
        listen(XenAddress(0))
    assert "self_domid" in info.value.hint


def test_xen_connect_before_the_guest_listens_is_peer_unavailable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    store = FakeXenstored(str(tmp_path / "xenstored.sock"))
    monkeypatch.setenv("XENSTORED_PATH", store.path)
    (tmp_path / "gntdev").touch()
    monkeypatch.setattr(vchan, "_GNTDEV", str(tmp_path / "gntdev"))
    try:
        with pytest.raises(PeerUnavailable) as info:
            connect(XenAddress(7, 4800))
    finally:
        store.close()
    assert "/local/domain/7/data/vchan/0/4800" in info.value.hint
