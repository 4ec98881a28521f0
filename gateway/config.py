"""One typed configuration: a TOML file validated with msgspec, then CLI overrides.

Every error names the bad field (``limits.max_line_bytes: Expected int ...``).
Nothing else in the gateway reads files or ``os.environ`` for settings; API key files
(``serve --api-key-file``, ``probe --key-file``) and the probe's ``DATABENTO_API_KEY`` are
read here too. Errors about keys name the flag, file and line, never the key.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec

from gateway.errors import ConfigError

__all__ = [
    "ApiKeyConfig",
    "Config",
    "LimitsConfig",
    "SlowReaderConfig",
    "StrobeConfig",
    "TransportConfig",
    "api_key_problem",
    "key_file_warning",
    "load_config",
    "read_key_file",
    "resolve_probe_key",
    "validate",
]

#: the environment variable the official clients read their key from
KEY_ENV = "DATABENTO_API_KEY"


class _Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ApiKeyConfig(_Base):
    key: str
    #: datasets this key may use; ["*"] for every dataset
    datasets: list[str] = msgspec.field(default_factory=lambda: ["*"])
    max_sessions: int = 10
    #: shown in logs instead of the key (default: the key's last 5 characters)
    name: str | None = None


class LimitsConfig(_Base):
    max_connections: int = 20_000
    max_unauthenticated: int = 2_000
    handshake_timeout_s: float = 30.0
    #: an authenticated session that has not sent start_session by then is ended
    start_timeout_s: float = 120.0
    max_line_bytes: int = 128 * 1024
    max_subscriptions: int = 1_000
    max_symbols: int = 100_000
    control_rate_per_s: float = 100.0
    control_burst: int = 2_000
    per_ip_rate: float = 20.0
    per_ip_burst: int = 200
    exempt_loopback: bool = True


class SlowReaderConfig(_Base):
    behind_bytes: int = 4 * 1024 * 1024
    behind_age_s: float = 2.0
    resume_bytes: int = 512 * 1024
    warning_interval_s: float = 1.0
    hard_cap_bytes: int = 32 * 1024 * 1024
    write_high_water: int = 1024 * 1024
    write_low_water: int = 256 * 1024
    stall_timeout_s: float = 10.0
    #: a cut session has this long to read what it was sent before it is reset
    cut_grace_s: float = 5.0


class TransportConfig(_Base):
    #: plain | onload | vma | exasock | preload:PATH
    kind: str = "plain"
    #: vendor profile name (onload: latency by default); values in the vendor's own names
    profile: str | None = None
    #: KEY=VALUE file whose values win over the profile (as the real onload wrapper does)
    env_file: str | None = None
    #: a requested bypass that is not loaded: fail fast (true) or only warn (false)
    bypass_required: bool = True
    sndbuf: int | None = None
    rcvbuf: int | None = None
    busy_poll_us: int | None = None
    cpu_affinity: list[int] | None = None
    #: SO_REUSEPORT on every listener (client, ingest, metrics): a successor gateway can
    #: bind them while this one runs, for a restart without downtime (README: hand-over).
    #: Unset: on for listeners with a fixed port, off for port 0 (nothing can succeed a
    #: port picked at random, and the kernel may hand one out twice to reuse-port sockets)
    reuse_port: bool | None = None

    def reuse_port_for(self, port: int) -> bool:
        return self.reuse_port if self.reuse_port is not None else port != 0


class StrobeConfig(_Base):
    """The uptime probe run inside the gateway (``serve --strobe``)."""

    enabled: bool = False
    #: API key the strobe uses (default: the first configured key); never logged
    key: str | None = None
    #: dataset to strobe (default: the first feed)
    dataset: str | None = None
    symbol: str = "ALL_SYMBOLS"
    schema: str = "trades"
    interval_s: float = 10.0
    #: limit for each step of a strobe
    timeout_s: float = 10.0
    #: SQLite uptime history (default: $XDG_STATE_HOME/gateway/probe.sqlite)
    history: str | None = None


class Config(_Base):
    host: str = "127.0.0.1"
    port: int = 13000
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    zstd_level: int = 1
    #: shared: one independent frame per chunk per fan-out group (the design);
    #: per_session: one streaming compressor per session (the naive baseline, for benchmarks)
    zstd_mode: Literal["shared", "per_session"] = "shared"
    default_heartbeat_s: int = 30
    shutdown_grace_s: float = 5.0
    api_keys: list[ApiKeyConfig] = msgspec.field(default_factory=list)
    #: dataset -> feed URI
    feeds: dict[str, str] = msgspec.field(default_factory=dict)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    slow_reader: SlowReaderConfig = msgspec.field(default_factory=SlowReaderConfig)
    transport: TransportConfig = msgspec.field(default_factory=TransportConfig)
    #: /readyz waits this long for a feed that is not connected (at start or after a drop)
    feed_grace_s: float = 10.0
    #: export per-API-key series (gateway_key_sessions{key_id}); off: labels stay bounded
    metrics_per_key: bool = False
    strobe: StrobeConfig = msgspec.field(default_factory=StrobeConfig)


def _where(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    msg, _, path = text.rpartition(" - at `$")
    if not path:
        return text
    field = path.rstrip("`").lstrip(".")
    return f"{field or 'config'}: {msg}"


def load_config(path: Path) -> Config:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        cfg = msgspec.toml.decode(data, type=Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {_where(exc)}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return cfg


def api_key_problem(key: str) -> str | None:
    """Why ``key`` cannot be an API key (None: it can); never contains the key."""
    if len(key) != 32 or not key.isascii() or not key.isprintable() or "|" in key:
        return (
            "must be 32 printable ASCII characters without '|' "
            "(the official clients reject other lengths)"
        )
    return None


def read_key_file(path: str | Path, flag: str) -> list[tuple[int, str]]:
    """(line number, key) for each key in a key file: one key per line, surrounding
    whitespace stripped, blank lines and lines starting with ``#`` ignored.

    Raises ConfigError naming ``flag``, the file and the line; the key is never shown.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read: {exc.strerror}") from None
    keys: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise ConfigError(
                f"{flag} {path} line {n}: not an API key (not ASCII; keys are "
                "32 printable ASCII characters)"
            ) from None
        if not line or line.startswith("#"):
            continue
        problem = api_key_problem(line)
        if problem is not None:
            raise ConfigError(f"{flag} {path} line {n}: not an API key: {problem}")
        if line in seen:
            raise ConfigError(f"{flag} {path} line {n}: duplicate key (same as line {seen[line]})")
        seen[line] = n
        keys.append((n, line))
    if not keys:
        raise ConfigError(
            f"{flag} {path}: no API key in the file (one key per line; "
            "blank lines and # comments are ignored)"
        )
    return keys


def key_file_warning(path: str | Path, flag: str) -> str | None:
    """A warning when other users may read a key file (None: they may not)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        return f"{flag} {path}: other users can read this key file (chmod 600 or 640 it)"
    return None


def resolve_probe_key(
    key: str | None, key_file: str | None, environ: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """(key, where it came from) for the probe: ``--key``, then ``--key-file``, then
    ``DATABENTO_API_KEY`` (as the official clients). ConfigError names the source."""
    env = os.environ if environ is None else environ
    if key is not None:
        source, value = "--key", key
    elif key_file is not None:
        found = read_key_file(key_file, "--key-file")
        if len(found) > 1:
            raise ConfigError(
                f"--key-file {key_file} line {found[1][0]}: more than one key "
                "(the probe logs in with one)"
            )
        return found[0][1], f"--key-file {key_file}"
    elif env.get(KEY_ENV):
        source, value = KEY_ENV, env[KEY_ENV].strip()
    else:
        raise ConfigError(
            f"key: no API key given; use --key-file FILE or set {KEY_ENV} "
            "(--key KEY also works, but shows in ps)"
        )
    if api_key_problem(value) is not None:
        raise ConfigError(f"{source}: API keys are 32 printable ASCII characters without '|'")
    return value, source


def validate(cfg: Config) -> Config:
    """Checks types cannot express; raises ConfigError naming the field."""
    for name in ("port",):
        if not 0 <= getattr(cfg, name) <= 65535:
            raise ConfigError(f"{name}: must be 0-65535")
    if cfg.metrics_port is not None and not 0 <= cfg.metrics_port <= 65535:
        raise ConfigError("metrics_port: must be 0-65535")
    if not 1 <= cfg.zstd_level <= 22:
        raise ConfigError("zstd_level: must be 1-22")
    if not 5 <= cfg.default_heartbeat_s <= 30:
        raise ConfigError("default_heartbeat_s: must be 5-30 (clients assume 30)")
    seen: set[str] = set()
    for i, k in enumerate(cfg.api_keys):
        if api_key_problem(k.key) is not None:
            raise ConfigError(
                f"api_keys[{i}].key: must be 32 printable ASCII characters "
                "(the official clients reject other lengths)"
            )
        if k.key in seen:
            raise ConfigError(f"api_keys[{i}].key: duplicate key")
        seen.add(k.key)
        if k.max_sessions < 1:
            raise ConfigError(f"api_keys[{i}].max_sessions: must be >= 1")
    lim = cfg.limits
    if lim.max_line_bytes < 64 * 1024:
        raise ConfigError(
            "limits.max_line_bytes: must be at least 65536 (clients send 500-symbol lines)"
        )
    for name in (
        "max_connections",
        "max_unauthenticated",
        "max_subscriptions",
        "max_symbols",
        "control_burst",
    ):
        if getattr(lim, name) < 1:
            raise ConfigError(f"limits.{name}: must be >= 1")
    if lim.handshake_timeout_s <= 0 or lim.control_rate_per_s <= 0:
        raise ConfigError("limits: handshake_timeout_s and control_rate_per_s must be > 0")
    if not 0 < lim.start_timeout_s < float("inf"):
        raise ConfigError("limits.start_timeout_s: must be a positive number of seconds")
    sr = cfg.slow_reader
    if not 0 < sr.write_low_water <= sr.write_high_water <= sr.hard_cap_bytes:
        raise ConfigError(
            "slow_reader: need 0 < write_low_water <= write_high_water <= hard_cap_bytes"
        )
    if not sr.resume_bytes <= sr.behind_bytes <= sr.hard_cap_bytes:
        raise ConfigError("slow_reader: need resume_bytes <= behind_bytes <= hard_cap_bytes")
    tr = cfg.transport
    for name in ("sndbuf", "rcvbuf"):
        if getattr(tr, name) is not None and getattr(tr, name) <= 0:
            raise ConfigError(f"transport.{name}: must be > 0 bytes (omit it for the default)")
    if tr.busy_poll_us is not None and tr.busy_poll_us < 0:
        raise ConfigError("transport.busy_poll_us: must be >= 0 (0 or omitted: off)")
    if tr.cpu_affinity is not None and (not tr.cpu_affinity or min(tr.cpu_affinity) < 0):
        raise ConfigError("transport.cpu_affinity: expected CPU numbers such as [2] or [2, 3]")
    from gateway.feeds import parse_feed_uri

    for dataset, uri in cfg.feeds.items():
        parse_feed_uri(dataset, uri)
    if cfg.feed_grace_s < 0:
        raise ConfigError("feed_grace_s: must be >= 0")
    st = cfg.strobe
    if st.interval_s <= 0 or st.timeout_s <= 0:
        raise ConfigError("strobe: interval_s and timeout_s must be > 0")
    if st.enabled:
        from gateway.dbn import SCHEMAS

        if st.schema not in SCHEMAS:
            raise ConfigError(f"strobe.schema: {st.schema!r} is not a DBN schema")
        if st.key is not None and st.key not in {k.key for k in cfg.api_keys}:
            raise ConfigError("strobe.key: must be one of api_keys (the strobe logs in as it)")
        if st.dataset is not None and st.dataset not in cfg.feeds:
            raise ConfigError(f"strobe.dataset: {st.dataset!r} is not one of the feeds")
    return cfg
