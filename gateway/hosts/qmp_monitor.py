"""A running QEMU's block layer over its monitor (QMP), as the gateway uses it.

The gateway owns the monitor of each ``qmp`` host (a QEMU process nothing else manages; a
libvirt VM must go through libvirt). Through it the gateway:

- reads the named dirty bitmaps of a block node (``query-named-block-nodes``), adds and
  removes them;
- starts QEMU's one NBD server on a unix socket of its own choosing and exports what it reads
  (``block-export-add``), removing its exports when done;
- takes a point in time of one or several disks in one ``transaction`` (the fleecing of
  QEMU's docs/interop/bitmaps.rst): per disk, a fork of each chosen bitmap is made on a
  fleecing node whose backing is the disk, the live bitmap restarts clean and keeps recording,
  and a ``blockdev-backup sync=none`` job makes QEMU copy old data into the fleecing node before
  a write changes it. The fleecing node, with its forks, is exported read-only;
- releases it: the export and the job go, what the forks still hold (all of it, or only the
  ranges no one acknowledged) merges back into the live bitmaps, and the fleecing node goes.

Everything the gateway leaves in QEMU is found again by name after a crash (``kill -9``): the
fleecing node is ``nbdgw-f-TOKEN-I``, its job ``nbdgw-j-TOKEN-I``, its export
``nbdgw-e-TOKEN-I``, and its image file ``EXPORT@SNAP.TOKEN-I.fleece.qcow2`` in the gateway's
folder names the export and the snapshot (``TOKEN`` is shared by the disks of one consistency
group). QEMU node names are at most 31 characters, so the names carry only the token.

The QMP client is the QEMU project's own ``qemu.qmp`` (asyncio, maintained with QEMU): QMP's
framing, greeting, capability negotiation and asynchronous events are its business, not ours.
This module is only the block-layer policy above it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError, Runstate

from nbdcore.storage import checkpoint as ckpt
from nbdcore.storage.checkpoint import CHECKPOINT_RE
from nbdcore.storage.errors import NoSuchCheckpointError

log = logging.getLogger("nbdgw.qmp")

# Names the gateway gives what it leaves in QEMU (recovery finds them by these).
NODE_PREFIX = "nbdgw-"
FLEECE_NODE = "nbdgw-f-{token}-{index}"
FLEECE_JOB = "nbdgw-j-{token}-{index}"
FLEECE_EXPORT = "nbdgw-e-{token}-{index}"
LIVE_EXPORT = "nbdgw-l-{key}"
MERGE_NODE = "nbdgw-m-{token}"
# A checkpoint's bitmap on the disk's node, and the since:C views: the names of every kind of
# host (nbdcore.storage.checkpoint).
FLEECE_FILE = re.compile(
    r"^(?P<export>[^@/]+)@(?P<snap>[^@/]+)\.(?P<token>[0-9a-f]{8})-(?P<index>\d+)\.fleece\.qcow2$"
)
FLEECE_NODE_RE = re.compile(r"^nbdgw-f-(?P<token>[0-9a-f]{8})-(?P<index>\d+)$")


class QMPFailure(Exception):
    """A QMP operation failed; ``kind`` says how, for the gRPC mapping (gateway.errors).

    - ``unavailable``: no monitor (QEMU gone, socket refused, connection lost);
    - ``not_found``: no such node, device or bitmap;
    - ``exists``: a bitmap or snapshot of that name exists already;
    - ``busy``: in use (a bitmap exported or frozen, a node under a block job: another snapshot);
    - ``no_space``: the fleecing image could not be made;
    - ``invalid``: QEMU refused the arguments;
    - ``failed``: anything else QEMU reported.
    """

    def __init__(self, kind: str, message: str, *, command: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.command = command


def _classify(exc: ExecuteError) -> str:
    desc = str(exc)
    low = desc.lower()
    if exc.error_class == "DeviceNotFound" or "cannot find device" in low or "not found" in low:
        return "not_found"
    if "already exists" in low or "already has" in low or "is already in use" in low:
        return "exists"
    if "busy" in low or "in use" in low or "currently" in low or "frozen" in low:
        return "busy"
    if "no space" in low:
        return "no_space"
    if exc.error_class == "GenericError" and ("invalid" in low or "parameter" in low):
        return "invalid"
    return "failed"


@dataclass(frozen=True)
class BitmapInfo:
    """One named dirty bitmap of a node, as query-named-block-nodes shows it."""

    name: str
    granularity: int
    count: int  # dirty bytes
    recording: bool
    persistent: bool
    busy: bool
    inconsistent: bool = False


@dataclass(frozen=True)
class NodeInfo:
    node_name: str
    size: int
    filename: str
    driver: str
    bitmaps: tuple[BitmapInfo, ...]
    read_only: bool = False


@dataclass
class Fleece:
    """One disk's part of a point in time: what the gateway made for it in QEMU."""

    export: str
    snapshot: str
    token: str
    index: int
    node: str  # the disk's node
    path: Path  # the fleecing image
    forks: dict[str, int] = field(default_factory=dict)  # bitmap name -> granularity
    nbd_name: str = ""  # the NBD export name of the point in time
    size: int = 0  # the disk's size, in bytes
    # Forks that are views (since:C, the merge of checkpoint bitmaps): fork -> its sources on
    # the disk. A view is not cleared on the disk and merges nothing back.
    views: dict[str, list[str]] = field(default_factory=dict)
    # A checkpoint started at the instant: (its new bitmap, the one that stops recording).
    checkpoint: tuple[str, str | None] | None = None
    created: float = 0.0  # when the point in time was taken (time.time())

    @property
    def record(self) -> Path:
        """What QEMU does not keep of the point in time (its checkpoint, views, creation time),
        beside the image: a gateway restarted under an open snapshot reads it back."""
        return self.path.with_suffix(".json")

    def save_record(self) -> None:
        data = {
            "checkpoint": list(self.checkpoint) if self.checkpoint is not None else None,
            "views": self.views,
            "created": self.created,
        }
        tmp = self.record.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.record)

    def load_record(self) -> None:
        """Read back what :meth:`save_record` kept; without it (an image made before records
        were kept), the snapshot is served without its checkpoint."""
        try:
            with open(self.record) as f:
                data = json.load(f)
            checkpoint = data["checkpoint"]
            self.checkpoint = (str(checkpoint[0]), checkpoint[1]) if checkpoint else None
            self.views = {str(k): [str(b) for b in v] for k, v in data["views"].items()}
            self.created = float(data["created"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            log.warning("snapshot %s of %s: no record of its checkpoint (%s)", self.snapshot,
                        self.export, exc)  # fmt: skip

    def remove_files(self) -> None:
        """The record first: an image without one is served without its checkpoint, while a
        record without its image would be a leftover."""
        for path in (self.record, self.path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    @property
    def fleece_node(self) -> str:
        return FLEECE_NODE.format(token=self.token, index=self.index)

    @property
    def job(self) -> str:
        return FLEECE_JOB.format(token=self.token, index=self.index)

    @property
    def export_id(self) -> str:
        return FLEECE_EXPORT.format(token=self.token, index=self.index)


def fleece_path(folder: Path, export: str, snapshot: str, token: str, index: int) -> Path:
    return folder / f"{export}@{snapshot}.{token}-{index}.fleece.qcow2"


def new_token() -> str:
    return secrets.token_hex(4)


class Monitor:
    """One QMP socket, connected on first use and again after it was lost.

    Every command goes through :meth:`execute`, which turns qemu.qmp's errors into
    :class:`QMPFailure`. Commands are serialised: a transaction and the queries that prepare
    it must not interleave with another caller's.
    """

    def __init__(
        self,
        path: str | Path,
        name: str = "qmp",
        *,
        timeout: float = 10.0,
        connect_timeout: float = 30.0,
    ) -> None:
        self.path = str(path)
        self.name = name
        self.timeout = timeout
        # A dead monitor refuses at once; one that accepted but is slow to greet and negotiate
        # (QEMU under TCG on a starved machine: seen past 10 s in CI) is given longer.
        self.connect_timeout = connect_timeout
        self._qmp: QMPClient | None = None
        self.lock = asyncio.Lock()  # callers that need several commands in a row hold it
        self._io = asyncio.Lock()
        self.last_error = ""
        # Counts connections: a new session may be a new QEMU process that lost our state.
        self.session = 0

    @property
    def connected(self) -> bool:
        return self._qmp is not None and self._qmp.runstate == Runstate.RUNNING

    async def _client(self) -> QMPClient:
        if self.connected:
            assert self._qmp is not None
            return self._qmp
        await self._drop()
        qmp = QMPClient(self.name)
        try:
            await asyncio.wait_for(qmp.connect(self.path), self.connect_timeout)
        except (ConnectError, OSError, TimeoutError) as exc:
            with contextlib.suppress(Exception):
                await qmp.disconnect()
            self.last_error = f"QMP monitor {self.path}: {_cause(exc)}"
            raise QMPFailure("unavailable", self.last_error) from None
        self._qmp = qmp
        self.session += 1
        self.last_error = ""
        return qmp

    async def _drop(self) -> None:
        qmp, self._qmp = self._qmp, None
        if qmp is not None:
            with contextlib.suppress(Exception):
                await qmp.disconnect()

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        async with self._io:
            qmp = await self._client()
            try:
                return await asyncio.wait_for(qmp.execute(command, arguments), self.timeout)
            except ExecuteError as exc:
                raise QMPFailure(_classify(exc), str(exc), command=command) from None
            except (ExecInterruptedError, QMPError, OSError, EOFError, TimeoutError) as exc:
                await self._drop()
                self.last_error = f"QMP monitor {self.path} lost during {command}: {_cause(exc)}"
                raise QMPFailure("unavailable", self.last_error, command=command) from None

    async def close(self) -> None:
        async with self._io:
            await self._drop()

    # --- block nodes and bitmaps ----------------------------------------------------------------

    async def nodes(self) -> dict[str, dict[str, Any]]:
        """Every named block node, by node name."""
        found = await self.execute("query-named-block-nodes", {"flat": True})
        return {n["node-name"]: n for n in found if n.get("node-name")}

    async def resolve(self, name: str) -> str:
        """A node name, or a device (``-drive id``, qdev id) resolved to its root node."""
        nodes = await self.nodes()
        if name in nodes:
            return name
        for dev in await self.execute("query-block"):
            inserted = dev.get("inserted") or {}
            qdev = str(dev.get("qdev") or "")
            # qdev is a QOM path; a -device id=ID is /machine/peripheral/ID/...
            ids = {dev.get("device"), qdev}
            if qdev.startswith("/machine/peripheral/"):
                ids.add(qdev.split("/")[3])
            if name in ids and inserted.get("node-name"):
                return str(inserted["node-name"])
        raise QMPFailure("not_found", f"QEMU has no block node or device {name!r}")

    async def node(self, name: str) -> NodeInfo:
        node_name = await self.resolve(name)
        raw = (await self.nodes())[node_name]
        return node_info(raw)

    async def add_bitmap(
        self, node: str, name: str, *, granularity: int | None = None, persistent: bool = True
    ) -> None:
        args: dict[str, Any] = {"node": node, "name": name, "persistent": persistent}
        if granularity:
            args["granularity"] = granularity
        await self.execute("block-dirty-bitmap-add", args)

    async def remove_bitmap(self, node: str, name: str) -> None:
        await self.execute("block-dirty-bitmap-remove", {"node": node, "name": name})

    # --- NBD server and exports -----------------------------------------------------------------

    async def ensure_nbd_server(self, sock: Path) -> None:
        """QEMU's one NBD server listening on ``sock`` (ours: we chose the path).

        A server already running (the gateway restarted) is kept when ``sock`` answers; one on
        another path, or dead, is stopped and started again on ours.
        """
        try:
            await self.execute(
                "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}}
            )
            return
        except QMPFailure as exc:
            if "already running" not in str(exc):
                raise
        if _listening(sock):
            return
        log.warning("%s: QEMU's NBD server is not on %s; restarting it there", self.name, sock)
        await self.execute("nbd-server-stop")
        await self.execute(
            "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}}
        )

    async def exports(self) -> dict[str, dict[str, Any]]:
        found = await self.execute("query-block-exports")
        return {e["id"]: e for e in found}

    async def add_export(
        self,
        export_id: str,
        node: str,
        nbd_name: str,
        *,
        bitmaps: Sequence[str] = (),
        description: str = "",
    ) -> None:
        args: dict[str, Any] = {
            "type": "nbd",
            "id": export_id,
            "node-name": node,
            "name": nbd_name,
            "writable": False,
        }
        if bitmaps:
            args["bitmaps"] = list(bitmaps)
        if description:
            args["description"] = description
        await self.execute("block-export-add", args)

    async def remove_export(self, export_id: str) -> None:
        """Remove an export now, dropping its clients (``mode: hard``), and wait until it is
        gone (QEMU removes it asynchronously)."""
        try:
            await self.execute("block-export-del", {"id": export_id, "mode": "hard"})
        except QMPFailure as exc:
            if exc.kind != "not_found":
                raise
            return
        for _ in range(200):
            if export_id not in await self.exports():
                return
            await asyncio.sleep(0.01)

    # --- the point in time ---------------------------------------------------------------------

    async def create_fleeces(self, fleeces: Sequence[Fleece], *, cluster_size: int = 65536) -> None:
        """Take the point in time of every disk of ``fleeces`` in one transaction.

        Before it, each fleecing node is added over a new image (the disk's size, no data) with
        the disk as its backing. The transaction then, per disk: adds each fork (disabled) on
        the fleecing node, merges the live bitmap into it, clears the live bitmap (which keeps
        recording), and starts the copy-before-write job. QEMU runs it with the disks drained:
        one instant for all of them. On failure nothing of it stays.
        """
        made: list[Fleece] = []
        sent = False
        created = time.time()
        try:
            for f in fleeces:
                info = await self.node(f.node)
                f.size = info.size
                await _qemu_img_create(f.path, info.size, cluster_size)
                made.append(f)
                f.created = created  # one time for the whole group
                try:
                    await asyncio.to_thread(f.save_record)
                except OSError as exc:
                    kind = "no_space" if exc.errno == errno.ENOSPC else "failed"
                    raise QMPFailure(kind, f"cannot write {f.record}: {exc}") from None
                await self.execute(
                    "blockdev-add",
                    {
                        "driver": "qcow2",
                        "node-name": f.fleece_node,
                        "file": {"driver": "file", "filename": str(f.path)},
                        "backing": info.node_name,
                        # QEMU writes the forks into the image when it closes it cleanly, so a
                        # QEMU that exits with a snapshot open leaves them for recovery.
                        "discard": "unmap",
                    },
                )
            actions: list[dict[str, Any]] = []
            for f in fleeces:
                for bitmap, granularity in f.forks.items():
                    sources = f.views.get(bitmap, [bitmap])
                    actions += [
                        _action(
                            "block-dirty-bitmap-add",
                            node=f.fleece_node,
                            name=bitmap,
                            granularity=granularity,
                            disabled=True,
                            persistent=True,
                        ),
                        _action(
                            "block-dirty-bitmap-merge",
                            node=f.fleece_node,
                            target=bitmap,
                            bitmaps=[{"node": f.node, "name": b} for b in sources],
                        ),
                    ]
                    if bitmap not in f.views:
                        actions.append(
                            _action("block-dirty-bitmap-clear", node=f.node, name=bitmap)
                        )
                if f.checkpoint is not None:
                    new, previous = f.checkpoint
                    if previous is not None:
                        actions.append(
                            _action("block-dirty-bitmap-disable", node=f.node, name=previous)
                        )
                    actions.append(
                        _action("block-dirty-bitmap-add", node=f.node, name=new, persistent=True)
                    )
                actions.append(
                    _action(
                        "blockdev-backup",
                        device=f.node,
                        target=f.fleece_node,
                        sync="none",
                        **{"job-id": f.job, "auto-dismiss": True, "auto-finalize": True},
                    )
                )
            sent = True
            await self.execute("transaction", {"actions": actions})
        except BaseException as exc:
            if sent and not (isinstance(exc, QMPFailure) and exc.kind != "unavailable"):
                # QEMU may have run the transaction (the monitor timed out or went away, or
                # the gateway is stopping): the forks may hold the live bitmaps' bits now.
                # The images stay, so that the recovery at the next monitor session finds
                # the fleeces, serves them again or rolls them back (forks merged).
                log.warning("snapshot %s: the transaction's outcome is unknown (%s); left to"
                            " recovery", fleeces[0].snapshot if fleeces else "?", exc)  # fmt: skip
                raise
            for f in made:
                with contextlib.suppress(QMPFailure):
                    await self._drop_node(f.fleece_node)
                with contextlib.suppress(OSError):
                    f.remove_files()
            raise

    async def export_fleece(self, f: Fleece) -> None:
        """Export a fleecing node on QEMU's NBD server (after :meth:`create_fleeces`)."""
        await self.add_export(
            f.export_id,
            f.fleece_node,
            f.nbd_name,
            bitmaps=list(f.forks),
            description=f"nbdgw snapshot {f.snapshot} of {f.export}",
        )

    async def _drop_node(self, node: str) -> None:
        try:
            await self.execute("blockdev-del", {"node-name": node})
        except QMPFailure as exc:
            if exc.kind != "not_found":
                raise

    async def cancel_job(self, job: str) -> None:
        """Cancel a fleecing job (sync=none never ends by itself) and wait until it is gone."""
        try:
            await self.execute("block-job-cancel", {"device": job, "force": True})
        except QMPFailure as exc:
            if exc.kind != "not_found" and "no active block job" not in str(exc).lower():
                raise
        for _ in range(500):
            jobs = await self.execute("query-block-jobs")
            if not any(j.get("device") == job for j in jobs):
                return
            await asyncio.sleep(0.01)
        raise QMPFailure("busy", f"block job {job} did not end")

    async def merge_back(
        self, fleece: Fleece, bitmap: str, source: tuple[str, str] | None = None
    ) -> None:
        """Merge into the live ``bitmap`` its fork (``source=None``) or another node's bitmap."""
        node, name = source if source is not None else (fleece.fleece_node, bitmap)
        await self.execute(
            "block-dirty-bitmap-merge",
            {"node": fleece.node, "target": bitmap, "bitmaps": [{"node": node, "name": name}]},
        )

    async def merge_ranges(
        self,
        fleece: Fleece,
        bitmap: str,
        granularity: int,
        size: int,
        ranges: Iterable[tuple[int, int]],
        scratch: Path,
    ) -> None:
        """Merge exactly ``ranges`` into the live ``bitmap``: QMP sets no arbitrary bits, so a
        scratch image with a bitmap of the same granularity gets them by write-zeroes (which
        dirties its bitmap and stores no data), and that bitmap merges."""
        await _qemu_img_create(scratch, size, 65536)
        try:
            await _run("qemu-img", "bitmap", "--add", "-g", str(granularity), str(scratch), "m")
            script = "".join(f"write -z {off} {length}\n" for off, length in ranges)
            # Cache mode unsafe (no flushes): the scratch image is thrown away, and a crash
            # before the merge redoes it from the fork; with flushes 64K ranges take minutes.
            await _run(
                "qemu-io", "-t", "unsafe", "-f", "qcow2", str(scratch), stdin=script.encode()
            )
            node = MERGE_NODE.format(token=fleece.token)
            await self.execute(
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": node,
                    "read-only": True,
                    "file": {"driver": "file", "filename": str(scratch), "read-only": True},
                },
            )
            try:
                await self.merge_back(fleece, bitmap, (node, "m"))
            finally:
                await self._drop_node(node)
        finally:
            await asyncio.to_thread(scratch.unlink, missing_ok=True)

    # --- checkpoints ---------------------------------------------------------------------------

    async def checkpoints(self, node: str) -> list[tuple[int, str, BitmapInfo]]:
        """The checkpoint chain of a disk's node, oldest first: (seq, id, bitmap)."""
        out = []
        for b in (await self.node(node)).bitmaps:
            m = CHECKPOINT_RE.match(b.name)
            if m is not None:
                out.append((int(m["seq"]), m["id"], b))
        return sorted(out, key=lambda c: c[0])

    async def delete_checkpoint(self, node: str, checkpoint: str) -> str | None:
        """Delete a checkpoint, merging its interval into the older neighbour (which records
        again when the deleted one was the newest), in one transaction; returns the neighbour's
        id, or None when it was the oldest."""
        chain = await self.checkpoints(node)
        links = ckpt.chain_of((b.name, b.granularity, b.recording, b.count) for _, _, b in chain)
        try:
            victim, older = ckpt.neighbour(links, checkpoint)
        except NoSuchCheckpointError:
            raise QMPFailure("not_found", f"no checkpoint {checkpoint!r}") from None
        if older is not None:
            actions = [
                _action("block-dirty-bitmap-merge", node=node, target=older.bitmap,
                        bitmaps=[victim.bitmap]),
            ]  # fmt: skip
            if victim.recording:
                actions.append(_action("block-dirty-bitmap-enable", node=node, name=older.bitmap))
            # The removal in the same transaction: a connection lost between two commands left
            # both recording, and the older one recorded for ever (nothing repaired it).
            actions.append(_action("block-dirty-bitmap-remove", node=node, name=victim.bitmap))
            await self.execute("transaction", {"actions": actions})
        else:
            await self.remove_bitmap(node, victim.bitmap)
        return older.id if older is not None else None

    async def drop_fleece(self, fleece: Fleece) -> None:
        """Remove the fleecing node (with its forks) and its image. Files that cannot be
        removed are logged, not raised: the node is gone, so the release (or rollback) this
        ends is done, and must not come back as a snapshot that cannot be released."""
        await self._drop_node(fleece.fleece_node)
        try:
            await asyncio.to_thread(fleece.remove_files)
        except OSError as exc:
            log.error(
                "snapshot %s of %s: %s; delete %s and %s by hand, or the next monitor session"
                " merges the forks stored in the image back whole (dropping their"
                " acknowledgements)",
                fleece.snapshot, fleece.export, exc, fleece.record, fleece.path,
            )  # fmt: skip

    async def drop_merge_leftovers(self, folder: Path, exports: Iterable[str]) -> None:
        """Scratch nodes and images of a merge-back that a crash interrupted (the merge-back is
        redone whole from the fork, which is still there): this QEMU's, of ``exports`` (the
        folder is shared with the other QEMU hosts, whose merges may be running)."""
        for name in await self.nodes():
            if name.startswith(MERGE_NODE.format(token="")):
                await self._drop_node(name)
        ours = set(exports)
        for path in await asyncio.to_thread(_merge_files, folder):
            if path.name.split("@", 1)[0] in ours:
                await asyncio.to_thread(path.unlink, missing_ok=True)

    async def find_fleeces(self, folder: Path) -> list[tuple[Fleece, bool]]:
        """What earlier gateways left: every fleecing image in ``folder`` with whether QEMU
        still has its node (True: the point in time is intact; False: QEMU restarted, only
        the image, and the forks QEMU stored in it on a clean exit, remain). The disk's node
        is left empty: the caller knows it from the export's configuration."""
        nodes = await self.nodes()
        found: list[tuple[Fleece, bool]] = []
        for path in await asyncio.to_thread(_fleece_files, folder):
            m = FLEECE_FILE.match(path.name)
            if m is None:
                continue
            token, index = m["token"], int(m["index"])
            f = Fleece(m["export"], m["snap"], token, index, node="", path=path)
            await asyncio.to_thread(f.load_record)
            live = f.fleece_node in nodes
            if live:
                f.forks = {b["name"]: int(b["granularity"]) for b in _named(nodes[f.fleece_node])}
                f.size = node_info(nodes[f.fleece_node]).size
            found.append((f, live))
        return found


def _merge_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.merge"))


def _fleece_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.fleece.qcow2"))


def _named(raw: Mapping[str, Any]) -> list[dict[str, Any]]:
    # Unnamed entries are QEMU's own internal bitmaps (the copy-before-write job's).
    return [b for b in raw.get("dirty-bitmaps") or [] if b.get("name")]


def node_info(raw: Mapping[str, Any]) -> NodeInfo:
    image = raw.get("image") or {}
    return NodeInfo(
        node_name=str(raw["node-name"]),
        size=int(image.get("virtual-size", 0)),
        filename=str(raw.get("file", "")),
        driver=str(raw.get("drv", "")),
        read_only=bool(raw.get("ro", False)),
        bitmaps=tuple(
            BitmapInfo(
                name=str(b["name"]),
                granularity=int(b["granularity"]),
                count=int(b.get("count", 0)),
                recording=bool(b.get("recording", False)),
                persistent=bool(b.get("persistent", False)),
                busy=bool(b.get("busy", False)),
                inconsistent=bool(b.get("inconsistent", False)),
            )
            for b in _named(raw)
        ),
    )


def _action(kind: str, **data: Any) -> dict[str, Any]:
    return {"type": kind, "data": data}


def _cause(exc: BaseException) -> str:
    while exc.__cause__ is not None and str(exc) == "":
        exc = exc.__cause__
    return str(exc) or type(exc).__name__


def _listening(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(sock))
        except OSError:
            return False
    return True


async def _run(*argv: str, stdin: bytes | None = None) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate(stdin)
    text = out.decode(errors="replace")
    # qemu-io reports a failed command on stdout and still exits 0.
    if proc.returncode != 0 or (argv[0] == "qemu-io" and "error" in text.lower()):
        kind = "no_space" if "no space" in text.lower() else "failed"
        raise QMPFailure(kind, f"{argv[0]} failed: {text.strip()[-500:]}")


async def _qemu_img_create(path: Path, size: int, cluster_size: int) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    except OSError as exc:  # a command of QEMU's host that failed, as qemu-img's own failures
        kind = "no_space" if exc.errno == errno.ENOSPC else "failed"
        raise QMPFailure(kind, f"cannot create {path}: {exc}") from None
    await _run(
        "qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}",
        str(path), str(size),
    )  # fmt: skip
