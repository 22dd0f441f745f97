"""qvaudio-dom0: serve every VM's audio from dom0 (or an audio VM).

The command line and configuration; the work is `qvaudio.dom0.agent.Dom0Agent`
(docs/architecture.md).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from qvaudio import __version__
from qvaudio.common.config import (
    CONFIG_DEFAULT_HELP,
    ConfigError,
    Dom0Settings,
    add_setting_flag,
    flag_overrides,
    flag_type,
    load_config,
)
from qvaudio.common.extras import require
from qvaudio.common.log import raise_priority, setup_logging
from qvaudio.dom0.agent import Dom0Agent
from qvaudio.dom0.control import default_socket_path
from qvaudio.dom0.policy_loader import POLICY_DIR_DEFAULT_HELP, default_policy_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qvaudio-dom0",
        description="Serve the audio of every VM from dom0 (or an audio VM): find the VMs, "
        "apply each one's policy, and play each as its own stream on the host audio server.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help=f"main config file (default: {CONFIG_DEFAULT_HELP})",
    )
    parser.add_argument(
        "--transport",
        action="append",
        type=flag_type("dom0", "transports"),
        metavar="SPEC",
        help="how VMs reach this agent, instead of the config's dom0.transports; repeatable: "
        "'xen' (XenStore), 'unix:DIR' (a socket per VM, named after it), "
        "'vsock:NAME=CID,...', 'qrexec' (Qubes: VMs call the qvaudio.Audio service)",
    )
    parser.add_argument(
        "--policy-dir",
        type=Path,
        metavar="DIR",
        help=f"policy directory (default: the config's dom0.policy_dir, else "
        f"{POLICY_DIR_DEFAULT_HELP})",
    )
    parser.add_argument(
        "--control-socket",
        type=Path,
        metavar="PATH",
        help="control socket path (default: the config's dom0.control_socket, else "
        "$XDG_RUNTIME_DIR/qvaudio/control.sock)",
    )
    parser.add_argument(
        "--pulse-server",
        metavar="SERVER",
        help="host audio server (default: the config's dom0.pulse_server, else the session's)",
    )
    flag = functools.partial(add_setting_flag, parser, section="dom0")
    flag(
        "--latency-ms",
        key="playback_latency_ms",
        metavar="MS",
        help="target latency of each VM's stream on the host server "
        "({range}; dom0.playback_latency_ms)",
    )
    flag("--reserve-ms", key="playback_reserve_ms", metavar="MS",
         help="audio held for each VM before its host stream starts, the least jitter reserve "
         "({range}; dom0.playback_reserve_ms)")  # fmt: skip
    parser.add_argument("--no-notifications", action="store_true",
                        help="do not show desktop notifications")  # fmt: skip
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log detail")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


#: Flags that override one config key each: {flag's dest: dom0 setting}.
FLAG_SETTINGS = {
    "pulse_server": "pulse_server",
    "latency_ms": "playback_latency_ms",
    "reserve_ms": "playback_reserve_ms",
}


def settings_from(args: argparse.Namespace, base: Dom0Settings) -> Dom0Settings:
    """The config's dom0 settings with the command line's overrides."""
    overrides = flag_overrides(args, FLAG_SETTINGS)
    if args.transport:
        overrides["transports"] = tuple(args.transport)
    if args.no_notifications:
        overrides["notifications"] = False
    return replace(base, **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    require("qvaudio-dom0", "numpy")
    setup_logging(args.verbose)
    raise_priority("qvaudio.dom0")  # before any thread starts: they inherit it
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    settings = settings_from(args, config.dom0)
    policy_dir = args.policy_dir or (
        Path(settings.policy_dir) if settings.policy_dir else default_policy_dir()
    )
    control_path = args.control_socket or (
        Path(settings.control_socket) if settings.control_socket else default_socket_path()
    )
    # Host streams are written from threads of their own, which wait for the
    # interpreter lock while the loop works; the default 5 ms a holder may keep
    # it is a quarter of a VM's whole jitter reserve. 1 ms keeps one VM's work
    # from delaying another's sound.
    sys.setswitchinterval(0.001)
    agent = Dom0Agent(settings, policy_dir=policy_dir, control_path=control_path)
    agent.install_signal_handlers()
    return agent.run()


if __name__ == "__main__":
    sys.exit(main())
