"""What both sessions (dom0's `VmSession`, the guest's `GuestSession`) share. No I/O.

A session owns one end of a connection. Whether that connection is over is
the connection's own state, not a flag beside it: it ends when a goodbye
goes either way, when the peer breaks the protocol, or when the session
abandons it (the transport was lost, or the shell gave up on it).
"""

from __future__ import annotations

from qvaudio.core.actions import Send
from qvaudio.core.connection import Connection, ConnectionState
from qvaudio.core.events import Event, Role


class Session:
    """One end of a connection, and why it ended once it has."""

    def __init__(self, role: Role) -> None:
        self.conn = Connection(role)
        #: Why the connection ended; empty while it has not.
        self.close_reason = ""

    @property
    def closed(self) -> bool:
        """The connection is over: nothing more is decided, sent or received."""
        return self.conn.state in (ConnectionState.CLOSED, ConnectionState.FAILED)

    def abandon(self, reason: str) -> None:
        """The shell gave up on this connection (the transport is gone, an internal error).

        Nothing is sent: there is nobody to send it to, or nothing to trust.
        """
        self._end(reason)

    def _end(self, reason: str) -> None:
        self.close_reason = reason
        self.conn.abandon()

    def _send(self, event: Event) -> list[Send]:
        """Bytes for `event`, or nothing once the connection is closed.

        A peer's goodbye can arrive in the same read as a request; by the time
        the request is answered the connection is closed, and the answer is
        simply not sent (found by fuzzing: it used to raise).
        """
        if self.closed:
            return []
        return [Send(self.conn.send(event))]
