"""One typed configuration: a TOML file validated with msgspec, then CLI overrides (one
table of them: ``gateway.cli.SERVE_FLAGS``).

Every error names the bad field (``limits.max_line_bytes: Expected int ...``).
Settings are read here and nowhere else: the config file, API key files (``serve
--api-key-file``, ``probe --key-file``) and the probe's ``DATABENTO_API_KEY``. (What else
reads the environment reads the process's, not settings: the preload, the launch marker and
``NOTIFY_SOCKET`` in ``gateway.transport``, ``XDG_STATE_HOME`` for the default probe history;
``transport.env_file`` is passed to the bypass library, never read as settings.) Errors
about keys name the flag, file and line, never the key.

Why one module: every table is a struct checked by the same msgspec conversion, and the
cross-field checks, the "did you mean" hints and the CLI overlay walk all of them; split,
each piece would import the others.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from gateway.errors import ConfigError

__all__ = [
    "ApiKeyConfig",
    "BooksConfig",
    "Config",
    "JournalConfig",
    "LimitsConfig",
    "SlowReaderConfig",
    "StrobeConfig",
    "TransportConfig",
    "WorkersConfig",
    "api_key_problem",
    "dump_config",
    "key_file_warning",
    "load_config",
    "masked",
    "parse_config",
    "read_key_file",
    "resolve_probe_key",
    "validate",
    "worker_count",
    "workers_settings",
]

#: the environment variable the official clients read their key from
KEY_ENV = "DATABENTO_API_KEY"


class _Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


# Range checks live in the types (msgspec.Meta), so that the file, CLI overrides and a
# reload all get the same message, naming the field: ``limits.max_symbols: Expected int >= 1``.
#: a port number (0: the kernel picks one)
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
#: at least one
Count = Annotated[int, msgspec.Meta(ge=1)]
#: zero or more (bytes, a rate, a burst)
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
#: a rate per second
Rate = Annotated[float, msgspec.Meta(gt=0)]
#: a positive number of seconds, at most a day (a timeout; inf is refused)
Seconds = Annotated[float, msgspec.Meta(gt=0, le=86_400)]
#: a grace period: zero or more seconds, at most a day
Grace = Annotated[float, msgspec.Meta(ge=0, le=86_400)]


class ApiKeyConfig(_Base):
    key: str
    #: datasets this key may use; ["*"] for every dataset
    datasets: list[str] = msgspec.field(default_factory=lambda: ["*"])
    max_sessions: Count = 10
    #: shown in logs instead of the key (default: the key's last 5 characters)
    name: str | None = None


class LimitsConfig(_Base):
    max_connections: Count = 20_000
    max_unauthenticated: Count = 2_000
    handshake_timeout_s: Seconds = 30.0
    #: an authenticated session that has not sent start_session by then is ended
    start_timeout_s: Seconds = 120.0
    #: at least 64 KiB: the official clients send 500-symbol lines
    max_line_bytes: Annotated[int, msgspec.Meta(ge=64 * 1024)] = 128 * 1024
    max_subscriptions: Count = 1_000
    max_symbols: Count = 100_000
    control_rate_per_s: Rate = 100.0
    control_burst: Count = 2_000
    #: new connections per second per source IP (0: no limit)
    per_ip_rate: NonNegFloat = 20.0
    per_ip_burst: NonNegInt = 200
    exempt_loopback: bool = True


class SlowReaderConfig(_Base):
    behind_bytes: NonNegInt = 4 * 1024 * 1024
    behind_age_s: Grace = 2.0
    resume_bytes: NonNegInt = 512 * 1024
    warning_interval_s: Grace = 1.0
    hard_cap_bytes: Count = 32 * 1024 * 1024
    write_high_water: Count = 1024 * 1024
    write_low_water: Count = 256 * 1024
    stall_timeout_s: Seconds = 10.0
    #: a cut session has this long to read what it was sent before it is reset
    cut_grace_s: Grace = 5.0


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
    interval_s: Seconds = 10.0
    #: limit for each step of a strobe
    timeout_s: Seconds = 10.0
    #: SQLite uptime history (default: $XDG_STATE_HOME/gateway/probe.sqlite)
    history: str | None = None


class JournalConfig(_Base):
    """The on-disk journal that serves replays (``start=``); off unless ``dir`` is set."""

    #: journal directory (created; locked while the gateway runs); None: no journal
    dir: str | None = None
    #: segments whose records are all older than this (against the newest journaled
    #: record's time, not the clock) are deleted
    retention_s: Annotated[float, msgspec.Meta(gt=0)] = 86_400.0
    #: the whole directory is kept under this many bytes (oldest segments deleted first)
    max_bytes: Annotated[int, msgspec.Meta(ge=1 << 20)] = 8 << 30
    #: never: the kernel writes back (survives a gateway crash, not a power loss);
    #: segment: fsync each segment when it is sealed; interval: every fsync_interval_s
    fsync: Literal["never", "segment", "interval"] = "never"
    fsync_interval_s: Seconds = 1.0
    #: replays that may run at once; past it a replay request gets a clear ErrorMsg
    max_replays: Count = 16
    #: a segment is sealed and a new one started at this size
    segment_bytes: Annotated[int, msgspec.Meta(ge=64 * 1024)] = 256 << 20
    #: ... or once it spans more than this much record time
    segment_span_s: Seconds = 3600.0
    #: bytes one replay may hand the kernel per event-loop turn (fairness to live sessions)
    replay_step_bytes: Annotated[int, msgspec.Meta(ge=4096)] = 1 << 20
    #: bytes per second all replays together may send (0: no cap). sendfile copies run
    #: on the gateway's own core: on a small machine, cap replays so live sessions keep it
    replay_bytes_per_s: NonNegInt = 0


class BooksConfig(_Base):
    """Order books built from every MBO feed (gateway/books): ``snapshot=1`` subscriptions
    and the schemas derived from MBO (mbp-1, mbp-10, tbbo, trades, bbo-1s/1m, ohlcv-1s/1m/
    1h/1d) need them."""

    #: build a book per (instrument, publisher) from the MBO records of every feed
    enabled: bool = True
    #: serve the derived schemas to their subscribers (built only when someone subscribes)
    derive: bool = True
    #: resting orders one feed's books may hold; past it that feed's books are dropped
    #: (snapshots and derived schemas refused, counted, logged): a runaway feed cannot
    #: take the host's memory (about 100 bytes an order)
    max_orders: Annotated[int, msgspec.Meta(ge=1000)] = 20_000_000
    #: the most records one snapshot may hold (about 0.3 us of the gateway's time each on a
    #: 2-core VM, during which it serves nobody else: 250,000 is about 70 ms, 14 MB); a
    #: larger one is refused with an ErrorMsg naming this setting
    max_snapshot_records: Annotated[int, msgspec.Meta(ge=1)] = 250_000
    #: a snapshot is only of books the gateway has seen from a clear record (an R: where the
    #: venue's book starts or is recovered); a book it joined mid-way (a restart, a
    #: publisher that started mid-session) may lack orders and is refused, saying so.
    #: false: serve books as held
    snapshot_requires_clear: bool = True


#: the most worker processes (``workers``): the shared ring's header has a slot for each
MAX_WORKERS = 64
WorkerCount = Annotated[int, msgspec.Meta(ge=1, le=MAX_WORKERS)]


class WorkersConfig(_Base):
    """``--workers N``: worker processes share the client port (SO_REUSEPORT) and are fed
    by one supervisor through a shared-memory ring per dataset. Written either as
    ``workers = 4`` (or ``"auto"``) at the top level, or as a ``[workers]`` table with
    ``count`` and the settings below."""

    #: worker processes; "auto": one per CPU this process may run on; 1: one process
    count: WorkerCount | Literal["auto"] = 1
    #: bytes of each dataset's shared ring: how far a worker may fall behind the feed
    #: before its sessions are skipped ahead or cut (per their slow-reader policy)
    ring_bytes: Annotated[int, msgspec.Meta(ge=1 << 20, le=1 << 40)] = 64 << 20
    #: a worker whose loop has not ticked for this long while the ring is full is killed
    #: (SIGKILL) and restarted (at least 1 s: a worker's loop ticks every 0.5 s)
    worker_stall_s: Annotated[float, msgspec.Meta(ge=1, le=86_400)] = 5.0
    #: first delay before restarting a worker that died; doubled (up to 5 s) while
    #: restarted workers keep dying within 10 s
    restart_backoff_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 0.2


class Config(_Base):
    host: str = "127.0.0.1"
    port: Port = 13000
    metrics_host: str = "127.0.0.1"
    metrics_port: Port | None = None
    loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    zstd_level: Annotated[int, msgspec.Meta(ge=1, le=22)] = 1
    #: shared: one independent frame per chunk per fan-out group (the design);
    #: per_session: one streaming compressor per session (the naive baseline, for benchmarks)
    zstd_mode: Literal["shared", "per_session"] = "shared"
    #: 5-30 s: the official clients assume 30
    default_heartbeat_s: Annotated[int, msgspec.Meta(ge=5, le=30)] = 30
    shutdown_grace_s: Grace = 5.0
    api_keys: list[ApiKeyConfig] = msgspec.field(default_factory=list)
    #: dataset -> feed URI
    feeds: dict[str, str] = msgspec.field(default_factory=dict)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    slow_reader: SlowReaderConfig = msgspec.field(default_factory=SlowReaderConfig)
    transport: TransportConfig = msgspec.field(default_factory=TransportConfig)
    #: /readyz waits this long for a feed that is not connected (at start or after a drop)
    feed_grace_s: Grace = 10.0
    #: export per-API-key series (gateway_key_sessions{key_id}); off: labels stay bounded
    metrics_per_key: bool = False
    strobe: StrobeConfig = msgspec.field(default_factory=StrobeConfig)
    journal: JournalConfig = msgspec.field(default_factory=JournalConfig)
    books: BooksConfig = msgspec.field(default_factory=BooksConfig)
    #: worker processes (``workers = 4`` / ``"auto"``) or the ``[workers]`` table
    workers: WorkerCount | Literal["auto"] | WorkersConfig = 1


def workers_settings(cfg: Config) -> WorkersConfig:
    """The ``[workers]`` settings, also when the config says only ``workers = N``."""
    w = cfg.workers
    return w if isinstance(w, WorkersConfig) else WorkersConfig(count=w)


def worker_count(cfg: Config) -> int:
    """How many worker processes: ``auto`` is the CPUs this process may run on (at most
    :data:`MAX_WORKERS`); 1 is the single-process gateway."""
    count = workers_settings(cfg).count
    if count == "auto":
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    return count


_UNKNOWN = "Object contains unknown field `"


def _fields_at(path: str) -> tuple[str, ...]:
    """The field names of the struct at ``path`` (``limits``, ``api_keys[0]``; "": the
    top level), for "did you mean" hints."""
    typ: Any = Config
    for part in filter(None, path.split(".")):
        name = part.split("[", 1)[0]
        hints = {f.name: f.type for f in msgspec.structs.fields(typ)}
        if name not in hints:
            return ()
        typ = hints[name]
        # ``workers``: a number or a table: the table's fields
        typ = next((a for a in getattr(typ, "__args__", ()) if _is_struct(a)), typ)
        if "[" in part:  # api_keys[0]: the element type of list[ApiKeyConfig]
            args = getattr(typ, "__args__", ())
            typ = args[0] if args else typ
    try:
        return tuple(f.name for f in msgspec.structs.fields(typ))
    except TypeError:
        return ()


def _is_struct(typ: Any) -> bool:
    return isinstance(typ, type) and issubclass(typ, msgspec.Struct)


def _where(exc: msgspec.ValidationError) -> str:
    """msgspec's message as ``field: what is wrong`` (``limits.max_symbols: Expected int
    >= 1``; ``metric_port: unknown field (did you mean metrics_port?)``)."""
    text = str(exc)
    msg, sep, path = text.rpartition(" - at `$")
    if not sep:
        msg, path = text, ""
    path = path.rstrip("`").lstrip(".")
    if msg.startswith(_UNKNOWN):
        name = msg[len(_UNKNOWN) :].rstrip("`")
        field = f"{path}.{name}" if path else name
        close = difflib.get_close_matches(name, _fields_at(path), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"{field}: unknown field{hint}"
    return f"{path or 'config'}: {msg.replace('`', '')}"


def load_config(path: Path) -> Config:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    return parse_config(data, str(path))


def parse_config(data: bytes | str, where: str = "config") -> Config:
    """A Config from TOML text; ConfigError prefixed with ``where`` and naming the field."""
    try:
        cfg = msgspec.toml.decode(data, type=Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{where}: {_where(exc)}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
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
    """Checks types cannot express; raises ConfigError naming the field.

    The range checks (``msgspec.Meta`` in the types) run again here, so that values set
    after decoding (CLI overrides) are held to them too, with the same message.
    """
    tr = cfg.transport
    # Socket options come mostly from flags: messages that say what omitting them means.
    for name in ("sndbuf", "rcvbuf"):
        if getattr(tr, name) is not None and getattr(tr, name) <= 0:
            raise ConfigError(f"transport.{name}: must be > 0 bytes (omit it for the default)")
    if tr.busy_poll_us is not None and tr.busy_poll_us < 0:
        raise ConfigError("transport.busy_poll_us: must be >= 0 (0 or omitted: off)")
    if tr.cpu_affinity is not None and (not tr.cpu_affinity or min(tr.cpu_affinity) < 0):
        raise ConfigError("transport.cpu_affinity: expected CPU numbers such as [2] or [2, 3]")
    try:
        msgspec.convert(msgspec.to_builtins(cfg), type=Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(_where(exc)) from None
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
    sr = cfg.slow_reader
    if not sr.write_low_water <= sr.write_high_water <= sr.hard_cap_bytes:
        raise ConfigError("slow_reader: need write_low_water <= write_high_water <= hard_cap_bytes")
    if not sr.resume_bytes <= sr.behind_bytes <= sr.hard_cap_bytes:
        raise ConfigError("slow_reader: need resume_bytes <= behind_bytes <= hard_cap_bytes")
    from gateway.feeds import parse_feed_uri

    for dataset, uri in cfg.feeds.items():
        parse_feed_uri(dataset, uri)
    jr = cfg.journal
    if jr.dir is not None and not jr.dir.strip():
        raise ConfigError("journal.dir: empty path (omit it for no journal)")
    if jr.segment_bytes > jr.max_bytes:
        raise ConfigError("journal: need segment_bytes <= max_bytes")
    if workers_settings(cfg).ring_bytes % 4096:
        raise ConfigError("workers.ring_bytes: must be a multiple of 4096 (a page)")
    if worker_count(cfg) > 1:
        if cfg.zstd_mode == "per_session":
            raise ConfigError(
                "zstd_mode: per_session is not supported with workers > 1 (use shared)"
            )
        if tr.reuse_port is False:
            raise ConfigError(
                "transport.reuse_port: workers > 1 share the client port with SO_REUSEPORT; "
                "it cannot be false"
            )
    st = cfg.strobe
    if st.enabled:
        from gateway.dbn import SCHEMAS

        if st.schema not in SCHEMAS:
            raise ConfigError(f"strobe.schema: {st.schema!r} is not a DBN schema")
        if st.key is not None and st.key not in {k.key for k in cfg.api_keys}:
            raise ConfigError("strobe.key: must be one of api_keys (the strobe logs in as it)")
        if st.dataset is not None and st.dataset not in cfg.feeds:
            raise ConfigError(f"strobe.dataset: {st.dataset!r} is not one of the feeds")
    return cfg


#: shown instead of a key's first 27 characters by ``dump_config``
MASK = "*" * 27


def _mask(key: str) -> str:
    return MASK + key[-5:] if len(key) >= 5 else MASK


def masked(cfg: Config) -> dict[str, Any]:
    """The config as plain data with every API key masked (its last 5 characters kept:
    they name it in the logs as ``key-XXXXX``)."""
    doc: dict[str, Any] = msgspec.to_builtins(cfg)
    for entry in doc.get("api_keys", []):
        entry["key"] = _mask(entry["key"])
    strobe = doc.get("strobe", {})
    if strobe.get("key") is not None:
        strobe["key"] = _mask(strobe["key"])
    return doc


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else json.dumps(key)


def _toml_table(doc: dict[str, Any]) -> list[str]:
    return [
        f"{_toml_key(k)} = {_toml_value(v)}"
        for k, v in doc.items()
        if v is not None
        and not isinstance(v, dict)
        and not (isinstance(v, list) and v and isinstance(v[0], dict))
    ]


def dump_config(cfg: Config, fmt: Literal["toml", "json"] = "toml") -> str:
    """The effective config (defaults filled in, keys masked) as TOML or JSON. Unset
    optional fields are left out of the TOML (it has no null)."""
    doc = masked(cfg)
    if fmt == "json":
        return json.dumps(doc, indent=2) + "\n"
    lines = _toml_table(doc)
    for name, value in doc.items():
        if isinstance(value, dict):
            lines += ["", f"[{name}]", *_toml_table(value)]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                lines += ["", f"[[{name}]]", *_toml_table(item)]
    return "\n".join(lines) + "\n"
