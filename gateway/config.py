"""Gateway configuration: a TOML file, ``NBDGW_*`` environment variables and flags.

Precedence: flags > environment > file > defaults. The TOML file::

    listen = "127.0.0.1:50051"      # gRPC address (HOST:PORT; port 0 picks one)
    metrics_listen = "0.0.0.0:9090" # Prometheus /metrics (plaintext HTTP); unset: none
    log_format = "json"             # text (default) or json: one JSON object per line
    log_level = "info"              # debug, info, warning (default), error
    grace_period = 5.0              # seconds given to open RPCs on SIGTERM
    host_check_interval = 5.0       # check a host idle this long, for readiness (0: never)
    reflection = true
    data_dir = "./nbdgw-data"       # embedded host: images and its unix socket; the ledger
    ledger_path = "ledger.sqlite"   # clear ledger (default DATA_DIR/ledger.sqlite)
    ledger_synchronous = "FULL"     # SQLite synchronous: FULL, EXTRA or NORMAL
    ledger_max_intervals = 1000000  # disjoint cleared ranges per (export, bitmap, generation)

    [[hosts]]                       # optional: named NBD hosts, with TLS options
    name = "qemu1"
    uri = "nbds://10.0.0.5:10809"
    max_connections = 4             # at most what the host accepts (qemu-nbd -e 4)
    tls_ca_file = "/etc/nbdgw/ca.pem"
    tls_cert_file = "/etc/nbdgw/client.pem"
    tls_key_file = "/etc/nbdgw/client.key"

    [[exports]]                     # an export of a remote NBD host...
    name = "vm1-disk0"
    uri = "nbd+unix:///disk0?socket=/run/qemu-nbd.sock"
    # or instead of uri: host = "qemu1" and nbd_export = "disk0"

    [[exports]]                     # a read-only point-in-time export of qemu-nbd: ClearRange
    name = "vm1-backup"             # goes to the ledger, scoped to the generation
    uri = "nbd+unix:///disk0?socket=/run/backup.sock"
    generation = "snap-2026-11-27"

    [[exports]]                     # ...or an image served by the embedded nbdcore host
    name = "scratch"
    image = "/var/lib/nbdgw/scratch.img"

    [[hosts]]                       # a running QEMU, through its monitor (docs/running-vms.md)
    name = "vm1"
    qmp = "/run/vm1/qmp.sock"
    command_timeout = 60.0          # seconds a monitor command may take (default 10)

    [[exports]]                     # one of its disks: a block node (or device) name
    name = "vm1-disk0"
    host = "vm1"
    node = "drive0"

Environment: every flag of ``nbdgw serve`` has a variable, ``NBDGW_`` and the flag's name
(``--grace-period``: ``NBDGW_GRACE_PERIOD``); lists are plural (``NBDGW_EXPORTS``,
``NBDGW_IMAGES``: items separated by spaces). docs/configuration.md has the table.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.ledger import DEFAULT_MAX_INTERVALS
from gateway.security.access import AccessConfigError, Policy, TokenFile
from gateway.security.limits import Limits
from nbdcore.exceptions import URIError
from nbdcore.tls import TLSConfig
from nbdcore.uri import NBDURI

# Matched with fullmatch: "$" also matches before a final newline ("disk\n" would pass).
EXPORT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
EMBEDDED_HOST = "embedded"
DEFAULT_LIBVIRT_URI = "qemu:///system"
# The data folder holds the embedded host's socket, images and ledger: owner only, whatever
# the umask (with umask 000 anyone could read, write or clear the disks around the API).
DATA_DIR_MODE = 0o700


def ensure_data_dir(path: Path) -> Path:
    """Create the data folder (and its parents) with :data:`DATA_DIR_MODE` unless it exists."""
    path.mkdir(mode=DATA_DIR_MODE, parents=True, exist_ok=True)
    return path


DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DATA_DIR = "./nbdgw-data"


class ConfigError(ValueError):
    """The configuration is invalid; the message says where and why."""


@dataclass(frozen=True)
class HostConfig:
    """An NBD host: where it listens (an NBD URI, its export part ignored) and TLS towards it."""

    name: str
    uri: NBDURI | None  # None for the embedded host
    tls: TLSConfig | None = None
    # Connections the gateway may hold open to it (None: GatewayConfig's default). Must not
    # exceed what the host accepts (qemu-nbd -e N, default 1).
    max_connections: int | None = None
    # A running QEMU's monitor socket (the ``qmp`` host kind): the gateway owns the monitor and
    # starts QEMU's NBD server itself (gateway.hosts.qmp); ``uri`` is then None.
    qmp: str | None = None
    # How long a monitor command may take (None: connect_timeout). A snapshot's transaction
    # drains the VM's disks first, which slow storage can make last: an outcome the gateway
    # did not see is left to recovery (docs/running-vms.md), so a longer wait is cheaper.
    command_timeout: float | None = None
    # A libvirt-managed VM (the ``libvirt`` host kind, gateway.hosts.libvirt): the connection
    # URI and the domain; libvirt's pull-mode backups serve its disks. ``uri`` is then None.
    libvirt: str | None = None
    domain: str | None = None
    # Serve every disk of the domain (exports DOMAIN-DISK), found when the gateway starts.
    all_disks: bool = False

    @property
    def kind(self) -> str:
        if self.libvirt:
            return "libvirt"
        return "qmp" if self.qmp else "embedded" if self.uri is None else "nbd"

    @property
    def label(self) -> str:
        """How the host is shown in the API and messages: never credentials."""
        return self.name


@dataclass(frozen=True)
class ExportConfig:
    """An export the gateway serves."""

    name: str  # the gateway's id: exports/{name}
    host: str  # HostConfig.name
    nbd_export: str = ""  # the export's name on the host
    description: str = ""
    read_only: bool = False
    image: Path | None = None  # served by the embedded host when set
    # The point in time a read-only export shows: clears recorded in the ledger are scoped to it
    # (see gateway.ledger). None: only SetExportGeneration sets one.
    generation: str | None = None
    # A qmp host's export: the QEMU block node or device it reads; a libvirt host's: the
    # disk's target (vda).
    node: str | None = None
    # The export shows one point in time for its whole life (a snapshot of a running QEMU):
    # ClearRange need not name the generation.
    fixed_generation: bool = False


def check_max_intervals(value: object, what: str = "ledger max intervals") -> int:
    try:
        n = int(str(value))
    except ValueError:
        raise ConfigError(f"{what} {value!r}: not an integer") from None
    if n < 1:
        raise ConfigError(f"{what} {n}: must be at least 1")
    return n


def check_interval(seconds: float) -> float:
    if not seconds >= 0:  # also refuses NaN
        raise ConfigError(f"host check interval {seconds}: must be 0 (never) or more seconds")
    return seconds


def check_grace_period(seconds: float) -> float:
    # Infinite would never stop the server; NaN became 0 and cut every running call.
    if not 0 <= seconds < float("inf"):
        raise ConfigError(f"grace period {seconds}: must be 0 or more seconds (and finite)")
    return seconds


DEFAULT_CSI_DRIVER_NAME = "nbdgw.dev"
DEFAULT_CSI_BLOCK_SIZE = 0  # CSI answers: 0 VARIABLE_LENGTH extents, N FIXED_LENGTH N-byte blocks


def check_csi_block_size(value: int, where: str) -> int:
    # 0, or a power of two of at least 512 (a sector), so blocks align with the bitmaps' granules.
    if value and (value < 512 or value & (value - 1)):
        raise ConfigError(f"{where}: {value} is neither 0 nor a power of two of at least 512")
    return value


@dataclass
class GatewayConfig:
    listen: str = DEFAULT_LISTEN
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    grace_period: float = 5.0
    reflection: bool = True
    # Who may call and what for (gateway.security.access): bearer tokens (a file, reloaded when it
    # changes), a per-identity policy; and per-caller limits (gateway.security.limits).
    tokens: TokenFile | None = None
    policy: Policy | None = None
    # No ClearRange rate limit unless configured: a backup of a fragmented bitmap clears
    # thousands of ranges in a burst, and clients need not all handle RetryInfo.
    limits: Limits = field(default_factory=lambda: Limits(clear_rate=0))
    # TLS on the gRPC port: certificate chain and key files, and a CA file that client
    # certificates must chain to (mutual TLS) when set.
    grpc_tls_cert_file: str | None = None
    grpc_tls_key_file: str | None = None
    grpc_tls_client_ca_file: str | None = None
    # A second, plaintext port serving only grpc.health.v1 (for the kubelet when the main port
    # uses TLS).
    health_listen: str | None = None
    # The CSI Identity and SnapshotMetadata services (gateway.api.csi) on a unix socket, for the
    # Kubernetes external-snapshot-metadata sidecar; the driver name must be the CSI driver's.
    csi_socket: str | None = None
    csi_driver_name: str = DEFAULT_CSI_DRIVER_NAME
    csi_block_size: int = DEFAULT_CSI_BLOCK_SIZE
    # Observability (gateway.observability): a plaintext HTTP port serving /metrics, and logs.
    metrics_listen: str | None = None
    log_format: str = "text"  # text | json
    log_level: str = "warning"  # debug | info | warning | error
    hosts: dict[str, HostConfig] = field(default_factory=dict)
    exports: dict[str, ExportConfig] = field(default_factory=dict)
    # Connection pool and reconnect tuning.
    connect_timeout: float = 10.0
    max_connections_per_host: int = 16
    max_idle_per_export: int = 4
    backoff_initial: float = 0.2
    backoff_max: float = 30.0
    # A host without traffic for this long is checked (connect, handshake, close) so that
    # readiness follows a dead host even when no RPC uses it; 0 disables the check.
    host_check_interval: float = 5.0
    # The clear ledger (gateway.ledger): None means DATA_DIR/ledger.sqlite.
    ledger_path: Path | None = None
    ledger_synchronous: str = "FULL"
    # Merged intervals one ledger scope may hold; a clear that would leave more is refused
    # (RESOURCE_EXHAUSTED): byte-exact disjoint clears would otherwise grow it without bound.
    ledger_max_intervals: int = DEFAULT_MAX_INTERVALS

    @property
    def ledger_file(self) -> Path:
        return self.ledger_path if self.ledger_path is not None else self.data_dir / "ledger.sqlite"

    @property
    def uses_embedded(self) -> bool:
        return any(e.host == EMBEDDED_HOST for e in self.exports.values())

    def add_export(self, export: ExportConfig) -> None:
        if not EXPORT_ID.fullmatch(export.name):
            raise ConfigError(
                f"export name {export.name!r}: use 1-63 letters, digits, '.', '_' or '-'"
                " (starting with a letter or digit)"
            )
        if export.name in self.exports:
            raise ConfigError(f"export {export.name!r} is configured twice")
        if export.host not in self.hosts:
            raise ConfigError(f"export {export.name!r}: unknown host {export.host!r}")
        self.exports[export.name] = export

    def add_uri_export(self, name: str, uri_text: str, tls: TLSConfig | None = None) -> None:
        """An export given as ``NAME=NBD_URI``; its host is named after the URI's address."""
        try:
            uri = NBDURI.parse(uri_text)
        except URIError as exc:
            raise ConfigError(f"export {name!r}: {exc}") from exc
        host_name = host_label(uri)
        if host_name not in self.hosts:
            if tls is None and uri.tls:
                tls = TLSConfig.from_uri(uri)
            self.hosts[host_name] = HostConfig(host_name, uri, tls if uri.tls else None)
        self.add_export(ExportConfig(name=name, host=host_name, nbd_export=uri.export))

    def add_qmp_export(
        self, name: str, qmp: str, node: str, *, host: str | None = None, description: str = ""
    ) -> None:
        """A disk of a running QEMU: block node (or device) ``node`` of the QEMU whose monitor
        is ``qmp``; its host is named ``qmp:SOCKET`` unless ``host`` names it."""
        if not node:
            raise ConfigError(f"export {name!r}: a QEMU block node or device name is required")
        host_name = host or f"qmp:{qmp}"
        existing = self.hosts.get(host_name)
        if existing is None:
            self.hosts[host_name] = HostConfig(host_name, None, qmp=qmp)
        elif existing.qmp != qmp:
            raise ConfigError(f"export {name!r}: host {host_name!r} is not the QEMU at {qmp}")
        self.add_export(
            ExportConfig(name=name, host=host_name, nbd_export=name, description=description,
                         node=node)
        )  # fmt: skip

    def add_libvirt_export(
        self,
        name: str,
        uri: str,
        domain: str,
        disk: str,
        *,
        host: str | None = None,
        description: str = "",
    ) -> None:
        """Disk ``disk`` (its target, such as vda) of libvirt domain ``domain`` at ``uri``;
        its host is named ``libvirt:DOMAIN`` unless ``host`` names it."""
        if not domain or not disk:
            raise ConfigError(f"export {name!r}: a libvirt domain and disk (vda) are required")
        host_name = host or f"libvirt:{domain}"
        existing = self.hosts.get(host_name)
        if existing is None:
            self.hosts[host_name] = HostConfig(host_name, None, libvirt=uri, domain=domain)
        elif (existing.libvirt, existing.domain) != (uri, domain):
            raise ConfigError(
                f"export {name!r}: host {host_name!r} is not domain {domain} at {uri}"
            )
        self.add_export(
            ExportConfig(name=name, host=host_name, nbd_export=name, description=description,
                         node=disk)
        )  # fmt: skip

    def add_image_export(
        self, name: str, image: Path, *, description: str = "", read_only: bool = False
    ) -> None:
        if EMBEDDED_HOST not in self.hosts:
            self.hosts[EMBEDDED_HOST] = HostConfig(EMBEDDED_HOST, None)
        self.add_export(
            ExportConfig(
                name=name,
                host=EMBEDDED_HOST,
                nbd_export=name,
                description=description,
                read_only=read_only,
                image=image,
            )
        )


def host_label(uri: NBDURI) -> str:
    """A host's name for messages and the API: its address, without export or options."""
    scheme = uri.scheme.split("+")[0]
    if uri.socket is not None:
        return f"{scheme}+unix:{uri.socket}"
    host, port = uri.address
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


def check_choice(what: str, value: str, allowed: tuple[str, ...]) -> str:
    """``value`` (case-insensitive) if it is one of ``allowed``."""
    if value.lower() not in allowed:
        raise ConfigError(f"{what} {value!r}: expected one of {', '.join(allowed)}")
    return value.lower()


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"listen address {text!r}: expected HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_text)


def load_tokens(path: str | Path) -> TokenFile:
    """Bearer tokens (``IDENTITY TOKEN`` lines, or a lone token), see gateway.security.access."""
    try:
        return TokenFile(path)
    except AccessConfigError as exc:
        raise ConfigError(str(exc)) from exc


def load_policy(path: str | Path) -> Policy:
    try:
        return Policy.load(path)
    except AccessConfigError as exc:
        raise ConfigError(str(exc)) from exc


def parse_limits(table: Any, where: str) -> Limits:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    known = {f.name for f in dataclasses.fields(Limits)}
    _check_keys(table, known, where)
    try:
        limits = Limits(**{"clear_rate": 0, **table})
        limits.check()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return limits


_INT_LIMITS = (
    "max_streams",
    "max_streams_per_identity",
    "clear_burst",
    "max_unauthenticated",
    "max_unauthenticated_per_connection",
    "max_calls",
    "max_calls_per_connection",
)


def parse_limit_args(items: list[str], base: Limits) -> Limits:
    """``NAME=VALUE`` items (``--limit``) over ``base``."""
    table: dict[str, Any] = dataclasses.asdict(base)
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in table:
            known = ", ".join(table)
            raise ConfigError(f"--limit {item!r}: expected NAME=VALUE, NAME one of {known}")
        try:
            table[name] = int(value) if name in _INT_LIMITS else float(value)
        except ValueError:
            raise ConfigError(f"--limit {item!r}: {value!r} is not a number") from None
    return parse_limits(table, "--limit")


def parse_libvirt_export_arg(text: str) -> tuple[str, str, str]:
    """``NAME=DOMAIN:DISK`` -> (name, domain, disk)."""
    name, sep, rest = text.partition("=")
    domain, colon, disk = rest.rpartition(":")
    if not sep or not name or not colon or not domain or not disk:
        raise ConfigError(f"--libvirt-export {text!r}: expected NAME=DOMAIN:DISK")
    return name, domain, disk


def parse_qmp_export_arg(text: str) -> tuple[str, str, str]:
    """``NAME=QMP_SOCKET:NODE`` -> (name, socket, node)."""
    name, sep, rest = text.partition("=")
    qmp, colon, node = rest.rpartition(":")
    if not sep or not name or not colon or not qmp or not node:
        raise ConfigError(f"--qmp-export {text!r}: expected NAME=QMP_SOCKET:NODE")
    return name, qmp, node


def parse_export_arg(text: str) -> tuple[str, str]:
    """``NAME=NBD_URI`` -> (name, uri)."""
    name, sep, uri = text.partition("=")
    if not sep or not name or not uri:
        raise ConfigError(f"--export {text!r}: expected NAME=NBD_URI")
    return name, uri


def _tls_from(table: Mapping[str, Any], where: str) -> TLSConfig | None:
    keys = {"tls_ca_file", "tls_cert_file", "tls_key_file", "tls_verify", "tls_server_hostname"}
    if not keys & table.keys():
        return None
    return TLSConfig(
        ca_file=_opt_str(table, "tls_ca_file", where),
        cert_file=_opt_str(table, "tls_cert_file", where),
        key_file=_opt_str(table, "tls_key_file", where),
        verify_peer=bool(table.get("tls_verify", True)),
        server_hostname=_opt_str(table, "tls_server_hostname", where),
    )


def _opt_str(table: Mapping[str, Any], key: str, where: str) -> str | None:
    value = table.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a string")
    return value


def _tables(data: Mapping[str, Any], key: str, where: str) -> list[Mapping[str, Any]]:
    """``[[key]]`` entries: a list of tables (found by fuzzing: a string there was an
    AttributeError)."""
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{where}: '{key}' must be a list of tables ([[{key}]])")
    return value


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")


_TOP_KEYS = {
    "listen",
    "metrics_listen",
    "log_format",
    "log_level",
    "grace_period",
    "host_check_interval",
    "reflection",
    "data_dir",
    "hosts",
    "exports",
    "token_file",
    "policy_file",
    "policy",
    "limits",
    "grpc_tls_cert_file",
    "grpc_tls_key_file",
    "grpc_tls_client_ca_file",
    "health_listen",
    "csi_socket",
    "csi_driver_name",
    "csi_block_size",
    "ledger_path",
    "ledger_synchronous",
    "ledger_max_intervals",
}
_TLS_KEYS = {"tls_ca_file", "tls_cert_file", "tls_key_file", "tls_verify", "tls_server_hostname"}
_HOST_KEYS = {
    "name",
    "uri",
    "qmp",
    "command_timeout",
    "libvirt",
    "domain",
    "disks",
    "max_connections",
} | _TLS_KEYS
_EXPORT_KEYS = {
    "name",
    "uri",
    "host",
    "nbd_export",
    "image",
    "description",
    "read_only",
    "generation",
    "node",
    "disk",
}


def load_file(path: str | Path, config: GatewayConfig | None = None) -> GatewayConfig:
    """Read a TOML configuration file into ``config`` (a new one by default)."""
    config = config or GatewayConfig()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    try:
        apply_table(data, config, str(path), base=path.parent)
    except ConfigError as exc:
        if str(path) in str(exc):
            raise
        raise ConfigError(f"{path}: {exc}") from exc
    except (TypeError, ValueError) as exc:  # a value of the wrong type (float("x"), ...)
        raise ConfigError(f"{path}: {exc}") from exc
    return config


def apply_table(
    data: Mapping[str, Any], config: GatewayConfig, where: str, base: Path = Path(".")
) -> None:
    _check_keys(data, _TOP_KEYS, where)
    if "listen" in data:
        config.listen = str(data["listen"])
        parse_listen(config.listen)
    if "metrics_listen" in data:
        config.metrics_listen = str(data["metrics_listen"])
        parse_listen(config.metrics_listen)
    for key, allowed in (("log_format", LOG_FORMATS), ("log_level", LOG_LEVELS)):
        if key in data:
            setattr(config, key, check_choice(key.replace("_", " "), str(data[key]), allowed))
    if "grace_period" in data:
        config.grace_period = check_grace_period(float(data["grace_period"]))
    if "host_check_interval" in data:
        config.host_check_interval = check_interval(float(data["host_check_interval"]))
    if "reflection" in data:
        config.reflection = bool(data["reflection"])
    if "data_dir" in data:
        config.data_dir = base / str(data["data_dir"])
    if "token_file" in data:
        config.tokens = load_tokens(base / str(data["token_file"]))
    if "policy_file" in data:
        config.policy = load_policy(base / str(data["policy_file"]))
    if "policy" in data:  # the policy inline: [policy.identities.NAME]
        if "policy_file" in data:
            raise ConfigError(f"{where}: give 'policy' or 'policy_file', not both")
        try:
            config.policy = Policy.from_table(data["policy"], f"{where}: policy")
        except AccessConfigError as exc:
            raise ConfigError(str(exc)) from exc
    if "limits" in data:
        config.limits = parse_limits(data["limits"], f"{where}: limits")
    for key in ("grpc_tls_cert_file", "grpc_tls_key_file", "grpc_tls_client_ca_file"):
        if key in data:
            setattr(config, key, str(base / str(data[key])))
    if "health_listen" in data:
        config.health_listen = str(data["health_listen"])
        parse_listen(config.health_listen)
    if "csi_socket" in data:
        config.csi_socket = str(base / str(data["csi_socket"]))
    if "csi_driver_name" in data:
        config.csi_driver_name = str(data["csi_driver_name"])
    if "csi_block_size" in data:
        config.csi_block_size = check_csi_block_size(int(data["csi_block_size"]), where)
    if "ledger_path" in data:
        config.ledger_path = base / str(data["ledger_path"])
    if "ledger_synchronous" in data:
        sync = str(data["ledger_synchronous"]).upper()
        if sync not in ("FULL", "EXTRA", "NORMAL"):
            raise ConfigError(f"{where}: ledger_synchronous must be FULL, EXTRA or NORMAL")
        config.ledger_synchronous = sync
    if "ledger_max_intervals" in data:
        config.ledger_max_intervals = check_max_intervals(
            data["ledger_max_intervals"], f"{where}: ledger_max_intervals"
        )
    for i, host in enumerate(_tables(data, "hosts", where)):
        here = f"{where}: hosts[{i}]"
        _check_keys(host, _HOST_KEYS, here)
        name, uri_text = host.get("name"), host.get("uri")
        qmp = host.get("qmp")
        if isinstance(name, str) and "domain" in host and uri_text is None and qmp is None:
            if name in config.hosts or name == EMBEDDED_HOST:
                raise ConfigError(f"{here}: host {name!r} is configured twice (or reserved)")
            domain, disks = host.get("domain"), host.get("disks", "named")
            if not isinstance(domain, str) or not domain or disks not in ("all", "named"):
                raise ConfigError(
                    f"{here}: a libvirt host needs 'domain' (a string); 'disks' is"
                    ' "all" or "named" (only the [[exports]] that name one)'
                )
            config.hosts[name] = HostConfig(
                name,
                None,
                libvirt=str(host.get("libvirt", DEFAULT_LIBVIRT_URI)),
                domain=domain,
                all_disks=disks == "all",
            )
            continue
        timeout = host.get("command_timeout")
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 < timeout < float("inf")  # NaN too
        ):
            raise ConfigError(f"{here}: command_timeout must be a positive number of seconds")
        if timeout is not None and not isinstance(qmp, str):
            raise ConfigError(f"{here}: command_timeout is for qmp hosts")
        if isinstance(name, str) and isinstance(qmp, str) and uri_text is None:
            if name in config.hosts or name == EMBEDDED_HOST:
                raise ConfigError(f"{here}: host {name!r} is configured twice (or reserved)")
            config.hosts[name] = HostConfig(
                name,
                None,
                qmp=str(base / qmp),
                command_timeout=None if timeout is None else float(timeout),
            )
            continue
        if not isinstance(name, str) or not isinstance(uri_text, str) or qmp is not None:
            raise ConfigError(
                f"{here}: 'name' and 'uri' are required strings (or 'qmp', a running QEMU's"
                " monitor socket, instead of 'uri')"
            )
        if name in config.hosts or name == EMBEDDED_HOST:
            raise ConfigError(f"{here}: host {name!r} is configured twice (or reserved)")
        try:
            uri = NBDURI.parse(uri_text)
        except URIError as exc:
            raise ConfigError(f"{here}: {exc}") from exc
        tls = _tls_from(host, here) or (TLSConfig.from_uri(uri) if uri.tls else None)
        limit = host.get("max_connections")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ConfigError(f"{here}: max_connections must be a positive integer")
        config.hosts[name] = HostConfig(name, uri, tls, limit)
    for i, export in enumerate(_tables(data, "exports", where)):
        here = f"{where}: exports[{i}]"
        _check_keys(export, _EXPORT_KEYS, here)
        name = export.get("name")
        if not isinstance(name, str):
            raise ConfigError(f"{here}: 'name' is a required string")
        ways = [k for k in ("uri", "host", "image") if k in export]
        if len(ways) != 1:
            raise ConfigError(f"{here}: give exactly one of 'uri', 'host' or 'image'")
        description = str(export.get("description", ""))
        read_only = bool(export.get("read_only", False))
        generation = export.get("generation")
        if generation is not None and (
            not isinstance(generation, str) or not generation or len(generation.encode()) > 256
        ):
            raise ConfigError(f"{here}: 'generation' must be a non-empty string (<= 256 bytes)")
        if "image" in export:
            config.add_image_export(
                name, base / str(export["image"]), description=description, read_only=read_only
            )
        elif "uri" in export:
            config.add_uri_export(name, str(export["uri"]))
            config.exports[name] = ExportConfig(
                name=name,
                host=config.exports[name].host,
                nbd_export=config.exports[name].nbd_export,
                description=description,
                read_only=read_only,
                generation=generation,
            )
        else:
            host_cfg = config.hosts.get(str(export["host"]))
            node = export.get("node")
            if host_cfg is not None and host_cfg.qmp:
                if not isinstance(node, str) or not node:
                    raise ConfigError(f"{here}: a qmp host's export needs 'node' (a block node)")
                config.add_qmp_export(
                    name, host_cfg.qmp, node, host=host_cfg.name, description=description
                )
                continue
            if host_cfg is not None and host_cfg.libvirt:
                disk = export.get("disk")
                if not isinstance(disk, str) or not disk:
                    raise ConfigError(f"{here}: a libvirt host's export needs 'disk' (vda)")
                config.add_libvirt_export(
                    name,
                    host_cfg.libvirt,
                    host_cfg.domain or "",
                    disk,
                    host=host_cfg.name,
                    description=description,
                )
                continue
            if node is not None:
                raise ConfigError(f"{here}: 'node' is for exports of qmp hosts")
            config.add_export(
                ExportConfig(
                    name=name,
                    host=str(export["host"]),
                    nbd_export=str(export.get("nbd_export", "")),
                    description=description,
                    read_only=read_only,
                    generation=generation,
                )
            )
