"""The options of an ``lsg://`` relay feed (``gateway.feeds.relay``) and its upstream key.

Sans-I/O but for reading the key: every bad value is a ConfigError that names the feed and
the option, and no error ever shows the key itself.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import SplitResult

from gateway import dbn
from gateway.errors import ConfigError

__all__ = [
    "DEFAULT_KEY_ENV",
    "RELAY_OPTIONS",
    "RelayOptions",
    "parse_relay",
    "read_key",
]

DEFAULT_KEY_ENV: Final = "DATABENTO_API_KEY"
DEFAULT_HEARTBEAT_S: Final = 5
_STYPES: Final = ("raw_symbol", "instrument_id")


@dataclass(frozen=True)
class RelayOptions:
    upstreams: tuple[tuple[str, int], ...]
    schemas: tuple[str, ...]
    dataset: str
    symbols: tuple[str, ...] = ("ALL_SYMBOLS",)
    stype_in: str = "raw_symbol"
    compression: str = "none"
    key_env: str | None = DEFAULT_KEY_ENV
    key_file: Path | None = None
    heartbeat_interval_s: int = DEFAULT_HEARTBEAT_S
    failover_after_s: float = 10.0


def _upstreams(dataset: str, netloc: str) -> tuple[tuple[str, int], ...]:
    out: list[tuple[str, int]] = []
    for item in netloc.split(","):
        host, sep, port_text = item.strip().rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(
                f"feeds.{dataset}: lsg:// upstream {item!r} must be HOST:PORT "
                "(port 1-65535; several: HOST:PORT,HOST2:PORT2)"
            )
        out.append((host, int(port_text)))
    return tuple(out)


def parse_relay(dataset: str, parts: SplitResult, query: dict[str, str]) -> RelayOptions:
    """The options of an ``lsg://`` URI (already split); ConfigError names the bad one."""
    if not parts.netloc:
        raise ConfigError(f"feeds.{dataset}: lsg:// needs HOST:PORT[,HOST2:PORT2...]")
    if parts.path not in ("", "/"):
        raise ConfigError(f"feeds.{dataset}: lsg:// takes no path (got {parts.path!r})")
    upstreams = _upstreams(dataset, parts.netloc)
    text = query.get("schemas", "")
    schemas = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if not schemas:
        raise ConfigError(f"feeds.{dataset}: lsg:// needs schemas=SCHEMA[,SCHEMA...]")
    bad = [s for s in schemas if s not in dbn.SCHEMAS]
    if bad:
        raise ConfigError(f"feeds.{dataset}: schemas: unknown schema {bad[0]!r}")
    if "tbbo" in schemas and "mbp-1" in schemas:
        raise ConfigError(
            f"feeds.{dataset}: schemas: tbbo and mbp-1 share rtype 0x01 in DBN v3, so one "
            "feed cannot carry both: relay one of them as another feed (dataset=...)"
        )
    upstream_dataset = query.get("dataset", dataset)
    if not upstream_dataset or len(upstream_dataset) > 16 or not upstream_dataset.isascii():
        raise ConfigError(f"feeds.{dataset}: dataset={upstream_dataset!r} must be 1-16 ASCII")
    symbols = tuple(s.strip() for s in query.get("symbols", "ALL_SYMBOLS").split(","))
    if not all(symbols):
        raise ConfigError(f"feeds.{dataset}: symbols={query['symbols']!r} has an empty symbol")
    stype_in = query.get("stype_in", "raw_symbol")
    if stype_in not in _STYPES:
        raise ConfigError(f"feeds.{dataset}: stype_in={stype_in!r} must be one of {_STYPES}")
    compression = query.get("compression", "none")
    if compression not in ("none", "zstd"):
        raise ConfigError(f"feeds.{dataset}: compression={compression!r} must be none or zstd")
    if "key_env" in query and "key_file" in query:
        raise ConfigError(f"feeds.{dataset}: give key_env or key_file, not both")
    key_file = Path(query["key_file"]) if query.get("key_file") else None
    if "key_file" in query and key_file is None:
        raise ConfigError(f"feeds.{dataset}: key_file= needs a path")
    key_env = None if key_file is not None else query.get("key_env", DEFAULT_KEY_ENV)
    if key_env is not None and (not key_env or not key_env.replace("_", "a").isalnum()):
        raise ConfigError(f"feeds.{dataset}: key_env={key_env!r} must be a variable name")
    hb_text = query.get("heartbeat_interval_s", str(DEFAULT_HEARTBEAT_S))
    if not hb_text.isdigit() or not 5 <= int(hb_text) <= 1800:
        raise ConfigError(
            f"feeds.{dataset}: heartbeat_interval_s={hb_text!r} must be 5-1800 seconds "
            "(the Live API's range)"
        )
    fo_text = query.get("failover_after_s", "10")
    try:
        failover = float(fo_text)
    except ValueError:
        failover = math.nan
    if not math.isfinite(failover) or not 0 <= failover <= 3600:
        raise ConfigError(f"feeds.{dataset}: failover_after_s={fo_text!r} must be 0-3600 seconds")
    return RelayOptions(
        upstreams=upstreams,
        schemas=schemas,
        dataset=upstream_dataset,
        symbols=symbols,
        stype_in=stype_in,
        compression=compression,
        key_env=key_env,
        key_file=key_file,
        heartbeat_interval_s=int(hb_text),
        failover_after_s=failover,
    )


RELAY_OPTIONS: Final = frozenset(
    {
        "schemas",
        "dataset",
        "symbols",
        "stype_in",
        "compression",
        "key_env",
        "key_file",
        "heartbeat_interval_s",
        "failover_after_s",
        "backpressure",
    }
)


def read_key(dataset: str, opts: RelayOptions) -> str:
    """The upstream API key, from the file or the environment; ConfigError names where it
    was looked for, never what it holds."""
    if opts.key_file is not None:
        try:
            text = opts.key_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"feeds.{dataset}: cannot read key_file {opts.key_file}: {exc.strerror}"
            ) from None
        where = f"key_file {opts.key_file}"
    else:
        assert opts.key_env is not None
        text = os.environ.get(opts.key_env, "")
        where = f"environment variable {opts.key_env}"
    key = text.strip()
    if not key:
        raise ConfigError(f"feeds.{dataset}: no upstream API key in {where}")
    if any(c.isspace() for c in key) or not key.isascii() or len(key) > 256:
        raise ConfigError(f"feeds.{dataset}: the upstream API key in {where} is malformed")
    return key
