"""qvaudio: per-VM audio for compartmentalised desktops.

A guest agent in each VM streams what the VM plays to a dom0 agent over a Xen
vchan (or vsock, or a Unix socket); the dom0 agent applies that VM's policy
before the audio reaches the host mixer. See docs/architecture.md.
"""

__version__ = "0.1.0"

from qvaudio.core.errors import QvaudioError

__all__ = ["QvaudioError", "__version__"]
