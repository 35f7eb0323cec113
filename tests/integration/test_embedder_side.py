"""The embedder's side: prefixes with the prompts a model ships (as sentence-transformers 6
saves and loads them), a hub model's weights hashed, and texts or prefixes it cannot encode
refused (real models on disk: the tiny random-weight one, copied and edited)."""
from __future__ import annotations

import json
import shutil

import numpy as np


def _copy(tiny_model, tmp_path, name, **config):
    out = tmp_path / name
    shutil.copytree(tiny_model, out)
    f = out / "config_sentence_transformers.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **config}))
    return str(out)


def test_a_model_saved_by_sentence_transformers_keeps_its_family_prefix(tiny_model, tmp_path):
    """A bge model re-saved by sentence-transformers 6 carries {"query": "", "document":
    ""}: its query still gets bge's instruction, and a model loaded from the hub (whose
    `prompts` always hold those defaults) reads the same."""
    from retrievekit.embedding import Embedder

    path = _copy(tiny_model, tmp_path, "bge-small-en-v1.5")
    assert json.loads((tmp_path / "bge-small-en-v1.5" / "config_sentence_transformers.json")
                      .read_text())["prompts"] == {"document": "", "query": ""}
    e = Embedder(model=path, batch_size=8)
    assert e.prefixes.query == "Represent this sentence for searching relevant passages: "
    assert e.model.prompts.get("query") == ""  # what a hub-loaded model's prompts hold
    q = e.embed_query("lanterns")
    d = e.embed_documents(["Represent this sentence for searching relevant passages: "
                           "lanterns"])[0]
    np.testing.assert_allclose(q, d, atol=1e-5)


def test_an_empty_prefix_overrides_the_models_default_prompt(tiny_model, tmp_path):
    """`document_prefix=""` is a deliberate "no prefix": the model's `default_prompt_name`
    must not put its query prompt on documents."""
    from sentence_transformers import SentenceTransformer

    from retrievekit.embedding import Embedder

    path = _copy(tiny_model, tmp_path, "tiny-default-prompt",
                 prompts={"query": "query: ", "document": "passage: "},
                 default_prompt_name="query")
    e = Embedder(model=path, batch_size=8, document_prefix="", dtype="float32")
    got = e.embed_documents(["hello world"])[0]
    plain = SentenceTransformer(path, device="cpu").encode(
        ["hello world", "query: hello world"], prompt="", normalize_embeddings=True)
    np.testing.assert_allclose(got, plain[0], atol=1e-5)
    assert float(got @ plain[1]) < 0.999


_HUB_CHILD = r"""
import json, sys
import numpy as np, torch
torch.set_num_threads(1)
from retrievekit.cache import EmbeddingCache
from retrievekit.embedding import Embedder
from retrievekit.errors import StoreMismatchError
from retrievekit.pipeline import HybridRetriever
phase, store, cache = sys.argv[1], sys.argv[2], sys.argv[3]
e = Embedder(model="org/tiny", batch_size=8, dtype="float32")
assert e.resolved.source == "hub", e.resolved
out = {"hash": e.identity()["model_hash"]}
e.cache = EmbeddingCache(cache)
out["cached"] = e.embed_documents(["hello world"])[0].tolist()
e.cache = None
out["fresh"] = e.embed_documents(["hello world"])[0].tolist()
try:
    with HybridRetriever({"store": {"path": store}}, embedder=e) as r:
        if phase == "first":
            r.add_documents([{"text": "hello world", "id": "a"}])
            # as a store made before hub models were hashed recorded it
            old = r.store.read_settings()
            old["embedder"]["model_hash"] = ""
            r.store.write_settings(old)
    out["opened"] = True
except StoreMismatchError as exc:
    out["opened"] = str(exc)
print(json.dumps(out))
"""


def test_a_hub_models_new_revision_is_noticed(tiny_model, tmp_path):
    """A hub model is hashed through its snapshot in the local Hugging Face cache: when the
    cache moves to a revision with other weights, the embedding cache does not serve the
    old weights' vectors and the store refuses the new ones; a store recorded before hub
    models were hashed opens (and records the hash) once."""
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file, save_file

    hub = tmp_path / "hf"
    repo = hub / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    shutil.copytree(tiny_model, repo / "snapshots" / ("a" * 40))
    shutil.copytree(tiny_model, repo / "snapshots" / ("b" * 40))
    weights = repo / "snapshots" / ("b" * 40) / "model.safetensors"
    g = torch.Generator().manual_seed(1)
    save_file({k: v + 0.5 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}

    def child(phase: str, revision: str) -> dict:
        (repo / "refs" / "main").write_text(revision * 40)
        got = subprocess.run([sys.executable, "-c", _HUB_CHILD, phase, str(tmp_path / "s"),
                              str(tmp_path / "cache.sqlite")], env=env, capture_output=True,
                             text=True, timeout=300)
        assert got.returncode == 0, got.stderr[-3000:]
        return json.loads(got.stdout.strip().splitlines()[-1])

    first = child("first", "a")
    assert first["hash"] and first["opened"] is True
    again = child("again", "a")  # the unhashed record: taken on trust, then recorded
    assert again["hash"] == first["hash"] and again["opened"] is True
    moved = child("moved", "b")
    assert moved["hash"] != first["hash"]
    np.testing.assert_allclose(moved["cached"], moved["fresh"], atol=1e-6)
    assert float(np.dot(moved["fresh"], first["fresh"])) < 0.99
    assert "model_hash" in moved["opened"]


def test_a_document_prefix_the_window_cannot_hold_is_a_config_error(tiny_model, tmp_path):
    """A document prefix that leaves the model (128 tokens) no room for the passage is
    refused with the parameter and the fix, before anything is written."""
    import pytest

    from retrievekit.embedding import Embedder
    from retrievekit.errors import ConfigError
    from retrievekit.pipeline import HybridRetriever

    e = Embedder(model=tiny_model, batch_size=8,
                 document_prefix="Represent this document for retrieval: " * 40)
    with HybridRetriever({"store": {"path": str(tmp_path / "s")}}, embedder=e) as r:
        with pytest.raises(ConfigError, match="document_prefix.*shorter"):
            r.add_documents([{"text": "short text", "id": "a"}])
        assert r.count() == 0


def test_a_text_that_is_not_utf8_is_refused(tiny_embedder, tmp_path):
    """A lone surrogate cannot be encoded (or cached): an InvalidInputError that names the
    text, with or without an embedding cache."""
    import pytest

    from retrievekit.cache import EmbeddingCache
    from retrievekit.errors import InvalidInputError

    for cache in (None, EmbeddingCache(str(tmp_path / "c.sqlite"))):
        with tiny_embedder.using_cache(cache):
            with pytest.raises(InvalidInputError, match=r"texts\[1\]"):
                tiny_embedder.embed_documents(["fine", "bad \ud800 text"])
            with pytest.raises(InvalidInputError, match="query"):
                tiny_embedder.embed_query("bad \ud800")
