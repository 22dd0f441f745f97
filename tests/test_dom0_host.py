"""The host playback thread against a real PulseAudio server."""

from __future__ import annotations

import time

from qvaudio.core import tone
from qvaudio.core.formats import AudioFormat, SampleFormat
from qvaudio.dom0.host import HostPlayback
from tests.audio_daemons import PulseAudioServer
from tests.dom0_harness import start_null_sink_clock_once_dom0_plays

S16 = AudioFormat(48000, SampleFormat.S16LE, 2)


def test_audio_piled_up_while_the_host_ran_dry_is_skipped(pulse_server: PulseAudioServer) -> None:
    """A guest that stalls and then sends its backlog at once must not leave
    that backlog in the latency: past the reserve and one chunk, it is late."""
    chunk = tone.generate_sine(440.0, S16, 0.01)
    hold, limit = S16.bytes_for_ms(10), S16.bytes_for_ms(200)
    playback = HostPlayback(
        "dry-vm", S16, server=pulse_server.server, latency_ms=30, initial_volume=1.0
    )
    try:
        start_null_sink_clock_once_dom0_plays(pulse_server)

        def real_time(seconds: float) -> None:
            start = time.monotonic()
            for i in range(int(seconds * 100)):
                time.sleep(max(0.0, start + i * 0.01 - time.monotonic()))
                playback.put(chunk, limit, hold)

        real_time(1.0)
        time.sleep(0.3)  # the guest stalls: the host runs dry
        drops, underruns = playback.late_drops, playback.underruns
        # The whole backlog arrives before the host thread looks (holding its
        # condition, re-entrant, makes that certain rather than likely).
        with playback._cond:
            for _ in range(6):
                playback.put(chunk, limit, hold)
        real_time(0.5)
        assert playback.underruns == underruns + 1
        assert playback.late_drops == drops + 4, "60 ms came; the reserve and one chunk stay"
    finally:
        playback.close()
