"""Command-line tools built on nbdcore (``nbdgw nbd ...``, ``nbdgw bitmap ...``)."""

from __future__ import annotations

import argparse
from typing import Any


def subgroup(groups: dict[str, Any], name: str, help: str) -> Any:
    """The subparsers of command group ``name`` (``nbd``, ``bitmap``), created on first use so
    that several modules can add commands to one group."""
    if name not in groups:
        parser: argparse.ArgumentParser = groups[""].add_parser(name, help=help)
        groups[name] = parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND")
        parser.set_defaults(func=lambda _args, p=parser: (p.print_help(), 2)[1])
    return groups[name]
