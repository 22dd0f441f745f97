import os

# Agents started by the tests write their logs to files, with no journald to
# add times: ask for them, so a failure shows how long each step took.
os.environ["QVAUDIO_LOG_TIMES"] = "1"

pytest_plugins = [
    "tests.audio_daemons",
    "tests.xenstored",
    "tests.dom0_harness",
    "tests.pipeline_harness",
    "tests.notification_daemon",
]
