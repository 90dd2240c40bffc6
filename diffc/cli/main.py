"""The ``diffc`` command: one subcommand per module in this package."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import DiffcError

# Subcommands, each a module with ``add_parser(subparsers)`` that sets ``func`` on its parser.
SUBCOMMANDS = ("compile", "run", "serve")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from ..version import __version__

    parser = argparse.ArgumentParser(
        prog="diffc", description="diffc: a compiler-centric inference engine for diffusion transformers.")
    parser.add_argument("--version", action="version", version=f"diffc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log loading and stage details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"diffc.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except DiffcError as exc:
        print(f"diffc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffc {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
