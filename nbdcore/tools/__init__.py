"""Command-line tools built on nbdcore (``nbdgw nbd ...``, ``nbdgw disk ...``)."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from nbdcore.exceptions import NBDError

if TYPE_CHECKING:
    from nbdcore.tls import TLSConfig


# The release that drops the old spellings of commands and flags (see deprecated()).
REMOVED_IN = "0.2"


_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)")


class OneLineParser(argparse.ArgumentParser):
    """A parser whose usage errors are one line naming the command, with a "did you mean"
    for a mistyped command (exit code 2). Its subparsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        match = _INVALID_CHOICE.search(message)
        if match:
            import difflib  # only on this error: start-up stays lean

            word, listed = match.groups()
            choices = re.findall(r"'([^']*)'", listed)
            close = difflib.get_close_matches(word, choices, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            message = f"unknown command {word!r}; {hint}(one of: {', '.join(choices)})"
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def unrecognized(
    parser: argparse.ArgumentParser, args: argparse.Namespace, extras: list[str]
) -> NoReturn:
    """Report arguments no parser took, as the command they were given to (not the top
    level), with the closest option of that command."""
    words = command_name(args, parser.prog).split()[1:]
    for word in words:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    options = [
        o for a in parser._actions if a.help is not argparse.SUPPRESS for o in a.option_strings
    ]
    import difflib

    flag = next((w.partition("=")[0] for w in extras if w.startswith("--")), None)
    close = difflib.get_close_matches(flag, options, n=1) if flag else []
    hint = f"; did you mean {close[0]}?" if close else ""
    parser.error(f"unrecognized arguments: {' '.join(extras)}{hint}")


def subgroup(groups: dict[str, Any], name: str, help: str) -> Any:
    """The subparsers of command group ``name`` (``nbd``, ``disk``; ``disk bitmap`` for a group
    inside a group), created on first use so that several modules can add commands to one
    group. The parsed words are ``command``, then ``WORDS_command`` (``disk_bitmap_command``)."""
    if name not in groups:
        parent, _, word = name.rpartition(" ")
        parser: argparse.ArgumentParser = groups[parent].add_parser(word, help=help)
        groups[name] = parser.add_subparsers(
            dest=f"{name.replace(' ', '_')}_command", metavar="COMMAND"
        )
        parser.set_defaults(func=lambda _args, p=parser: (p.print_help(), 2)[1])
    return groups[name]


def deprecated(old: str, new: str) -> None:
    """The one notice an old spelling prints (on stderr, once per use): it still works."""
    print(
        f"nbdgw: {old!r} is deprecated, use {new!r} (removed in {REMOVED_IN})",
        file=sys.stderr,
        flush=True,
    )


class DeprecatedFlag(argparse.Action):
    """An old spelling of a flag: ``p.add_argument("--old", action=DeprecatedFlag,
    new="--new", dest=...)`` stores into the new flag's ``dest`` and prints the notice. Hidden
    from --help and docs/cli.md."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str, **kwargs: Any):
        kwargs.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        deprecated(option_string or self.option_strings[0], self.new)
        if self.nargs == 0:
            values = True if self.const is None else self.const
        if isinstance(getattr(namespace, self.dest, None), list) and not isinstance(values, list):
            getattr(namespace, self.dest).append(values)
        else:
            setattr(namespace, self.dest, values)


def help_text(doc: str | None) -> str:
    """A docstring as a terminal shows it: ``x`` (reST) becomes 'x' and :role:`x` x."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc or "")
    return re.sub(r"``([^`]+)``", r"'\1'", text)


class DocstringFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps a docstring description's lines, shown without its reST markup (the parser keeps
    the docstring itself, for scripts/gen-docs, which turns it into Markdown)."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(help_text(text))


def nbd_tls_options(p: argparse.ArgumentParser) -> None:
    """TLS to an NBD server: ``--nbd-tls-*``, as every command says it (``--tls-*`` is the
    gateway's, in commands that talk to one); ``--tls-*`` still works here, with a notice."""
    for what, helps in (
        ("ca", "CA certificate to verify the NBD server (default for nbds://: the system's)"),
        ("cert", "client certificate (PEM) for the NBD server"),
        ("key", "client private key (PEM) for the NBD server"),
    ):
        p.add_argument(f"--nbd-tls-{what}", dest=f"nbd_tls_{what}", metavar="FILE", help=helps)
        p.add_argument(
            f"--tls-{what}",
            dest=f"nbd_tls_{what}",
            metavar="FILE",
            action=DeprecatedFlag,
            new=f"--nbd-tls-{what}",
        )


def nbd_tls(args: argparse.Namespace) -> TLSConfig | None:
    """The TLS settings ``nbd_tls_options`` parsed (None: none given; an nbds:// URI still
    gets TLS, configured from the URI)."""
    if not (args.nbd_tls_ca or args.nbd_tls_cert or args.nbd_tls_key):
        return None
    from nbdcore.tls import TLSConfig

    return TLSConfig(
        ca_file=args.nbd_tls_ca, cert_file=args.nbd_tls_cert, key_file=args.nbd_tls_key
    )


def command_name(args: argparse.Namespace, prog: str = "nbdgw") -> str:
    """``nbdgw disk bitmap add`` from the parsed words (``command``, then ``WORDS_command``)."""
    words = [prog]
    command = getattr(args, "command", None)
    while command:
        words.append(command)
        command = getattr(args, f"{'_'.join(words[1:])}_command", None)
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
    args, extras = parser.parse_known_args(argv)
    if extras:
        unrecognized(parser, args, extras)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        result = func(args)
        if isinstance(result, Coroutine):
            # asyncio only for the commands that are coroutines: its import is about a third
            # of the start-up of the blocking ones (nbd copy), and --help should not pay it.
            import asyncio

            result = asyncio.run(result)
    except KeyboardInterrupt:
        return 130
    except (NBDError, OSError) as exc:
        print(f"{command_name(args, parser.prog)}: {describe(exc)}", file=sys.stderr)
        return 1
    return int(result or 0)
