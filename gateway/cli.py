"""argv -> Config -> app.run. No logic beyond parsing and reporting errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway import __version__
from gateway.config import ApiKeyConfig, Config, load_config, validate
from gateway.errors import ConfigError

__all__ = ["build_parser", "config_from_args", "main"]

CONNECT_HELP = """\
Gateway {version} is serving {datasets} on {host}:{port}.

Connect with the official client (pip install databento):

    import databento as db
    client = db.Live(key="{key}", gateway="{host}", port={port})
    client.subscribe(dataset="{dataset}", schema="trades", symbols="ALL_SYMBOLS")
    for record in client:
        print(record)

API key: {key}   (demo key: for local use only)
Stop with Ctrl-C.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="A live market-data gateway speaking Databento's Live Raw API.",
    )
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway. Options override the config file.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="feed URIs:\n"
        "  synthetic:[?rate=2000&instruments=50&seed=7]   embedded demo feed\n"
        "  file:PATH[?pace=realtime|max|FACTOR&loop=1]    replay a .dbn/.dbn.zst file\n"
        "  ingest://HOST:PORT[?backpressure=1]            listen for a DBN publisher\n",
    )
    serve.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML config file (see README: Configuration)"
    )
    serve.add_argument("--host", help="address to listen on for clients (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="client port (default 13000; 0 picks one)")
    serve.add_argument(
        "--metrics-port",
        type=int,
        metavar="P",
        help="serve /metrics, /healthz, /readyz on this port (default: off)",
    )
    serve.add_argument("--metrics-host", help="address for the metrics port (default 127.0.0.1)")
    serve.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="accept this 32-character API key for every dataset (repeatable; never logged)",
    )
    serve.add_argument(
        "--feed",
        action="append",
        default=[],
        metavar="DATASET=URI",
        help="serve DATASET from URI (repeatable)",
    )
    serve.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        help="event loop (default auto: uvloop when installed)",
    )
    serve.add_argument("--log-format", choices=("text", "json"), help="log line format")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    serve.add_argument(
        "--heartbeat-interval",
        type=int,
        metavar="S",
        help="default heartbeat interval in seconds (5-30, default 30)",
    )
    serve.add_argument(
        "--print-connect-help",
        action="store_true",
        help="print how to connect once listening (used by make run)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config) if args.config else Config()
    for name in ("host", "port", "metrics_port", "metrics_host", "loop", "log_format", "log_level"):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    if args.heartbeat_interval is not None:
        cfg.default_heartbeat_s = args.heartbeat_interval
    for key in args.api_key:
        cfg.api_keys.append(ApiKeyConfig(key=key))
    for item in args.feed:
        dataset, sep, uri = item.partition("=")
        if not sep or not dataset or not uri:
            raise ConfigError(f"--feed {item!r}: expected DATASET=URI")
        cfg.feeds[dataset] = uri
    if not cfg.feeds:
        cfg.feeds["DEMO.SYNTH"] = "synthetic:"
    if not cfg.api_keys:
        raise ConfigError(
            "api_keys: no API key configured; pass --api-key KEY or list keys in the config file"
        )
    return validate(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"gateway: error: {exc}", file=sys.stderr)
        return 2
    if args.print_connect_help:
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
        dataset = next(iter(cfg.feeds))
        print(
            CONNECT_HELP.format(
                version=__version__,
                datasets=", ".join(cfg.feeds),
                host=host,
                port=cfg.port,
                key=cfg.api_keys[0].key,
                dataset=dataset,
            ),
            flush=True,
        )
    from gateway.app import run

    return run(cfg)
