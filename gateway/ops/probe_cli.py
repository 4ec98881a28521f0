"""``gateway probe``: the uptime probe as its own process (arguments, one strobe or a
strobe every ``--interval`` seconds with its own /metrics and /status)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal

from gateway.config import key_file_warning, resolve_probe_key
from gateway.errors import ConfigError
from gateway.metrics import ProbeMetrics
from gateway.ops.history import StrobeRecord, default_history_path
from gateway.ops.http import StatusServer
from gateway.ops.logs import setup_logging
from gateway.ops.probe import Prober, ProbeTarget, open_history
from gateway.transport import run_loop

__all__ = ["add_arguments", "format_result", "run_probe"]

log = logging.getLogger("gateway.probe")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="gateway host")
    parser.add_argument("--port", type=int, default=13000, help="gateway client port")
    parser.add_argument(
        "--key-file",
        metavar="FILE",
        help="read the API key to strobe with from FILE (one key; blank lines and # comments "
        "ignored). Without --key and --key-file: the DATABENTO_API_KEY environment variable",
    )
    parser.add_argument(
        "--key",
        help="API key to strobe with; wins over --key-file and DATABENTO_API_KEY. For local "
        "tests only: a key on the command line shows in ps. Never logged",
    )
    parser.add_argument("--dataset", required=True, help="dataset to subscribe to")
    parser.add_argument("--symbol", default="ALL_SYMBOLS", help="symbol to subscribe to")
    parser.add_argument("--schema", default="trades", help="schema to subscribe to")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between strobes")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds each step may take")
    parser.add_argument("--once", action="store_true", help="one strobe; exit 0 on success")
    parser.add_argument(
        "--json", action="store_true", help="with --once: print the result as one JSON line"
    )
    parser.add_argument(
        "--history",
        metavar="FILE",
        default=str(default_history_path()),
        help="SQLite uptime history, one file for any number of targets",
    )
    parser.add_argument(
        "--no-history", action="store_true", help="keep no history (figures from this run only)"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="P",
        help="serve /metrics, /status and /status.json on this port (0 picks one)",
    )
    parser.add_argument("--metrics-host", default="127.0.0.1", help="address for the metrics port")
    parser.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop (auto: uvloop when installed)",
    )
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="log line format"
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="the least severe log lines written",
    )


def run_probe(args: argparse.Namespace) -> int:
    setup_logging(args.log_format, args.log_level)
    key, _ = resolve_probe_key(args.key, args.key_file)
    if args.key_file is not None:
        warning = key_file_warning(args.key_file, "--key-file")
        if warning is not None:
            log.warning("%s", warning)
    target = ProbeTarget(
        host=args.host,
        port=args.port,
        key=key,
        dataset=args.dataset,
        symbol=args.symbol,
        schema=args.schema,
        timeout_s=args.timeout,
    ).validate()
    if args.interval <= 0:
        raise ConfigError("interval: must be > 0")
    path = ":memory:" if args.no_history else (args.history or str(default_history_path()))
    history = open_history(path)
    prober = Prober(target, interval_s=args.interval, metrics=ProbeMetrics(), history=history)
    main = _once(prober, args.json) if args.once else _forever(prober, args)
    return run_loop(main, args.loop)


def format_result(rec: StrobeRecord) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.1f} ms"

    timings = (
        f"connect {ms(rec.connect_s)}, auth {ms(rec.auth_s)}, "
        f"first record {ms(rec.first_record_s)}, total {ms(rec.total_s)}"
    )
    if rec.ok:
        fresh = "-" if rec.freshness_s is None else f"{rec.freshness_s:.3f} s"
        return f"probe ok {rec.target}: {timings}; feed freshness {fresh}"
    return f"probe failed at step {rec.step} ({rec.target}): {rec.error}; {timings}"


async def _once(prober: Prober, as_json: bool) -> int:
    try:
        rec = await prober.run_once()
    finally:
        await asyncio.to_thread(prober.history.close)
    print(json.dumps(rec.as_dict()) if as_json else format_result(rec), flush=True)
    return 0 if rec.ok else 1


async def _forever(prober: Prober, args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await prober.load()
    http: StatusServer | None = None
    if args.metrics_port is not None:
        http = StatusServer(None, registry=prober.metrics.registry, prober=prober)
        port = await http.start(args.metrics_host, args.metrics_port)
        print(f"probe metrics_port={port}", flush=True)
    log.info(
        "probe every %gs target=%s schema=%s symbol=%s history=%s",
        prober.interval_s,
        prober.target.name,
        prober.target.schema,
        prober.target.symbol,
        prober.history.path,
    )
    task = prober.start()
    stopper = loop.create_task(stop.wait())
    await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    await prober.stop()
    if http is not None:
        await http.stop()
    log.info("probe stopped")
    return 0
