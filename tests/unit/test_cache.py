"""Tests of retrievekit.cache.EmbeddingCache: exact round trips, keys, threads, processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from retrievekit.cache import EmbeddingCache
from retrievekit.errors import InvalidInputError, StoreError

SRC = Path(__file__).resolve().parents[2] / "src"
BASE = dict(model_id="org/model@rev1", prefix="query: ", truncate_dim=None, normalize=True)


@pytest.fixture()
def cache(tmp_path: Path):
    c = EmbeddingCache(tmp_path / "emb.sqlite")
    yield c
    c.close()


def _key(**overrides) -> str:
    args = {**BASE, "text": "hello", **overrides}
    return EmbeddingCache.key_for(**args)


def test_round_trip_is_byte_exact(cache: EmbeddingCache) -> None:
    rng = np.random.default_rng(0)
    vecs = {_key(text=f"t{i}"): rng.standard_normal(384).astype(np.float32) for i in range(20)}
    # values that a lossy path (text, float64 round trip via str) would disturb
    special = np.array([-0.0, 1e-45, 3.4028235e38, -1.1754944e-38, 0.1], dtype=np.float32)
    vecs[_key(text="special")] = special
    cache.put_many(vecs)
    got = cache.get_many(list(vecs))
    assert set(got) == set(vecs)
    for key, vec in vecs.items():
        assert got[key].dtype == np.float32
        assert got[key].shape == vec.shape
        assert got[key].tobytes() == vec.tobytes()
    assert len(cache) == 21


def test_float64_input_is_stored_as_float32(cache: EmbeddingCache) -> None:
    vec = np.array([0.1, 0.2, 0.3], dtype=np.float64)
    cache.put_many({"k": vec})
    assert cache.get_many(["k"])["k"].tobytes() == vec.astype(np.float32).tobytes()


def test_returned_arrays_are_independent(cache: EmbeddingCache) -> None:
    cache.put_many({"k": np.ones(4, dtype=np.float32)})
    first = cache.get_many(["k"])["k"]
    first[:] = 7.0  # writable, and writing does not touch the cache
    assert cache.get_many(["k"])["k"].tolist() == [1.0, 1.0, 1.0, 1.0]


def test_missing_keys_are_absent(cache: EmbeddingCache) -> None:
    assert cache.get_many([]) == {}
    cache.put_many({"a": np.zeros(2, dtype=np.float32)})
    got = cache.get_many(["a", "b", "a"])
    assert list(got) == ["a"]
    assert "a" in cache and "b" not in cache


def test_many_keys_beyond_one_select_batch(cache: EmbeddingCache) -> None:
    vecs = {f"k{i}": np.full(2, i, dtype=np.float32) for i in range(1203)}
    cache.put_many(vecs)
    got = cache.get_many(list(vecs) + ["absent"])
    assert len(got) == 1203
    assert got["k1202"].tolist() == [1202.0, 1202.0]


def test_put_is_an_upsert(cache: EmbeddingCache) -> None:
    cache.put_many({"k": np.array([1, 2, 3], dtype=np.float32)})
    cache.put_many({"k": np.array([4, 5], dtype=np.float32)})
    assert len(cache) == 1
    assert cache.get_many(["k"])["k"].tolist() == [4.0, 5.0]


def test_put_many_is_one_transaction(cache: EmbeddingCache) -> None:
    good = np.ones(3, dtype=np.float32)
    with pytest.raises(InvalidInputError, match="NaN"):
        cache.put_many({"a": good, "b": np.array([np.nan], dtype=np.float32)})
    assert len(cache) == 0  # nothing of the failed batch was written


@pytest.mark.parametrize(
    ("vec", "match"),
    [
        (np.ones((2, 3), dtype=np.float32), "1-D"),
        (np.array([], dtype=np.float32), "1-D"),
        (np.array(["a", "b"]), "dtype"),
        (np.array([1.0, np.inf], dtype=np.float32), "NaN or inf"),
    ],
)
def test_put_many_rejects_bad_vectors(cache: EmbeddingCache, vec, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        cache.put_many({"k": vec})


# --------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------


def test_key_is_stable_sha256_hex() -> None:
    key = _key()
    assert key == _key()
    assert len(key) == 64 and int(key, 16) >= 0


@pytest.mark.parametrize(
    "overrides",
    [
        {"model_id": "org/model@rev2"},
        {"prefix": "passage: "},
        {"prefix": ""},
        {"truncate_dim": 256},
        {"truncate_dim": 128},
        {"normalize": False},
        {"text": "hello!"},
    ],
)
def test_each_setting_changes_the_key(overrides) -> None:
    assert _key(**overrides) != _key()


def test_truncate_dims_differ_from_each_other() -> None:
    keys = {_key(truncate_dim=d) for d in (None, 64, 128, 256)}
    assert len(keys) == 4


def test_prefix_and_text_do_not_run_together() -> None:
    assert _key(prefix="query: a", text="b") != _key(prefix="query: ", text="ab")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"model_id": ""}, "model_id"),
        ({"prefix": None}, "prefix"),
        ({"truncate_dim": 0}, "truncate_dim"),
        ({"truncate_dim": True}, "truncate_dim"),
        ({"text": b"bytes"}, "text"),
    ],
)
def test_key_for_rejects_bad_arguments(overrides, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        _key(**overrides)


# --------------------------------------------------------------------------------------
# Persistence, concurrency, errors
# --------------------------------------------------------------------------------------


def test_reopen_keeps_entries(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "emb.sqlite"  # parent folders are created
    vec = np.random.default_rng(1).standard_normal(64).astype(np.float32)
    with EmbeddingCache(path) as c:
        c.put_many({_key(): vec})
    with EmbeddingCache(path) as c:
        assert len(c) == 1
        assert c.get_many([_key()])[_key()].tobytes() == vec.tobytes()


def test_closed_cache_raises(tmp_path: Path) -> None:
    c = EmbeddingCache(tmp_path / "emb.sqlite")
    c.close()
    with pytest.raises(StoreError, match="closed"):
        c.get_many(["k"])
    c.close()  # idempotent


def test_threads_put_and_get_concurrently(cache: EmbeddingCache) -> None:
    n_threads, per_thread = 8, 60
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_threads)

    def work(t: int) -> None:
        try:
            barrier.wait()
            for batch in range(0, per_thread, 10):
                vecs = {
                    f"t{t}-{i}": np.full(16, t * 1000 + i, dtype=np.float32)
                    for i in range(batch, batch + 10)
                }
                cache.put_many(vecs)
                got = cache.get_many(list(vecs))
                assert all(got[k].tobytes() == v.tobytes() for k, v in vecs.items())
                cache.get_many([f"t{(t + 1) % n_threads}-{batch}"])  # others' rows
                len(cache)
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(cache) == n_threads * per_thread
    got = cache.get_many([f"t{t}-{i}" for t in range(n_threads) for i in range(per_thread)])
    assert got["t7-59"][0] == 7059.0


_WRITER = """
import sys
import numpy as np
from retrievekit.cache import EmbeddingCache
path, worker = sys.argv[1], int(sys.argv[2])
c = EmbeddingCache(path)
for batch in range(10):
    c.put_many({f"p{worker}-{batch}-{i}": np.full(8, worker, dtype=np.float32) for i in range(20)})
    c.get_many([f"p{(worker + 1) % 4}-{batch}-0"])
c.close()
"""


def test_processes_share_the_file(tmp_path: Path) -> None:
    path = tmp_path / "emb.sqlite"
    EmbeddingCache(path).close()
    pythonpath = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath}
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(w)], env=env,
                         stderr=subprocess.PIPE, text=True)
        for w in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    with EmbeddingCache(path) as c:
        assert len(c) == 4 * 10 * 20
        assert c.get_many(["p3-9-19"])["p3-9-19"].tolist() == [3.0] * 8


def test_unwritable_path_raises_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match="a_file"):
        EmbeddingCache(blocker / "emb.sqlite")
    with pytest.raises(StoreError, match="writable"):
        EmbeddingCache(tmp_path)  # a directory, not a file


@pytest.mark.skipif(
    sys.platform == "win32" or os.geteuid() == 0, reason="root ignores permission bits"
)
def test_read_only_folder_or_file_raises_store_error(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    existing = tmp_path / "existing.sqlite"
    EmbeddingCache(existing).close()
    existing.chmod(0o400)
    try:
        with pytest.raises(StoreError, match="writable"):
            EmbeddingCache(ro / "emb.sqlite")
        with pytest.raises(StoreError, match="writable"):
            EmbeddingCache(existing)
    finally:
        ro.chmod(0o700)
        existing.chmod(0o600)

