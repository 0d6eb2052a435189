"""The gateway's record of what was written between a libvirt disk's checkpoints
(gateway.hosts.libvirt_deltas): paths of links, a name taken again, pruning, damaged files.
The whole loop against a real libvirtd and a writing guest is in tests/gateway/test_libvirt.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.hosts.libvirt import parse_disks
from gateway.hosts.libvirt_deltas import Links, union

G = 65536
SIZE = 1 << 30
C0, C1, C2, C3 = ("c0", 100), ("c1", 200), ("c2", 300), ("c3", 400)
A, B = "/var/lib/vm/a.qcow2", "/var/lib/vm/b.qcow2"  # the images at vda and vdb


def links_with(tmp_path: Path) -> Links:
    links = Links(tmp_path / "links")
    links.record("j1", "vda", A, C0, C1, SIZE, [(0, G), (5 * G, 2 * G)])
    links.record("j1", "vdb", B, C0, C1, SIZE, [(9 * G, G)])
    links.record("j2", "vda", A, C1, C2, SIZE, [(G, G), (6 * G, 3 * G)])
    return links


def runs_of(
    links: Links, disk: str, base: tuple[str, int], target: tuple[str, int], source: str = ""
) -> object:
    path = links.path(disk, source or {"vda": A, "vdb": B}[disk], base, target)
    return None if path is None else union(path)


def test_a_path_is_the_union_of_its_links(tmp_path: Path) -> None:
    links = links_with(tmp_path)
    assert runs_of(links, "vda", C0, C1) == [(0, G), (5 * G, 2 * G)]
    # Touching and overlapping runs of the two links are joined.
    assert runs_of(links, "vda", C0, C2) == [(0, 2 * G), (5 * G, 4 * G)]
    assert runs_of(links, "vdb", C0, C1) == [(9 * G, G)]
    # Nothing joins these: no link leads there, or only backwards.
    assert runs_of(links, "vdb", C0, C2) is None
    assert runs_of(links, "vda", C2, C0) is None
    assert runs_of(links, "vda", C1, C3) is None
    # A job records each disk once: again is the same file.
    links.record("j2", "vda", A, C1, C2, SIZE, [(G, G), (6 * G, 3 * G)])
    assert len(links.links("vda")) == 2


def test_a_name_taken_again_is_another_checkpoint(tmp_path: Path) -> None:
    """c1 deleted, then a new c1 created later: the link to the old one must not stand for the
    new one (it would miss every write between the two)."""
    links = links_with(tmp_path)
    assert runs_of(links, "vda", C0, ("c1", 250)) is None
    assert runs_of(links, "vda", ("c1", 250), C2) is None
    # Within the same second the identities are equal: the job that creates the new c1
    # drops every link of the old one before it records its own.
    links.record("j3", "vda", A, C0, C1, SIZE, [(40 * G, G)])
    assert runs_of(links, "vda", C0, C1) == [(40 * G, G)]
    assert runs_of(links, "vda", C0, C2) is None  # c1 -> c2 was about the old c1
    assert runs_of(links, "vdb", C0, C1) == [(9 * G, G)]  # another disk's, another job's


def test_the_shortest_path_is_taken(tmp_path: Path) -> None:
    links = links_with(tmp_path)
    links.record("j4", "vda", A, C0, C2, SIZE, [(20 * G, G)])
    path = links.path("vda", A, C0, C2)
    assert path is not None and [(k.base, k.target) for k in path] == [(C0, C2)]


def test_prune_keeps_what_joins_current_checkpoints(tmp_path: Path) -> None:
    links = links_with(tmp_path)
    links.record("j5", "vda", A, C2, C3, SIZE, [(30 * G, G)])
    (links.folder / "crashed.tmp").write_bytes(b"half")
    # c1 deleted: the links through it still join c0 and c2.
    assert links.prune("vda", A, [C0, C2, C3]) == 0
    assert not (links.folder / "crashed.tmp").exists()
    assert runs_of(links, "vda", C0, C3) == [(0, 2 * G), (5 * G, 4 * G), (30 * G, G)]
    # c0 deleted too: c0 -> c1 -> c2 can no longer be asked for; c2 -> c3 can.
    assert links.prune("vda", A, [C2, C3]) == 2
    assert [(k.base, k.target) for k in links.links("vda")] == [(C2, C3)]
    # The other disk's links are its own.
    assert len(links.links("vdb")) == 1


def test_damaged_or_unknown_files_are_refused(tmp_path: Path) -> None:
    links = links_with(tmp_path)
    (links.folder / "junk.link").write_bytes(b"not json\n")
    (links.folder / "future.link").write_bytes(b'{"version": 99}\n')
    assert len(links.links()) == 3
    (one,) = links.links("vdb")
    raw = bytearray(one.path.read_bytes())
    raw[-3] ^= 0x40  # a flipped bit in the runs
    one.path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="damaged"):
        union([one])
    one.path.write_bytes(bytes(raw[:-16]))  # a run short
    with pytest.raises(ValueError, match="damaged"):
        union([one])


def test_no_folder_no_links(tmp_path: Path) -> None:
    links = Links(tmp_path / "absent")
    assert links.links() == [] and links.path("vda", A, C0, C1) is None


def test_another_image_at_the_same_target_inherits_nothing(tmp_path: Path) -> None:
    """vda's image swapped for another (detach, attach at the same target): the old image's
    links say nothing of the new one's writes. A delta from them would be wrong, silently."""
    links = links_with(tmp_path)
    other = "/var/lib/vm/a-restored.qcow2"
    assert runs_of(links, "vda", C0, C2, source=other) is None
    # Its own links serve it...
    links.record("j6", "vda", other, C2, C3, SIZE, [(50 * G, G)])
    assert runs_of(links, "vda", C2, C3, source=other) == [(50 * G, G)]
    assert runs_of(links, "vda", C2, C3) is None  # ...and not the old image
    # The old image's are of no use once the new one is there: pruned.
    assert links.prune("vda", other, [C0, C1, C2, C3]) == 2
    assert [(k.source, k.base) for k in links.links("vda")] == [(other, C2)]
    assert len(links.links("vdb")) == 1


def test_links_recorded_before_sources_were_kept_serve_nothing(tmp_path: Path) -> None:
    """A link without a source cannot say which image it was about: it serves no delta (which
    is then FAILED_PRECONDITION: one full backup) and is pruned, never taken for any image."""
    links = links_with(tmp_path)
    (old,) = links.links("vdb")
    head, _, runs = old.path.read_bytes().partition(b"\n")
    legacy = json.loads(head)
    del legacy["source"]
    old.path.write_bytes(json.dumps(legacy).encode() + b"\n" + runs)
    (read,) = links.links("vdb")
    assert read.source is None
    assert runs_of(links, "vdb", C0, C1) is None
    assert links.prune("vdb", B, [C0, C1]) == 1
    assert links.links("vdb") == []


def test_a_disks_source_is_what_its_xml_names() -> None:
    """The second half of a disk's identity, for every kind of <source> libvirt has."""
    xml = """<domain><devices>
      <disk type='file' device='disk'><source file='/img/a.qcow2'/><target dev='vda'/></disk>
      <disk type='block' device='disk'><source dev='/dev/sdb'/><target dev='vdb'/></disk>
      <disk type='volume' device='disk'><source pool='p1' volume='v1'/><target dev='vdc'/></disk>
      <disk type='network' device='disk'><source protocol='rbd' name='rbd/img' index='3'>
        <host name='mon1' port='6789'/><host name='mon2' port='6789'/></source>
        <target dev='vdd'/></disk>
      <disk type='file' device='disk'><target dev='vde'/></disk>
      <disk type='vhostuser' device='disk'><source type='unix' path='/run/vhost.sock'/>
        <target dev='vdf'/></disk>
      <disk type='nvme' device='disk'><source type='pci' namespace='1' index='2'>
        <address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source>
        <target dev='vdg'/></disk>
      <disk type='file' device='cdrom'><source file='/iso'/><target dev='hdc'/></disk>
    </devices></domain>"""
    found = {d.target: d.source for d in parse_disks(xml)}
    nvme = found.pop("vdg")
    assert found == {
        "vda": "/img/a.qcow2",
        "vdb": "/dev/sdb",
        "vdc": "p1/v1",
        "vdd": "rbd://mon1:6789,mon2:6789/rbd/img",  # the same name on other servers differs
        "vde": "",
        "vdf": "/run/vhost.sock",
    }
    # Any other kind: the element itself, without libvirt's index (moved by block jobs).
    assert 'bus="0x01"' in nvme and 'namespace="1"' in nvme and "index" not in nvme
