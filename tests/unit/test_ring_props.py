"""Property test of the shared ring against a model: random entry sizes and kinds, two
readers at their own pace that hold some payload views for a while. Every reader sees
exactly what was written, in order; a view a reader still holds (its release is below it)
is never overwritten; the writer refuses only when a live slot holds the space, and never
lets head run more than the ring ahead of a live release."""

from __future__ import annotations

import os

from hypothesis import given, settings, strategies as st

from gateway.workers.ring import (
    CHUNK,
    ENTRY_HEADER,
    LEARN,
    STATE,
    Entry,
    Ring,
    RingReader,
    RingWriter,
)

SIZE = 16 * 1024

write_op = st.tuples(
    st.just("write"),
    st.one_of(st.integers(0, 300), st.integers(0, SIZE // 2), st.integers(0, SIZE - ENTRY_HEADER)),
    st.sampled_from([CHUNK, CHUNK, LEARN, STATE]),
)
read_op = st.tuples(st.just("read"), st.integers(0, 1), st.integers(1, 4), st.booleans())
release_op = st.tuples(st.just("release"), st.integers(0, 1))
drop_op = st.tuples(st.just("drop"), st.integers(0, 1))
ops = st.lists(st.one_of(write_op, write_op, read_op, release_op, drop_op), max_size=60)


def fill(i: int, n: int) -> bytes:
    return (i.to_bytes(4, "little") * (n // 4 + 1))[:n]


@settings(max_examples=150, deadline=None, database=None)
@given(ops)
def test_ring_matches_a_model(program):
    ring = Ring.create(SIZE, 2)
    mapped = Ring.attach(ring.name, creator=os.getpid())
    try:
        w = RingWriter(ring)
        w.set_live(0, True)
        w.set_live(1, True)
        readers = [RingReader(mapped, 0), RingReader(mapped, 1)]
        written: list[tuple[int, bytes, int]] = []  # (kind, payload, seq) in order
        next_index = [0, 0]
        held: list[list[tuple[Entry, bytes]]] = [[], []]
        for op in program:
            if op[0] == "write":
                _, n, kind = op
                data = fill(len(written), n)
                seq = len(written) + 1
                pos = w.try_write(kind, data, seq=seq, records=n % 7)
                if pos is None:
                    assert w.holders(), "refused with no live slot holding the space"
                else:
                    written.append((kind, data, seq))
                    low = min(w.release_of(0), w.release_of(1))
                    assert w.head - low <= SIZE
            elif op[0] == "read":
                _, r, count, hold = op
                for _ in range(count):
                    e = readers[r].next()
                    if e is None:
                        assert next_index[r] == len(written)
                        break
                    kind, data, seq = written[next_index[r]]
                    assert (e.kind, bytes(e.payload), e.seq, e.records) == (
                        kind,
                        data,
                        seq,
                        len(data) % 7,
                    )
                    next_index[r] += 1
                    if hold:
                        held[r].append((e, data))
            elif op[0] == "release":
                r = op[1]
                oldest = held[r][0][0].pos if held[r] else readers[r].pos
                readers[r].release(min(oldest, readers[r].pos))
            else:
                held[op[1]].clear()
            for views in held:
                for e, data in views:
                    assert bytes(e.payload) == data, "a held entry was overwritten"
        # both readers drain what is left, in order
        for r in (0, 1):
            held[r].clear()
            while (e := readers[r].next()) is not None:
                assert e.seq == written[next_index[r]][2]
                next_index[r] += 1
            assert next_index[r] == len(written)
    finally:
        mapped.close()
        ring.close()
        ring.unlink()
