pytest_plugins = [
    "tests.audio_daemons",
    "tests.xenstored",
    "tests.dom0_harness",
    "tests.pipeline_harness",
    "tests.notification_daemon",
]
