"""The libvirt host kind's configuration and the XML it gives libvirt (no libvirtd needed: the
behaviour against a real one is tests/gateway/test_libvirt.py)."""

from __future__ import annotations

import os
import pwd
import xml.etree.ElementTree as ET
from pathlib import Path

import grpc
import pytest

from gateway.cli import build_parser
from gateway.cli.serve import build_config
from gateway.config import ConfigError, load_file, parse_libvirt_export_arg
from gateway.errors import GatewayError
from gateway.hosts.libvirt import (
    QEMU_USER,
    backup_xml,
    checkpoint_xml,
    parse_backup,
    parse_checkpoint,
    parse_disks,
    prepare_folder,
)
from tests.peers import missing


def test_toml_hosts_and_exports(tmp_path: Path) -> None:
    path = tmp_path / "nbdgw.toml"
    path.write_text(
        '[[hosts]]\nname = "vm1"\ndomain = "vm1"\n\n'
        '[[hosts]]\nname = "vm2"\nlibvirt = "qemu:///system?socket=/x"\ndomain = "dom2"\n'
        'disks = "all"\n\n'
        '[[exports]]\nname = "vm1-vda"\nhost = "vm1"\ndisk = "vda"\n'
    )
    cfg = load_file(path)
    vm1, vm2 = cfg.hosts["vm1"], cfg.hosts["vm2"]
    assert (vm1.kind, vm1.libvirt, vm1.domain, vm1.all_disks) == (
        "libvirt", "qemu:///system", "vm1", False,
    )  # fmt: skip
    assert (vm2.libvirt, vm2.domain, vm2.all_disks) == ("qemu:///system?socket=/x", "dom2", True)
    export = cfg.exports["vm1-vda"]
    assert (export.host, export.node) == ("vm1", "vda")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[[hosts]]\nname = "h"\ndomain = 3\n', "'domain'"),
        ('[[hosts]]\nname = "h"\ndomain = "d"\ndisks = "some"\n', "'disks'"),
        ('[[hosts]]\nname = "h"\ndomain = "d"\n[[exports]]\nname = "e"\nhost = "h"\n', "'disk'"),
    ],
)
def test_toml_errors(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "nbdgw.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_file(path)


def test_flags() -> None:
    assert parse_libvirt_export_arg("vm1-vda=vm1:vda") == ("vm1-vda", "vm1", "vda")
    with pytest.raises(ConfigError, match="NAME=DOMAIN:DISK"):
        parse_libvirt_export_arg("vm1-vda=vm1")
    args = build_parser().parse_args(
        ["serve", "--libvirt-export", "a=vm1:vda", "--libvirt-export", "b=vm1:vdb",
         "--libvirt-uri", "u"]
    )  # fmt: skip
    cfg, _ = build_config(args)
    (host,) = [h for h in cfg.hosts.values() if h.libvirt]
    assert (host.name, host.libvirt, host.domain) == ("libvirt:vm1", "u", "vm1")
    assert [(e.name, e.node) for e in cfg.exports.values()] == [("a", "vda"), ("b", "vdb")]


def test_backup_xml_round_trip() -> None:
    disks = {"vda": ("d0@s", "since:c1", Path("/f/a.scratch"))}
    text = backup_xml(Path("/f/nbd.sock"), disks, ["vda", "vdb"], "c1")
    root = ET.fromstring(text)
    assert root.get("mode") == "pull" and root.findtext("incremental") == "c1"
    vda, vdb = root.iterfind("disks/disk")
    assert (vda.get("exportname"), vda.get("exportbitmap"), vdb.get("backup")) == (
        "d0@s", "since:c1", "no",
    )  # fmt: skip
    assert parse_backup(text) == ("/f/nbd.sock", "c1", {"vda": "d0@s"})
    # A full backup exports no bitmap; names are escaped, never spliced into the XML.
    full = ET.fromstring(backup_xml(Path("/f/s"), {"vda": ("a'<b", "", Path("/x"))}, ["vda"], ""))
    assert full.find("incremental") is None
    assert full.find("disks/disk").get("exportname") == "a'<b"  # type: ignore[union-attr]
    assert ET.fromstring(checkpoint_xml("c<1")).findtext("name") == "c<1"


def test_parse_domain_and_checkpoint() -> None:
    disks = parse_disks(
        "<domain><devices><disk type='file' device='cdrom'><target dev='sda'/></disk>"
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        "<source file='/v/a.qcow2'/><target dev='vda' bus='virtio'/></disk></devices></domain>"
    )
    assert [(d.target, d.source, d.driver) for d in disks] == [("vda", "/v/a.qcow2", "qcow2")]
    c = parse_checkpoint(
        "<domaincheckpoint><name>c2</name><parent><name>c1</name></parent>"
        "<creationTime>5</creationTime><disks><disk name='vda' checkpoint='bitmap' bitmap='c2'"
        " size='65536'/><disk name='vdb' checkpoint='no'/></disks></domaincheckpoint>"
    )
    assert (c.name, c.parent, c.created, c.disks) == ("c2", "c1", 5, {"vda": 65536})


def test_a_folder_qemu_cannot_reach_is_a_clear_error(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        missing("root (the folder is given to libvirt-qemu)", "run the tests as root")
    try:
        pwd.getpwnam(QEMU_USER)
    except KeyError:
        missing(f"the user {QEMU_USER}", "run scripts/install-deps.sh (libvirt-daemon-system)")
    private = tmp_path / "data"
    private.mkdir(mode=0o700)  # as the gateway makes DATA_DIR
    with pytest.raises(GatewayError) as err:
        prepare_folder(private / "libvirt", "d0")
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"chmod o+x {private}" in err.value.message
    private.chmod(0o711)
    for parent in tmp_path.parents:  # pytest's own folders are 0700 too
        if not parent.stat().st_mode & 0o001:
            with pytest.raises(GatewayError):
                prepare_folder(private / "libvirt", "d0")
            return
    prepare_folder(private / "libvirt", "d0")
    assert (private / "libvirt").stat().st_uid == pwd.getpwnam(QEMU_USER).pw_uid
