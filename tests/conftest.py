"""Shared test set-up: which event loop the suite runs on (GATEWAY_TEST_LOOP), where the
DBN sample files are (tests/data/dbn, inside the repository)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

TEST_LOOP = os.environ.get("GATEWAY_TEST_LOOP", "uvloop")

#: Databento's public DBN test files (see tests/data/README.md): the only sample data tests read.
DBN_SAMPLES = Path(__file__).resolve().parent / "data" / "dbn"


def dbn_sample_files() -> list[Path]:
    """Every sample file, sorted; fails loudly rather than let a test iterate over nothing."""
    files = sorted(DBN_SAMPLES.glob("*/*.dbn.zst"))
    assert len(files) >= 50, f"expected the DBN samples under {DBN_SAMPLES}, found {len(files)}"
    return files


def pytest_asyncio_loop_factories(
    config: Any, item: Any
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    if TEST_LOOP == "uvloop":
        import uvloop

        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}
