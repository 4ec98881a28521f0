"""Feed sources, one module per kind, and the URI syntax that selects them.

synthetic:[?rate=2000&instruments=50&seed=7&schemas=trades,mbp-1,ohlcv-1s]
file:PATH[?pace=realtime|max|<factor>&loop=1&backpressure=0|1]
ingest://HOST:PORT[?backpressure=0|1&idle_timeout_s=30&allow=CIDR,CIDR]
lsg://HOST:PORT[,HOST2:PORT2...]?schemas=trades[&dataset=D&symbols=A,B&stype_in=raw_symbol
      &compression=zstd&key_env=VAR|key_file=PATH&heartbeat_interval_s=5&failover_after_s=10]

Every bad value is a ConfigError that names the feed and the option.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import parse_qsl, urlsplit

from gateway.errors import ConfigError
from gateway.feeds.base import Feed
from gateway.feeds.file import FileSource
from gateway.feeds.ingest import (
    DEFAULT_ALLOW,
    DEFAULT_IDLE_TIMEOUT_S,
    MAX_IDLE_TIMEOUT_S,
    IngestSource,
    Network,
    parse_allow,
)
from gateway.feeds.relay import RelaySource
from gateway.feeds.relay_options import RELAY_OPTIONS, RelayOptions, parse_relay
from gateway.feeds.synthetic import MAX_RATE, SyntheticOptions, SyntheticSource, parse_schemas

__all__ = ["Feed", "FeedSpec", "Source", "build_source", "parse_feed_uri"]

N = TypeVar("N", int, float)


class Source(Protocol):
    kind: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class FeedSpec:
    dataset: str
    kind: str
    uri: str
    path: Path | None = None
    host: str = ""
    port: int = 0
    pace: float | None = 1.0
    loop: bool = False
    backpressure: bool = False
    synthetic: SyntheticOptions | None = None
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    allow: tuple[Network, ...] = DEFAULT_ALLOW
    relay: RelayOptions | None = None


def _flag(value: str, name: str) -> bool:
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise ConfigError(f"feed option {name}={value!r} must be 0 or 1")


def _number(dataset: str, query: dict[str, str], name: str, default: str, kind: type[N]) -> N:
    text = query.get(name, default)
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"feeds.{dataset}: {name}={text!r} must be {what}") from None


def parse_feed_uri(dataset: str, uri: str) -> FeedSpec:
    """Validate a feed URI; ConfigError names the bad part."""
    if not dataset or len(dataset) > 16 or not dataset.isascii():
        raise ConfigError(f"feeds: dataset {dataset!r} must be 1-16 ASCII characters")
    parts = urlsplit(uri)
    try:
        query = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False))
    except ValueError as exc:
        raise ConfigError(f"feeds.{dataset}: bad query in {uri!r}: {exc}") from None
    scheme = parts.scheme
    known: set[str]
    if scheme == "synthetic":
        known = {"rate", "instruments", "seed", "schemas"}
        rate = _number(dataset, query, "rate", "2000", float)
        if not math.isfinite(rate) or not 0 <= rate <= MAX_RATE:
            raise ConfigError(
                f"feeds.{dataset}: rate={query['rate']!r} must be a number of records per "
                f"second from 0 to {MAX_RATE:,}"
            )
        instruments = _number(dataset, query, "instruments", "50", int)
        if not 1 <= instruments <= 100_000:
            raise ConfigError(f"feeds.{dataset}: instruments={instruments} must be 1..100000")
        seed = _number(dataset, query, "seed", "7", int)
        if seed < 0:
            raise ConfigError(f"feeds.{dataset}: seed={seed} must be >= 0")
        opts = SyntheticOptions(rate=rate, instruments=instruments, seed=seed)
        if "schemas" in query:
            try:
                schemas = parse_schemas(query["schemas"])
            except ValueError as exc:
                raise ConfigError(f"feeds.{dataset}: {exc}") from None
            opts = SyntheticOptions(opts.rate, opts.instruments, opts.seed, opts.tick_s, schemas)
        spec = FeedSpec(dataset, "synthetic", uri, synthetic=opts)
    elif scheme == "file":
        known = {"pace", "loop", "backpressure"}
        path = Path((parts.netloc or "") + parts.path)
        if not str(path) or str(path) == ".":
            raise ConfigError(f"feeds.{dataset}: file: needs a path")
        pace_text = query.get("pace", "realtime")
        pace: float | None
        if pace_text == "realtime":
            pace = 1.0
        elif pace_text == "max":
            pace = None
        else:
            try:
                pace = float(pace_text)
            except ValueError:
                raise ConfigError(
                    f"feeds.{dataset}: pace={pace_text!r} must be realtime, max or a speed factor"
                ) from None
            if not math.isfinite(pace) or pace <= 0:
                raise ConfigError(
                    f"feeds.{dataset}: pace={pace_text!r} must be a finite speed factor > 0"
                )
        loop = _flag(query.get("loop", "0"), "loop")
        # A file can always wait: at max speed it is lossless unless told otherwise.
        default_bp = "1" if pace is None else "0"
        bp = _flag(query.get("backpressure", default_bp), "backpressure")
        spec = FeedSpec(dataset, "file", uri, path=path, pace=pace, loop=loop, backpressure=bp)
    elif scheme == "ingest":
        known = {"backpressure", "idle_timeout_s", "allow"}
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(
                f"feeds.{dataset}: ingest port in {uri!r} must be a number 0-65535"
            ) from None
        if not parts.hostname or port is None:
            raise ConfigError(f"feeds.{dataset}: ingest URI needs HOST:PORT, got {uri!r}")
        bp = _flag(query.get("backpressure", "0"), "backpressure")
        idle = _number(dataset, query, "idle_timeout_s", str(DEFAULT_IDLE_TIMEOUT_S), float)
        if not math.isfinite(idle) or not 0 < idle <= MAX_IDLE_TIMEOUT_S:
            raise ConfigError(
                f"feeds.{dataset}: idle_timeout_s={query['idle_timeout_s']!r} must be a "
                f"number of seconds > 0 and <= {MAX_IDLE_TIMEOUT_S:g}"
            )
        allow = DEFAULT_ALLOW
        if "allow" in query:
            try:
                allow = parse_allow(query["allow"])
            except ValueError as exc:
                raise ConfigError(f"feeds.{dataset}: allow: {exc}") from None
        spec = FeedSpec(
            dataset,
            "ingest",
            uri,
            host=parts.hostname,
            port=port,
            backpressure=bp,
            idle_timeout_s=idle,
            allow=allow,
        )
    elif scheme == "lsg":
        known = set(RELAY_OPTIONS)
        bp = _flag(query.get("backpressure", "0"), "backpressure")
        relay = parse_relay(dataset, parts, query)
        spec = FeedSpec(dataset, "relay", uri, backpressure=bp, relay=relay)
    else:
        raise ConfigError(
            f"feeds.{dataset}: unknown feed URI {_redacted(uri)!r} "
            "(synthetic:, file:PATH, ingest://HOST:PORT or lsg://HOST:PORT)"
        )
    unknown = set(query) - known
    if unknown:
        raise ConfigError(
            f"feeds.{dataset}: unknown option {sorted(unknown)[0]!r} in {_redacted(uri)!r}"
        )
    return spec


def _redacted(uri: str) -> str:
    """The URI without its query: an option named wrong could be a key pasted in."""
    return uri.split("?", 1)[0] + ("?..." if "?" in uri else "")


def build_source(spec: FeedSpec, feed: Feed, *, reuse_port: bool = False) -> Source:
    if spec.kind == "synthetic":
        assert spec.synthetic is not None
        return SyntheticSource(feed, spec.synthetic)
    if spec.kind == "file":
        assert spec.path is not None
        return FileSource(feed, spec.path, spec.pace, spec.loop)
    if spec.kind == "relay":
        assert spec.relay is not None
        return RelaySource(feed, spec.relay)
    return IngestSource(
        feed, spec.host, spec.port, spec.idle_timeout_s, spec.allow, reuse_port=reuse_port
    )
