"""argv -> Config -> app.run. No logic beyond parsing and reporting errors."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gateway import __version__
from gateway.config import (
    ApiKeyConfig,
    Config,
    dump_config,
    key_file_warning,
    load_config,
    read_key_file,
    validate,
)
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = [
    "DEMO_KEY",
    "build_parser",
    "check_config",
    "config_from_args",
    "connect_help",
    "main",
    "print_error",
]

#: the public demo key of ``make run`` (the Makefile's DEMO_KEY); the only key
#: ``--print-connect-help`` ever prints
DEMO_KEY = "db-DEMO0000000000000000000000000"
KEY_PLACEHOLDER = "<your API key>"

CONNECT_HELP = """\
Gateway {version} is serving {datasets} on {host}:{port}.

Connect with the official client (pip install databento):

    import databento as db
    client = db.Live(key="{key}", gateway="{host}", port={port})
    client.subscribe(dataset="{dataset}", schema="trades", symbols="ALL_SYMBOLS")
    for record in client:
        print(record)

{key_line}
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
        help="serve /metrics, /healthz, /readyz, /status on this port (default: off)",
    )
    serve.add_argument("--metrics-host", help="address for the metrics port (default 127.0.0.1)")
    serve.add_argument(
        "--api-key-file",
        action="append",
        default=[],
        metavar="FILE",
        help="accept the API keys in FILE for every dataset: one 32-character key per line, "
        "blank lines and # comments ignored (repeatable; keys are never logged)",
    )
    serve.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="accept this API key for every dataset (repeatable). For local demos only: "
        "a key on the command line shows in ps; use --api-key-file or the config file",
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
    serve.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="least severe log lines written to stderr (default info; debug is verbose)",
    )
    serve.add_argument(
        "--heartbeat-interval",
        type=int,
        metavar="S",
        help="default heartbeat interval in seconds (5-30, default 30)",
    )
    tr = serve.add_argument_group("transport (see README: Kernel bypass)")
    tr.add_argument(
        "--transport", metavar="KIND", help="plain (default), onload, vma, exasock or preload:PATH"
    )
    tr.add_argument(
        "--transport-profile",
        metavar="NAME",
        help="vendor profile for a bypass transport (onload default: latency)",
    )
    tr.add_argument(
        "--env-file",
        metavar="FILE",
        help="KEY=VALUE file (e.g. EF_* overrides) that wins over the profile",
    )
    tr.add_argument(
        "--bypass-required",
        choices=("true", "false"),
        help="when a bypass transport is requested but not loaded: fail (true, "
        "default) or only warn (false)",
    )
    tr.add_argument("--sndbuf", type=int, metavar="BYTES", help="SO_SNDBUF for client sockets")
    tr.add_argument("--rcvbuf", type=int, metavar="BYTES", help="SO_RCVBUF for client sockets")
    tr.add_argument(
        "--busy-poll-us",
        type=int,
        metavar="US",
        help="SO_BUSY_POLL for client sockets (needs CAP_NET_ADMIN to raise)",
    )
    tr.add_argument(
        "--cpu-affinity",
        metavar="CPUS",
        help="pin the event-loop thread to these CPUs, e.g. 2 or 2,3",
    )
    tr.add_argument(
        "--reuse-port",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="listen with SO_REUSEPORT, so a successor can take over without downtime "
        "(default: on for fixed ports, off for port 0)",
    )
    st = serve.add_argument_group("uptime strobe (see README: Operating it)")
    st.add_argument(
        "--strobe",
        action="store_true",
        help="probe this gateway like a customer every few seconds (metrics, /status)",
    )
    st.add_argument("--strobe-interval", type=float, metavar="S", help="seconds between strobes")
    st.add_argument(
        "--strobe-history",
        metavar="FILE",
        help="SQLite uptime history (default $XDG_STATE_HOME/gateway/probe.sqlite)",
    )
    serve.add_argument(
        "--print-connect-help",
        action="store_true",
        help="print how to connect once listening (used by make run)",
    )
    probe = sub.add_parser(
        "probe",
        help="strobe a gateway like a customer (connect, auth, subscribe, first record)",
        description="Connect, authenticate, subscribe and wait for a record, like a customer; "
        "export the results as Prometheus metrics and keep an uptime history.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from gateway.probe import add_arguments

    add_arguments(probe)
    check = sub.add_parser(
        "check-config",
        help="validate a config file and print the effective config (keys masked)",
        description="Validate a TOML config file as `gateway serve --config FILE` would and "
        "print the effective config (defaults filled in, API keys masked). Exits 0 when it "
        "is valid, 2 naming the bad field when it is not.",
    )
    check.add_argument("file", type=Path, metavar="FILE", help="TOML config file")
    check.add_argument(
        "--format",
        choices=("toml", "json"),
        default="toml",
        help="how to print the effective config (default toml)",
    )
    return parser


def print_error(text: str, fmt: str = "text", level: str = "error", prog: str = "gateway") -> None:
    """A fatal error or a warning on stderr: ``gateway: error: ...``, or one JSON line
    (``--log-format json``: every stderr line is JSON)."""
    if fmt == "json":
        doc = {
            "ts": round(time.time(), 6),
            "level": level,
            "logger": prog.replace(" ", "."),
            "msg": text,
            "event": "fatal" if level == "error" else level,
        }
        line = json.dumps(doc)
    else:
        line = f"{prog}: {level}: {text}"
    print(line, file=sys.stderr, flush=True)


def _log_format(args: argparse.Namespace) -> str:
    """The log format asked for, also when the config file itself is what failed: the
    flag, else ``log_format`` read leniently from the file, else text."""
    if getattr(args, "log_format", None):
        return str(args.log_format)
    path = getattr(args, "config", None)
    if path is None:
        return "text"
    import msgspec

    try:
        doc = msgspec.toml.decode(path.read_bytes())
    except (OSError, msgspec.DecodeError):
        return "text"
    value = doc.get("log_format") if isinstance(doc, dict) else None
    return "json" if value == "json" else "text"


def check_config(path: Path, fmt: str = "toml") -> int:
    """``gateway check-config FILE``: 0 and the effective config on stdout, or 2 and the
    error (naming the field) on stderr."""
    try:
        cfg = validate(load_config(path))
    except ConfigError as exc:
        print(f"gateway: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(dump_config(cfg, "json" if fmt == "json" else "toml"))
    if not cfg.api_keys:
        print(
            f"gateway: note: {path} lists no API keys: serve needs --api-key-file FILE",
            file=sys.stderr,
        )
    return 0


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config) if args.config else Config()
    for name in ("host", "port", "metrics_port", "metrics_host", "loop", "log_format", "log_level"):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    t = cfg.transport
    if args.transport is not None:
        t.kind = args.transport
    if args.transport_profile is not None:
        t.profile = args.transport_profile
    if args.env_file is not None:
        t.env_file = args.env_file
    if args.bypass_required is not None:
        t.bypass_required = args.bypass_required == "true"
    for name in ("sndbuf", "rcvbuf", "busy_poll_us"):
        if getattr(args, name) is not None:
            setattr(t, name, getattr(args, name))
    if args.cpu_affinity is not None:
        try:
            t.cpu_affinity = [int(c) for c in args.cpu_affinity.split(",") if c.strip()]
        except ValueError:
            raise ConfigError(
                f"--cpu-affinity {args.cpu_affinity!r}: expected CPU numbers such as 2 or 2,3"
            ) from None
    if args.reuse_port is not None:
        t.reuse_port = args.reuse_port
    if args.heartbeat_interval is not None:
        cfg.default_heartbeat_s = args.heartbeat_interval
    if args.strobe:
        cfg.strobe.enabled = True
    if args.strobe_interval is not None:
        cfg.strobe.interval_s = args.strobe_interval
    if args.strobe_history is not None:
        cfg.strobe.history = args.strobe_history
    for key in args.api_key:
        cfg.api_keys.append(ApiKeyConfig(key=key))
    for path in args.api_key_file:
        for line, key in read_key_file(path, "--api-key-file"):
            if any(k.key == key for k in cfg.api_keys):
                raise ConfigError(
                    f"--api-key-file {path} line {line}: duplicate key (already configured "
                    "by the config file, --api-key or an earlier --api-key-file)"
                )
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
            "api_keys: no API key configured; list keys in the config file ([[api_keys]]) "
            "or pass --api-key-file FILE (--api-key KEY for local demos)"
        )
    return validate(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "probe":
        from gateway.errors import GatewayError
        from gateway.probe import run_probe

        try:
            return run_probe(args)
        except GatewayError as exc:
            print_error(str(exc), getattr(args, "log_format", "text"), prog="gateway probe")
            return 2
    if args.command == "check-config":
        return check_config(args.file, args.format)
    if args.command != "serve":
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print_error(str(exc), _log_format(args))
        return 2
    from gateway import transport
    from gateway.app import run

    try:  # a bypass transport execs here (same pid), once, before anything is printed
        transport.maybe_relaunch(cfg, sys.argv if argv is None else ["gateway", *argv])
    except ConfigError as exc:
        print_error(str(exc), cfg.log_format)
        return 2
    for path in args.api_key_file:
        warning = key_file_warning(path, "--api-key-file")
        if warning is not None:
            print_error(warning, cfg.log_format, "warning")

    def print_connect_help(gw: Gateway) -> None:
        print(connect_help(cfg, gw.port), flush=True)

    # printed once listening, with the bound port (--port 0; a port in use prints nothing)
    # SIGHUP: the config file and key files read again, the same way (keys and limits apply)
    return run(
        cfg,
        on_listening=print_connect_help if args.print_connect_help else None,
        reload=lambda: config_from_args(args),
    )


def connect_help(cfg: Config, port: int) -> str:
    """How to connect to a gateway listening on ``port``. Only the public demo key is
    ever printed; any other key is a placeholder."""
    host = cfg.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if any(k.key == DEMO_KEY for k in cfg.api_keys):
        key = DEMO_KEY
        key_line = f"API key: {DEMO_KEY}   (demo key: for local use only)"
    else:
        key = KEY_PLACEHOLDER
        key_line = "API key: one of the keys you configured (not printed)"
    return CONNECT_HELP.format(
        version=__version__,
        datasets=", ".join(cfg.feeds),
        host=host,
        port=port,
        key=key,
        key_line=key_line,
        dataset=next(iter(cfg.feeds)),
    )
