"""XenStore: pure parsing and diffing (core.domains), then the real xenstored (dom0.xenstore)."""

from __future__ import annotations

import gc
import os
import selectors
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from qvaudio.core.domains import (
    DomainAdded,
    DomainEvent,
    DomainRemoved,
    DomainUpdated,
    InvalidName,
    MetadataLayout,
    Snapshot,
    VchanPublished,
    VmInfo,
    diff_snapshots,
    parse_domid,
    parse_label,
    parse_owner,
    parse_tags,
    validate_name,
)
from qvaudio.dom0.xenstore import XenStore, XenStoreError, default_socket_path
from qvaudio.dom0.xenstore_watch import DomainWatcher
from tests.waiting import wait_until
from tests.xenstored import XenstoredProcess, XenstoreSim

DEADLINE = 10.0
PLAY, REC = 4713, 4714


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def wait_for(
    watcher: DomainWatcher, done: Callable[[list[DomainEvent]], bool]
) -> list[DomainEvent]:
    """Collect events through the watcher's fd until `done` holds, or fail at the deadline."""
    seen: list[DomainEvent] = []
    deadline = time.monotonic() + DEADLINE
    with selectors.DefaultSelector() as sel:
        sel.register(watcher, selectors.EVENT_READ)
        while not done(seen):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"watcher events so far: {seen}")
            if sel.select(remaining):
                seen += watcher.drain()
    return seen


def has(event: DomainEvent) -> Callable[[list[DomainEvent]], bool]:
    return lambda seen: event in seen


# ------------------------------------------------------------------ pure


@pytest.mark.parametrize(
    "name", ["work", "sys-net", "disp1234", "fedora-39.dvm", "Work_2", "a", "x" * 64]
)
def test_validate_name_accepts(name: str) -> None:
    assert validate_name(name.encode()) == name


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"x" * 65,
        b"a/b",
        b"../dom0",
        b"with space",
        b" work",
        b"work\n",
        b"\x1b[31mwork",
        b"work\x00",
        b"caf\xc3\xa9",
        b"\xff\xfe",
        b"w\xd0\xberk",  # Cyrillic o: looks like "work"
        b"-rf",
        b"@anyvm",
        b"*",
        b"dom0",
        b"Domain-0",
        b"$(reboot)",
    ],
)
def test_validate_name_rejects(raw: bytes) -> None:
    with pytest.raises(InvalidName):
        validate_name(raw)


def test_vminfo_cannot_hold_an_invalid_name_or_domid() -> None:
    with pytest.raises(InvalidName):
        VmInfo(5, "a/b")
    with pytest.raises(ValueError):
        VmInfo(0, "dom-zero")
    assert VmInfo(5, "work").vchan_path(4713) == "/local/domain/5/data/vchan/0/4713"


@pytest.mark.parametrize(
    ("raw", "tags"),
    [(b"", set()), (b"audio trusted", {"audio", "trusted"}), (b" a\tb \n", {"a", "b"})],
)
def test_parse_tags(raw: bytes, tags: set[str]) -> None:
    assert parse_tags(raw) == tags


@pytest.mark.parametrize(
    "raw", [b"ok b@d", b"caf\xc3\xa9", b" ".join([b"t%d" % i for i in range(65)])]
)
def test_parse_tags_rejects(raw: bytes) -> None:
    with pytest.raises(ValueError):
        parse_tags(raw)


def test_parse_label() -> None:
    assert parse_label(b"red") == "red"
    for bad in (b"Red", b"", b"red; rm", b"\xff", b"x" * 33):
        with pytest.raises(ValueError):
            parse_label(bad)


@pytest.mark.parametrize(
    ("raw", "domid"),
    [(b"0", 0), (b"7", 7), (b"32751", 32751), (b"32752", None), (b"07", None), (b"-1", None),
     (b"1e3", None), (b"", None), (b"99999", None)],
)  # fmt: skip
def test_parse_domid(raw: bytes, domid: int | None) -> None:
    assert parse_domid(raw) == domid


@pytest.mark.parametrize(
    ("perms", "owner"),
    [([b"n0"], 0), ([b"n5", b"r0"], 5), ([b"b12"], 12), ([], None), ([b"x0"], None),
     ([b"n"], None), ([b"n-1"], None)],
)  # fmt: skip
def test_parse_owner(perms: list[bytes], owner: int | None) -> None:
    assert parse_owner(perms) == owner


WORK = VmInfo(5, "work")
WORK_TAGGED = VmInfo(5, "work", frozenset({"audio"}), "red")
OTHER_ON_5 = VmInfo(5, "personal")
MAIL = VmInfo(6, "mail")


def snap(*vms: VmInfo, vchans: dict[tuple[int, int], tuple[int, int]] | None = None) -> Snapshot:
    return Snapshot({vm.domid: vm for vm in vms}, vchans or {}, frozenset(vm.domid for vm in vms))


@pytest.mark.parametrize(
    ("old", "new", "events"),
    [
        pytest.param(snap(), snap(), [], id="nothing"),
        pytest.param(
            snap(), snap(WORK, MAIL), [DomainAdded(WORK), DomainAdded(MAIL)], id="initial"
        ),
        pytest.param(snap(WORK, MAIL), snap(MAIL), [DomainRemoved(5)], id="removed"),
        pytest.param(snap(WORK), snap(WORK), [], id="unchanged"),
        pytest.param(snap(WORK), snap(WORK_TAGGED), [DomainUpdated(WORK_TAGGED)], id="retagged"),
        pytest.param(
            snap(WORK),
            snap(OTHER_ON_5),
            [DomainRemoved(5), DomainAdded(OTHER_ON_5)],
            id="domid-reused",
        ),
        pytest.param(
            snap(WORK),
            snap(WORK, vchans={(5, PLAY): (8, 40)}),
            [VchanPublished(5, PLAY)],
            id="vchan-published",
        ),
        pytest.param(
            snap(WORK, vchans={(5, PLAY): (8, 40)}),
            snap(WORK, vchans={(5, PLAY): (8, 40)}),
            [],
            id="vchan-unchanged",
        ),
        pytest.param(
            snap(WORK, vchans={(5, PLAY): (8, 40)}),
            snap(WORK, vchans={(5, PLAY): (9, 41)}),
            [VchanPublished(5, PLAY)],
            id="vchan-republished",
        ),
        pytest.param(snap(WORK, vchans={(5, PLAY): (8, 40)}), snap(WORK), [], id="vchan-withdrawn"),
        pytest.param(
            snap(),
            snap(WORK, vchans={(5, REC): (8, 40), (5, PLAY): (7, 39)}),
            [DomainAdded(WORK), VchanPublished(5, PLAY), VchanPublished(5, REC)],
            id="added-with-vchans",
        ),
        pytest.param(
            snap(WORK, vchans={(5, PLAY): (8, 40)}),
            snap(OTHER_ON_5, vchans={(5, PLAY): (8, 40)}),
            [DomainRemoved(5), DomainAdded(OTHER_ON_5), VchanPublished(5, PLAY)],
            id="reused-domid-vchan-announced-again",
        ),
        pytest.param(snap(), snap(vchans={(5, PLAY): (8, 40)}), [], id="vchan-of-unknown-domain"),
    ],
)
def test_diff_snapshots(old: Snapshot, new: Snapshot, events: list[DomainEvent]) -> None:
    assert diff_snapshots(old, new) == events


def test_layout_rejects_unusable_templates() -> None:
    with pytest.raises(ValueError):
        MetadataLayout(tags="/local/domain/{domid}/tags list")
    assert MetadataLayout(tags=None, label=None).tags is None


def test_default_socket_path_prefers_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XENSTORED_PATH", "/somewhere/socket")
    assert default_socket_path() == "/somewhere/socket"
    monkeypatch.delenv("XENSTORED_PATH")
    assert default_socket_path() in ("/run/xenstored/socket", "/var/run/xenstored/socket")


# ------------------------------------------------------------------ real xenstored


@pytest.fixture
def store(xenstored: XenstoreSim) -> Iterator[XenStore]:
    with xenstored.client() as s:
        yield s


def test_list_domains_reports_toolstack_identity(xenstored: XenstoreSim, store: XenStore) -> None:
    xenstored.add_domain(3, "work", tags=["audio", "trusted"], label="blue")
    xenstored.add_domain(4, "personal")
    assert store.list_domains() == {
        3: VmInfo(3, "work", frozenset({"audio", "trusted"}), "blue"),
        4: VmInfo(4, "personal"),
    }
    assert store.read("/local/domain/3/name") == b"work"
    assert store.read("/local/domain/3/nonexistent") is None


@pytest.mark.parametrize(
    "hostile", [b"a/b", b"", b"\x1b]0;pwned\x07", b"x" * 200, b"dom0", b"w\xd0\xberk", b"-rf"]
)
def test_hostile_names_are_not_listed(
    xenstored: XenstoreSim, store: XenStore, hostile: bytes
) -> None:
    xenstored.add_domain(3, "work")
    if hostile:
        xenstored.add_domain(4, hostile)
    else:
        # pyxs cannot write an empty value: an empty node is a mkdir.
        xenstored.add_domain(4, "placeholder")
        xenstored.delete("/local/domain/4/name")
        xenstored._admin.mkdir(b"/local/domain/4/name")
    assert store.list_domains() == {3: VmInfo(3, "work")}


def test_nodes_a_guest_owns_do_not_vouch_for_identity(
    xenstored: XenstoreSim, store: XenStore
) -> None:
    xenstored.add_domain(3, "work", label="red")
    xenstored.add_domain(4, "banking")
    xenstored.add_domain(5, "mail", tags=["trusted"])
    xenstored.set_owner("/local/domain/3/qvaudio/label", 3)
    xenstored.set_owner("/local/domain/4/name", 4)
    xenstored.set_owner("/local/domain/5/qvaudio/tags", 5)
    # Label is cosmetic: dropped. Name or tags drive policy: the domain is left out.
    assert store.list_domains() == {3: VmInfo(3, "work")}


def test_malformed_tags_leave_the_domain_out(xenstored: XenstoreSim, store: XenStore) -> None:
    xenstored.add_domain(3, "work", tags=["ok", "b@d!"])
    xenstored.add_domain(4, "mail", label="Not A Label")
    assert store.list_domains() == {4: VmInfo(4, "mail")}


def test_only_introduced_domains_are_alive(xenstored: XenstoreSim, store: XenStore) -> None:
    xenstored.add_domain(3, "work", introduce=False)
    assert store.list_domains() == {}
    xenstored.introduce(3)
    assert set(store.list_domains()) == {3}
    xenstored.release(3)  # dead, nodes not yet removed by the toolstack
    assert store.list_domains() == {}


def test_duplicate_names_are_both_ignored(xenstored: XenstoreSim, store: XenStore) -> None:
    xenstored.add_domain(3, "work")
    xenstored.add_domain(4, "work")
    xenstored.add_domain(5, "mail")
    assert set(store.list_domains()) == {5}


def test_own_domain_is_not_listed(xenstored: XenstoreSim) -> None:
    xenstored.add_domain(3, "audiovm")
    xenstored.add_domain(4, "work")
    with xenstored.client(own_domid=3) as s:
        assert set(s.list_domains()) == {4}


def test_vchan_published(xenstored: XenstoreSim, store: XenStore) -> None:
    xenstored.add_domain(3, "work")
    assert not store.vchan_published(3, PLAY)
    xenstored.write("/local/domain/3/data/vchan/0/4713/ring-ref", "8", owner=3)
    assert not store.vchan_published(3, PLAY)  # half-written
    xenstored.publish_vchan(3, PLAY)
    assert store.vchan_published(3, PLAY)
    assert not store.vchan_published(3, REC)
    xenstored.write("/local/domain/3/data/vchan/0/4713/event-channel", "forty", owner=3)
    assert not store.vchan_published(3, PLAY)
    xenstored.publish_vchan(3, REC, client_domid=7)  # offered to another client, not us
    assert not store.vchan_published(3, REC)


def test_watcher_follows_domains_and_vchans(xenstored: XenstoreSim, store: XenStore) -> None:
    xenstored.add_domain(3, "work")
    with DomainWatcher(store, ports=[PLAY, REC]) as watcher:
        # The watches fire once when set: that is the initial snapshot.
        wait_for(watcher, has(DomainAdded(VmInfo(3, "work"))))

        xenstored.add_domain(4, "mail", tags=["audio"])
        wait_for(watcher, has(DomainAdded(VmInfo(4, "mail", frozenset({"audio"})))))

        xenstored.publish_vchan(4, PLAY)
        wait_for(watcher, has(VchanPublished(4, PLAY)))

        # A restarted guest agent publishes a new ring on the same port.
        xenstored.publish_vchan(4, PLAY, ring_ref=9, event_channel=41)
        wait_for(watcher, has(VchanPublished(4, PLAY)))

        xenstored.write("/local/domain/4/qvaudio/label", "green")
        wait_for(watcher, has(DomainUpdated(VmInfo(4, "mail", frozenset({"audio"}), "green"))))

        xenstored.remove_domain(4)
        wait_for(watcher, has(DomainRemoved(4)))
        assert set(watcher.snapshot.domains) == {3}


def test_watcher_notices_a_name_written_after_introduction(
    xenstored: XenstoreSim, store: XenStore
) -> None:
    with DomainWatcher(store) as watcher:
        xenstored.add_domain(6, "late", introduce=False)
        xenstored.delete("/local/domain/6/name")
        xenstored.introduce(6)
        xenstored.write("/local/domain/6/name", "late")
        wait_for(watcher, has(DomainAdded(VmInfo(6, "late"))))


def test_watcher_announces_published_vchan_of_a_new_domain(
    xenstored: XenstoreSim, store: XenStore
) -> None:
    xenstored.add_domain(3, "work")
    xenstored.publish_vchan(3, REC)
    with DomainWatcher(store, ports=[REC]) as watcher:
        seen = wait_for(watcher, has(VchanPublished(3, REC)))
        assert seen.index(DomainAdded(VmInfo(3, "work"))) < seen.index(VchanPublished(3, REC))


def test_watcher_stops_cleanly(xenstored: XenstoreSim) -> None:
    gc.collect()
    fds, threads = open_fds(), set(threading.enumerate())
    xenstored.add_domain(3, "work")
    store = xenstored.client()
    watcher = DomainWatcher(store, ports=[PLAY])
    watcher.start()
    wait_for(watcher, has(DomainAdded(VmInfo(3, "work"))))
    watcher.stop()
    watcher.stop()  # idempotent
    store.close()
    gc.collect()
    assert set(threading.enumerate()) == threads
    assert open_fds() == fds


def test_no_xenstored_gives_a_clear_error() -> None:
    gc.collect()
    fds = open_fds()
    with pytest.raises(XenStoreError) as missing:
        XenStore("/nonexistent/xenstored/socket")
    assert missing.value.hint == "not in dom0, or xenstored not running"
    assert "/nonexistent/xenstored/socket" in str(missing.value)
    assert "not in dom0" in str(missing.value)

    with tempfile.TemporaryDirectory() as tmp:
        stale = os.path.join(tmp, "socket")
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(stale)  # a socket file nobody listens on
        with pytest.raises(XenStoreError, match=r"not reachable at .*socket"):
            XenStore(stale)
    del missing
    gc.collect()
    assert open_fds() == fds


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_watcher_reports_a_lost_xenstored(private_xenstored: XenstoredProcess) -> None:
    sim = XenstoreSim(private_xenstored)
    sim.add_domain(3, "work")
    sim.close()
    with (
        XenStore(private_xenstored.socket_path) as store,
        DomainWatcher(store, health_interval=0.1) as watcher,
    ):
        wait_for(watcher, has(DomainAdded(VmInfo(3, "work"))))
        private_xenstored.stop()

        def drain_once() -> bool:
            watcher.drain()
            return False  # only XenStoreError ends the wait

        with pytest.raises(XenStoreError, match="lost connection"):
            wait_until(drain_once, "the watcher to see xenstored gone", DEADLINE, interval=0.05)
        assert not store.alive
