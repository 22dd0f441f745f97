pytest_plugins = ["tests.audio_daemons", "tests.xenstored", "tests.dom0_harness"]
