"""`qvaudio-guest`: run inside a VM; carries what the VM plays to dom0, and dom0's microphone back.

The command line and configuration; the work is `qvaudio.guest.loop.GuestAgent`.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from dataclasses import replace
from pathlib import Path

from qvaudio import __version__
from qvaudio.common.config import (
    CONFIG_DEFAULT_HELP,
    ConfigError,
    GuestSettings,
    add_setting_flag,
    flag_overrides,
    load_config,
)
from qvaudio.common.log import raise_priority, setup_logging
from qvaudio.guest.loop import GuestAgent
from qvaudio.transport import GUEST_FORMS

log = logging.getLogger(__name__)


# -- command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qvaudio-guest",
        description=(
            "Run inside a VM: send what the VM's applications play to dom0, and feed "
            "dom0's microphone (when its policy allows) to the VM's applications. "
            "Flags override the config file."
        ),
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help=f"configuration file to read (default: {CONFIG_DEFAULT_HELP}).",
    )
    flag = functools.partial(add_setting_flag, parser, section="guest")
    flag(
        "--transport", key="transport", metavar="ADDR", help=f"where dom0 connects: {GUEST_FORMS}."
    )
    flag(
        "--format",
        key="formats",
        dest="formats",
        action="append",
        metavar="FMT",
        help="playback format to offer dom0, e.g. s16le:48000:2; repeat to offer several, "
        "best first.",
    )
    flag(
        "--period-ms",
        key="period_ms",
        metavar="MS",
        help="size of each chunk read from the virtual output; smaller means lower latency "
        "({range}).",
    )
    flag(
        "--idle-timeout",
        key="idle_timeout_s",
        metavar="SECONDS",
        help="after this much silence, stop sending audio until sound resumes ({range}).",
    )
    flag(
        "--pulse-server",
        key="pulse_server",
        type=None,
        metavar="SERVER",
        help="PulseAudio/PipeWire server to use instead of the session's default.",
    )
    flag(
        "--sink-name",
        key="sink_name",
        metavar="NAME",
        help="name of the virtual output device to create.",
    )
    flag("--source-name", key="source_name", metavar="NAME",
         help="name of the virtual microphone device to create.")  # fmt: skip
    parser.add_argument(
        "--no-report-latency",
        action="store_true",
        help="on PipeWire, keep a null sink and a remapped monitor as the virtual devices: "
        "applications are not told the latency to dom0's speakers or from its microphone "
        "(guest.report_latency: false).",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more detail (debug messages)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


#: Flags that override one config key each: {flag's dest: guest setting}.
FLAG_SETTINGS = {
    "transport": "transport",
    "period_ms": "period_ms",
    "idle_timeout": "idle_timeout_s",
    "pulse_server": "pulse_server",
    "sink_name": "sink_name",
    "source_name": "source_name",
}


def settings_from(args: argparse.Namespace, base: GuestSettings) -> GuestSettings:
    overrides = flag_overrides(args, FLAG_SETTINGS)
    if args.formats:
        overrides["formats"] = tuple(args.formats)
    if args.no_report_latency:
        overrides["report_latency"] = False
    return replace(base, **overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    raise_priority("qvaudio.guest")  # before any thread starts: they inherit it
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        # Every value was checked by the config's own code (flags too), so
        # `qvaudio config check` refuses exactly what the agent refuses.
        sys.stderr.writelines(f"{problem}\n" for problem in exc.problems)
        return 2
    settings = settings_from(args, config.guest)
    log.debug("configuration from %s", config.source)
    return GuestAgent(settings).run()


if __name__ == "__main__":
    sys.exit(main())
