"""The ``diffc`` command: one subcommand per module in this package."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
import threading
from typing import Any

from ..errors import DiffcError, InvalidArgumentError

# Subcommands, each a module with ``add_parser(subparsers)`` that sets ``func`` and ``_parser`` on its parser.
SUBCOMMANDS = ("compile", "run", "serve")
_VERBOSE_HELP = "log loading and stage details"


class Terminated(BaseException):
    """SIGTERM or SIGHUP (the terminal closed, the SSH session dropped), raised in the main thread like Ctrl-C's
    KeyboardInterrupt, so what a command was writing is undone (a compile's temporary artifact folder) before it
    exits. A BaseException: no ``except Exception`` stops it."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


# The signals that end a command as Ctrl-C does (SIGHUP exists on POSIX only)
ENDING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def _terminated(signum, frame):
    raise Terminated(signum)


def plain(text: str | None) -> str | None:
    """Help text without reStructuredText's double backticks (module docstrings become descriptions)."""
    return None if text is None else re.sub(r"``(.*?)``", r"\1", text)


class Parser(argparse.ArgumentParser):
    """argparse's parser with a flag mistake as one line naming ``--help`` (argparse printed the usage of every
    option first: 27 lines for ``diffc run --steps 1.5``). Subcommand parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from ..version import __version__

    parser = Parser(
        prog="diffc", description="diffc: a compiler-centric inference engine for diffusion transformers.")
    parser.add_argument("--version", action="version", version=f"diffc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"diffc.cli.{name}").add_parser(sub)
    for p in sub.choices.values():
        # after the subcommand too; SUPPRESS keeps `diffc -v run` from being reset by the subcommand's default
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=_VERBOSE_HELP)
    for p in [parser, *sub.choices.values()]:
        p.description = plain(p.description)
        for action in p._actions:
            action.help = plain(action.help)
    for action in sub._choices_actions:
        action.help = plain(action.help)
    return parser


def named_by_flag(exc: InvalidArgumentError, parser: argparse.ArgumentParser,
                  aliases: dict[str, str] | None = None) -> InvalidArgumentError:
    """``exc`` under the flag that sets its field, where the field is a Python argument a flag of this command sets
    (``image`` -> ``--image``, ``num_frames[0]`` -> ``--num-frames[0]``; ``aliases``: field -> flag where the names
    differ): checks made after loading the model are the Python API's and name its arguments."""
    field = exc.field
    base = re.split(r"[.\[]", field, maxsplit=1)[0]
    if field.startswith("-") or not base:
        return exc
    if aliases and base in aliases:
        return InvalidArgumentError(aliases[base] + field[len(base):], exc.message)
    for action in parser._actions:
        flags = [o for o in action.option_strings if o.startswith("--")]
        if action.dest == base and flags:
            return InvalidArgumentError(flags[0] + field[len(base):], exc.message)
    return exc


def _flag_of_path(args: argparse.Namespace, filename) -> str | None:
    """The flag whose value is ``filename`` or a folder holding it (``--model`` for its config files)."""
    target = str(filename)
    for action in args._parser._actions:
        values = getattr(args, action.dest, None) if action.option_strings else None
        for value in values if isinstance(values, list) else [values]:
            if not isinstance(value, str) or not value.strip():
                continue
            for given in {value, os.path.expanduser(value)}:
                if target == given or target.startswith(given.rstrip("/") + "/"):
                    return next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
    return None


def out_of_memory(exc: BaseException) -> str | None:
    """One line for a failure to allocate memory (torch's CPU allocator, a CUDA out-of-memory, Python's
    MemoryError), None for any other error: a request too large for the machine is the user's to shrink, not a
    traceback from inside torch."""
    torch = sys.modules.get("torch")
    text = str(exc)
    cuda = torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ()))
    if not (cuda or isinstance(exc, MemoryError) or "DefaultCPUAllocator: can't allocate memory" in text):
        return None
    where = "the GPU" if cuda or "CUDA" in text else "host memory"
    asked = re.search(r"you tried to allocate (\d+) bytes", text)
    size = f"{int(asked.group(1)) / 2**30:.2f} GiB" if asked else None
    if size is None:
        asked = re.search(r"Tried to allocate ([\d.]+ [KMGTP]i?B)", text)
        size = asked.group(1) if asked else None
    return (f"out of memory: {where} could not hold {f'another {size}' if size else 'what this request needs'}; "
            "ask for a smaller size, fewer frames or a smaller --batch (on a GPU, --offload helps)")


def main(argv: list[str] | None = None) -> int:
    from .config import given_options

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM ends the command as Ctrl-C does (cleaning up), where nothing else handles it already; not in a rank of
    # a parallel run, which its launcher stops with SIGTERM even inside a collective (the default kills it there)
    from .parallel import in_worker

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread() and not in_worker():
        for signum in ENDING_SIGNALS:
            if signal.getsignal(signum) == signal.SIG_DFL:
                previous[signum] = signal.signal(signum, _terminated)
    try:
        sub_argv = argv[argv.index(args.command) + 1:]
        args._given = given_options(args._parser, sub_argv)
        args._argv = argv
        with contextlib.ExitStack() as until_done:  # what the command turns on for its own run (--no-progress)
            args._until_done = until_done
            return args.func(args) or 0
    except DiffcError as exc:
        if isinstance(exc, InvalidArgumentError):
            exc = named_by_flag(exc, args._parser, getattr(args, "_field_flags", None))
        from .parallel import report_rank_error

        if not report_rank_error(str(exc)):  # a spawned rank leaves it to the parent, which prints it once
            print(f"diffc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the OS refuses (a name too long, ...) where no check of diffc's named it first
        if exc.filename is None:
            raise
        from .parallel import report_rank_error

        flag = _flag_of_path(args, exc.filename)
        from ..fileio import shown_path

        message = f"{flag + ': ' if flag else ''}{shown_path(exc.filename)}: {exc.strerror or type(exc).__name__}"
        if not report_rank_error(message):
            print(f"diffc {args.command}: error: {message}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        message = out_of_memory(exc)
        if message is None:
            raise
        from .parallel import report_rank_error

        if not report_rank_error(message):
            print(f"diffc {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        from .parallel import spawned_rank

        if not spawned_rank():  # Ctrl-C reaches every rank too; their parent says it once
            print(f"diffc {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"diffc {args.command}: terminated ({signal.Signals(exc.signum).name})", file=sys.stderr)
        return 128 + exc.signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
