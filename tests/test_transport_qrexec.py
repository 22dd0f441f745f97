"""The qrexec transport with real processes, sockets, pipes and fd passing.

There is no Qubes here, so `qrexec-client-vm` is a stand-in (written below)
that does what qrexec does for one call: start dom0's service handler
(`python -m qvaudio.transport.qrexec`, as /etc/qubes-rpc/qvaudio.Audio would)
with QREXEC_REMOTE_DOMAIN set and pipes as its stdin/stdout, and relay the
VM's bytes through them. Everything else is the real code.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qvaudio.transport import (
    QrexecAddress,
    Stream,
    StreamClosed,
    TransportUnavailable,
    connect,
    listen,
    parse_address,
)
from qvaudio.transport.qrexec import MAGIC, FdPairStream, HandoffListener, QrexecDialer
from tests.waiting import wait_until

FAKE_CLIENT = """#!{python}
# Stand-in for qrexec-client-vm: one call to dom0's service, relayed via pipes.
import os, selectors, subprocess, sys
with open(os.environ["FAKE_QREXEC_LOG"], "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
env = dict(os.environ, QREXEC_REMOTE_DOMAIN=os.environ.get("FAKE_QREXEC_CALLER", "work"))
handler = subprocess.Popen(
    [sys.executable, "-m", "qvaudio.transport.qrexec"],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
)
sel = selectors.DefaultSelector()
sel.register(0, selectors.EVENT_READ, handler.stdin.fileno())
sel.register(handler.stdout.fileno(), selectors.EVENT_READ, 1)
while sel.get_map():
    for key, _ in sel.select():
        data = os.read(key.fd, 65536)
        if not data:
            sel.unregister(key.fd)
            if key.fd != 0:  # the service ended: so does the call, both ways
                sys.exit(handler.wait())
            handler.stdin.close()
            continue
        os.write(key.data, data)
sys.exit(handler.wait())
"""


def wait_readable(fd: int, timeout: float = 5.0) -> None:
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, f"fd {fd} not readable within {timeout} s"


def read_exactly(stream: Stream, size: int, timeout: float = 5.0) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < size:
        wait_readable(stream.fileno(), max(0.01, deadline - time.monotonic()))
        stream.handle_wakeup()
        data += stream.read(size - len(data))
    return data


def write_all(stream: Stream, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = stream.write(view)
        view = view[sent:]
        if not sent:
            select.select([stream.fileno()], [], [], 1.0)


@pytest.fixture
def qrexec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A PATH with the stand-in qrexec-client-vm; yields the calls' log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    client = bin_dir / "qrexec-client-vm"
    client.write_text(FAKE_CLIENT.format(python=sys.executable))
    client.chmod(0o755)
    calls = tmp_path / "calls.log"
    calls.touch()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_QREXEC_LOG", str(calls))
    monkeypatch.setenv("QVAUDIO_QREXEC_SOCKET", str(tmp_path / "run" / "qrexec.sock"))
    yield calls


def test_parse_qrexec_addresses() -> None:
    assert parse_address("qrexec:") == QrexecAddress("@default", "qvaudio.Audio")
    assert parse_address("qrexec:dom0") == QrexecAddress("dom0", "qvaudio.Audio")
    assert parse_address("qrexec:audio-vm:my.Audio") == QrexecAddress("audio-vm", "my.Audio")
    assert str(QrexecAddress()) == "qrexec:@default:qvaudio.Audio"
    for bad in ("qrexec:a:b:c", "qrexec:-x", "qrexec:x y", "qrexec:dom0:a/b"):
        with pytest.raises(ValueError, match="bad address"):
            parse_address(bad)


def test_dom0_never_dials_qrexec() -> None:
    with pytest.raises(TransportUnavailable, match="calls come from the VM"):
        connect(QrexecAddress())


def test_without_qrexec_client_the_dialer_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with QrexecDialer() as dialer, pytest.raises(TransportUnavailable, match="Qubes VM"):
        dialer.accept()


def test_call_hands_the_stream_to_dom0_with_qrexecs_identity(qrexec: Path, tmp_path: Path) -> None:
    path = Path(os.environ["QVAUDIO_QREXEC_SOCKET"])
    with HandoffListener(path) as handoff, listen(parse_address("qrexec:")) as dialer:
        assert isinstance(dialer, QrexecDialer)
        assert path.stat().st_mode & 0o777 == 0o600
        wait_readable(dialer.fileno())
        guest = dialer.accept()
        assert guest is not None
        wait_readable(handoff.fileno())
        dom0 = handoff.accept()
        assert isinstance(dom0, FdPairStream)
        # Whatever the VM sends, its name is what qrexec told the handler.
        write_all(guest, MAGIC + b"dom0")
        assert read_exactly(dom0, len(MAGIC) + 4) == MAGIC + b"dom0"
        assert dom0.remote_domain == "work"
        assert dom0.address == "qrexec:work"
        assert qrexec.read_text() == "@default qvaudio.Audio\n"

        # Both directions, more than a pipe holds at once.
        payload = os.urandom(256 * 1024)
        write_all(dom0, payload[:1000])
        assert read_exactly(guest, 1000) == payload[:1000]
        received = bytearray()
        view = memoryview(payload)
        deadline = time.monotonic() + 10
        while len(received) < len(payload) and time.monotonic() < deadline:
            if view:
                dom0.poll_events(want_write=True)
                view = view[dom0.write(view) :]
            guest_ready, _, _ = select.select([guest.fileno()], [], [], 0.05)
            if guest_ready:
                received += guest.read(65536)
        assert bytes(received) == payload
        dom0.poll_events(want_write=False)
        assert dom0.buffer_space() > 0
        assert dom0.data_ready() == 0

        # dom0 letting go ends the handler, the call, and the VM's stream.
        dom0.close()
        wait_readable(guest.fileno())

        def read_once() -> bool:
            guest.read(4096)
            return False  # only StreamClosed ends the wait

        with pytest.raises(StreamClosed):
            wait_until(read_once, "the VM's stream to close", 1.0, interval=0.01)
        # The dialer becomes readable when the call's process is gone, and calls again.
        wait_readable(dialer.fileno())
        again = dialer.accept()
        assert again is not None
        again.close()
        guest.close()


def test_the_handler_refuses_a_caller_without_a_valid_name(qrexec: Path) -> None:
    path = Path(os.environ["QVAUDIO_QREXEC_SOCKET"])
    with HandoffListener(path) as handoff:
        for name in ("", "../evil", "a" * 40, "dom0 x"):
            env = dict(os.environ, QREXEC_REMOTE_DOMAIN=name)
            proc = subprocess.run(
                [sys.executable, "-m", "qvaudio.transport.qrexec"],
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            assert proc.returncode == 2, proc.stderr
            assert "QREXEC_REMOTE_DOMAIN" in proc.stderr
        assert select.select([handoff.fileno()], [], [], 0.2)[0] == []


def test_the_handler_says_when_the_agent_is_not_running(qrexec: Path) -> None:
    env = dict(os.environ, QREXEC_REMOTE_DOMAIN="work")
    proc = subprocess.run(
        [sys.executable, "-m", "qvaudio.transport.qrexec"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert proc.returncode == 1
    assert "dom0 agent is not running" in proc.stderr


@pytest.mark.parametrize("message", [b"", b"junk", MAGIC + b"bad name!", MAGIC + b"work"], ids=repr)
def test_the_agent_refuses_bad_handoffs(tmp_path: Path, message: bytes) -> None:
    with (
        HandoffListener(tmp_path / "h.sock") as handoff,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw,
    ):
        raw.connect(str(tmp_path / "h.sock"))
        if message:
            raw.send(message)  # no fds attached: never a stream
        wait_readable(handoff.fileno())
        assert handoff.accept() is None
        raw.settimeout(2)
        assert raw.recv(1) == b""  # the agent hung up on it
