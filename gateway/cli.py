"""argv -> Config -> app.run. No logic beyond parsing and reporting errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway import __version__
from gateway.config import (
    ApiKeyConfig,
    Config,
    WorkersConfig,
    dump_config,
    key_file_warning,
    load_config,
    read_key_file,
    validate,
)
from gateway.errors import ConfigError, GatewayError
from gateway.ops.logs import print_error

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = [
    "DEMO_KEY",
    "SERVE_FLAGS",
    "Flag",
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


def _cpu_list(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(
            f"--cpu-affinity {text!r}: expected CPU numbers such as 2 or 2,3"
        ) from None


def _workers_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--workers {text!r}: expected a number of workers or auto") from None


@dataclass(frozen=True)
class Flag:
    """One ``gateway serve`` option: how argparse reads it and which config field it
    overrides. A row with a ``path`` is applied by :func:`config_from_args` when the option is
    given; ``--config``, the key and feed options (added to lists, with their own checks) and
    ``--print-connect-help`` have none."""

    name: str
    help: str
    #: the config field it overrides: ``port``, ``transport.kind``, ``strobe.enabled``
    path: str | None = None
    #: argparse ``type``: turns the option's text into a value
    value_type: Callable[[str], Any] | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    #: argparse action: ``append`` (a list, default []), ``store_const`` (``const`` or None),
    #: ``store_true``, ``argparse.BooleanOptionalAction``
    action: str | type[argparse.Action] | None = None
    const: Any = None
    #: the parsed value -> the field's value (a ConfigError names the flag)
    convert: Callable[[Any], Any] | None = None
    #: the --help section (None: the options)
    group: str | None = None

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    def argparse_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"help": self.help}
        if self.value_type is not None:
            kw["type"] = self.value_type
        for key in ("metavar", "choices", "action", "const"):
            if getattr(self, key) is not None:
                kw[key] = getattr(self, key)
        if self.action == "append":
            kw["default"] = []
        elif self.action is argparse.BooleanOptionalAction:
            kw["default"] = None
        return kw


TRANSPORT = "transport (see README: Kernel bypass)"
JOURNAL = "journal and replay (see README: Replay)"
STROBE = "uptime strobe (see README: Operating it)"

#: every ``gateway serve`` option, in --help order: adding an override is one row
SERVE_FLAGS: tuple[Flag, ...] = (
    Flag(
        "--config", "TOML config file (see README: Configuration)", value_type=Path, metavar="FILE"
    ),
    Flag("--host", "address to listen on for clients (default 127.0.0.1)", "host"),
    Flag("--port", "client port (default 13000; 0 picks one)", "port", value_type=int),
    Flag(
        "--metrics-port",
        "serve /metrics, /healthz, /readyz, /status on this port (default: off)",
        "metrics_port",
        value_type=int,
        metavar="P",
    ),
    Flag("--metrics-host", "address for the metrics port (default 127.0.0.1)", "metrics_host"),
    Flag(
        "--api-key-file",
        "accept the API keys in FILE for every dataset: one 32-character key per line, "
        "blank lines and # comments ignored (repeatable; keys are never logged)",
        action="append",
        metavar="FILE",
    ),
    Flag(
        "--api-key",
        "accept this API key for every dataset (repeatable). For local demos only: "
        "a key on the command line shows in ps; use --api-key-file or the config file",
        action="append",
        metavar="KEY",
    ),
    Flag(
        "--feed",
        "serve DATASET from URI (repeatable)",
        action="append",
        metavar="DATASET=URI",
    ),
    Flag(
        "--workers",
        "worker processes sharing the client port (default 1: one process; auto: one per "
        "CPU; see README: Multi-core)",
        metavar="N|auto",
    ),
    Flag(
        "--loop",
        "event loop (default auto: uvloop when installed)",
        "loop",
        choices=("auto", "uvloop", "asyncio"),
    ),
    Flag("--log-format", "log line format", "log_format", choices=("text", "json")),
    Flag(
        "--log-level",
        "least severe log lines written to stderr (default info; debug is verbose)",
        "log_level",
        choices=("debug", "info", "warning", "error"),
    ),
    Flag(
        "--heartbeat-interval",
        "default heartbeat interval in seconds (5-30, default 30)",
        "default_heartbeat_s",
        value_type=int,
        metavar="S",
    ),
    Flag(
        "--transport",
        "plain (default), onload, vma, exasock or preload:PATH",
        "transport.kind",
        metavar="KIND",
        group=TRANSPORT,
    ),
    Flag(
        "--transport-profile",
        "vendor profile for a bypass transport (onload default: latency)",
        "transport.profile",
        metavar="NAME",
        group=TRANSPORT,
    ),
    Flag(
        "--env-file",
        "KEY=VALUE file (e.g. EF_* overrides) that wins over the profile",
        "transport.env_file",
        metavar="FILE",
        group=TRANSPORT,
    ),
    Flag(
        "--bypass-required",
        "when a bypass transport is requested but not loaded: fail (true, default) or only "
        "warn (false)",
        "transport.bypass_required",
        choices=("true", "false"),
        convert=lambda value: value == "true",
        group=TRANSPORT,
    ),
    Flag(
        "--sndbuf",
        "SO_SNDBUF for client sockets",
        "transport.sndbuf",
        value_type=int,
        metavar="BYTES",
        group=TRANSPORT,
    ),
    Flag(
        "--rcvbuf",
        "SO_RCVBUF for client sockets",
        "transport.rcvbuf",
        value_type=int,
        metavar="BYTES",
        group=TRANSPORT,
    ),
    Flag(
        "--busy-poll-us",
        "SO_BUSY_POLL for client sockets (needs CAP_NET_ADMIN to raise)",
        "transport.busy_poll_us",
        value_type=int,
        metavar="US",
        group=TRANSPORT,
    ),
    Flag(
        "--cpu-affinity",
        "pin the event-loop thread to these CPUs, e.g. 2 or 2,3",
        "transport.cpu_affinity",
        metavar="CPUS",
        convert=_cpu_list,
        group=TRANSPORT,
    ),
    Flag(
        "--reuse-port",
        "listen with SO_REUSEPORT, so a successor can take over without downtime "
        "(default: on for fixed ports, off for port 0)",
        "transport.reuse_port",
        action=argparse.BooleanOptionalAction,
        group=TRANSPORT,
    ),
    Flag(
        "--strobe",
        "probe this gateway like a customer every few seconds (metrics, /status)",
        "strobe.enabled",
        action="store_const",
        const=True,
        group=STROBE,
    ),
    Flag(
        "--strobe-interval",
        "seconds between strobes",
        "strobe.interval_s",
        value_type=float,
        metavar="S",
        group=STROBE,
    ),
    Flag(
        "--strobe-history",
        "SQLite uptime history (default $XDG_STATE_HOME/gateway/probe.sqlite)",
        "strobe.history",
        metavar="FILE",
        group=STROBE,
    ),
    Flag(
        "--journal-dir",
        "keep a journal of every feed in DIR and serve replays (start=) from it "
        "(default: no journal)",
        "journal.dir",
        metavar="DIR",
        group=JOURNAL,
    ),
    Flag(
        "--journal-retention-s",
        "keep this many seconds of record time per dataset (default 86400)",
        "journal.retention_s",
        value_type=float,
        metavar="S",
        group=JOURNAL,
    ),
    Flag(
        "--journal-max-bytes",
        "keep the journal directory under this many bytes (default 8 GiB)",
        "journal.max_bytes",
        value_type=int,
        metavar="BYTES",
        group=JOURNAL,
    ),
    Flag(
        "--print-connect-help",
        "print how to connect once listening (used by make run)",
        action="store_true",
    ),
)


def set_path(cfg: Config, path: str, value: Any) -> None:
    """Set the config field at a dotted ``path`` (``transport.kind``)."""
    *parents, name = path.split(".")
    target: Any = cfg
    for part in parents:
        target = getattr(target, part)
    setattr(target, name, value)


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
        "      (&schemas=mbo: an MBO order flow instead)\n"
        "  file:PATH[?pace=realtime|max|FACTOR&loop=1]    replay a .dbn/.dbn.zst file\n"
        "  ingest://HOST:PORT[?backpressure=1]            listen for a DBN publisher\n",
    )
    groups: dict[str | None, argparse._ActionsContainer] = {None: serve}
    for flag in SERVE_FLAGS:
        if flag.group not in groups:
            groups[flag.group] = serve.add_argument_group(flag.group)
        groups[flag.group].add_argument(flag.name, **flag.argparse_kwargs())
    probe = sub.add_parser(
        "probe",
        help="strobe a gateway like a customer (connect, auth, subscribe, first record)",
        description="Connect, authenticate, subscribe and wait for a record, like a customer; "
        "export the results as Prometheus metrics and keep an uptime history.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from gateway.ops.probe_cli import add_arguments

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
    """The config file (if any), then every option given (:data:`SERVE_FLAGS`), the API keys
    and feeds added; validated."""
    cfg = load_config(args.config) if args.config else Config()
    for flag in SERVE_FLAGS:
        value = getattr(args, flag.dest)
        if flag.path is not None and value is not None:
            set_path(cfg, flag.path, flag.convert(value) if flag.convert else value)
    if args.workers is not None:
        count = _workers_arg(args.workers)
        if isinstance(cfg.workers, WorkersConfig):
            cfg.workers.count = count  # type: ignore[assignment]  # validate() checks it
        else:
            cfg.workers = count  # type: ignore[assignment]
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
        from gateway.ops.probe_cli import run_probe

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
