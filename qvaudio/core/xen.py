"""Xen's own facts, as both agents need them: domain ids, vchan paths, xenstored. No I/O.

One place for each: the largest domain id, where libxenvchan's server
publishes its ring, and where xenstored may be reached. The binding
(`qvaudio.vchan`), the transports and dom0's XenStore adapter all read them
from here.
"""

from __future__ import annotations

from typing import Final

#: Xen's DOMID_FIRST_RESERVED is 0x7FF0: ids from there on name special domains, never a VM.
MAX_DOMID: Final = 0x7FEF
#: The control domain, whose toolstack writes every identity node.
DOM0: Final = 0
#: Where xenstored listens in dom0, in the order they are tried.
XENSTORED_SOCKETS: Final = ("/run/xenstored/socket", "/var/run/xenstored/socket")
#: A guest's way to XenStore: the kernel's xenbus device.
XENBUS_PATH: Final = "/dev/xen/xenbus"
#: The environment variable that names xenstored's socket instead.
XENSTORED_ENV: Final = "XENSTORED_PATH"


def vchan_path(server_domid: int, client_domid: int, port: int) -> str:
    """The conventional XenStore directory where a vchan server publishes its ring.

    `/local/domain/<server>/data/vchan/<client>/<port>`: the server grants its
    pages to `client_domid` alone.
    """
    return f"/local/domain/{server_domid}/data/vchan/{client_domid}/{port}"
