"""The state file of ``nbdgw backup`` (``OUTPUT.nbdgw-backup.json``): what a resumed run must know,
shared by the backup loop (:mod:`gateway.cli.backup`) and its snapshots
(:mod:`gateway.cli.backup_snapshots`)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.cli.common import CommandFailed
from nbdcore.durable import write_atomic

STATE_SUFFIX = ".nbdgw-backup.json"
STATE_VERSION = 1


class BackupError(CommandFailed):
    """A backup cannot start or go on; the message says why and what to do."""


def state_path(output: Path) -> Path:
    return output.with_name(output.name + STATE_SUFFIX)


@dataclass
class BackupState:
    """What a resumed run must know, and must check, to continue exactly where one stopped."""

    export: str
    context: str
    size: int
    full: bool
    clear: bool
    next_offset: int = 0
    # Dirty runs [offset, length] already on disk but not yet cleared: a run reaching a
    # checkpoint may go on past it, and ClearRange clears only whole granules, so it is
    # cleared once its end is known (after a resume too).
    pending_clear: list[list[int]] = field(default_factory=list)
    # The clear token of the oldest message that carried a pending run (a live writable export
    # hands them out): the clears are conditional on it, so a write after the copy is kept.
    pending_token: str = ""
    complete: bool = False
    bytes_written: int = 0
    bytes_cleared: int = 0
    bytes_rechecked: int = 0  # re-read after clearing (see _Backup._recheck)
    bytes_rewritten: int = 0  # of which had changed since they were copied
    bytes_gap_copied: int = 0  # clean bytes between runs cleared together (see checkpoint)
    bytes_kept: int = 0  # kept by conditional clears: written after their copy, copied again
    bytes_left_dirty: int = 0  # still kept after the last copy: left for the next backup
    # With --clear on an export cleared through the gateway's ledger: the generation (point in
    # time) copied. Every ClearRange names it, so a clear never masks another snapshot.
    generation: str = ""
    started: float = field(default_factory=time.time)
    snapshot: str = ""  # the snapshot read, "" for the live export (gateway.cli.backup_snapshots)
    # With --since C / --checkpoint-id N: the checkpoint the changes are since, and the one the
    # backup's snapshot created; restore checks a chain with them.
    since: str = ""
    checkpoint: str = ""
    # With --digest: the algorithm, and once complete the digest of what the stream delivered
    # (hex; nbdgw.integrity.RangeDigest), checked against the gateway's. Until then, what a
    # resumed run needs: the last checkpoint's resume token (it carries the gateway's digest
    # state) and our own digest's state (chain hex, block start), whose block is read again
    # from OUTPUT.
    digest_algorithm: str = ""
    digest: str = ""
    digest_state: list[Any] = field(default_factory=list)
    resume_token: str = ""
    updated: float = 0.0
    version: int = STATE_VERSION

    @classmethod
    def load(cls, path: Path) -> BackupState:
        try:
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
                raise ValueError(f"unknown state version {raw.get('version')!r}")
            state = cls(**raw)
            for name in ("size", "next_offset", "bytes_written", "bytes_cleared"):
                value = getattr(state, name)
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"bad {name} {value!r}")
            if state.next_offset > state.size:
                raise ValueError("next_offset is past the end")
            state.pending_clear = [[int(o), int(n)] for o, n in state.pending_clear]
        except FileNotFoundError:
            raise
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            raise BackupError(f"{path}: not a usable backup state file: {exc}") from None
        return state

    def save(self, path: Path) -> None:
        """Replace ``path`` atomically: a crash leaves the old or the new state, never half."""
        self.updated = time.time()
        write_atomic(path, json.dumps(asdict(self), indent=1, sort_keys=True).encode() + b"\n")
