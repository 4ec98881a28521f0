"""cffi build script (API mode, out-of-line) for the native order books.

Used by setup.py (``cffi_modules``), so ``pip install -e .`` / ``make install`` compile
``gateway.books._native._books`` (``_books.abi3.so`` beside the sources) from
gateway/books/_native/books.c. After editing the C: ``make install`` (it depends on the
sources), or ``.venv/bin/pip install -e . --no-deps`` (a few seconds).
"""

from __future__ import annotations

import os

from cffi import FFI  # type: ignore[import-untyped]  # no stubs shipped

_HERE = os.path.dirname(os.path.abspath(__file__))
_NATIVE = os.path.join(_HERE, "_native")
_ROOT = os.path.dirname(os.path.dirname(_HERE))

CDEF = """
typedef struct nb_engine nb_engine;
typedef struct {
    const uint8_t *mbp1; size_t mbp1_len; uint64_t mbp1_count;
    const uint8_t *mbp10; size_t mbp10_len; uint64_t mbp10_count;
    const uint8_t *trades; size_t trades_len; uint64_t trades_count;
    size_t consumed;
    int error;
} nb_result;
typedef struct {
    uint64_t books; uint64_t orders; uint64_t levels; uint64_t memory_bytes;
    uint64_t records_applied; uint64_t unknown_cancels;
} nb_stats;
typedef struct {
    uint64_t order_id; int64_t price; uint64_t ts_event; uint32_t size; uint32_t sequence;
    char side;
} nb_order_out;
typedef struct { int64_t price; uint64_t size; uint32_t count; } nb_level_out;
nb_engine *nb_new(void);
void nb_free(nb_engine *e);
int nb_apply(nb_engine *e, const uint8_t *data, size_t n, int want, nb_result *out);
int nb_snapshot(nb_engine *e, const uint32_t *iids, size_t n_iids, int all, uint64_t ts_recv,
                const uint8_t **out, size_t *out_len, uint64_t *count);
void nb_get_stats(const nb_engine *e, nb_stats *out);
size_t nb_levels(const nb_engine *e, uint32_t iid, uint16_t pub, char side, size_t depth,
                 nb_level_out *out);
size_t nb_order_count(const nb_engine *e, uint32_t iid, uint16_t pub);
size_t nb_orders(const nb_engine *e, uint32_t iid, uint16_t pub, nb_order_out *out, size_t cap);
"""


def make_builder() -> FFI:
    # setuptools wants source paths relative to setup.py's folder (the repository root)
    native = os.path.relpath(_NATIVE, _ROOT)
    builder = FFI()
    builder.cdef(CDEF)
    builder.set_source(
        "gateway.books._native._books",
        '#include "books.h"',
        sources=[os.path.join(native, "books.c")],
        include_dirs=[_NATIVE],
        depends=[os.path.join(native, "books.h")],
        extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"],
    )
    return builder


ffibuilder = make_builder()
