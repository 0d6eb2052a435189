"""``nbdgw serve``: run the gateway.

Exports come from ``--config FILE`` (TOML, see :mod:`gateway.config`), ``--export NAME=NBD_URI``
(remote NBD hosts), ``--image NAME=PATH`` (raw images served by the embedded nbdcore host) and
``NBDGW_*`` environment variables (the defaults of the flags). With none configured, a sample
64 MiB disk with a dirty bitmap ``backup`` is created in ``--data-dir`` and served by the embedded
host, so that ``nbdgw serve`` alone gives something to try.

NBD hosts must stay up between clients and accept as many clients as the gateway may open:
run qemu-nbd with ``-t -e N`` and give the gateway ``--max-connections N`` (or less).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.config import (
    DEFAULT_CSI_DRIVER_NAME,
    DEFAULT_DATA_DIR,
    DEFAULT_LIBVIRT_URI,
    DEFAULT_LISTEN,
    LOG_FORMATS,
    LOG_LEVELS,
    ConfigError,
    GatewayConfig,
    check_choice,
    check_csi_block_size,
    check_grace_period,
    check_interval,
    check_max_intervals,
    load_file,
    load_policy,
    load_tokens,
    parse_export_arg,
    parse_libvirt_export_arg,
    parse_limit_args,
    parse_listen,
    parse_qmp_export_arg,
)
from gateway.sample import SAMPLE_BITMAP, SAMPLE_EXPORT
from nbdcore.tls import TLSConfig
from nbdcore.tools import DeprecatedFlag, DocstringFormatter

# SQLite's synchronous modes the ledger accepts (gateway.ledger.Ledger).
LEDGER_SYNCHRONOUS = ("full", "extra", "normal")

if TYPE_CHECKING:
    from gateway.server import Listening


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"NBDGW_{name}", default)


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _switch(value: bool | str | None, name: str) -> bool:
    """A store_true flag whose default came from ``NBDGW_{name}``: True when given, else the
    variable as a boolean."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise ConfigError(f"NBDGW_{name}={value!r}: expected 1/true/yes/on or 0/false/no/off")


def register(sub: argparse._SubParsersAction[Any], groups: dict[str, Any]) -> None:
    """Add ``serve``."""
    p = sub.add_parser(
        "serve",
        help="run the gRPC gateway",
        description=__doc__,
        formatter_class=DocstringFormatter,
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        default=_env("CONFIG"),
        help="TOML configuration file ($NBDGW_CONFIG)",
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        default=_env("LISTEN"),
        help=f"gRPC address, port 0 picks one ($NBDGW_LISTEN, default {DEFAULT_LISTEN})",
    )
    p.add_argument(
        "--export",
        metavar="NAME=NBD_URI",
        action="append",
        default=None,
        help="serve an export of an NBD host, e.g. vm1=nbd+unix:///?socket=/run/nbd.sock"
        " (repeatable; $NBDGW_EXPORTS: space-separated)",
    )
    p.add_argument(
        "--qmp-export",
        metavar="NAME=QMP_SOCKET:NODE",
        action="append",
        default=None,
        help="serve a disk of a running QEMU: its monitor socket and block node (or device),"
        " e.g. vm1-disk0=/run/vm1/qmp.sock:drive0; the gateway owns that monitor"
        " (repeatable; $NBDGW_QMP_EXPORTS: space-separated)",
    )
    p.add_argument(
        "--libvirt-export",
        metavar="NAME=DOMAIN:DISK",
        action="append",
        default=None,
        help="serve a disk of a libvirt-managed VM: its domain and disk target, e.g."
        " vm1-vda=vm1:vda, through libvirt's checkpoints and pull-mode backups"
        " (repeatable; $NBDGW_LIBVIRT_EXPORTS: space-separated)",
    )
    p.add_argument(
        "--libvirt-uri",
        metavar="URI",
        default=_env("LIBVIRT_URI"),
        help="the libvirt connection of --libvirt-export ($NBDGW_LIBVIRT_URI; default"
        f" {DEFAULT_LIBVIRT_URI})",
    )
    p.add_argument(
        "--image",
        metavar="NAME=PATH",
        action="append",
        default=None,
        help="serve a raw image with the embedded nbdcore host (repeatable; $NBDGW_IMAGES:"
        " space-separated)",
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        default=_env("DATA_DIR"),
        help=f"embedded host's directory: sample disk, NBD socket ($NBDGW_DATA_DIR,"
        f" default {DEFAULT_DATA_DIR})",
    )
    p.add_argument(
        "--grace-period",
        metavar="SECONDS",
        type=float,
        default=_env("GRACE_PERIOD"),
        help="time open calls get on SIGTERM ($NBDGW_GRACE_PERIOD, default 5)",
    )
    p.add_argument(
        "--host-check-interval",
        metavar="SECONDS",
        type=float,
        default=_env("HOST_CHECK_INTERVAL"),
        help="check an NBD host that had no traffic for this long (connect, close), so"
        " readiness follows a dead host without any call; 0 never ($NBDGW_HOST_CHECK_INTERVAL,"
        " default 5)",
    )
    p.add_argument(
        "--max-connections",
        metavar="N",
        type=int,
        default=_env("MAX_CONNECTIONS"),
        help="connections the gateway may hold to each NBD host; at most what the host accepts"
        " (qemu-nbd -e N) ($NBDGW_MAX_CONNECTIONS, default 16)",
    )
    p.add_argument(
        "--no-reflection",
        action="store_true",
        default=_env("NO_REFLECTION"),
        help="do not serve gRPC server reflection ($NBDGW_NO_REFLECTION)",
    )
    p.add_argument(
        "--ledger-path",
        metavar="FILE",
        default=_env("LEDGER_PATH"),
        help="the clear ledger, for exports whose host cannot clear ($NBDGW_LEDGER_PATH,"
        " default DATA_DIR/ledger.sqlite)",
    )
    p.add_argument(
        "--ledger-synchronous",
        metavar="MODE",
        choices=LEDGER_SYNCHRONOUS,
        type=str.lower,
        default=_env("LEDGER_SYNCHRONOUS"),
        help="SQLite synchronous mode of the ledger: FULL survives power loss, NORMAL only a"
        " crash of the process ($NBDGW_LEDGER_SYNCHRONOUS, default FULL)",
    )
    p.add_argument(
        "--ledger-max-intervals",
        metavar="N",
        default=_env("LEDGER_MAX_INTERVALS"),
        help="disjoint cleared ranges the ledger keeps per export, bitmap and generation; a"
        " clear that would leave more fails with RESOURCE_EXHAUSTED"
        " ($NBDGW_LEDGER_MAX_INTERVALS, default 1000000)",
    )
    sec = p.add_argument_group("securing the gRPC port")
    sec.add_argument(
        "--limit",
        metavar="NAME=VALUE",
        action="append",
        default=None,
        help="a per-caller limit of gateway.security.limits.Limits: max_streams,"
        " max_streams_per_identity, clear_rate (ClearRange/s per identity, 0: none),"
        " clear_burst, stall_timeout, unary_timeout, max_unauthenticated,"
        " max_unauthenticated_per_connection, unauthenticated_timeout (calls without"
        " credentials: health probes) (repeatable; $NBDGW_LIMITS: space-separated)",
    )
    sec.add_argument(
        "--token-file",
        metavar="FILE",
        default=_env("TOKEN_FILE"),
        help="require 'authorization: Bearer TOKEN' on every call but health checks; the file"
        " holds 'IDENTITY TOKEN' lines (or one token) and is re-read when it changes"
        " ($NBDGW_TOKEN_FILE)",
    )
    sec.add_argument(
        "--policy-file",
        metavar="FILE",
        default=_env("POLICY_FILE"),
        help="which identity may do what on which exports (TOML, see gateway.security.access)"
        " ($NBDGW_POLICY_FILE)",
    )
    sec.add_argument(
        "--grpc-tls-cert-file",
        metavar="FILE",
        default=_env("GRPC_TLS_CERT_FILE"),
        help="serve TLS with this certificate chain ($NBDGW_GRPC_TLS_CERT_FILE)",
    )
    sec.add_argument(
        "--grpc-tls-key-file",
        metavar="FILE",
        default=_env("GRPC_TLS_KEY_FILE"),
        help="and this key ($NBDGW_GRPC_TLS_KEY_FILE)",
    )
    sec.add_argument(
        "--grpc-tls-client-ca-file",
        metavar="FILE",
        default=_env("GRPC_TLS_CLIENT_CA_FILE"),
        help="require client certificates from this CA: mutual TLS"
        " ($NBDGW_GRPC_TLS_CLIENT_CA_FILE)",
    )
    sec.add_argument(
        "--health-listen",
        metavar="HOST:PORT",
        default=_env("HEALTH_LISTEN"),
        help="also serve grpc.health.v1 alone, in plaintext, here (for probes that cannot"
        " speak TLS) ($NBDGW_HEALTH_LISTEN)",
    )
    csi = p.add_argument_group("Kubernetes changed block tracking (docs/kubernetes-cbt.md)")
    csi.add_argument(
        "--csi-socket",
        metavar="PATH",
        default=_env("CSI_SOCKET"),
        help="serve csi.v1.Identity and csi.v1.SnapshotMetadata on this unix socket, for the"
        " external-snapshot-metadata sidecar ($NBDGW_CSI_SOCKET)",
    )
    csi.add_argument(
        "--csi-driver-name",
        metavar="NAME",
        default=_env("CSI_DRIVER_NAME"),
        help="the CSI driver name GetPluginInfo answers: the cluster's driver"
        f" ($NBDGW_CSI_DRIVER_NAME, default {DEFAULT_CSI_DRIVER_NAME})",
    )
    csi.add_argument(
        "--csi-block-size",
        metavar="BYTES",
        type=int,
        default=_env("CSI_BLOCK_SIZE"),
        help="answer CSI calls in FIXED_LENGTH blocks of this size; 0: VARIABLE_LENGTH extents"
        " ($NBDGW_CSI_BLOCK_SIZE, default 0)",
    )
    tls = p.add_argument_group("TLS towards NBD hosts (nbds:// URIs given by --export)")
    # --nbd-tls-*: the NBD side's TLS, as in every command (--tls-* is a gateway client's,
    # --grpc-tls-* this gateway's own); the old --tls-*-file spellings still work until 0.2.
    for name, env, helps in (
        ("ca-file", "TLS_CA_FILE", "CA bundle to verify the hosts"),
        ("cert-file", "TLS_CERT_FILE", "client certificate for the hosts"),
        ("key-file", "TLS_KEY_FILE", "client private key for the hosts"),
        ("server-hostname", "TLS_SERVER_HOSTNAME", "name to verify in the host's certificate"),
    ):
        dest = "tls_" + name.replace("-", "_")
        tls.add_argument(
            f"--nbd-tls-{name}",
            dest=dest,
            default=_env(env),
            metavar="NAME" if name == "server-hostname" else "FILE",
            help=f"{helps} (${'NBDGW_' + env})",
        )
        tls.add_argument(
            f"--tls-{name}", dest=dest, default=argparse.SUPPRESS, action=DeprecatedFlag,
            new=f"--nbd-tls-{name}",
        )  # fmt: skip
    tls.add_argument(
        "--no-nbd-tls-verify",
        dest="no_tls_verify",
        action="store_true",
        default=_env("NO_TLS_VERIFY"),
        help="do not verify NBD hosts' certificates ($NBDGW_NO_TLS_VERIFY)",
    )
    tls.add_argument(
        "--no-tls-verify", dest="no_tls_verify", nargs=0, default=argparse.SUPPRESS,
        action=DeprecatedFlag, new="--no-nbd-tls-verify",
    )  # fmt: skip
    obs = p.add_argument_group("metrics and logs")
    obs.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        default=_env("METRICS_LISTEN"),
        help="serve Prometheus metrics at http://HOST:PORT/metrics, in plaintext"
        " ($NBDGW_METRICS_LISTEN)",
    )
    obs.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        type=str.lower,
        metavar="FORMAT",
        default=_env("LOG_FORMAT"),
        help="text lines, or one JSON object per line ($NBDGW_LOG_FORMAT, default text)",
    )
    obs.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        type=str.lower,
        metavar="LEVEL",
        default=_env("LOG_LEVEL"),
        help="least severe records logged; info logs every call ($NBDGW_LOG_LEVEL,"
        " default warning)",
    )
    obs.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=_env("VERBOSE"),
        help="same as --log-level info ($NBDGW_VERBOSE)",
    )
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> tuple[GatewayConfig, bool]:
    """The configuration the flags, environment and file describe; and whether it is the
    sample (nothing configured)."""
    config = load_file(args.config) if args.config else GatewayConfig()
    if args.listen:
        parse_listen(args.listen)
        config.listen = args.listen
    if args.data_dir:
        config.data_dir = Path(args.data_dir)
    if args.grace_period is not None:
        config.grace_period = check_grace_period(float(args.grace_period))
    if args.host_check_interval is not None:
        config.host_check_interval = check_interval(float(args.host_check_interval))
    if args.max_connections is not None:
        if int(args.max_connections) < 1:
            raise ConfigError("--max-connections must be at least 1")
        config.max_connections_per_host = int(args.max_connections)
    if args.ledger_path:
        config.ledger_path = Path(args.ledger_path)
    if args.ledger_synchronous:
        config.ledger_synchronous = check_choice(
            "ledger synchronous mode", args.ledger_synchronous, LEDGER_SYNCHRONOUS
        ).upper()
    if args.ledger_max_intervals is not None:
        config.ledger_max_intervals = check_max_intervals(
            args.ledger_max_intervals, "--ledger-max-intervals"
        )
    if args.token_file:
        config.tokens = load_tokens(args.token_file)
    if args.policy_file:
        config.policy = load_policy(args.policy_file)
    limits = args.limit if args.limit is not None else shlex.split(_env("LIMITS") or "")
    if limits:
        config.limits = parse_limit_args(limits, config.limits)
    for key in ("grpc_tls_cert_file", "grpc_tls_key_file", "grpc_tls_client_ca_file"):
        if getattr(args, key):
            setattr(config, key, getattr(args, key))
    if args.health_listen:
        parse_listen(args.health_listen)
        config.health_listen = args.health_listen
    if args.csi_socket:
        config.csi_socket = args.csi_socket
    if args.csi_driver_name:
        config.csi_driver_name = args.csi_driver_name
    if args.csi_block_size is not None:
        config.csi_block_size = check_csi_block_size(int(args.csi_block_size), "--csi-block-size")
    if _switch(args.no_reflection, "NO_REFLECTION"):
        config.reflection = False
    if args.metrics_listen:
        parse_listen(args.metrics_listen)
        config.metrics_listen = args.metrics_listen
    # Choices given by variables are checked here (argparse checks only the command line).
    if args.log_format:
        config.log_format = check_choice("log format", args.log_format, LOG_FORMATS)
    if args.log_level:
        config.log_level = check_choice("log level", args.log_level, LOG_LEVELS)
    elif _switch(args.verbose, "VERBOSE"):
        config.log_level = "info"
    no_verify = _switch(args.no_tls_verify, "NO_TLS_VERIFY")
    tls = None
    if args.tls_ca_file or args.tls_cert_file or args.tls_key_file or no_verify:
        tls = TLSConfig(
            ca_file=args.tls_ca_file,
            cert_file=args.tls_cert_file,
            key_file=args.tls_key_file,
            verify_peer=not no_verify,
            server_hostname=args.tls_server_hostname,
        )
    exports = args.export
    if exports is None:
        exports = shlex.split(_env("EXPORTS") or "")
    for item in exports:
        name, uri = parse_export_arg(item)
        config.add_uri_export(name, uri, tls)
    qmp_exports = args.qmp_export
    if qmp_exports is None:
        qmp_exports = shlex.split(_env("QMP_EXPORTS") or "")
    for item in qmp_exports:
        name, qmp, node = parse_qmp_export_arg(item)
        config.add_qmp_export(name, str(Path(qmp).absolute()), node)
    libvirt_exports = args.libvirt_export
    if libvirt_exports is None:
        libvirt_exports = shlex.split(_env("LIBVIRT_EXPORTS") or "")
    libvirt_uri = args.libvirt_uri or DEFAULT_LIBVIRT_URI
    for item in libvirt_exports:
        name, domain, disk = parse_libvirt_export_arg(item)
        config.add_libvirt_export(name, libvirt_uri, domain, disk)
    images = args.image
    if images is None:
        images = shlex.split(_env("IMAGES") or "")
    for item in images:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--image {item!r}: expected NAME=PATH")
        config.add_image_export(name, Path(path))
    sample = not config.exports
    if sample:
        from gateway.sample import ensure_sample

        path = ensure_sample(config.data_dir)
        config.add_image_export(
            SAMPLE_EXPORT,
            path,
            description=f"nbdgw sample disk with dirty bitmap {SAMPLE_BITMAP!r}",
        )
    return config, sample


def _announce(listening: Listening, config: GatewayConfig, sample: bool) -> None:
    addr = listening.address
    target = "" if addr == DEFAULT_LISTEN else f" --target {addr}"
    lines = [f"nbdgw: gateway listening on {addr}"]
    if listening.health_port is not None:
        lines.append(f"nbdgw: health (plaintext) on port {listening.health_port}")
    if listening.metrics_port is not None:
        host = parse_listen(config.metrics_listen or "")[0]
        host = f"[{host}]" if ":" in host else host
        lines.append(f"nbdgw: metrics on http://{host}:{listening.metrics_port}/metrics")
    if config.tokens:
        target += " --token TOKEN"
    if config.grpc_tls_cert_file:
        target += " --tls-ca CA_FILE"
    if listening.csi_socket:
        lines.append(f"nbdgw: CSI SnapshotMetadata on unix:{listening.csi_socket}")
    if listening.nbd_socket:
        lines.append(f"nbdgw: embedded NBD host on nbd+unix:///?socket={listening.nbd_socket}")
    lines.append(f"nbdgw: exports: {', '.join(config.exports)}")
    export = next(iter(config.exports))
    bitmap = SAMPLE_BITMAP if sample else "CONTEXT"
    if sample:
        lines.append(f"nbdgw: sample disk in {config.data_dir.absolute()}")
    lines += [
        "Try:",
        f"  nbdgw export list{target}",
        f"  nbdgw bitmap list {export}{target}",
        f"  nbdgw bitmap map {export} --context {bitmap}{target}",
        "  buf curl --protocol grpc"
        + (" --cacert CA_FILE" if config.grpc_tls_cert_file else " --http2-prior-knowledge")
        + (" -H 'authorization: Bearer TOKEN'" if config.tokens else "")
        + f""" -d '{{"export": "exports/{export}", "context": "{bitmap}"}}'"""
        + f" {'https' if config.grpc_tls_cert_file else 'http'}://{addr}"
        + "/nbdgw.v1.BitmapService/StreamExtents",
    ]
    print("\n".join(lines), flush=True)


async def run(args: argparse.Namespace) -> int:
    try:
        config, sample = build_config(args)
    except ConfigError as exc:
        print(f"nbdgw serve: {exc}", file=sys.stderr)
        return 2
    # Imported here: the rest of the CLI need not load grpc's server side.
    from gateway.observability import configure_logging
    from gateway.server import Gateway

    configure_logging(config.log_format, config.log_level, sys.stderr)

    gateway = Gateway(config)
    await gateway.serve(on_ready=lambda listening: _announce(listening, config, sample))
    return 0
