"""The root of qvaudio's own exceptions. No I/O.

Every error qvaudio raises on purpose derives from `QvaudioError`, so a
caller can tell qvaudio's refusals (a bad config, a VM that broke the
protocol, a transport that is not there) from bugs. The typed errors keep
their standard bases too (`ValueError`, `OSError`, ...), where callers
catch them as those.
"""

from __future__ import annotations


class QvaudioError(Exception):
    """Something qvaudio refused or could not do, said in words a person can act on."""
