"""How the guest keeps an idle virtual output quiet, per audio server. No I/O.

An idle agent must cost no CPU, so the monitor stream it records must
deliver nothing while no application plays; how depends on the server
(`IdleMethod`). On PulseAudio the agent suspends the idle sink
(`sink_suspension` says when); on PipeWire the monitor stream is passive.
"""

from __future__ import annotations

from enum import Enum


class IdleMethod(Enum):
    """How the virtual output's monitor is kept quiet while no application plays."""

    #: PulseAudio: the agent suspends the sink; its monitor then delivers
    #: nothing, and a resumed sink restarts its clock with our short period.
    #: An application's stream created meanwhile waits for the resume. The
    #: monitor stream stays open: one opened when an application starts
    #: misses the start, as an idle null sink renders in blocks of up to 2 s.
    SUSPEND_SINK = "suspend-sink"
    #: PipeWire: suspending a sink that a stream is linked to does not stop
    #: its graph, so an open monitor would deliver silence 100 times a second
    #: (~2 % of a CPU to read and drop). The monitor stream is passive
    #: (node.passive=true) instead: it does not keep the graph running, and
    #: the graph runs again when an application's stream is linked. Closing
    #: the monitor while idle was tried too, and lost the first ~40 ms of
    #: each sound to the time it takes to open a stream.
    PASSIVE_MONITOR = "passive-monitor"


def idle_method(server_name: str) -> IdleMethod:
    """The method for a server, from its `server_info().server_name`."""
    if "pipewire" in server_name.lower():
        return IdleMethod.PASSIVE_MONITOR
    return IdleMethod.SUSPEND_SINK


def sink_suspension(method: IdleMethod, players: int, suspended: bool) -> bool | None:
    """True: suspend the virtual output now; False: resume it; None: leave it.

    Asked again after every change on the server, so a resume by someone
    else (the monitor's clock restart, a user) while nothing plays is undone.
    """
    if method is not IdleMethod.SUSPEND_SINK:
        return None
    if players == 0 and not suspended:
        return True
    if players > 0 and suspended:
        return False
    return None
