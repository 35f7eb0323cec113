"""Prefixes with the prompts a model ships, as sentence-transformers 6 saves and loads them
(real models on disk: the tiny random-weight one, copied and edited)."""
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
