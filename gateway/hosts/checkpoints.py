"""Checkpoint chains, one notion for every kind of host (nbdcore.storage.checkpoint).

The chain's rules (naming, planning a snapshot's start and view, deleting into the older
neighbour, "between A and B") are nbdcore.storage.checkpoint's, for nbdcore images (embedded,
and remote ``nbdgw nbd serve`` hosts through NBD_OPT_X_NBDGW_SNAPSHOT) and for running QEMU VMs
(gateway.hosts.qmp_snapshots, over QMP). Here: what the gateway hands out, and its errors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import grpc

from gateway import errors
from gateway.errors import GatewayError
from gateway.hosts.pool import ExportPool
from nbdcore.aio.client import NBDClient
from nbdcore.extents import iter_extents
from nbdcore.storage.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointOrderError,
    NoSuchCheckpointError,
)

CHECKPOINT_TYPE = "nbdgw.dev/Checkpoint"


class CheckpointReason:
    """``nbdgw.v1.SnapshotErrorReason`` names (without prefix) of checkpoints."""

    CHECKPOINT_NOT_FOUND = "CHECKPOINT_NOT_FOUND"
    CHECKPOINT_EXISTS = "CHECKPOINT_EXISTS"


@dataclass(frozen=True)
class CheckpointDelta:
    """What was written between checkpoints ``base`` and ``target`` of ``export``: whole
    granules as sorted, merged ``(offset, length)`` byte runs (the last clipped to ``size``)."""

    export: str
    base: str
    target: str
    size: int
    granularity: int
    ranges: list[tuple[int, int]]


def checkpoint_not_found(export: str, checkpoint: str) -> GatewayError:
    return errors.resource_error(
        grpc.StatusCode.NOT_FOUND,
        CheckpointReason.CHECKPOINT_NOT_FOUND,
        f"export {export!r} has no checkpoint {checkpoint!r}",
        {"export": export, "checkpoint": checkpoint},
        resource_type=CHECKPOINT_TYPE,
        resource_name=f"exports/{export}/checkpoints/{checkpoint}",
        description="no checkpoint of this id (ListCheckpoints shows the chain)",
    )


def checkpoint_exists(export: str, checkpoint: str) -> GatewayError:
    return errors.resource_error(
        grpc.StatusCode.ALREADY_EXISTS,
        CheckpointReason.CHECKPOINT_EXISTS,
        f"export {export!r} already has a checkpoint {checkpoint!r}",
        {"export": export, "checkpoint": checkpoint},
        resource_type=CHECKPOINT_TYPE,
        resource_name=f"exports/{export}/checkpoints/{checkpoint}",
        description="choose another checkpoint_id",
    )


def checkpoint_error(
    export: str, exc: CheckpointError, field: str = "checkpoint_id"
) -> GatewayError:
    """The GatewayError of a refusal of nbdcore.storage.checkpoint."""
    if isinstance(exc, NoSuchCheckpointError):
        return checkpoint_not_found(export, exc.checkpoint)
    if isinstance(exc, CheckpointExistsError):
        return checkpoint_exists(export, exc.checkpoint)
    if isinstance(exc, CheckpointOrderError):
        return errors.invalid_field("base", str(exc))
    return errors.invalid_field(field, str(exc))


def remote_checkpoint_error(export: str, error: dict[str, object]) -> GatewayError | None:
    """The GatewayError of a remote nbdcore host's checkpoint refusal, ``error`` being the
    extension's error object (docs/extension-snapshot.md); None: not a checkpoint refusal."""
    reason, message = error.get("reason"), str(error.get("message", ""))
    checkpoint = str(error.get("checkpoint", ""))
    if reason == "CHECKPOINT_NOT_FOUND":
        return checkpoint_not_found(export, checkpoint)
    if reason == "CHECKPOINT_EXISTS":
        return checkpoint_exists(export, checkpoint)
    if reason == "INVALID_CHECKPOINT":
        # "field" names the request key at fault; hosts older than it said so only in words.
        field = error.get("field") or ("between" if "newer than" in message else "checkpoint")
        return errors.invalid_field("base" if field == "between" else "checkpoint_id", message)
    return None


async def read_dirty_runs(pool: ExportPool, context: str) -> list[tuple[int, int]]:
    """The dirty runs of dirty-bitmap ``context`` on ``pool``'s export, merged, read over NBD
    (bounded steps: the walker's memory does not grow with the disk; the list does, one pair per
    run)."""
    runs: list[tuple[int, int]] = []

    async def read(client: NBDClient) -> None:
        async for batch in iter_extents(client, [context]):
            for off, length, (flags,) in batch.rows():
                if not flags & 1:
                    continue
                if runs and sum(runs[-1]) == off:
                    runs[-1] = (runs[-1][0], runs[-1][1] + length)
                else:
                    runs.append((off, length))

    await pool.run([context], read)
    return runs


def merged(ranges: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Sorted ranges with touching and overlapping ones joined (empty ones dropped)."""
    cur: tuple[int, int] | None = None
    for off, length in ranges:
        if length <= 0:
            continue
        if cur is not None and off <= cur[0] + cur[1]:
            cur = (cur[0], max(cur[0] + cur[1], off + length) - cur[0])
            continue
        if cur is not None:
            yield cur
        cur = (off, length)
    if cur is not None:
        yield cur
