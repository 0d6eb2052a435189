"""``nbdgw nbd list|map|copy`` and ``iter_extents`` against real peers.

qemu-nbd 7.2 (and qemu 10, extended headers) serve a qcow2 whose two bitmaps were dirtied by
qemu-io at known ranges; nbdkit serves data, sparse-random and extentlist maps. The oracle is
libnbd's nbdinfo: ``nbd map`` must print byte for byte what ``nbdinfo --map`` prints, and
``iter_extents`` over any sub-range must agree with nbdinfo's map of the whole export.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdcore.aio.client import NBDClient
from nbdcore.extents import Allocation, allocation_of, iter_allocation, iter_extents
from nbdcore.tools import client_cmds
from tests.peers import ROOT, qemu10, stop_peer, tool, wait_listening

pytestmark = pytest.mark.interop

MiB = 1 << 20
QCOW2_SIZE = 64 * MiB + 3 * 512  # a tail that is not a whole cluster

# qemu-io commands: b0 sees the first group, b1 (granularity 4 KiB) only the second.
B0_WRITES = [
    "write -P 0x11 0 64k",
    "write -P 0x22 1000000 3000",  # unaligned: dirties whole granules
    "write -z 2M 256k",  # dirties b0, allocates nothing
    "write -P 0x33 10M 1M",
    *[f"write -z {16 * MiB + i * 128 * 1024} 64k" for i in range(200)],  # 400 extents
]
B1_WRITES = [
    "write -P 0x44 40M 100k",
    "write -z 50M 4k",
    "write -P 0x55 12M 8k",  # overlaps b0's data range
    f"write -P 0x66 {QCOW2_SIZE - 1024} 1024",  # the unaligned tail
]


@contextlib.contextmanager
def _serve(cmd: list[str], sock: Path) -> Iterator[str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(proc, sock=sock)
        yield f"nbd+unix:///{'disk' if '-x' in cmd else ''}?socket={sock}"
    finally:
        stop_peer(proc)  # SIGTERM: qemu-nbd releases its bitmaps cleanly


@pytest.fixture(scope="module")
def qcow2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    qemu_img, qemu_io = tool("qemu-img"), tool("qemu-io")
    d = tmp_path_factory.mktemp("qcow2")
    img = d / "d.qcow2"
    run = subprocess.run
    run([qemu_img, "create", "-q", "-f", "qcow2", str(img), str(QCOW2_SIZE)], check=True)
    run([qemu_img, "bitmap", "--add", "--granularity", "65536", str(img), "b0"], check=True)
    script = "".join(c + "\n" for c in B0_WRITES)
    run([qemu_io, "-f", "qcow2", str(img)], input=script.encode(), check=True, capture_output=True)
    run([qemu_img, "bitmap", "--disable", str(img), "b0"], check=True)
    run([qemu_img, "bitmap", "--add", "--granularity", "4096", str(img), "b1"], check=True)
    script = "".join(c + "\n" for c in B1_WRITES)
    run([qemu_io, "-f", "qcow2", str(img)], input=script.encode(), check=True, capture_output=True)
    return img


def _qemu_nbd(binary: str, img: Path, sock: Path) -> list[str]:
    return [binary, "-r", "-t", "-e", "8", "-f", "qcow2", "-x", "disk", "-D", "test disk",
            "-A", "-B", "b0", "-B", "b1", "-k", str(sock), str(img)]  # fmt: skip


@pytest.fixture(scope="module")
def qemu_uri(qcow2: Path) -> Iterator[str]:
    sock = qcow2.parent / "qemu.sock"
    with _serve(_qemu_nbd(tool("qemu-nbd"), qcow2, sock), sock) as uri:
        yield uri


@pytest.fixture(scope="module")
def qemu10_uri(qcow2: Path) -> Iterator[str]:
    sock = qcow2.parent / "qemu10.sock"
    with _serve(_qemu_nbd(qemu10("qemu-nbd"), qcow2, sock), sock) as uri:
        yield uri


EXTENT_LIST = """\
0 1000 0
1000 3096 hole,zero
4096 64K zero
69632 4096 0
73728 4096 0
77824 1M hole,zero
2M 12345 hole
"""

NBDKIT_PLUGINS = {
    "data": ["data", "( 0x11 * 65536 ) @262144 ( 0x22 * 1000 ) @1048576 1", "size=4M"],
    "sparse": ["sparse-random", "size=64M", "seed=42", "percent=30", "runlength=262144"],
    "extentlist": ["--filter=extentlist", "null", "size=3M", "extentlist={list}"],
    # A 4 KiB minimum block size that nbdkit enforces: unaligned requests fail with EINVAL.
    "min-block": [
        "--filter=blocksize-policy",
        "sparse-random",
        "size=8M",
        "seed=7",
        "percent=40",
        "runlength=65536",
        "blocksize-minimum=4096",
        "blocksize-error-policy=error",
    ],
}


@pytest.fixture(scope="module", params=sorted(NBDKIT_PLUGINS))
def nbdkit_uri(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[str]:  # fmt: skip
    d = tmp_path_factory.mktemp("nbdkit")
    (d / "extents").write_text(EXTENT_LIST)
    sock = d / "nbdkit.sock"
    args = [a.format(list=d / "extents") for a in NBDKIT_PLUGINS[request.param]]
    with _serve([tool("nbdkit"), "-f", "-r", "-U", str(sock), *args], sock) as uri:
        yield uri


def nbdinfo(*args: str) -> str:
    return subprocess.run(
        [tool("nbdinfo"), *args], check=True, capture_output=True, text=True
    ).stdout


def ours(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    assert client_cmds.main(["nbd", *args]) == 0
    return capsys.readouterr().out


def nbdinfo_map(uri: str, context: str) -> list[tuple[int, int, int]]:
    return [
        (e["offset"], e["length"], e["type"])
        for e in json.loads(nbdinfo("--json", f"--map={context}", uri))
    ]


FORMATS = {
    "text": [],
    "json": ["--json"],
    "totals": ["--totals"],
    "totals-json": ["--totals", "--json"],
}
QEMU_CONTEXTS = [
    "base:allocation",
    "qemu:allocation-depth",
    "qemu:dirty-bitmap:b0",
    "qemu:dirty-bitmap:b1",
]


# --- nbd map == nbdinfo --map -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("context", QEMU_CONTEXTS)
def test_map_qemu(
    qemu_uri: str, context: str, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    expect = nbdinfo(*FORMATS[fmt], f"--map={context}", qemu_uri)
    assert ours(capsys, "map", *FORMATS[fmt], "--context", context, qemu_uri) == expect


def test_qemu_bitmaps_are_where_qemu_io_wrote(qemu_uri: str) -> None:
    """The fixture itself: b0 is dirty on b0's writes (whole 64 KiB granules), b1 (4 KiB
    granules) on b1's only."""
    b0 = nbdinfo_map(qemu_uri, "qemu:dirty-bitmap:b0")
    dirty0 = [(o, n) for o, n, t in b0 if t == 1]
    assert dirty0[:3] == [(0, 65536), (983040, 65536), (2 * MiB, 256 * 1024)]
    assert len(b0) > 400
    b1 = nbdinfo_map(qemu_uri, "qemu:dirty-bitmap:b1")
    assert (40 * MiB, 100 * 1024) in [(o, n) for o, n, t in b1 if t == 1]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("context", QEMU_CONTEXTS)
def test_map_qemu10_extended_headers(
    qemu10_uri: str, context: str, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Our client negotiates extended headers with qemu 10; nbdinfo 1.14 cannot: same map."""
    expect = nbdinfo(*FORMATS[fmt], f"--map={context}", qemu10_uri)
    assert ours(capsys, "map", *FORMATS[fmt], "--context", context, qemu10_uri) == expect


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_map_nbdkit(nbdkit_uri: str, fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    expect = nbdinfo(*FORMATS[fmt], "--map", nbdkit_uri)
    assert ours(capsys, "map", *FORMATS[fmt], nbdkit_uri) == expect


# --- iter_extents over sub-ranges -------------------------------------------------------------


def clip_merge(
    maps: list[list[tuple[int, int, int]]], start: int, end: int
) -> list[tuple[int, int, tuple[int, ...]]]:
    """The model: nbdinfo maps of whole contexts, cut at every boundary, clipped, merged."""
    cuts = sorted({o + n for m in maps for o, n, _ in m if start < o + n < end} | {end})
    rows: list[tuple[int, int, tuple[int, ...]]] = []
    pos = start
    for cut in cuts:
        flags = tuple(next(t for o, n, t in m if o <= pos < o + n) for m in maps)
        if rows and rows[-1][2] == flags:
            rows[-1] = (rows[-1][0], rows[-1][1] + cut - pos, flags)
        else:
            rows.append((pos, cut - pos, flags))
        pos = cut
    return rows


def _ranges(size: int, seed: int, count: int = 12) -> list[tuple[int, int]]:
    rnd = random.Random(seed)
    out = [(0, size), (1, size - 1), (size - 1, 1)]
    for _ in range(count):
        a, b = sorted(rnd.sample(range(size + 1), 2))
        out.append((a, b - a))
    return out


async def _check_subranges(uri: str, contexts: list[str], extended: bool = True) -> None:
    maps = [nbdinfo_map(uri, c) for c in contexts]
    client = await NBDClient.connect(uri, meta_contexts=contexts, extended_headers=extended)
    try:
        for offset, length in _ranges(client.size, seed=len(contexts)):
            for max_extents in (3, 65536):
                rows = []
                async for batch in iter_extents(
                    client, contexts, offset, length, max_extents=max_extents
                ):
                    assert len(batch.lengths) <= max_extents
                    rows += batch.rows()
                assert rows == clip_merge(maps, offset, offset + length), (offset, length)
    finally:
        await client.close()


@pytest.mark.parametrize("contexts", [[c] for c in QEMU_CONTEXTS] + [QEMU_CONTEXTS])
async def test_iter_extents_qemu(qemu_uri: str, contexts: list[str]) -> None:
    await _check_subranges(qemu_uri, contexts)


async def test_iter_extents_qemu10(qemu10_uri: str) -> None:
    await _check_subranges(qemu10_uri, QEMU_CONTEXTS)


async def test_iter_extents_nbdkit(nbdkit_uri: str) -> None:
    await _check_subranges(nbdkit_uri, ["base:allocation"])


async def test_iter_allocation_qemu(qemu_uri: str) -> None:
    alloc = nbdinfo_map(qemu_uri, "base:allocation")
    dirty = nbdinfo_map(qemu_uri, "qemu:dirty-bitmap:b0")
    kinds = [(o, n, int(allocation_of(t))) for o, n, t in alloc]
    client = await NBDClient.connect(qemu_uri, meta_contexts=QEMU_CONTEXTS)
    try:
        rows = []
        async for b in iter_allocation(client, "b0", 4097, client.size - 9000):
            pos = b.offset
            for n, k, d in zip(b.lengths, b.allocation, b.dirty, strict=True):
                rows.append((pos, n, (k, d)))
                pos += n
    finally:
        await client.close()
    assert rows == clip_merge([kinds, dirty], 4097, client.size - 9000 + 4097)
    # b0's write -z range is dirty and reads as zeroes without being data.
    assert any(k != Allocation.DATA and d for _, _, (k, d) in rows)


# --- nbd list ---------------------------------------------------------------------------------


def test_list_qemu(qemu_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    expect = json.loads(nbdinfo("--list", "--json", qemu_uri))
    got = json.loads(ours(capsys, "list", "--json", qemu_uri))
    assert got["exports"] == expect["exports"]
    assert got["TLS"] == expect["TLS"]
    # The text form has nbdinfo's per-export lines (nbdinfo adds a protocol line first).
    text = nbdinfo("--list", qemu_uri)
    assert ours(capsys, "list", qemu_uri) == text[text.index("export=") :]


def test_list_nbdkit(nbdkit_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    expect = json.loads(nbdinfo("--list", "--json", nbdkit_uri))
    got = json.loads(ours(capsys, "list", "--json", nbdkit_uri))
    assert got["exports"] == expect["exports"]


# --- nbd copy ---------------------------------------------------------------------------------


def _copy(uri: str, dest: str, *extra: str) -> bytes:
    proc = subprocess.run(
        [sys.executable, "-m", "nbdcore.tools.client_cmds", "nbd", "copy", uri, dest, *extra],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert b"\r" not in proc.stderr  # no progress bar when stderr is not a terminal
    return proc.stdout


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_copy_qemu(qemu_uri: str, qcow2: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.raw"
    out.write_bytes(b"\xff" * (5 * MiB))  # stale content must not survive
    _copy(qemu_uri, str(out), "--request-size", str(MiB))
    subprocess.run(
        [tool("qemu-img"), "compare", "-q", "-f", "qcow2", "-F", "raw", str(qcow2), str(out)],
        check=True,
    )
    assert out.stat().st_size == QCOW2_SIZE
    data = sum(n for _, n, t in nbdinfo_map(qemu_uri, "base:allocation") if t & 2 == 0)
    # Sparse: nothing beyond the data extents (plus filesystem block rounding) was written.
    assert _allocated(out) <= data + 64 * 4096


def test_copy_qemu_to_stdout(qemu_uri: str, qcow2: Path, tmp_path: Path) -> None:
    raw = tmp_path / "ref.raw"
    subprocess.run(
        [tool("qemu-img"), "convert", "-f", "qcow2", "-O", "raw", str(qcow2), str(raw)],
        check=True,
    )
    assert _copy(qemu_uri, "-") == raw.read_bytes()


def test_copy_nbdkit(nbdkit_uri: str, tmp_path: Path) -> None:
    ref = tmp_path / "ref.raw"
    subprocess.run([tool("nbdcopy"), nbdkit_uri, str(ref)], check=True)
    out = tmp_path / "out.raw"
    _copy(nbdkit_uri, str(out), "--requests", "3")
    subprocess.run(["cmp", str(ref), str(out)], check=True)
    data = sum(n for _, n, t in nbdinfo_map(nbdkit_uri, "base:allocation") if t & 2 == 0)
    assert _allocated(out) <= data + 64 * 4096


def test_copy_without_structured_replies(tmp_path: Path) -> None:
    """nbdkit --no-sr offers no base:allocation: the copy reads everything and still skips
    all-zero reads."""
    sock = tmp_path / "s"
    cmd = [tool("nbdkit"), "-f", "-r", "--no-sr", "-U", str(sock), *NBDKIT_PLUGINS["data"]]
    with _serve(cmd, sock) as uri:
        out = tmp_path / "out.raw"
        _copy(uri, str(out), "--request-size", "65536")
        ref = tmp_path / "ref.raw"
        subprocess.run([tool("nbdcopy"), uri, str(ref)], check=True)
    subprocess.run(["cmp", str(ref), str(out)], check=True)
    assert _allocated(out) <= 4 * 65536 + 64 * 4096


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["map", "http://example.invalid/x"], "scheme"),
        (["map", "nbd+unix:///disk?socket=/nonexistent/sock"], "connect"),
        (["list", "nbd://127.0.0.1:1/"], "connect"),
        (["map", "nbd+unix:///nope?socket={sock}"], "nope"),
        (["map", "--context", "qemu:dirty-bitmap:zz", "{uri}"], "qemu:dirty-bitmap:zz"),
        (["copy", "{uri}", "/nonexistent/dir/file"], "/nonexistent/dir/file"),
    ],
    ids=["scheme", "no-socket", "refused", "export", "context", "dest"],
)
def test_bad_input(qemu_uri: str, args: list[str], message: str) -> None:
    sock = qemu_uri.split("socket=")[1]
    argv = [a.format(uri=qemu_uri, sock=sock) for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "nbdcore.tools.client_cmds", "nbd", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nbdgw nbd "), proc.stderr
    assert message in lines[0]
    assert proc.stdout == ""


def test_registered_in_nbdgw() -> None:
    """The nbdgw command routes ``nbd map|list|copy`` here."""
    from gateway.cli import build_parser

    parser = build_parser()
    for cmd, func in [("map", "map_cmd"), ("list", "list_cmd"), ("copy", "copy_cmd")]:
        argv = ["nbd", cmd, "nbd://h/e"] + (["-"] if cmd == "copy" else [])
        assert parser.parse_args(argv).func is getattr(client_cmds, func)


def test_copy_progress_bar(qemu_uri: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "nbdcore.tools.client_cmds", "nbd", "copy", "--progress",
         qemu_uri, str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, check=True,
    )  # fmt: skip
    last = proc.stderr.split(b"\r")[-1]
    assert proc.stderr.startswith(b"\r") and last.endswith(b"\x1b[K\n")
    assert b" copied  100.0%  " in last
    assert proc.stdout == b""


async def test_iter_extents_closed_early_leaves_client_usable(qemu_uri: str) -> None:
    """Leaving a walk early cancels its requests in flight; the connection carries on."""
    context = "qemu:dirty-bitmap:b0"
    client = await NBDClient.connect(qemu_uri, meta_contexts=[context])
    try:
        for _ in range(3):
            walk = iter_extents(client, [context], max_extents=2, depth=8)
            first = await anext(walk)
            assert first.offset == 0 and len(first.lengths) == 2
            await walk.aclose()  # type: ignore[attr-defined]
        rows = [r for b in [b async for b in iter_extents(client, [context])] for r in b.rows()]
    finally:
        await client.close()
    expect = nbdinfo_map(qemu_uri, context)
    assert [(o, n, f[0]) for o, n, f in rows] == expect


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_map_empty_export(tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    sock = tmp_path / "s"
    with _serve([tool("nbdkit"), "-f", "-r", "-U", str(sock), "null", "size=0"], sock) as uri:
        expect = nbdinfo(*FORMATS[fmt], "--map", uri)
        assert ours(capsys, "map", *FORMATS[fmt], uri) == expect
        out = tmp_path / "out"
        _copy(uri, str(out))
        assert out.stat().st_size == 0


def test_copy_to_a_device(qemu_uri: str) -> None:
    """Not a regular file: written in full (nothing to truncate), here /dev/null."""
    _copy(qemu_uri, "/dev/null")


@pytest.fixture()
def nbd_server_uri(tmp_path: Path) -> Iterator[str]:
    """nbd-server 3.24: no structured replies, so no metadata contexts at all."""
    binary = tool("nbd-server")
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * 65536 + os.urandom(65536) + b"\0" * (2 * MiB))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "nbd-server.conf"
    conf.write_text(
        f"[generic]\n    listenaddr = 127.0.0.1\n    port = {port}\n    allowlist = true\n"
        f"[disk]\n    exportname = {img}\n    readonly = true\n"
    )
    pidfile = tmp_path / "pid"
    subprocess.run([binary, "-C", str(conf), "-p", str(pidfile)], check=True, capture_output=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            assert time.monotonic() < deadline, "nbd-server did not listen"
            time.sleep(0.05)
        yield f"nbd://127.0.0.1:{port}/disk"
    finally:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
            os.kill(int(pidfile.read_text()), 15)


def test_tools_against_nbd_server(
    nbd_server_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expect = json.loads(nbdinfo("--list", "--json", nbd_server_uri))
    got = json.loads(ours(capsys, "list", "--json", nbd_server_uri))
    assert got["exports"] == expect["exports"]
    # No base:allocation: map fails in one line, copy reads everything (sparse all the same).
    assert client_cmds.main(["nbd", "map", nbd_server_uri]) == 1
    err = capsys.readouterr().err
    assert err == 'nbdgw nbd map: server does not support metadata context "base:allocation"\n'
    out = tmp_path / "out"
    _copy(nbd_server_uri, str(out))
    assert out.read_bytes() == (tmp_path / "disk.img").read_bytes()
    assert _allocated(out) <= 65536 + 64 * 4096
