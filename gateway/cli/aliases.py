"""The old spellings of ``nbdgw`` commands, kept for one release: each is rewritten into the new
grammar before parsing, with one notice on stderr (:func:`nbdcore.tools.deprecated`).

The grammar: gateway nouns with verbs at the top (``export``, ``bitmap``, ``snapshot``,
``checkpoint``; ``backup``, ``restore``, ``verify``, ``render``, ``serve``), the local image
tools under ``disk`` and the NBD tools under ``nbd``. Old flags that only changed their name
are :class:`nbdcore.tools.DeprecatedFlag` on the new parsers; a flag whose meaning changed with
its command (``extents --bitmap`` is any context: ``bitmap map --context``) is rewritten here.

Two old spellings collide with new ones: ``nbdgw bitmap VERB DISK ...`` and ``nbdgw snapshot
VERB DISK ...`` worked on a local image, ``nbdgw bitmap VERB EXPORT ...`` and ``nbdgw snapshot
VERB EXPORT ...`` now work through the gateway. The rule (docs/cli.md): when the first argument
after the verb that is not an option names an existing file, it is the old local form (an export
whose name is also a file here is reached as ``exports/NAME``); verbs only the local form has
(``enable``, ``disable``, ``merge``) always are.

Kept light: imported by ``nbdgw`` before it knows which command runs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Final

from nbdcore.tools import deprecated

# Old words -> (new words, {old flag: new flag} for the rest of the command line).
ALIASES: Final[dict[tuple[str, ...], tuple[tuple[str, ...], dict[str, str]]]] = {
    ("exports",): (("export", "list"), {}),
    ("generation",): (("export", "generation"), {}),
    ("bitmaps",): (("bitmap", "list"), {}),
    ("extents",): (("bitmap", "map"), {"--bitmap": "--context"}),
    ("clear",): (("bitmap", "clear"), {}),
    ("remaining",): (("bitmap", "remaining"), {}),
    ("add-bitmap",): (("bitmap", "add"), {}),
    ("remove-bitmap",): (("bitmap", "remove"), {}),
    ("snapshots", "list"): (("snapshot", "list"), {}),
    ("snapshots", "create"): (("snapshot", "create"), {}),
    ("snapshots", "release"): (("snapshot", "release"), {}),
    ("snapshots", "checkpoints"): (("checkpoint", "list"), {}),
    ("snapshots", "delete-checkpoint"): (("checkpoint", "delete"), {}),
    ("snapshots",): (("snapshot",), {}),
    ("map",): (("render",), {}),
}

# The verbs of the old local groups, and those the new gateway groups share with them.
LOCAL_VERBS: Final[dict[str, frozenset[str]]] = {
    "bitmap": frozenset({"add", "remove", "list", "map", "enable", "disable", "clear", "merge"}),
    "snapshot": frozenset({"create", "list", "release"}),
}
GATEWAY_VERBS: Final[dict[str, frozenset[str]]] = {
    "bitmap": frozenset({"add", "remove", "list", "map", "clear", "remaining"}),
    "snapshot": frozenset({"create", "list", "release"}),
}

# Options of those commands that take their value as the next word: skipped when looking for
# the first argument.
_VALUE_OPTIONS: Final = frozenset(
    {
        "-g",
        "--granularity",
        "--offset",
        "--length",
        "--cluster-size",
        "--max-size",
        "--on-full",
        "--bitmap",
        "--context",
        "--target",
        "--token",
        "--tls-ca",
        "--tls-cert",
        "--tls-key",
        "--tls-server-name",
        "--timeout",
        "--generation",
        "--clear-token",
        "--retries",
        "--id",
        "--group",
        "--checkpoint",
        "--since",
    }
)


def first_argument(words: Sequence[str]) -> str | None:
    """The first word of ``words`` that is neither an option nor an option's value."""
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word == "--":
            continue
        elif word.startswith("-"):
            skip = word in _VALUE_OPTIONS
        else:
            return word
    return None


def is_local(group: str, words: Sequence[str]) -> bool:
    """``nbdgw GROUP VERB ...`` (``words``: VERB and what follows) is the old local form."""
    if not words or words[0] not in LOCAL_VERBS.get(group, ()):
        return False
    if words[0] not in GATEWAY_VERBS[group]:
        return True
    disk = first_argument(words[1:])
    return disk is not None and os.path.isfile(disk)


def rewrite(argv: Sequence[str]) -> list[str]:
    """``argv`` in the new grammar; each old spelling found prints its notice."""
    args = list(argv)
    at = next((i for i, w in enumerate(args) if not w.startswith("-")), None)
    if at is None:
        return args
    group = args[at]
    if group in LOCAL_VERBS and is_local(group, args[at + 1 :]):
        verb = args[at + 1]
        deprecated(f"{group} {verb}", f"disk {group} {verb}")
        return [*args[:at], "disk", *args[at:]]
    for old, (new, flags) in ALIASES.items():
        if tuple(args[at : at + len(old)]) != old:
            continue
        deprecated(" ".join(old), " ".join(new))
        rest = [_rename_flag(w, flags) for w in args[at + len(old) :]]
        return [*args[:at], *new, *rest]
    return args


def _rename_flag(word: str, flags: dict[str, str]) -> str:
    # No notice of its own: the command's says where to look, one line per use.
    name, eq, value = word.partition("=")
    return flags[name] + eq + value if name in flags else word


def table() -> list[tuple[str, str]]:
    """(old, new) spellings of commands, for docs/cli.md."""
    rows = [(" ".join(old), " ".join(new)) for old, (new, _) in ALIASES.items()]
    for group, verbs in LOCAL_VERBS.items():
        rows += [(f"{group} {verb} DISK ...", f"disk {group} {verb}") for verb in sorted(verbs)]
    return rows
