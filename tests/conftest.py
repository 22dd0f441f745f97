import os

import pytest

# Agents started by the tests write their logs to files, with no journald to
# add times: ask for them, so a failure shows how long each step took.
os.environ["QVAUDIO_LOG_TIMES"] = "1"

pytest_plugins = [
    "tests.reaper",
    "tests.audio_daemons",
    "tests.xenstored",
    "tests.dom0_harness",
    "tests.pipeline_harness",
    "tests.notification_daemon",
]

#: What a test needs beyond Python, known from the fixtures that start it.
#: Tests that start such a part themselves carry the marker by hand.
#: `make check` runs every test that has none of these.
NEEDS_BY_FIXTURE: dict[str, frozenset[str]] = {
    "needs_audio": frozenset(
        {"pulse_server", "pipewire_server", "audio_server", "make_pulse_server"}
    ),
    "needs_xenstore": frozenset({"xenstored_session", "private_xenstored"}),
    "needs_dbus": frozenset({"notification_daemon"}),
    # tests/test_rpm.py's session fixture: rpmbuild, then rpm --root.
    "needs_rpm": frozenset({"build"}),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        # The whole fixture closure: a fixture that needs a daemon marks its users.
        used = set(getattr(item, "fixturenames", ()))
        for marker, fixtures in NEEDS_BY_FIXTURE.items():
            if used & fixtures and item.get_closest_marker(marker) is None:
                item.add_marker(marker)
