"""The ``waterdoctor`` console script: one sub-command per module in :mod:`waterdoctor.commands`.

Each command module exposes ``add_parser(subparsers)`` that registers its parser and sets ``func`` to a callable
``(args, settings) -> int``. Settings are read once here, from the environment, and passed down.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from handoff.errors import HandoffError
from handoff.settings import Settings

COMMANDS = (
    "up",
    "ingest",
    "analytics",
    "alerting",
    "retention",
    "simulate",
    "load",
    "status",
    "replay",
    "dlq",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="waterdoctor", description="Telemetry-to-alert pipeline for water utilities"
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"waterdoctor.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"waterdoctor.commands.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"waterdoctor: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    try:
        rc: int = args.func(args, settings)
    except HandoffError as exc:
        print(f"waterdoctor {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
