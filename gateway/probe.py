"""The uptime probe: uses the gateway like a customer and records the result.

Skeleton: the command line is defined here; the probe itself is not built yet.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from gateway.errors import NotSupportedError

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["add_arguments", "run_probe", "start_strobe"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="gateway host")
    parser.add_argument("--port", type=int, default=13000, help="gateway client port")
    parser.add_argument("--key", required=True, help="API key to strobe with")
    parser.add_argument("--dataset", required=True, help="dataset to subscribe to")
    parser.add_argument("--symbol", default="ALL_SYMBOLS", help="symbol to subscribe to")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between strobes")
    parser.add_argument("--once", action="store_true", help="one strobe; exit 0 on success")


def run_probe(args: argparse.Namespace) -> int:
    raise NotSupportedError("gateway probe is not supported yet")


async def start_strobe(gateway: Gateway) -> Any:
    raise NotSupportedError("--strobe is not supported yet")
