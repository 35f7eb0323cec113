"""The inference engines for real: ONNX export of the bundled MiniLM (once per module, into a
temporary cache), its agreement with torch, refusal of broken exports, cache reuse, the
automatic routing, and a small cross-encoder exported beside its own model directory."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from retrievekit import inference, models, onnx_backend
from retrievekit.embedding import Embedder
from retrievekit.errors import MissingDependencyError
from retrievekit.models import model_fingerprint, resolve_model
from retrievekit.rerank import Reranker

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
QUERIES = {  # query -> the corpus_docs id it is about
    "which pet purrs and hunts mice": "cats",
    "memory safety without garbage collection": "rust",
    "how much caffeine is in green tea": "tea",
    "what does error XQ7-42 mean": "xq7",
}


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    """RETRIEVEKIT_CACHE pointed at a fresh folder for this module."""
    path = tmp_path_factory.mktemp("onnx-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RETRIEVEKIT_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def onnx_embedder(onnx_cache):
    """MiniLM on the ONNX engine; exported (and checked) once for the module."""
    e = Embedder(model=MODEL, backend="onnx")
    assert e.engine_for(1) == "onnx"
    return e


@pytest.fixture(scope="module")
def fp32_embedder():
    e = Embedder(model=MODEL, backend="torch", dtype="float32")
    _ = e.model
    return e


def _folder():
    resolved = resolve_model(MODEL)
    return onnx_backend.cache_dir_for(resolved, onnx_backend.content_key(resolved))


def _copy_cache(src, dst_root, *, skip: tuple[str, ...] = ()):
    """A copy of the module's cache folder under another RETRIEVEKIT_CACHE root."""
    dst = dst_root / "onnx" / src.name
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in skip and f.name.startswith("embed-fp32") \
                or f.name == "tokenizer.json":
            shutil.copy2(f, dst / f.name)
    return dst


def _refusals(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "retrievekit.onnx_backend" and r.levelno == logging.WARNING]


# -- agreement -----------------------------------------------------------------------------------
def test_onnx_and_torch_agree_on_vectors_and_rankings(onnx_embedder, fp32_embedder, corpus_docs):
    texts = [d.text for d in corpus_docs]
    ids = [d.id for d in corpus_docs]
    d_onnx, d_torch = onnx_embedder.embed_documents(texts), fp32_embedder.embed_documents(texts)
    assert np.max(np.abs(d_onnx - d_torch)) < 1e-5
    for query, about in QUERIES.items():
        q_onnx, q_torch = onnx_embedder.embed_query(query), fp32_embedder.embed_query(query)
        assert float(q_onnx @ q_torch) > 1 - 1e-6
        rank_onnx = [ids[i] for i in np.argsort(-(d_onnx @ q_onnx))]
        assert rank_onnx == [ids[i] for i in np.argsort(-(d_torch @ q_torch))]
        assert rank_onnx[0] == about


def test_retriever_on_the_onnx_engine(onnx_embedder, corpus_docs):
    from retrievekit.pipeline import HybridRetriever

    with HybridRetriever(path=":memory:", embedder=onnx_embedder) as r:
        r.add_documents(corpus_docs)
        for query, about in QUERIES.items():
            assert r.search(query, k=1, mode="dense")[0].id == about


def test_int8_is_close_and_kept_apart_in_the_embedding_cache(onnx_embedder, fp32_embedder,
                                                              corpus_docs, tmp_path):
    from retrievekit.cache import EmbeddingCache

    int8 = Embedder(model=MODEL, backend="onnx", onnx_quantize="int8")
    assert int8.engine_for(1) == "onnx"
    record = json.loads((_folder() / "embed-int8.json").read_text())
    assert record["ok"] and record["precision"] == "int8"
    texts = [d.text for d in corpus_docs]
    cos = np.sum(int8.embed_documents(texts) * fp32_embedder.embed_documents(texts), axis=1)
    assert cos.min() > 0.95 and cos.max() < 1 - 1e-6  # close, but really quantized
    with EmbeddingCache(tmp_path / "c.sqlite") as cache:
        for e in (onnx_embedder, int8):
            saved, e.cache = e.cache, cache
            try:
                e.embed_documents(["one text, two precisions"])
            finally:
                e.cache = saved
        assert len(cache) == 2  # the int8 vector never serves an fp32 lookup


# -- the cache and refusals ----------------------------------------------------------------------
def test_second_load_reuses_the_export(onnx_embedder, caplog):
    onnx_file = _folder() / "embed-fp32.onnx"
    before = os.stat(onnx_file)
    caplog.set_level(logging.INFO, logger="retrievekit.onnx_backend")
    again = Embedder(model=MODEL, backend="onnx")
    assert again.engine_for(1) == "onnx"
    assert not [r for r in caplog.records if "exporting" in r.getMessage()]
    after = os.stat(onnx_file)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    texts = ["same file, same vectors", "x"]
    assert np.array_equal(again.embed_documents(texts), onnx_embedder.embed_documents(texts))


@pytest.mark.parametrize("damage", ["flipped bytes", "unloadable file with a matching record"])
def test_corrupt_cached_export_is_refused_for_torch(onnx_embedder, fp32_embedder, tmp_path,
                                                    monkeypatch, caplog, damage):
    folder = _copy_cache(_folder(), tmp_path)
    onnx_file = folder / "embed-fp32.onnx"
    if damage == "flipped bytes":
        with open(onnx_file, "r+b") as fh:
            fh.seek(os.path.getsize(onnx_file) // 2)
            chunk = fh.read(64)
            fh.seek(-len(chunk), 1)
            fh.write(bytes(b ^ 0xFF for b in chunk))
        expected = "does not match its recorded hash"
    else:
        onnx_file.write_bytes(b"not an onnx model")
        record_file = folder / "embed-fp32.json"
        record = json.loads(record_file.read_text())
        record["sha256"] = onnx_backend._sha256(onnx_file)
        record_file.write_text(json.dumps(record))
        expected = "onnxruntime cannot load"
    monkeypatch.setenv("RETRIEVEKIT_CACHE", str(tmp_path))
    caplog.set_level(logging.WARNING, logger="retrievekit.onnx_backend")
    e = Embedder(model=MODEL, backend="onnx", dtype="float32")
    assert e.engine_for(1) == "torch"
    assert any(expected in m for m in _refusals(caplog))
    q = "torch answers instead"
    np.testing.assert_allclose(e.embed_query(q), fp32_embedder.embed_query(q), atol=1e-6)


def test_export_failing_its_check_is_refused_and_not_retried(onnx_embedder, tmp_path,
                                                             monkeypatch, caplog):
    # the exported file without its record: the next load checks it against torch again
    folder = _copy_cache(_folder(), tmp_path, skip=("embed-fp32.json",))
    monkeypatch.setenv("RETRIEVEKIT_CACHE", str(tmp_path))
    caplog.set_level(logging.WARNING, logger="retrievekit.onnx_backend")
    with monkeypatch.context() as strict:
        strict.setitem(onnx_backend.TOLERANCE, ("embed", "fp32"), -1.0)  # nothing can pass
        e = Embedder(model=MODEL, backend="onnx")
        assert e.engine_for(1) == "torch"
    assert any("exceeds the tolerance" in m for m in _refusals(caplog))
    record_file = folder / "embed-fp32.json"
    record = json.loads(record_file.read_text())
    assert record["ok"] is False and record["deviation"] < 1e-4
    assert not (folder / "embed-fp32.onnx").exists()
    stamp = os.stat(record_file).st_mtime_ns
    # the normal tolerance is back, but the recorded failure holds until the record is deleted
    again = Embedder(model=MODEL, backend="onnx")
    assert again.engine_for(1) == "torch"
    assert os.stat(record_file).st_mtime_ns == stamp
    assert again.embed_query("still answered").shape == (384,)


def test_missing_onnxruntime(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` fails
    with pytest.raises(MissingDependencyError, match=r"pip install 'retrievekit\[onnx\]'"):
        Embedder(model=MODEL, backend="onnx").embed_query("x")
    assert Embedder(model=MODEL, dtype="float32").engine_for(1) == "torch"  # auto: no error


# -- automatic choices ---------------------------------------------------------------------------
def test_auto_never_exports_on_first_use(tmp_path, monkeypatch, fp32_embedder, caplog):
    monkeypatch.setenv("RETRIEVEKIT_CACHE", str(tmp_path))  # no export cached here
    # the advice is logged once per process: the session's embedder may have had it already
    monkeypatch.setattr(onnx_backend, "_warned", set())
    caplog.set_level(logging.INFO, logger="retrievekit.onnx_backend")
    e = Embedder(model=MODEL, dtype="float32")  # "auto" would pick ONNX for every call
    assert e.engine_for(1) == "torch" and e.engine_for(1000) == "torch"
    q = "answered by torch until an export exists"
    np.testing.assert_allclose(e.embed_query(q), fp32_embedder.embed_query(q), atol=1e-6)
    assert not list(tmp_path.rglob("*.onnx")) and not list(tmp_path.rglob("*.json"))
    assert any("export_onnx()" in r.getMessage() for r in caplog.records)


def test_export_onnx_ahead_of_time_with_progress(small_cross_encoder, tmp_path, monkeypatch,
                                                 capsys):
    monkeypatch.setenv("RETRIEVEKIT_CACHE", str(tmp_path))
    auto = Reranker(model=small_cross_encoder, dtype="float32", sigmoid=False)
    assert auto.engine_for(1) == "torch"  # nothing exported yet, and first use did not wait
    capsys.readouterr()
    path = auto.export_onnx(progress=True)
    err = capsys.readouterr().err
    assert "ONNX export of" in err and "3/3" in err and "checking against torch" in err
    assert path.is_file() and path.is_relative_to(tmp_path)
    assert auto.engine_for(1) == "onnx"  # the same object switches ...
    assert Reranker(model=small_cross_encoder, dtype="float32").engine_for(1) == "onnx"  # new too
    torch_ = Reranker(model=small_cross_encoder, backend="torch", dtype="float32", sigmoid=False)
    passages = ["tea has caffeine", "cats purr", ""]
    np.testing.assert_allclose(auto.score("green tea", passages),
                               torch_.score("green tea", passages), atol=1e-5)
    stamp = os.stat(path).st_mtime_ns
    assert auto.export_onnx(progress=True) == path  # a second call reuses the export ...
    assert os.stat(path).st_mtime_ns == stamp and "ONNX export of" not in capsys.readouterr().err


def test_auto_backend_routes_by_call_size(onnx_embedder, fp32_embedder):
    default = Embedder(model=MODEL)
    assert default.dtype == ("bfloat16" if inference.cpu_has_native_bf16() else "float32")
    half = Embedder(model=MODEL, dtype="bfloat16")
    bulk = inference.AUTO_ONNX_MAX_ITEMS + 1
    assert half.engine_for(1) == "onnx" and half.engine_for(bulk) == "torch"
    full = Embedder(model=MODEL, dtype="float32")
    assert full.engine_for(1) == "onnx" and full.engine_for(10_000) == "onnx"
    texts = [f"passage number {i} about tea and cats" for i in range(bulk)]
    got = half.embed_documents(texts)  # torch bf16
    ref = fp32_embedder.embed_documents(texts)
    assert np.min(np.sum(got * ref, axis=1)) > 1 - 1e-3
    assert float(half.embed_query(texts[0]) @ ref[0]) > 1 - 1e-6  # ONNX fp32


def test_model_is_full_precision_unless_a_dtype_is_named():
    import torch

    half = Embedder(model=MODEL, backend="torch", dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert half._torch_engine() is half.model  # one copy
    default = Embedder(model=MODEL, backend="torch")  # dtype "auto"
    assert next(default.model.parameters()).dtype == torch.float32  # to train or compare with
    engine = default._torch_engine()
    if default.dtype == "bfloat16":  # the internal bulk copy
        assert engine is not default.model
        assert next(engine.parameters()).dtype == torch.bfloat16


def test_onnx_threads_follow_the_setting(onnx_embedder):
    opts = onnx_embedder._onnx_engine().session.get_session_options()
    assert opts.intra_op_num_threads == inference.default_num_threads()
    one = Embedder(model=MODEL, backend="onnx", num_threads=1)
    assert one._onnx_engine().session.get_session_options().intra_op_num_threads == 1


# -- network -------------------------------------------------------------------------------------
_NO_NETWORK_CHILD = textwrap.dedent("""
    import time
    from retrievekit.embedding import Embedder
    e = Embedder(model=%r, backend="onnx")
    assert e.engine_for(1) == "onnx"
    e.embed_query("no network, please")
    time.sleep(14)  # onnxruntime's telemetry looks up its host ~10 s after the import
""")


@pytest.mark.slow
def test_onnx_engine_makes_no_network_calls(onnx_embedder, onnx_cache, tmp_path):
    """Seen with strace: every socket the process opens. onnxruntime's telemetry opens UDP
    sockets for DNS lookups of its collector host unless ORT_DISABLE_TELEMETRY is set."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env["RETRIEVEKIT_CACHE"] = str(onnx_cache)
    trace = tmp_path / "trace.txt"
    proc = subprocess.run(
        ["strace", "-f", "-e", "trace=socket,connect,sendto", "-o", str(trace),
         sys.executable, "-c", _NO_NETWORK_CHILD % MODEL],
        env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0 and "ptrace" in proc.stderr:
        pytest.skip(f"strace cannot trace here: {proc.stderr[:200]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = trace.read_text()
    assert "+++ exited with 0 +++" in text  # strace did follow the process to its end
    inet = [line for line in text.splitlines() if "AF_INET" in line]
    assert not inet, "\n".join(inet[:5])


def test_onnxruntime_is_imported_with_its_telemetry_off():
    child = ("import os, sys; from retrievekit.onnx_backend import require_onnxruntime; "
             "require_onnxruntime(); print(os.environ.get('ORT_DISABLE_TELEMETRY'))")
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    out = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert out[-1] == "1"
    env["ORT_DISABLE_TELEMETRY"] = "0"  # the user's own choice stands
    out = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert out[-1] == "0"


# -- the reranker --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_cross_encoder(tmp_path_factory):
    """A 2-layer BERT cross-encoder with random weights and MiniLM's tokenizer (fast export)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("small-ce")
    tok = AutoTokenizer.from_pretrained(resolve_model(MODEL).load_from)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=128, num_labels=1,
                     max_position_embeddings=512)
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_reranker_backends_agree_and_export_beside_the_model(small_cross_encoder, corpus_docs,
                                                             monkeypatch):
    monkeypatch.delenv("RETRIEVEKIT_CACHE", raising=False)
    resolved = resolve_model(small_cross_encoder)
    before = model_fingerprint(resolved)
    onnx = Reranker(model=small_cross_encoder, backend="onnx", sigmoid=False)
    torch_ = Reranker(model=small_cross_encoder, backend="torch", dtype="float32", sigmoid=False)
    assert onnx.engine_for(20) == "onnx"
    passages = [d.text for d in corpus_docs] + ["", "word " * 700]  # empty, and past truncation
    for query in QUERIES:
        s_onnx, s_torch = onnx.score(query, passages), torch_.score(query, passages)
        np.testing.assert_allclose(s_onnx, s_torch, atol=1e-5)
        assert np.argsort(-s_onnx).tolist() == np.argsort(-s_torch).tolist()
    beside = os.path.join(small_cross_encoder, "onnx", "retrievekit", before,
                          "rerank-fp32.onnx")
    assert os.path.exists(beside)  # a writable local model keeps its export next to it
    models._hash_dir.cache_clear()
    assert model_fingerprint(resolved) == before  # ... without changing the model's hash


def test_reranker_max_length_is_honoured(small_cross_encoder, monkeypatch):
    monkeypatch.delenv("RETRIEVEKIT_CACHE", raising=False)
    long = "tea " * 300
    short_onnx = Reranker(model=small_cross_encoder, backend="onnx", max_length=32)
    short_torch = Reranker(model=small_cross_encoder, backend="torch", dtype="float32",
                           max_length=32)
    np.testing.assert_allclose(short_onnx.score("q", [long, "tea"]),
                               short_torch.score("q", [long, "tea"]), atol=1e-6)


def test_an_export_checked_without_prefixes_is_not_served_for_a_prompt_it_pools(
        tiny_model, tmp_path, monkeypatch):
    """A model whose pooling leaves the prompt's tokens out (`include_prompt: false`) has an
    export checked without prefixes: the same export is not served to an embedder with a
    prefix (the graph pools the prompt's tokens; its vectors would not be torch's), also
    when its record is from before the export recorded this."""
    monkeypatch.setenv("RETRIEVEKIT_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "no-prompt-pooling"
    shutil.copytree(tiny_model, model)
    pooling = model / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({**json.loads(pooling.read_text()), "include_prompt": False}))
    plain = Embedder(model=str(model), backend="onnx", dtype="float32")
    assert plain.engine_for(1) == "onnx"
    records = list((tmp_path / "cache").rglob("embed-fp32.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["include_prompt"] is False
    for old in (False, True):
        if old:  # as an export recorded before include_prompt was
            rec = json.loads(records[0].read_text())
            rec.pop("include_prompt")
            records[0].write_text(json.dumps(rec))
        prefixed = Embedder(model=str(model), backend="onnx", dtype="float32",
                            query_prefix="query: ")
        assert prefixed.engine_for(1) == "torch"
        torch_side = Embedder(model=str(model), backend="torch", dtype="float32",
                              query_prefix="query: ")
        np.testing.assert_allclose(prefixed.embed_query("hello world"),
                                   torch_side.embed_query("hello world"), atol=1e-5)
