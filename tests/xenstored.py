"""pytest plugin: Debian's real xenstored (cxenstored 4.17) on a private socket, without Xen.

The LD_PRELOAD shim in tests/xen/fakexen.c stands in for the hypervisor
interfaces. Guest domains are simulated the way the toolstack makes them:
write /local/domain/<id>/... as dom0, then XS_INTRODUCE (which fires
@introduceDomain); removal is XS_RELEASE (fires @releaseDomain), then the
toolstack deletes the nodes. If xenstored cannot start, fixtures fail with its
log: a missing daemon must never turn into skipped tests.

Fixtures: `xenstored_session` (one daemon per session) and `xenstored` (the
same daemon, with every domain a test simulated removed afterwards).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pyxs
from pyxs._internal import Op

from qvaudio.core.domains import MetadataLayout
from qvaudio.dom0.xenstore import XenStore
from tests.waiting import WaitTimeout, wait_until

SHIM_SOURCE = Path(__file__).parent / "xen" / "fakexen.c"
START_TIMEOUT = 10.0


def find_xenstored() -> str:
    explicit = os.environ.get("QVAUDIO_XENSTORED")
    if explicit:
        return explicit
    found = sorted(glob.glob("/usr/lib/xen-*/bin/xenstored"))
    if not found:
        pytest.fail(
            "xenstored not found (install xen-utils-4.17 and libxen-dev, or set QVAUDIO_XENSTORED)"
        )
    return found[-1]


class XenstoredProcess:
    """One xenstored under the shim; everything it touches lives in `workdir`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.socket_path = str(workdir / "socket")
        self.log_path = workdir / "xenstored.log"
        self.trace_path = workdir / "trace.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        shim = self.workdir / "fakexen.so"
        build = subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O2", "-o", str(shim), str(SHIM_SOURCE), "-ldl"],
            capture_output=True,
            text=True,
        )
        if build.returncode != 0:
            pytest.fail(f"building {SHIM_SOURCE} failed (needs gcc, libxen-dev):\n{build.stderr}")
        # The shim redirects /proc/xen/xsd_{port,kva} here; dom0's fake ring page.
        (self.workdir / "xsd_port").write_text("1\n")
        with open(self.workdir / "xsd_kva", "wb") as f:
            f.truncate(4096)
        env = dict(
            os.environ,
            LD_PRELOAD=str(shim),
            FAKEXEN_DIR=str(self.workdir),
            XENSTORED_PATH=self.socket_path,
            XENSTORED_RUNDIR=str(self.workdir),
        )
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [find_xenstored(), "--no-fork", "--trace-file", str(self.trace_path)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        proc = self._proc

        def answers() -> bool:
            if proc.poll() is not None:
                self.fail(f"xenstored exited with status {proc.returncode}")
            return os.path.exists(self.socket_path) and self._answers()

        try:
            wait_until(answers, f"xenstored on {self.socket_path}", START_TIMEOUT)
        except WaitTimeout:
            self.fail(f"xenstored did not answer on {self.socket_path} within {START_TIMEOUT}s")

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(self.socket_path)
            except OSError:
                return False
        return True

    def fail(self, why: str) -> None:
        self.stop()
        log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        trace = self.trace_path.read_text(errors="replace") if self.trace_path.exists() else ""
        pytest.fail(
            f"{why}\n--- xenstored output ---\n{log}\n--- trace (tail) ---\n{trace[-3000:]}"
        )

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None


_XS_WRITE = 11  # xs_wire.h
# pyxs sends only NUL and 0x20-0x7f.
_PYXS_WRITABLE = re.compile(rb"[\x00\x20-\x7f]+")


def _recv_exactly(s: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = s.recv(size - len(data))
        if not chunk:
            raise OSError("xenstored closed the connection")
        data += chunk
    return data


class XenstoreSim:
    """Simulates the toolstack's and guests' XenStore writes against a XenstoredProcess."""

    def __init__(self, daemon: XenstoredProcess, layout: MetadataLayout | None = None) -> None:
        self.daemon = daemon
        self.socket_path = daemon.socket_path
        self.layout = layout or MetadataLayout()
        self.domids: set[int] = set()
        self._admin: Any = pyxs.Client(unix_socket_path=self.socket_path)
        self._admin.connect()

    def close(self) -> None:
        self._admin.close()

    def client(self, **kwargs: Any) -> XenStore:
        """A qvaudio XenStore connected to this daemon; close it (or use `with`)."""
        return XenStore(self.socket_path, **kwargs)

    # -- raw toolstack-side writes

    def write(self, path: str, value: bytes | str, owner: int | None = None) -> None:
        """Write as dom0 (any bytes); `owner` re-owns the node as a guest-created one would be."""
        data = value.encode() if isinstance(value, str) else value
        if _PYXS_WRITABLE.fullmatch(data):
            self._admin.write(path.encode(), data)
        else:
            self._raw_write(path.encode(), data)
        if owner is not None:
            self.set_owner(path, owner)

    def _raw_write(self, path: bytes, value: bytes) -> None:
        """XS_WRITE straight on the wire, for the hostile values pyxs refuses to send."""
        payload = path + b"\0" + value
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(self.socket_path)
            s.sendall(struct.pack("<IIII", _XS_WRITE, 1, 0, len(payload)) + payload)
            op, _rq, _tx, size = struct.unpack("<IIII", _recv_exactly(s, 16))
            reply = _recv_exactly(s, size)
        if op != _XS_WRITE:
            raise OSError(f"xenstored refused write to {path!r}: {reply!r}")

    def set_owner(self, path: str, owner: int) -> None:
        self._admin.set_perms(path.encode(), [b"n%d" % owner])

    def delete(self, path: str) -> None:
        self._admin.delete(path.encode())

    def introduce(self, domid: int) -> None:
        """XS_INTRODUCE, as the toolstack does once a domain is built: fires @introduceDomain."""
        self._admin.introduce_domain(domid, mfn=domid, eventchn=1)

    def release(self, domid: int) -> None:
        """XS_RELEASE, as on domain death: fires @releaseDomain."""
        # pyxs refuses release_domain unless /proc/xen says control domain.
        self._admin.ack(Op.RELEASE, b"%d\x00" % domid)

    # -- whole-domain helpers

    def add_domain(
        self,
        domid: int,
        name: str | bytes,
        tags: Iterable[str] = (),
        label: str | None = None,
        *,
        introduce: bool = True,
    ) -> None:
        """Create a guest the way libxl does: nodes first (dom0-owned, guest
        read-only; data/ guest-owned), then introduce it."""
        base = f"/local/domain/{domid}"
        self.domids.add(domid)
        self.write(f"{base}/domid", str(domid))
        self._admin.set_perms(base.encode(), [b"n0", b"r%d" % domid])
        self.write(f"{base}/name", name)
        tag_list = " ".join(tags)
        if tag_list and self.layout.tags:
            self.write(self.layout.tags.format(domid=domid), tag_list)
        if label is not None and self.layout.label:
            self.write(self.layout.label.format(domid=domid), label)
        self._admin.mkdir(f"{base}/data".encode())
        self._admin.set_perms(f"{base}/data".encode(), [b"n%d" % domid])
        if introduce:
            self.introduce(domid)

    def remove_domain(self, domid: int) -> None:
        """Domain death: xenstored releases it, then the toolstack removes its nodes."""
        self.release(domid)
        self.delete(f"/local/domain/{domid}")
        self.domids.discard(domid)

    def publish_vchan(
        self,
        domid: int,
        port: int,
        ring_ref: int = 8,
        event_channel: int = 40,
        client_domid: int = 0,
    ) -> None:
        """What libxenvchan's server_init in the guest writes (guest-owned nodes)."""
        base = f"/local/domain/{domid}/data/vchan/{client_domid}/{port}"
        self.write(f"{base}/ring-ref", str(ring_ref), owner=domid)
        self.write(f"{base}/event-channel", str(event_channel), owner=domid)

    def cleanup(self) -> None:
        for domid in sorted(self.domids):
            if self._admin.is_domain_introduced(domid):
                self.release(domid)
            self.delete(f"/local/domain/{domid}")
        self.domids.clear()


@pytest.fixture(scope="session")
def xenstored_session() -> Iterator[XenstoreSim]:
    workdir = Path(tempfile.mkdtemp(prefix="qvaudio-xenstored-"))
    daemon = XenstoredProcess(workdir)
    daemon.start()
    sim = XenstoreSim(daemon)
    try:
        yield sim
    finally:
        sim.close()
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def xenstored(xenstored_session: XenstoreSim) -> Iterator[XenstoreSim]:
    if not xenstored_session.daemon.running:
        xenstored_session.daemon.fail("xenstored died during an earlier test")
    try:
        yield xenstored_session
    finally:
        xenstored_session.cleanup()


@pytest.fixture
def private_xenstored() -> Iterator[XenstoredProcess]:
    """A daemon of the test's own, for tests that stop or kill it."""
    # Not tmp_path: a Unix socket path must stay under 108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="qvaudio-xenstored-"))
    daemon = XenstoredProcess(workdir)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)
