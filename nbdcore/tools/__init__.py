"""Command-line tools built on nbdcore (``nbdgw nbd ...``, ``nbdgw bitmap ...``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from nbdcore.exceptions import NBDError


def subgroup(groups: dict[str, Any], name: str, help: str) -> Any:
    """The subparsers of command group ``name`` (``nbd``, ``bitmap``), created on first use so
    that several modules can add commands to one group."""
    if name not in groups:
        parser: argparse.ArgumentParser = groups[""].add_parser(name, help=help)
        groups[name] = parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND")
        parser.set_defaults(func=lambda _args, p=parser: (p.print_help(), 2)[1])
    return groups[name]


def help_text(doc: str | None) -> str:
    """A docstring as a terminal shows it: ``x`` (reST) becomes 'x' and :role:`x` x."""
    import re

    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc or "")
    return re.sub(r"``([^`]+)``", r"'\1'", text)


class DocstringFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps a docstring description's lines, shown without its reST markup (the parser keeps
    the docstring itself, for scripts/gen-docs, which turns it into Markdown)."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(help_text(text))


def command_name(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """``nbdgw nbd copy`` from the parsed words (``command``, then ``GROUP_command``)."""
    words = [parser.prog]
    command = getattr(args, "command", None)
    if command:
        words.append(command)
        sub = getattr(args, f"{command}_command", None)
        if sub:
            words.append(sub)
    return " ".join(words)


def describe(exc: BaseException) -> str:
    """An error as a person reads it: an OSError without its ``[Errno N]``, with its file."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    return str(exc)


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command: the ``func`` its parser set (a callable
    taking the namespace and returning an exit code, or a coroutine function, run with
    asyncio). The one runner of ``nbdgw`` and of these tools run alone: no command prints
    help (exit 2); an NBDError or OSError is one line on stderr, never a traceback, since a
    person caused it or the peer or the OS did (exit 1); Ctrl-C is exit 130."""
    args = parser.parse_args(argv)
    # asyncio and inspect only now: --help and argument errors should not pay their import.
    import asyncio
    import inspect

    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        result = asyncio.run(func(args)) if inspect.iscoroutinefunction(func) else func(args)
    except KeyboardInterrupt:
        return 130
    except (NBDError, OSError) as exc:
        print(f"{command_name(parser, args)}: {describe(exc)}", file=sys.stderr)
        return 1
    return int(result or 0)
