"""`qvaudio-guest`: run inside a VM; carries what the VM plays to dom0, and dom0's microphone back.

The command line and configuration; the work is `qvaudio.guest_loop.GuestAgent`.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

from qvaudio.config import ConfigError, GuestSettings, default_config_path, load_config
from qvaudio.formats import AudioFormat, FormatError
from qvaudio.guest_loop import GuestAgent
from qvaudio.log import raise_priority, setup_logging
from qvaudio.transport import parse_address

log = logging.getLogger(__name__)

#: Device names go unquoted into module arguments (the alphabet pulse_devices accepts).
DEVICE_NAME: Final = re.compile(r"[A-Za-z0-9_.\-]+")


# -- command line ----------------------------------------------------------------------------


def _format_arg(text: str) -> AudioFormat:
    try:
        return AudioFormat.parse(text)
    except FormatError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _transport_arg(text: str) -> str:
    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _ranged(kind: type[int] | type[float], low: float, high: float) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low:g} to {high:g}")
        return value

    return parse


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
        help=f"configuration file to read (default: {default_config_path()}).",
    )
    parser.add_argument(
        "--transport",
        type=_transport_arg,
        metavar="ADDR",
        help="where dom0 connects: xen:DOMID[:PORT], vsock:CID:PORT or unix:PATH.",
    )
    parser.add_argument(
        "--format",
        dest="formats",
        action="append",
        type=_format_arg,
        metavar="FMT",
        help="playback format to offer dom0, e.g. s16le:48000:2; repeat to offer several, "
        "best first.",
    )
    parser.add_argument(
        "--period-ms",
        type=_ranged(int, 2, 100),
        metavar="MS",
        help="size of each chunk read from the virtual output; smaller means lower latency.",
    )
    parser.add_argument(
        "--idle-timeout",
        type=_ranged(float, 0.1, 3600),
        metavar="SECONDS",
        help="after this much silence, stop sending audio until sound resumes.",
    )
    parser.add_argument(
        "--pulse-server",
        metavar="SERVER",
        help="PulseAudio/PipeWire server to use instead of the session's default.",
    )
    parser.add_argument(
        "--sink-name", metavar="NAME", help="name of the virtual output device to create."
    )
    parser.add_argument(
        "--source-name", metavar="NAME", help="name of the virtual microphone device to create."
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more detail (debug messages)."
    )
    return parser


def settings_from(args: argparse.Namespace, base: GuestSettings) -> GuestSettings:
    overrides: dict[str, Any] = {}
    for flag, name in (
        ("transport", "transport"),
        ("period_ms", "period_ms"),
        ("idle_timeout", "idle_timeout_s"),
        ("pulse_server", "pulse_server"),
        ("sink_name", "sink_name"),
        ("source_name", "source_name"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides[name] = value
    if args.formats:
        overrides["formats"] = tuple(args.formats)
    return replace(base, **overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    raise_priority("qvaudio.guest")  # before any thread starts: they inherit it
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    settings = settings_from(args, config.guest)
    for name in (settings.sink_name, settings.source_name):
        # Checked here, once, rather than failing in the watcher on every retry.
        if not DEVICE_NAME.fullmatch(name):
            sys.stderr.write(
                f"qvaudio-guest: device name {name!r} must match {DEVICE_NAME.pattern}\n"
            )
            return 2
    log.debug("configuration from %s", config.source)
    return GuestAgent(settings).run()


if __name__ == "__main__":
    sys.exit(main())
