"""``nbdgw render`` end to end against a real qemu-nbd serving a qcow2 with bitmaps dirtied by
qemu-io at known ranges; the oracle is ``nbdinfo --map --json`` on the same server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli import main, render
from tests.peers import tool

pytestmark = pytest.mark.interop

SVG = "{http://www.w3.org/2000/svg}"
MiB = 1 << 20
SIZE = 64 * MiB
B0, B1 = "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    qemu_img, qemu_io, qemu_nbd = tool("qemu-img"), tool("qemu-io"), tool("qemu-nbd")
    nbdinfo = tool("nbdinfo")
    d = tmp_path_factory.mktemp("map")
    disk, sock = d / "d.qcow2", d / "nbd.sock"
    run = lambda *a, **kw: subprocess.run(a, check=True, capture_output=True, **kw)  # noqa: E731
    run(qemu_img, "create", "-q", "-f", "qcow2", str(disk), str(SIZE))
    run(qemu_img, "bitmap", "--add", "--granularity", "65536", str(disk), "b0")
    # b0: 64 KiB of data at 0, 256 KiB of write-zeroes at 2 MiB (dirty, still a hole), 1.5 MiB
    # of data at 5 MiB; then b1 (granularity 64 KiB): 3 MiB at 40 MiB and a 4 KiB write every
    # 512 KiB over [16 MiB, 24 MiB) (one dirty granule in eight).
    script = "write -P 0x11 0 64k\nwrite -z 2M 256k\nwrite -P 0x22 5M 1536k\n"
    run(qemu_io, "-f", "qcow2", str(disk), input=script.encode())
    run(qemu_img, "bitmap", "--disable", str(disk), "b0")
    run(qemu_img, "bitmap", "--add", str(disk), "b1")
    script = "write -P 0x33 40M 3M\n" + "".join(
        f"write -P 0x44 {16 * MiB + i * 512 * 1024} 4k\n" for i in range(16)
    )
    run(qemu_io, "-f", "qcow2", str(disk), input=script.encode())
    argv = [qemu_nbd, "-r", "-t", "-e", "8", "-f", "qcow2", "-x", "disk", "-B", "b0", "-B", "b1"]
    proc = subprocess.Popen(
        [*argv, "-k", str(sock), str(disk)],
        stderr=subprocess.PIPE,
    )
    uri = f"nbd+unix:///disk?socket={sock}"
    try:
        for _ in range(200):  # poll, never sleep blindly
            if subprocess.run([nbdinfo, "--size", uri], capture_output=True).returncode == 0:
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        else:
            pytest.fail("qemu-nbd did not come up")
        yield uri
    finally:
        proc.terminate()
        proc.wait(10)


def oracle(uri: str, context: str) -> list[tuple[int, int, int]]:
    out = subprocess.run(
        [tool("nbdinfo"), f"--map={context}", "--json", uri],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


def set_runs(uri: str, context: str, track: render.Track) -> list[tuple[int, int]]:
    """[start, end) byte runs where ``track``'s own condition holds, from nbdinfo."""
    return [(o, o + n) for o, n, flags in oracle(uri, context) if track.holds(flags)]


def intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for lo1, hi1 in a:
        for lo2, hi2 in b:
            lo, hi = max(lo1, lo2), min(hi1, hi2)
            if lo < hi:
                out.append((lo, hi))
    return out


def expected_counts(runs: list[tuple[int, int]], start: int, length: int, width: int) -> list[int]:
    bounds = render.pixel_bounds(start, length, width)
    counts = [0] * (len(bounds) - 1)
    for lo, hi in runs:
        for p in range(len(counts)):
            counts[p] += max(0, min(hi, bounds[p + 1]) - max(lo, bounds[p]))
    return counts


def drawn_levels(track_group: ET.Element, kind: str, width: int) -> list[int]:
    """The opacity level of each pixel as drawn in one track of the SVG."""
    levels = [0] * width
    colour = render.PALETTE[kind][0]
    for rect in track_group.iter(f"{SVG}rect"):
        if rect.get("fill") != colour:
            continue
        opacity = float(rect.get("fill-opacity", "1"))
        level = round((opacity - render.MIN_OPACITY) / (1 - render.MIN_OPACITY) * render.LEVELS)
        x = int(rect.get("x", "0")) - render.LEFT
        for p in range(x, x + int(rect.get("width", "0"))):
            levels[p] = level
    return levels


def tracks_of(svg_path: Path) -> dict[tuple[str, str], ET.Element]:
    root = ET.parse(svg_path).getroot()
    return {
        (g.get("data-context", ""), g.get("data-track", "")): g
        for g in root.findall(f".//{SVG}g[@class='track']")
    }


def test_default_map_shows_allocation_and_every_bitmap(served: str, tmp_path: Path) -> None:
    out = tmp_path / "map.svg"
    assert main(["render", served, "-o", str(out), "--width", "128"]) == 0
    tracks = tracks_of(out)
    assert list(tracks) == [
        ("base:allocation", "allocated"),
        ("base:allocation", "zero"),
        (B0, "dirty"),
        (B0, "dirty data"),
        (B1, "dirty"),
        (B1, "dirty data"),
    ]
    # Every pixel (512 KiB) drawn at the level the oracle's extents give; "dirty data" is the
    # oracle's dirty runs intersected with its non-zero allocation runs.
    allocated, zero = render.tracks_for("base:allocation", 0)
    not_zero = render.Track("not zero", "zero", 0, zero.mask, 0)
    for (context, label), group in tracks.items():
        own = [t for t in render.tracks_for(context, 0) if t.label == label.split()[0]]
        (track,) = own
        runs = set_runs(served, context, track)
        if label == "dirty data":
            runs = intersect(runs, set_runs(served, "base:allocation", not_zero))
        counts = expected_counts(runs, 0, SIZE, 128)
        want = [render.opacity_level(c / (SIZE // 128)) for c in counts]
        kind = "dirty-data" if label == "dirty data" else track.kind
        assert drawn_levels(group, kind, 128) == want, (context, label)
    # Known ranges, independently of nbdinfo: b0 dirty at pixels 0, 4 and 10-12 (5 MiB..6.5 MiB),
    # b1 one granule in eight over 16-24 MiB (pixels 32-47) and 40-43 MiB (pixels 80-85).
    b0 = drawn_levels(tracks[(B0, "dirty")], "dirty", 128)
    assert [p for p, level in enumerate(b0) if level] == [0, 4, 10, 11, 12]
    assert b0[0] == render.opacity_level(64 / 512) and b0[4] == render.opacity_level(256 / 512)
    b1 = drawn_levels(tracks[(B1, "dirty")], "dirty", 128)
    assert [p for p, level in enumerate(b1) if level] == [*range(32, 48), *range(80, 86)]
    assert set(b1[32:48]) == {render.opacity_level(1 / 8)}
    assert set(b1[80:86]) == {render.LEVELS}
    root = ET.parse(out).getroot()
    texts = ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]
    assert "dirty: 1.81 MiB (2.83%) in 3 extents" in texts  # b0: 64K + 256K + 1.5M
    assert "dirty: 4 MiB (6.25%) in 17 extents" in texts  # b1: 16 x 64K + 3M
    # Dirty data leaves out b0's write-zeroes at 2M (dirty, but reads as zeroes).
    assert "dirty data: 1.56 MiB (2.44%) in 2 extents" in texts  # b0: 64K + 1.5M
    b0_data = drawn_levels(tracks[(B0, "dirty data")], "dirty-data", 128)
    assert [p for p, level in enumerate(b0_data) if level] == [0, 10, 11, 12]
    assert allocated.label == "allocated"


def test_html_of_one_bitmap_by_export_name(served: str, tmp_path: Path) -> None:
    sock = served.split("socket=", 1)[1]
    out = tmp_path / "b1.html"
    argv = ["render", "disk", "--socket", sock, "-b", "b1", "--no-allocation", "-o", str(out)]
    assert main(argv) == 0
    html = out.read_text()
    rows = re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td><td class=\"n\">(\d+)</td>", html)
    dirty = sum(n for _, n, flags in oracle(served, B1) if flags & 1)
    assert rows == [(B1, "dirty", str(dirty))]
    assert dirty == 4 * MiB


def test_subrange_counts_only_its_bytes(served: str, tmp_path: Path) -> None:
    out = tmp_path / "sub.html"
    argv = ["render", served, "-c", B0, "--offset", "1M", "--length", "5M", "-o", str(out)]
    assert main(argv) == 0
    html = out.read_text()
    rows = dict(
        ((c, t), int(n))
        for c, t, n in re.findall(
            r"<tr><td>([^<]*)</td><td>([^<]*)</td><td class=\"n\">(\d+)</td>", html
        )
    )
    # [1M, 6M): the 256 KiB write-zeroes at 2M and the first MiB of the write at 5M.
    assert rows[(B0, "dirty")] == 256 * 1024 + MiB
    assert rows[(B0, "dirty data")] == MiB  # the write-zeroes is not data
    assert set(rows) == {
        ("base:allocation", "allocated"),
        ("base:allocation", "zero"),
        (B0, "dirty"),
        (B0, "dirty data"),
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-b", "nosuch"], "does not offer qemu:dirty-bitmap:nosuch"),
        (["--offset", "63M", "--length", "2M"], "outside the export"),
        (["--width", "0"], "--width must be between"),
    ],
)
def test_bad_requests_fail_with_one_line(
    served: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    out = tmp_path / "x.svg"
    assert main(["render", served, "-o", str(out), *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_cli_errors_without_traceback(served: str, tmp_path: Path) -> None:
    cases = [
        (
            ["render", "disk", "-o", str(tmp_path / "a.svg")],
            "is not an NBD URI, and there is no NBD socket",
        ),
        (["render", served, "-o", str(tmp_path / "a.png")], "name it .svg or .html"),
        (["render", "nbd+unix:///disk?socket=" + str(tmp_path / "none"), "-o", "-"], "connect"),
        (["render", served, "-o", str(tmp_path / "no" / "dir" / "a.svg")], "No such file"),
    ]
    for argv, message in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "gateway", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,  # no ./nbdgw-data/nbd.sock of a `nbdgw serve` run here
            env={k: v for k, v in os.environ.items() if not k.startswith("NBDGW_")},
        )
        assert proc.returncode == 1, (argv, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, (argv, proc.stderr)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_export_names_default_to_the_socket_of_nbdgw_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.cli import map as map_cmd

    monkeypatch.delenv("NBDGW_NBD_SOCKET", raising=False)
    monkeypatch.delenv("NBDGW_DATA_DIR", raising=False)
    assert map_cmd.default_socket() == os.path.join("./nbdgw-data", "nbd.sock")
    monkeypatch.setenv("NBDGW_DATA_DIR", "/srv/gw")
    assert map_cmd.default_socket() == "/srv/gw/nbd.sock"
    monkeypatch.setenv("NBDGW_NBD_SOCKET", "/run/x.sock")
    assert map_cmd.default_socket() == "/run/x.sock"
    uri = "nbd+unix:///a%20b?socket=/x"
    assert map_cmd.resolve_source(uri, "/nonexistent") == uri
    assert map_cmd.resolve_source("a b", "/") == "nbd+unix:///a%20b?socket=/"


def make_pki(d: Path) -> None:
    """A CA, a server certificate for localhost, a client certificate: qemu's tls-creds-x509
    layout (it verifies client certificates by default)."""
    openssl = tool("openssl")
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", str(d / "ca-key.pem"), "-out", str(d / "ca-cert.pem"), "-subj", "/CN=map CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    for who, ext in (
        ("server", "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        (d / f"{who}.ext").write_text("basicConstraints=CA:FALSE\n" + ext)
        run(openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / f"{who}-key.pem"),
            "-out", str(d / f"{who}.csr"), "-subj", "/CN=localhost")  # fmt: skip
        run(openssl, "x509", "-req", "-in", str(d / f"{who}.csr"), "-CA", str(d / "ca-cert.pem"),
            "-CAkey", str(d / "ca-key.pem"), "-CAcreateserial", "-days", "2",
            "-out", str(d / f"{who}-cert.pem"), "-extfile", str(d / f"{who}.ext"))  # fmt: skip


def test_map_over_tls(served: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """nbds:// with --nbd-tls-ca/--nbd-tls-cert/--nbd-tls-key against qemu-nbd requiring TLS
    (and client certificates); without them, one clear line."""
    disk = Path(served.split("socket=", 1)[1]).parent / "d.qcow2"
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [tool("qemu-nbd"), "-r", "-t", "-e", "4", "-f", "qcow2", "-x", "disk", "-B", "b0",
         "--object", f"tls-creds-x509,id=tls0,dir={pki},endpoint=server", "--tls-creds", "tls0",
         "-b", "127.0.0.1", "-p", str(port), str(disk)],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        for _ in range(200):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        uri = f"nbds://localhost:{port}/disk"
        out = tmp_path / "tls.html"
        tls = ["--nbd-tls-ca", str(pki / "ca-cert.pem")]
        tls += ["--nbd-tls-cert", str(pki / "client-cert.pem")]
        tls += ["--nbd-tls-key", str(pki / "client-key.pem")]
        assert main(["render", uri, "-b", "b0", "-o", str(out), *tls]) == 0
        assert (
            f'<td>{B0}</td><td>dirty</td><td class="n">{64 * 1024 + 256 * 1024 + 1536 * 1024}<'
            in (out.read_text())
        )
        capsys.readouterr()
        assert main(["render", f"nbd://localhost:{port}/disk", "-o", str(tmp_path / "p.svg")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("nbdgw render: ") and err.count("\n") == 1 and "TLS" in err.upper()
        assert not (tmp_path / "p.svg").exists()
    finally:
        proc.terminate()
        proc.wait(10)
