"""`qvaudio`: the command line for people.

qvaudio status [--json]           what every VM's audio is doing (asks qvaudio-dom0)
qvaudio mic attach|detach VM      grant or revoke the microphone (attach-on-request VMs)
qvaudio policy check|show|set     the per-VM policy (docs/policy.md)
qvaudio config check [PATH]       validate qvaudio.yaml
qvaudio demo [--json]             both agents on this machine, a tone through them
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qvaudio import __version__
from qvaudio.cli_policy import add_policy_parser
from qvaudio.config import ConfigError, default_config_path, load_config
from qvaudio.control import ControlError, default_socket_path, request

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _socket(args: argparse.Namespace) -> Path:
    return Path(args.control_socket) if args.control_socket else default_socket_path()


def _ask(args: argparse.Namespace, payload: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return request(_socket(args), payload)
    except ControlError as exc:
        print(f"qvaudio: {exc}", file=sys.stderr)
        return None


def _ms(us: object) -> str:
    return f"{int(us) / 1000:.1f} ms" if isinstance(us, int) and us else "-"


def _format_status(reply: dict[str, Any]) -> str:
    lines = []
    policy = reply.get("policy", {})
    state = "loaded" if policy.get("loaded") else "NOT LOADED: all audio denied"
    lines.append(f"policy: {policy.get('dir')} ({state})")
    lines.extend(f"  problem: {p}" for p in policy.get("problems", []))
    vms = reply.get("vms", {})
    if not vms:
        lines.append("no VMs")
    for name, vm in vms.items():
        lines.append(f"{name}: {vm.get('state')} via {vm.get('transport')}")
        playback, capture = vm.get("playback"), vm.get("capture")
        if isinstance(playback, dict):
            flow = "playing" if playback.get("active") else "not playing"
            if playback.get("corked"):
                flow = "idle"
            lines.append(
                f"  playback: {playback.get('decision')} ({playback.get('rule')}); {flow}; "
                f"format {playback.get('format') or '-'}; cap {playback.get('volume_max')}%; "
                f"latency {_ms(playback.get('latency_us'))} "
                f"(reserve {playback.get('jitter_buffer_ms', '-')} ms)"
            )
        if isinstance(capture, dict):
            mic = "recording" if capture.get("running") else "not recording"
            lines.append(
                f"  capture: {capture.get('decision')} ({capture.get('rule')}); {mic}"
                f"{'; attached' if capture.get('mic_attached') else ''}"
            )
        counters = vm.get("counters")
        if isinstance(counters, dict):
            lines.append(
                f"  bytes: {counters.get('bytes_received', 0)} received, "
                f"{counters.get('bytes_discarded', 0)} discarded; "
                f"underruns {counters.get('underruns', 0)} late from the VM, "
                f"{counters.get('host_underruns', 0)} on the host"
            )
        if vm.get("close_reason"):
            lines.append(f"  closed: {vm['close_reason']}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    reply = _ask(args, {"cmd": "status"})
    if reply is None:
        return 1
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
    else:
        print(_format_status(reply))
    return 0 if reply.get("ok") else 1


def cmd_mic(args: argparse.Namespace) -> int:
    reply = _ask(args, {"cmd": "mic", "action": args.action, "vm": args.vm})
    if reply is None:
        return 1
    if not reply.get("ok"):
        print(f"qvaudio: {reply.get('error')}", file=sys.stderr)
        return 1
    state = "attached to" if reply.get("attached") else "detached from"
    print(f"microphone {state} {args.vm}")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    path = Path(args.path) if args.path else default_config_path()
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{config.source}: OK")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from qvaudio.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qvaudio", description="Per-VM audio for compartmentalised desktops."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--control-socket",
        metavar="PATH",
        help="the dom0 agent's control socket (default: $XDG_RUNTIME_DIR/qvaudio/control.sock)",
    )
    commands: SubParsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = commands.add_parser("status", help="show every VM's audio state (from qvaudio-dom0)")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(func=cmd_status)

    mic = commands.add_parser(
        "mic", help="attach or detach the microphone for a VM whose policy is attach-on-request"
    )
    mic.add_argument("action", choices=("attach", "detach"))
    mic.add_argument("vm", help="the VM's name")
    mic.set_defaults(func=cmd_mic)

    add_policy_parser(commands)

    config = commands.add_parser("config", help="check the main configuration file")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate qvaudio.yaml")
    check.add_argument("path", nargs="?", help="the file (default: the installed one)")
    check.set_defaults(func=cmd_config_check)

    demo = commands.add_parser(
        "demo",
        help="run both agents on this machine and send a tone through them",
        description="Start private audio servers for a 'VM' and for 'dom0', run "
        "qvaudio-guest and qvaudio-dom0 between them over a Unix socket with the "
        "shipped config and policy, play a tone in the VM and measure what reaches dom0.",
    )
    demo.add_argument("--json", action="store_true", help="print the results as one JSON object")
    demo.add_argument(
        "--speakers", action="store_true", help="play to your own audio server so you hear it"
    )
    demo.add_argument("--seconds", type=float, default=3.0, help="length of the tone")
    demo.add_argument(
        "--keep-recording",
        metavar="FILE",
        help="save what reached dom0's sink (raw s16le 48 kHz stereo) for a closer look",
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
