"""Conditional clears (NBD_X_NBDGW_CLEAR_F_SINCE): a clear since a position clears only the
granules not written after it. Against a model (per granule, the sequence of its last write),
through the storage, the sans-I/O protocol in both roles, and a real server and client; plus
what survives a restart of the process and what a crash of the machine forgets."""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdcore import clear_ext, wire
from nbdcore.aio.client import NBDClient
from nbdcore.aio.server import ExportConfig, NBDServer
from nbdcore.client import ClientConnection, Reply
from nbdcore.constants import NBD_REPLY_FLAG_DONE, Cmd, Errno, Opt, Rep, ReplyType
from nbdcore.exceptions import RequestError, ServerProtocolError, UsageError
from nbdcore.server import Request, ServerConnection
from nbdcore.storage import DirtyBitmap
from nbdcore.storage.bitmap import MAX_HISTORY_REGIONS, history_length
from nbdcore.storage.disk import MemoryDisk
from nbdcore.storage.image import Image
from nbdcore.storage.store import IN_USE, store_dir
from tests.unit.test_server_support import Chunk, go, joined, opt, parse_replies, start

GRAN = 4096
B0, ALLOC = "qemu:dirty-bitmap:b0", "base:allocation"
F_SINCE = clear_ext.encode_features(clear_ext.NBD_X_NBDGW_CLEAR_F_SINCE)


def granule_runs(granules: list[int], size: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for g in granules:
        start, n = g * GRAN, min(GRAN, size - g * GRAN)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((start, n))
    return out


# --- the bitmap against a model -----------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    granules=st.integers(1, 40),
    tail=st.integers(0, GRAN - 1),
    steps=st.lists(
        st.tuples(st.sampled_from(["write", "position", "clear"]), st.data()), max_size=30
    ),
)
def test_clear_since_matches_the_model(
    granules: int, tail: int, steps: list[tuple[str, st.DataObject]]
) -> None:
    size = granules * GRAN + tail
    count = -(-size // GRAN)
    bitmap = DirtyBitmap("m", size, GRAN)
    seq = 0
    written = [0] * count  # per granule: the sequence of its last write
    dirty = [False] * count
    positions = [bitmap.position]
    for op, data in steps:
        if op == "write":
            offset = data.draw(st.integers(0, size - 1))
            length = data.draw(st.integers(1, size - offset))
            bitmap.mark_dirty(offset, length)
            seq += 1
            for g in range(offset // GRAN, (offset + length - 1) // GRAN + 1):
                written[g], dirty[g] = seq, True
        elif op == "position":
            positions.append(bitmap.position)
        else:
            since = data.draw(st.sampled_from(positions))
            offset = data.draw(st.integers(0, size))
            length = data.draw(st.integers(0, size - offset))
            first = -(-offset // GRAN)
            end = count if offset + length == size else (offset + length) // GRAN
            inner = list(range(first, end))
            kept = [g for g in inner if written[g] > since[1]]
            cleared = [g for g in inner if written[g] <= since[1]]
            for g in cleared:
                dirty[g] = False
            assert bitmap.clear_range_since(offset, length, since) == (
                granule_runs(cleared, size),
                granule_runs(kept, size),
            )
        assert [bitmap.is_dirty(g * GRAN) for g in range(count)] == dirty


def test_a_position_of_another_history_clears_nothing() -> None:
    bitmap = DirtyBitmap("m", 10 * GRAN, GRAN)
    bitmap.mark_dirty(0, 10 * GRAN)
    history_id, sequence = bitmap.position
    whole = [(0, 10 * GRAN)]
    assert bitmap.clear_range_since(0, 10 * GRAN, (history_id ^ 2, sequence)) == ([], whole)
    assert bitmap.clear_range_since(0, 10 * GRAN, (history_id, sequence + 1)) == ([], whole)
    assert bitmap.dirty_bytes() == 10 * GRAN
    assert DirtyBitmap("m", 10 * GRAN, GRAN).position[0] != history_id  # ids are drawn


def test_large_disks_keep_whole_regions() -> None:
    # More granules than history regions: a write keeps its whole region, never less.
    granularity = 512
    size = MAX_HISTORY_REGIONS * 4 * granularity
    bitmap = DirtyBitmap("m", size, granularity)
    assert history_length(size, granularity) <= 32 + 8 * MAX_HISTORY_REGIONS
    bitmap.mark_dirty(0, size)
    since = bitmap.position
    bitmap.mark_dirty(5 * granularity, 1)  # granule 5, in region 1 (granules 4-7)
    cleared, kept = bitmap.clear_range_since(0, size, since)
    assert kept == [(4 * granularity, 4 * granularity)]
    assert cleared == [(0, 4 * granularity), (8 * granularity, size - 8 * granularity)]
    assert bitmap.is_dirty(5 * granularity) and not bitmap.is_dirty(0)


def test_a_clear_whose_runs_overflow_clears_nothing() -> None:
    bitmap = DirtyBitmap("m", 10 * GRAN, GRAN)
    bitmap.mark_dirty(0, 10 * GRAN)
    since = bitmap.position
    for g in (1, 4, 7):
        bitmap.mark_dirty(g * GRAN, 1)
    with pytest.raises(OSError, match="3 runs kept and 4 cleared, more than 3") as exc:
        bitmap.clear_range_since(0, 10 * GRAN, since, max_runs=3)
    assert exc.value.errno == errno.EOVERFLOW
    assert bitmap.dirty_bytes() == 10 * GRAN
    cleared, kept = bitmap.clear_range_since(0, 10 * GRAN, since, max_runs=4)
    assert (len(cleared), len(kept)) == (4, 3)


def test_disabled_bitmaps_still_record_history() -> None:
    bitmap = DirtyBitmap("m", 4 * GRAN, GRAN, enabled=False)
    since = bitmap.position
    bitmap.mark_dirty(0, 1)
    assert bitmap.dirty_bytes() == 0
    assert bitmap.clear_range_since(0, 4 * GRAN, since)[1] == [(0, GRAN)]


def test_merge_counts_as_written() -> None:
    live = DirtyBitmap("live", 8 * GRAN, GRAN)
    fork = DirtyBitmap("fork", 8 * GRAN, GRAN)
    fork.mark_dirty(3 * GRAN, 1)
    since = live.position
    live.merge_from(fork)
    _, kept = live.clear_range_since(0, 8 * GRAN, since)
    assert (3 * GRAN, GRAN) in kept or any(a <= 3 * GRAN < a + n for a, n in kept)
    assert live.is_dirty(3 * GRAN)


class CutShortDisk(MemoryDisk):
    """A disk whose data changes land half their bytes, then fail as a full file system makes
    os.pwrite fail; ``between`` runs first, where a reader takes its position and reads."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.between: Callable[[], None] = lambda: None

    def _cut(self, offset: int, length: int, change: Callable[[int, int], None]) -> None:
        self.between()
        change(offset, length // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        self._cut(offset, len(view), lambda o, n: MemoryDisk.pwrite(self, view[:n], o))

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False
    ) -> None:
        self._cut(offset, length, lambda o, n: MemoryDisk.write_zeroes(self, o, n))

    def trim(self, offset: int, length: int) -> None:
        self._cut(offset, length, lambda o, n: MemoryDisk.trim(self, o, n))


@pytest.mark.parametrize("change", ["write", "write_zeroes", "trim"])
def test_a_failed_write_is_stamped_after_what_it_changed(change: str) -> None:
    """A write cut short (ENOSPC, EFBIG, EIO) may have changed part of the data: a reader
    whose position is between the write's first mark and its data saw the old bytes, so its
    clear must keep the granule."""
    disk = CutShortDisk(4 * GRAN)
    image = Image(disk)
    image.add_bitmap("b", granularity=GRAN)
    MemoryDisk.pwrite(disk, b"A" * GRAN, 0)
    seen: dict[str, Any] = {}

    def reader() -> None:
        seen["position"] = image.bitmaps["b"].position
        seen["copy"] = image.read(0, GRAN)

    disk.between = reader
    with pytest.raises(OSError, match="No space"):
        if change == "write":
            image.write(b"B" * GRAN, 0)
        else:
            getattr(image, change)(0, GRAN)
    assert image.read(0, GRAN) != seen["copy"]  # half of it changed
    cleared, kept = image.clear_bitmap_range_since("b", 0, GRAN, seen["position"])
    assert (cleared, kept) == ([], [(0, GRAN)])
    assert image.bitmaps["b"].is_dirty(0)


# --- persistence ---------------------------------------------------------------------------


def test_positions_survive_a_restart_but_not_a_machine_crash(tmp_path: Path) -> None:
    path = tmp_path / "d.raw"
    with Image.create(path, 16 * GRAN) as image:
        image.add_bitmap("b0", granularity=GRAN)
        image.write(b"x" * 16 * GRAN, 0)
        since = image.bitmap_position("b0")
        image.write(b"y", 3 * GRAN)
    # A clean restart, then the death of the process (in-use left behind): same history.
    for clean in (True, False):
        image = Image.open(path)
        assert image.bitmap_position("b0") == (since[0], since[1] + 2)
        image.write(b"z", 9 * GRAN)
        image.close() if clean else image._store.close(clean=False)  # type: ignore[union-attr]
        since = (since[0], since[1] + 2)
    with Image.open(path) as image:
        cleared, kept = image.clear_bitmap_range_since("b0", 0, 16 * GRAN, since)
        assert kept == [(9 * GRAN, GRAN)]
        assert cleared == [(0, 9 * GRAN), (10 * GRAN, 6 * GRAN)]
        position = image.bitmap_position("b0")
        image._store.close(clean=False)  # type: ignore[union-attr]
    # The machine went down: stamps in the page cache may be lost, so no older position may
    # match again.
    (store_dir(path) / IN_USE).write_text(json.dumps({"boot_id": "another boot", "pid": 1}))
    with Image.open(path) as image:
        assert image.recovered
        assert image.bitmap_position("b0")[0] != position[0]
        cleared, kept = image.clear_bitmap_range_since("b0", 0, 16 * GRAN, position)
        assert cleared == [] and kept == [(0, 16 * GRAN)]


def test_a_torn_history_file_starts_a_new_history(tmp_path: Path) -> None:
    path = tmp_path / "d.raw"
    with Image.create(path, 16 * GRAN) as image:
        image.add_bitmap("b0", granularity=GRAN)
        position = image.bitmap_position("b0")
    (hist,) = store_dir(path).glob("*.hist")
    hist.write_bytes(hist.read_bytes()[:20])
    with Image.open(path) as image:
        assert image.bitmap_position("b0")[0] != position[0]


# --- the protocol, sans I/O ----------------------------------------------------------------


def since_server(*, extended: bool = False) -> ServerConnection:
    conn = start(clear_extension=True)
    first = Opt.EXTENDED_HEADERS if extended else Opt.STRUCTURED_REPLY
    assert opt(conn, first)[-1][1] == Rep.ACK
    assert opt(conn, Opt.X_NBDGW_CLEAR, F_SINCE)[-1][1] == Rep.ACK
    payload = wire.encode_meta_context_request("disk", [ALLOC, B0])
    assert opt(conn, Opt.SET_META_CONTEXT, payload)[-1][1] == Rep.ACK
    go(conn, "disk")
    (negotiated,) = conn.events_received()
    assert negotiated.clear_since  # type: ignore[union-attr]
    return conn


def test_option_features() -> None:
    conn = start(clear_extension=True)
    assert opt(conn, Opt.STRUCTURED_REPLY)[-1][1] == Rep.ACK
    # Unknown feature bits, or data of the wrong size: refused whole, as servers from before
    # features refuse any data (the client asks again without).
    assert opt(conn, Opt.X_NBDGW_CLEAR, b"\0\0\0\2")[-1][1] == Rep.ERR_INVALID
    assert opt(conn, Opt.X_NBDGW_CLEAR, b"\0\0\1")[-1][1] == Rep.ERR_INVALID
    assert opt(conn, Opt.X_NBDGW_CLEAR, F_SINCE)[-1][1] == Rep.ACK


@pytest.mark.parametrize("extended", [False, True])
def test_position_and_conditional_clear_on_the_wire(extended: bool) -> None:
    conn = since_server(extended=extended)
    conn.receive_data(wire.encode_request(0, Cmd.X_NBDGW_POSITION, 5, 0, 0, extended))
    (req,) = conn.events_received()
    assert isinstance(req, Request) and req.contexts == ((1, B0),)
    conn.reply_positions(req, [(0xABC, 42)])
    (chunk,) = parse_replies(joined(conn))
    assert isinstance(chunk, Chunk) and chunk.type == ReplyType.X_NBDGW_POSITION
    assert clear_ext.decode_position(chunk.payload) == clear_ext.Position(1, 0xABC, 42)

    payload = clear_ext.encode_clear_payload(4 * GRAN, 1, (0xABC, 42))
    flags = 1 << 5 if extended else 0  # PAYLOAD_LEN
    head = wire.encode_request(flags, Cmd.X_NBDGW_CLEAR, 6, 0, len(payload), extended)
    conn.receive_data(head + payload)
    (req,) = conn.events_received()
    assert isinstance(req, Request) and req.since == (0xABC, 42)
    with pytest.raises(UsageError):
        conn.reply_cleared(req, GRAN, [(0, 4 * GRAN)])  # a conditional clear needs kept runs
    conn.reply_cleared(req, GRAN, [(0, GRAN), (2 * GRAN, 2 * GRAN)], [(GRAN, GRAN)])
    cleared, kept = parse_replies(joined(conn))
    assert isinstance(cleared, Chunk) and isinstance(kept, Chunk)
    assert cleared.type == ReplyType.X_NBDGW_CLEARED and not cleared.flags & NBD_REPLY_FLAG_DONE
    assert kept.type == ReplyType.X_NBDGW_KEPT and kept.flags & NBD_REPLY_FLAG_DONE
    assert clear_ext.decode_cleared(kept.payload).runs == ((GRAN, GRAN),)


def test_server_refuses_since_without_the_feature() -> None:
    conn = start(clear_extension=True)
    assert opt(conn, Opt.STRUCTURED_REPLY)[-1][1] == Rep.ACK
    assert opt(conn, Opt.X_NBDGW_CLEAR)[-1][1] == Rep.ACK  # the plain extension
    payload = wire.encode_meta_context_request("disk", [B0])
    assert opt(conn, Opt.SET_META_CONTEXT, payload)[-1][1] == Rep.ACK
    go(conn, "disk")
    conn.events_received()
    for raw in (
        wire.encode_request(0, Cmd.X_NBDGW_POSITION, 5, 0, 0, False),
        wire.encode_request(0, Cmd.X_NBDGW_CLEAR, 6, 0, 28, False)
        + clear_ext.encode_clear_payload(GRAN, 0, (1, 1)),
    ):
        conn.receive_data(raw)
        assert conn.events_received() == []
        (chunk,) = parse_replies(joined(conn))
        assert isinstance(chunk, Chunk) and chunk.type == ReplyType.ERROR
        assert wire.decode_error_payload(chunk.payload, False)[0] == Errno.EINVAL


def since_pair() -> tuple[ClientConnection, ServerConnection]:
    srv = start(clear_extension=True)
    cli = ClientConnection()

    def pump() -> None:
        for _ in range(20):
            out = cli.data_to_send()
            if out:
                srv.receive_data(b"".join(bytes(b) for b in out))
            back = srv.data_to_send()
            if back:
                cli.receive_data(b"".join(bytes(b) for b in back))
            if not out and not back:
                return

    cli.receive_data(wire.encode_greeting(3))
    assert cli.data_to_send()
    for send in (
        cli.send_structured_reply,
        lambda: cli.send_x_nbdgw_clear(clear_ext.NBD_X_NBDGW_CLEAR_F_SINCE),
        lambda: cli.send_set_meta_context("disk", [ALLOC, B0]),
        lambda: cli.send_go("disk"),
    ):
        send()
        pump()
    assert cli.clear_since and cli.meta_contexts[B0] == 1
    cli.events_received()
    srv.events_received()
    return cli, srv


def test_client_round_trip() -> None:
    cli, srv = since_pair()
    cookie = cli.send_position()
    srv.receive_data(b"".join(bytes(b) for b in cli.data_to_send()))
    (req,) = srv.events_received()
    srv.reply_positions(req, [(7, 9)])  # type: ignore[arg-type]
    cli.receive_data(b"".join(bytes(b) for b in srv.data_to_send()))
    (reply,) = cli.events_received()
    assert isinstance(reply, Reply) and reply.cookie == cookie
    assert reply.positions == {1: clear_ext.Position(1, 7, 9)}

    cookie = cli.send_clear(0, 4 * GRAN, 1, since=(7, 9))
    srv.receive_data(b"".join(bytes(b) for b in cli.data_to_send()))
    (req,) = srv.events_received()
    srv.reply_cleared(req, GRAN, [(0, 3 * GRAN)], [(3 * GRAN, GRAN)])  # type: ignore[arg-type]
    cli.receive_data(b"".join(bytes(b) for b in srv.data_to_send()))
    (reply,) = cli.events_received()
    assert isinstance(reply, Reply) and reply.kept is not None and reply.cleared is not None
    assert reply.kept.runs == ((3 * GRAN, GRAN),)


def _chunks(cookie: int, *chunks: tuple[int, bytes, bool]) -> bytes:
    out = b""
    for rtype, body, done in chunks:
        flags = NBD_REPLY_FLAG_DONE if done else 0
        out += wire.encode_chunk_header(flags, rtype, cookie, len(body), False) + body
    return out


@pytest.mark.parametrize(
    "chunks",
    [
        # No kept chunk: the client cannot tell what was kept.
        [(ReplyType.X_NBDGW_CLEARED, clear_ext.encode_cleared(1, GRAN, [(0, GRAN)]), True)],
        # A granule both cleared and kept.
        [
            (ReplyType.X_NBDGW_CLEARED, clear_ext.encode_cleared(1, GRAN, [(0, 2 * GRAN)]), False),
            (ReplyType.X_NBDGW_KEPT, clear_ext.encode_cleared(1, GRAN, [(GRAN, GRAN)]), True),
        ],
        # Kept runs outside the request.
        [
            (ReplyType.X_NBDGW_CLEARED, clear_ext.encode_cleared(1, GRAN, []), False),
            (ReplyType.X_NBDGW_KEPT, clear_ext.encode_cleared(1, GRAN, [(0, 8 * GRAN)]), True),
        ],
    ],
)
def test_client_refuses_impossible_conditional_replies(
    chunks: list[tuple[int, bytes, bool]],
) -> None:
    cli, _ = since_pair()
    cookie = cli.send_clear(0, 4 * GRAN, 1, since=(7, 9))
    cli.data_to_send()
    with pytest.raises(ServerProtocolError):
        cli.receive_data(_chunks(cookie, *chunks))


def test_client_refuses_a_position_reply_missing_a_bitmap() -> None:
    cli, _ = since_pair()
    cookie = cli.send_position()
    cli.data_to_send()
    with pytest.raises(ServerProtocolError):
        cli.receive_data(_chunks(cookie, (ReplyType.NONE, b"", True)))


# --- a real server and client --------------------------------------------------------------


async def test_a_write_after_the_position_is_kept(tmp_path: Path) -> None:
    size = 32 * GRAN
    image = Image.create(tmp_path / "d.raw", size)
    image.add_bitmap("b0", granularity=GRAN)
    sock = str(tmp_path / "s")
    uri = f"nbd+unix:///d?socket={sock}"
    async with NBDServer([ExportConfig("d", image)]) as server:
        await server.start_unix(sock)
        async with (
            await NBDClient.connect(uri, meta_contexts=[B0], clear_extension=True) as reader,
            await NBDClient.connect(uri) as writer,
        ):
            assert reader.conditional_clears
            await writer.pwrite(b"a" * size, 0)
            (since,) = (await reader.positions()).values()
            await writer.pwrite(b"b" * 10, 5 * GRAN + 7)  # after the position: kept
            cleared, kept = await reader.clear_since(0, size, B0, since)
            assert kept.runs == ((5 * GRAN, GRAN),)
            assert cleared.runs == ((0, 5 * GRAN), (6 * GRAN, size - 6 * GRAN))
            # A fresh position clears it.
            (now,) = (await reader.positions()).values()
            cleared, kept = await reader.clear_since(0, size, B0, now)
            assert kept.runs == () and cleared.runs == ((0, size),)
            assert image.bitmap("b0").dirty_bytes() == 0
            # Locally checked: a position needs the feature on this connection.
            async with await NBDClient.connect(uri, meta_contexts=[B0]) as plain:
                with pytest.raises(UsageError):
                    await plain.positions()
    image.close()


async def test_a_server_without_the_feature_still_clears(tmp_path: Path) -> None:
    """A server from before F_SINCE refuses the option's data: the client asks again without
    it and gets the plain extension."""
    image = Image.create(tmp_path / "d.raw", 8 * GRAN)
    image.add_bitmap("b0", granularity=GRAN)
    sock = str(tmp_path / "s")

    def old_option(self: ServerConnection, option: int, payload: bytes) -> None:
        if payload:
            self._error(option, Rep.ERR_INVALID, "NBD_OPT_X_NBDGW_CLEAR carries no data")
        else:
            self.neg.clear = True
            self._reply(option, Rep.ACK)

    original = ServerConnection._opt_x_nbdgw_clear
    ServerConnection._opt_x_nbdgw_clear = old_option  # type: ignore[method-assign]
    try:
        async with NBDServer([ExportConfig("d", image)]) as server:
            await server.start_unix(sock)
            async with await NBDClient.connect(
                f"nbd+unix:///d?socket={sock}", meta_contexts=[B0], clear_extension=True
            ) as client:
                assert client.clear_extension and not client.conditional_clears
                assert (await client.clear(0, GRAN, B0)).runs == ((0, GRAN),)
                with pytest.raises(UsageError):
                    await client.clear_since(0, GRAN, B0, (1, 1))
    finally:
        ServerConnection._opt_x_nbdgw_clear = original  # type: ignore[method-assign]
    image.close()


async def test_position_of_a_removed_bitmap_fails_the_request_only(tmp_path: Path) -> None:
    image = Image.create(tmp_path / "d.raw", 8 * GRAN)
    image.add_bitmap("b0", granularity=GRAN)
    sock = str(tmp_path / "s")
    async with NBDServer([ExportConfig("d", image)]) as server:
        await server.start_unix(sock)
        async with await NBDClient.connect(
            f"nbd+unix:///d?socket={sock}", meta_contexts=[B0], clear_extension=True
        ) as client:
            image.remove_bitmap("b0")
            with pytest.raises(RequestError):
                await client.positions()
            assert await client.pread(0, 10) == bytes(10)
    image.close()
