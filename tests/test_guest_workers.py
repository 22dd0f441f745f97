"""The guest's PCM workers: when a failed monitor may open again.

No audio server is involved: the monitor here is a stand-in object, since
what is tested is only the bookkeeping around a failure (the threads
themselves are tested against real servers in tests/test_agent_guest.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest

from qvaudio.common.config import GuestSettings
from qvaudio.guest.pcm_threads import Mailbox, MonitorReader
from qvaudio.guest.workers import MONITOR_RETRY_S, PcmWorkers


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox()
    yield box
    box.close()


def failed_workers(mailbox: Mailbox, now: float) -> PcmWorkers:
    workers = PcmWorkers(mailbox, None, GuestSettings())
    reader = cast(MonitorReader, object())
    workers.monitor = reader
    workers.monitor_failed(reader, "stream died", now, retry=True)
    return workers


def test_a_monitor_failing_on_its_own_waits_before_opening_again(mailbox: Mailbox) -> None:
    workers = failed_workers(mailbox, now=100.0)
    assert workers.monitor is None
    assert not workers.retry_due(100.0 + MONITOR_RETRY_S / 2)
    assert workers.retry_due(100.0 + MONITOR_RETRY_S)
    assert not workers.retry_due(100.0 + MONITOR_RETRY_S), "due once"


def test_a_server_coming_back_ends_the_wait(mailbox: Mailbox) -> None:
    # The server was killed: the monitor failed before the watcher saw the
    # server go, then the server came back with its devices.
    workers = failed_workers(mailbox, now=100.0)
    workers.server_ready()
    assert workers.retry_at == 0.0, "the monitor may open at once"


def test_a_failure_from_a_server_that_is_gone_does_not_wait(mailbox: Mailbox) -> None:
    workers = PcmWorkers(mailbox, None, GuestSettings())
    reader = cast(MonitorReader, object())
    workers.monitor = reader
    workers.monitor_failed(reader, "connection refused", 100.0, retry=False)
    assert workers.monitor is None and workers.retry_at == 0.0
