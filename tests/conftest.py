pytest_plugins = ["tests.audio_daemons", "tests.xenstored"]
