"""The `qvaudio.Admin` qrexec service: status and microphone control from an admin VM.

qrexec runs this in dom0 for each call (as /etc/qubes-rpc/qvaudio.Admin),
with the caller's name in QREXEC_REMOTE_DOMAIN and the request on stdin: one
line, `status`, `mic attach VM` or `mic detach VM`. It forwards the request
to the running qvaudio-dom0 over its control socket and writes the answer,
one JSON object, to stdout. Who may call at all is qrexec policy (deny by
default, see qubes/30-qvaudio.policy); what `mic attach` may do is still the
YAML policy, which the agent enforces (only attach-on-request VMs).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import Any, BinaryIO, TextIO

from qvaudio.common.log import OneLineFormatter
from qvaudio.dom0.control import ControlError, default_socket_path, request

log = logging.getLogger("qvaudio.admin")

MAX_REQUEST = 256
_VM = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,30}")


def parse_request(line: str) -> dict[str, Any]:
    """The control request for one command line; ValueError for anything else."""
    words = line.split()
    if words == ["status"]:
        return {"cmd": "status"}
    if len(words) == 3 and words[0] == "mic" and words[1] in ("attach", "detach"):
        if not _VM.fullmatch(words[2]):
            raise ValueError(f"not a VM name: {words[2]!r}")
        return {"cmd": "mic", "action": words[1], "vm": words[2]}
    raise ValueError("expected 'status', 'mic attach VM' or 'mic detach VM'")


def serve(stdin: BinaryIO, stdout: TextIO, caller: str) -> int:
    data = stdin.read(MAX_REQUEST + 1)
    if len(data) > MAX_REQUEST:
        reply: dict[str, Any] = {"ok": False, "error": "request too long"}
    else:
        try:
            payload = parse_request(data.decode("ascii", "strict"))
        except (UnicodeDecodeError, ValueError) as exc:
            reply = {"ok": False, "error": str(exc)}
        else:
            log.info("%s asks: %s", caller, " ".join(str(v) for v in payload.values()))
            try:
                reply = request(default_socket_path(), payload)
            except ControlError as exc:
                reply = {"ok": False, "error": str(exc)}
    stdout.write(json.dumps(reply, sort_keys=True) + "\n")
    stdout.flush()
    return 0 if reply.get("ok") else 1


def main() -> int:
    # What the admin VM asks is logged escaped, like every string from outside.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    caller = os.environ.get("QREXEC_REMOTE_DOMAIN", "")
    if not _VM.fullmatch(caller):
        print("qvaudio.Admin: run by qrexec only (no valid QREXEC_REMOTE_DOMAIN)", file=sys.stderr)
        return 2
    return serve(sys.stdin.buffer, sys.stdout, caller)


if __name__ == "__main__":
    sys.exit(main())
