"""Placeholder: its owner fills in the commands."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction[Any], groups: dict[str, Any]) -> None:
    """Add this module's subcommands to ``sub`` (``groups`` shares nested groups by name)."""
