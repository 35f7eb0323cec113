"""The vector copy (funnel.py, `FunnelVectors`) without a graph: writes cost the change, not
the copy's size, and a reader running beside a writer never scores one record with another
record's vector, although rows are written in place and freed rows are reused."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np

from retrievekit.funnel import FunnelVectors
from retrievekit.records import Record

DIM = 8


def _vector(n: int) -> np.ndarray:
    """A unit vector whose similarity with e0 is 1 / sqrt(1 + (n / 100)^2): one per record."""
    v = np.zeros(DIM, np.float32)
    v[0], v[1] = 1.0, n / 100
    return v / np.linalg.norm(v)


def _records(parent: str, first: int, n: int) -> tuple[list[Record], dict[str, np.ndarray]]:
    ids = [f"{parent}:{i}" for i in range(first, first + n)]
    return ([Record(i, parent, "", {}) for i in ids],
            {i: _vector(first + k) for k, i in enumerate(ids)})


def test_a_small_write_copies_nothing_and_growth_is_amortized():
    fv = FunnelVectors(DIM, None)
    for start in range(0, 5000, 100):  # 50 writes of 100 records
        fv.replace((), *_records(f"d{start}", start, 100))
    assert len(fv) == 5000
    matrix = fv._matrix
    fv.replace(["d0"], *_records("d0", 7, 3))  # a document replaced by a smaller one
    fv.replace((), *_records("new", 9000, 1))
    assert fv._matrix is matrix  # written in place: no copy of the 5,000 rows
    q = _vector(0)
    sims = fv.similarities(["d0:7", "d0:50", "new:9000", "d100:150"], q)
    expected = [_vector(n) @ q for n in (7, 9000, 150)]
    assert np.isneginf(sims[1])
    np.testing.assert_allclose(sims[[0, 2, 3]], expected, rtol=1e-6)
    grown = 0
    for start in range(10_000, 30_000, 100):  # 200 more writes: the matrix doubles a few times
        before = fv._matrix
        fv.replace((), *_records(f"e{start}", start, 100))
        grown += fv._matrix is not before
    assert 1 <= grown <= 4


def test_a_reader_beside_a_writer_never_gets_another_records_vector():
    """The writer drops one document and writes another into the freed rows, over and over;
    every score the reader gets is its own record's, or -inf while the record is away."""
    fv = FunnelVectors(DIM, None)
    a, a_vec = _records("a", 0, 300)
    b, b_vec = _records("b", 1000, 300)
    fv.replace((), a, a_vec)
    ids = [r.id for r in a + b]
    q = _vector(0)
    expected = np.array([float(_vector(int(i.split(":")[1])) @ q) for i in ids])
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            fv.replace(["a"], b, b_vec)  # b takes the rows a leaves
            fv.replace(["b"], a, a_vec)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    thread = threading.Thread(target=writer)
    thread.start()
    wrong = reads = 0
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            sims = fv.similarities(ids, q)
            held = np.isfinite(sims)
            wrong += int((np.abs(sims[held] - expected[held]) > 1e-6).sum())
            reads += 1
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old)
    assert reads > 50
    assert wrong == 0
