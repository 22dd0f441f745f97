"""`qvaudio demo`: the whole path on one machine, measured.

Two private PulseAudio daemons stand in for a VM's audio server and dom0's;
`qvaudio-guest` and `qvaudio-dom0` run between them over the Unix-socket
transport, exactly as installed agents would over a vchan. A 440 Hz tone is
played in the "VM" by an ordinary client, the monitor of the sink dom0
played it to is recorded, and the result is printed: frequency, non-silent
fraction, signal-to-noise ratio, the tone's onset delay and the policy
decision that let it through.

dom0 uses the policy a real qvaudio-dom0 would (so the demo also shows what
your own rules decide); where none is installed, the demo writes its own,
which lets the demo VM play, rather than showing a deny-all.

The pieces: `run` (the run itself, and an answer whatever happens),
`policy` (which policy dom0 uses), `measure` (the tone and what is measured
of it), `servers` (what is asked of the audio servers and of dom0 meanwhile)
and `report` (the outcome as text). This module holds what the command line
needs before any of them: the names, the `--seconds` range, `DemoError`.
"""

from __future__ import annotations

import argparse

from qvaudio.core.errors import QvaudioError

VM_NAME = "demo-vm"
#: The guest's virtual sink, named on its command line so a config that
#: renames it cannot make the demo wait for the wrong one.
GUEST_SINK = "qvaudio_out"
#: The range `--seconds` accepts: under half a second the measurements mean
#: little; over a minute the pure-Python analysis takes longer than the tone.
MIN_SECONDS = 0.5
MAX_SECONDS = 60.0


class DemoError(QvaudioError):
    """Something the person running the demo can act on."""


def tone_seconds(text: str) -> float:
    """argparse type of `--seconds`."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    # Written so that NaN fails too.
    if not MIN_SECONDS <= value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"{text} is out of range: the tone lasts from {MIN_SECONDS:g} to {MAX_SECONDS:g} s"
        )
    return value
