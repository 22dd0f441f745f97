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
from qvaudio.common.config import (
    CONFIG_DEFAULT_HELP,
    Config,
    ConfigError,
    default_config_path,
    load_config,
)
from qvaudio.dom0.control import ControlError, default_socket_path, request

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
    host = reply.get("host")
    if isinstance(host, dict) and host.get("reachable") is False:
        lines.append(
            f"host audio server: UNREACHABLE ({host.get('server')}): no VM is heard "
            "until it is back (the agent keeps trying)"
        )
    vms = reply.get("vms", {})
    if not vms:
        lines.append("no VMs")
    for name, vm in vms.items():
        lines.append(f"{name}: {vm.get('state')} via {vm.get('transport')}")
        playback, capture = vm.get("playback"), vm.get("capture")
        if isinstance(playback, dict):
            lines.append(_playback_line(playback))
        if isinstance(capture, dict):
            lines.extend(_capture_lines(name, capture))
        counters = vm.get("counters")
        if isinstance(counters, dict):
            lines.append(
                f"  bytes: {counters.get('bytes_received', 0)} received, "
                f"{counters.get('bytes_discarded', 0)} discarded; "
                f"underruns {counters.get('underruns', 0)} late from the VM, "
                f"{counters.get('host_underruns', 0)} on the host "
                f"({counters.get('host_stalls', 0)} of them stalls in dom0 or the host)"
            )
        if vm.get("close_reason"):
            lines.append(f"  closed: {vm['close_reason']}")
    return "\n".join(lines)


def _playback_line(playback: dict[str, Any]) -> str:
    flow = "playing" if playback.get("active") else "not playing"
    if playback.get("corked"):
        flow = "idle"
    # What stops the sound on dom0's side outranks what the VM is doing.
    if playback.get("host_stream") == "unreachable":
        flow = "NOT HEARD: the host audio server is unreachable"
    elif playback.get("host_refused"):
        flow = f"NOT HEARD: {playback['host_refused']}"
    return (
        f"  playback: {playback.get('decision')} ({playback.get('rule')}); {flow}; "
        f"format {playback.get('format') or '-'}; "
        f"volume {playback.get('volume_default', '-')}% (cap {playback.get('volume_max')}%); "
        f"latency {_ms(playback.get('latency_us'))} "
        f"(reserve {playback.get('jitter_buffer_ms', '-')} ms)"
    )


def _capture_lines(name: str, capture: dict[str, Any]) -> list[str]:
    mic = "recording" if capture.get("running") else "not recording"
    lines = [
        f"  capture: {capture.get('decision')} ({capture.get('rule')}); {mic}"
        f"{'; attached' if capture.get('mic_attached') else ''}"
    ]
    if capture.get("requested") and not capture.get("running"):
        decision = capture.get("decision")
        if decision == "attach-on-request" and not capture.get("mic_attached"):
            lines.append(
                f"  microphone: {name} is asking for it; to grant it: qvaudio mic attach {name}"
            )
        elif decision == "deny":
            lines.append(f"  microphone: {name} is asking for it; the policy denies it")
        else:
            lines.append(f"  microphone: {name} is asking for it; not started yet")
    return lines


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
    """The agents' own reading of the file: what it refuses, they refuse."""
    try:
        config = load_config(Path(args.path) if args.path else None)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    if config.source == Config().source:
        print(f"OK: no file at {default_config_path()}; the agents use the built-in defaults")
    else:
        print(f"{config.source}: OK")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from qvaudio.demo.run import run_demo

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
    check.add_argument(
        "path", nargs="?", help=f"the file (default: the agents' own: {CONFIG_DEFAULT_HELP})"
    )
    check.set_defaults(func=cmd_config_check)

    from qvaudio.demo import MAX_SECONDS, MIN_SECONDS, tone_seconds

    demo = commands.add_parser(
        "demo",
        help="run both agents on this machine and send a tone through them",
        description="Start private audio servers for a 'VM' and for 'dom0', run "
        "qvaudio-guest and qvaudio-dom0 between them over a Unix socket with your "
        "config and policy (or, if none is installed, the demo's own, which lets the "
        "demo VM play), play a tone in the VM and measure what reaches dom0.",
    )
    demo.add_argument(
        "--json",
        action="store_true",
        help='print the outcome as one JSON object, failures included ({"ok": false, '
        '"error": ...})',
    )
    demo.add_argument(
        "--speakers",
        action="store_true",
        help="play to your own audio server so you hear it (and measure its output's monitor)",
    )
    demo.add_argument(
        "--seconds",
        type=tone_seconds,
        default=3.0,
        metavar="S",
        help=f"length of the tone, {MIN_SECONDS:g} to {MAX_SECONDS:g} s (default: 3)",
    )
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
