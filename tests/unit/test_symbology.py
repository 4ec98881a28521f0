"""gateway/symbology.py: the symbol directory and its log, and the symbology a feed finds in
its chunks and Metadata. Records in, pairs and chunks out; no feed, no sessions."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

from gateway import dbn
from gateway.symbology import (
    SymbolDirectory,
    mappings_in_chunk,
    mappings_in_metadata,
    without_gateway_records,
)

from .conftest import definition, trade

TS = 1_700_000_000_000_000_000


def mapping(iid: int, raw: str) -> bytes:
    return dbn.encode_symbol_mapping(TS, iid, dbn.STYPE_RAW_SYMBOL, raw, raw, TS)


def index_of(*records: bytes) -> dbn.ChunkIndex:
    index, used = dbn.index_records(b"".join(records))
    assert used == sum(map(len, records))
    return index


def test_directory_learns_both_ways_and_logs_every_change() -> None:
    directory = SymbolDirectory()
    assert directory.learn(" ESZ4 ", 1)  # stripped
    assert not directory.learn("ESZ4", 1)  # nothing new
    assert not directory.learn("  ", 9)  # no symbol
    assert directory.learn("NQZ4", 2)
    assert directory.learn("ESZ4", 3)  # remapped: the old id no longer names it
    assert directory.by_symbol == {"ESZ4": 3, "NQZ4": 2}
    assert directory.by_id == {2: "NQZ4", 3: "ESZ4"}
    assert directory.log == [("ESZ4", 1), ("NQZ4", 2), ("ESZ4", 3)]
    # a reader following the log skips entries no longer current
    assert [e for i, e in enumerate(directory.log) if directory.latest[e[0]] == i] == [
        ("NQZ4", 2),
        ("ESZ4", 3),
    ]
    assert len(directory) == 2


def test_learn_many_returns_what_changed_in_order() -> None:
    directory = SymbolDirectory()
    directory.learn("A", 1)
    changed = directory.learn_many([("A", 1), (" B", 2), ("A", 5), ("", 7), ("B", 2)])
    assert changed == [("B", 2), ("A", 5)]
    assert directory.log[-2:] == changed


def test_mappings_in_a_chunk_come_from_definitions_and_symbol_mappings_in_order() -> None:
    index = index_of(trade(1), definition(42, "ESZ4"), trade(2), mapping(43, "NQZ4"))
    assert mappings_in_chunk(index) == [("ESZ4", 42), ("NQZ4", 43)]
    assert mappings_in_chunk(index_of(trade(1), trade(2))) == []


def test_gateway_records_are_taken_out_of_the_data() -> None:
    system = dbn.encode_system(TS, "hello", dbn.SystemCode.HEARTBEAT)
    error = dbn.encode_error(TS, "oops", dbn.ErrorCode.INTERNAL_ERROR)
    records = [trade(1), system, definition(42, "ESZ4"), mapping(43, "NQZ4"), error, trade(2)]
    out = without_gateway_records(index_of(*records))
    assert bytes(out.data) == trade(1) + definition(42, "ESZ4") + trade(2)
    assert out.count == 3
    plain = index_of(trade(1), definition(42, "ESZ4"))
    assert without_gateway_records(plain) is plain  # nothing to take out: no copy


def test_mappings_in_decoded_metadata_take_each_symbols_last_interval() -> None:
    metadata = SimpleNamespace(
        mappings={
            "ESZ4": [{"symbol": "1"}, {"symbol": "7"}],
            "NQZ4": [{"symbol": "2"}],
            "ODD": [{"symbol": "not-an-id"}],
            "NONE": [],
        }
    )
    assert mappings_in_metadata(metadata) == [("ESZ4", 7), ("NQZ4", 2)]
    assert mappings_in_metadata(SimpleNamespace()) == []


def test_feeds_and_the_index_never_import_the_session_protocol() -> None:
    """A feed produces chunks and symbology; sessions are the index's members, seen only
    through the FeedMember protocol."""
    root = Path(__file__).resolve().parents[2] / "gateway"
    paths = [*sorted((root / "feeds").glob("*.py"))] + [
        root / name for name in ("symbology.py", "subscriptions.py", "interest.py")
    ]
    forbidden = {"gateway.session", "gateway.server", "gateway.connection"}
    for path in paths:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                names = {a.name for a in node.names}
            else:
                continue
            assert not names & forbidden, f"{path.name} imports {names & forbidden}"
