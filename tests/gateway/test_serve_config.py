"""Gateway configuration: TOML, flags and NBDGW_* environment, and their errors (no I/O beyond
temporary files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import build_parser
from gateway.cli.serve import build_config
from gateway.config import (
    EMBEDDED_HOST,
    ConfigError,
    GatewayConfig,
    host_label,
    load_file,
    parse_export_arg,
    parse_listen,
)
from nbdcore.uri import NBDURI


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:50051", ("127.0.0.1", 50051)),
        ("[::1]:0", ("::1", 0)),
        (":8080", ("0.0.0.0", 8080)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["nowhere", "host:", "host:99999", "host:-1", "host:http"])
def test_parse_listen_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_listen(text)


def test_parse_export_arg() -> None:
    assert parse_export_arg("vm=nbd://h/x=y") == ("vm", "nbd://h/x=y")
    for bad in ("vm", "=nbd://h", "vm="):
        with pytest.raises(ConfigError, match="NAME=NBD_URI"):
            parse_export_arg(bad)


def test_host_labels() -> None:
    assert host_label(NBDURI.parse("nbd://example.com/x")) == "nbd://example.com:10809"
    assert host_label(NBDURI.parse("nbds://h:1234/x")) == "nbds://h:1234"
    assert host_label(NBDURI.parse("nbd+unix:///x?socket=/run/s")) == "nbd+unix:/run/s"
    assert host_label(NBDURI.parse("nbd://[::1]:5/x")) == "nbd://[::1]:5"


def test_uri_exports_share_their_host() -> None:
    config = GatewayConfig()
    config.add_uri_export("a", "nbd+unix:///one?socket=/run/s")
    config.add_uri_export("b", "nbd+unix:///two?socket=/run/s")
    config.add_uri_export("c", "nbds://h/three?tls-verify-peer=false")
    assert len(config.hosts) == 2
    assert config.exports["a"].host == config.exports["b"].host == "nbd+unix:/run/s"
    assert (config.exports["a"].nbd_export, config.exports["b"].nbd_export) == ("one", "two")
    tls = config.hosts["nbds://h:10809"].tls
    assert tls is not None and tls.verify_peer is False
    with pytest.raises(ConfigError, match="twice"):
        config.add_uri_export("a", "nbd://h/x")
    for name in ("", "a/b", "-x", "x" * 64, "sp ace"):
        with pytest.raises(ConfigError, match="export name"):
            config.add_uri_export(name, "nbd://h/x")
    with pytest.raises(ConfigError, match="scheme"):
        config.add_uri_export("d", "http://h/x")


def test_load_file(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(
        """
listen = "0.0.0.0:6000"
grace_period = 2.5
reflection = false
data_dir = "state"

[[hosts]]
name = "q1"
uri = "nbds://10.0.0.5"
tls_ca_file = "/ca.pem"
tls_server_hostname = "q1.example"

[[exports]]
name = "vm1"
host = "q1"
nbd_export = "disk0"
description = "first"
read_only = true

[[exports]]
name = "img"
image = "disks/img.raw"
"""
    )
    config = load_file(path)
    assert config.listen == "0.0.0.0:6000"
    assert config.grace_period == 2.5 and config.reflection is False
    assert config.data_dir == tmp_path / "state"
    host = config.hosts["q1"]
    assert host.tls is not None and host.tls.ca_file == "/ca.pem"
    assert host.tls.server_hostname == "q1.example"
    vm1 = config.exports["vm1"]
    assert (vm1.host, vm1.nbd_export, vm1.description, vm1.read_only) == (
        "q1",
        "disk0",
        "first",
        True,
    )
    img = config.exports["img"]
    assert img.host == EMBEDDED_HOST and img.image == tmp_path / "disks/img.raw"
    assert config.uses_embedded and list(config.exports) == ["vm1", "img"]


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('[[exports]]\nname = "x"\nhost = "nope"\n', "unknown host 'nope'"),
        ('[[exports]]\nname = "x"\nuri = "nbd://h/x"\nimage = "a"\n', "exactly one of"),
        ('[[exports]]\nuri = "nbd://h/x"\n', "'name' is a required string"),
        ('[[exports]]\nname = "x"\nuri = "nbd://h/x"\ncolour = 1\n', "colour"),
        ('[[hosts]]\nname = "h"\n', "'name' and 'uri' are required"),
        ('[[hosts]]\nname = "embedded"\nuri = "nbd://h"\n', "reserved"),
        (
            '[[hosts]]\nname = "h"\nuri = "nbd://h"\n[[hosts]]\nname = "h"\nuri = "nbd://g"\n',
            "twice",
        ),
        ('[[hosts]]\nname = "h"\nuri = "nbd://h"\ntls_ca_file = 3\n', "must be a string"),
        ('[[hosts]]\nname = "q"\nqmp = "q.sock"\ncommand_timeout = 0\n', "positive number"),
        ('[[hosts]]\nname = "q"\nqmp = "q.sock"\ncommand_timeout = "1m"\n', "positive"),
        ('[[hosts]]\nname = "q"\nqmp = "q.sock"\ncommand_timeout = inf\n', "positive"),
        ('[[hosts]]\nname = "q"\nqmp = "q.sock"\ncommand_timeout = nan\n', "positive"),
        ('[[hosts]]\nname = "h"\nuri = "nbd://h"\ncommand_timeout = 5\n', "for qmp hosts"),
        ('listen = "x"\n', "HOST:PORT"),
        ('grace_period = "soon"\n', "soon"),
        ("grace_period = -1\n", "0 or more seconds"),
        ('grace_period = "inf"\n', "finite"),
        ('grace_period = "nan"\n', "grace period nan"),
        ("listen = [", "gw.toml"),
    ],
)
def test_load_file_errors(tmp_path: Path, toml: str, needle: str) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=None) as info:
        load_file(path)
    assert needle in str(info.value)
    assert str(path) in str(info.value)  # says which file


def test_a_qmp_hosts_command_timeout(tmp_path: Path) -> None:
    """How long the monitor waits for QEMU (a snapshot's transaction drains the disks first)."""
    from gateway.hosts.qmp import QmpHost

    path = tmp_path / "gw.toml"
    path.write_text(
        '[[hosts]]\nname = "slow"\nqmp = "slow.sock"\ncommand_timeout = 90\n'
        '[[hosts]]\nname = "q"\nqmp = "q.sock"\n'
    )
    cfg = load_file(path)
    assert cfg.hosts["slow"].command_timeout == 90.0
    assert cfg.hosts["q"].command_timeout is None
    slow = QmpHost(cfg.hosts["slow"], cfg, folder=tmp_path)
    default = QmpHost(cfg.hosts["q"], cfg, folder=tmp_path)
    assert (slow.monitor.timeout, default.monitor.timeout) == (90.0, cfg.connect_timeout)


def parse(argv: list[str]):
    return build_parser().parse_args(["serve", *argv])


def test_flags_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBDGW_LISTEN", "127.0.0.1:7000")
    monkeypatch.setenv("NBDGW_EXPORTS", "a=nbd://h/a  b=nbd+unix:///b?socket=/s")
    monkeypatch.setenv("NBDGW_GRACE_PERIOD", "3")
    monkeypatch.setenv("NBDGW_DATA_DIR", str(tmp_path / "d"))
    config, sample = build_config(parse([]))
    assert not sample
    assert config.listen == "127.0.0.1:7000" and config.grace_period == 3.0
    assert list(config.exports) == ["a", "b"]
    assert config.data_dir == tmp_path / "d"
    # Flags win over the environment; --export replaces $NBDGW_EXPORTS.
    config, _ = build_config(
        parse(["--listen", "127.0.0.1:0", "--export", "c=nbd://h/c", "--no-reflection"])
    )
    assert config.listen == "127.0.0.1:0" and list(config.exports) == ["c"]
    assert config.reflection is False
    # TLS flags apply to nbds:// exports only.
    config, _ = build_config(
        parse(
            [
                "--export",
                "s=nbds://h/s",
                "--export",
                "p=nbd://g/p",
                "--nbd-tls-ca-file",
                "/ca.pem",
                "--nbd-tls-server-hostname",
                "h.example",
            ]
        )
    )
    tls = config.hosts[config.exports["s"].host].tls
    assert tls is not None and tls.ca_file == "/ca.pem" and tls.server_hostname == "h.example"
    assert config.hosts[config.exports["p"].host].tls is None


def test_nothing_configured_makes_the_sample(tmp_path: Path) -> None:
    config, sample = build_config(parse(["--data-dir", str(tmp_path / "d")]))
    assert sample and list(config.exports) == ["sample"]
    assert config.exports["sample"].image == tmp_path / "d" / "sample.img"
    assert (tmp_path / "d" / "sample.img").stat().st_size == 64 * 1024 * 1024
    # An image export is configured: no sample.
    config, sample = build_config(
        parse(["--data-dir", str(tmp_path / "e"), "--image", f"x={tmp_path / 'd/sample.img'}"])
    )
    assert not sample and list(config.exports) == ["x"]
    assert not (tmp_path / "e" / "sample.img").exists()


def test_access_settings(tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text("alice alice-token-1\nbob bob-token-22\n")
    (tmp_path / "policy.toml").write_text(
        '[identities.alice]\nexports = ["*"]\noperations = ["*"]\n'
    )
    (tmp_path / "gw.toml").write_text(
        'token_file = "tokens"\npolicy_file = "policy.toml"\n'
        "[limits]\nmax_streams = 7\nclear_rate = 0.5\n"
    )
    config = load_file(tmp_path / "gw.toml")
    assert config.tokens is not None and config.tokens.lookup("bob-token-22") == "bob"
    assert config.policy is not None
    assert config.limits.max_streams == 7 and config.limits.clear_rate == 0.5
    for toml, needle in (
        ('token_file = "missing"\n', "missing"),
        ("[limits]\nmax_streams = 0\n", "at least 1"),
        ("[limits]\nspeed = 1\n", "speed"),
        ('policy_file = "tokens"\n', "policy file"),
    ):
        (tmp_path / "bad.toml").write_text(toml)
        with pytest.raises(ConfigError) as info:
            load_file(tmp_path / "bad.toml")
        assert needle in str(info.value)
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(ConfigError, match="shorter than 8"):
        build_config(parse(["--token-file", str(tmp_path / "short")]))
