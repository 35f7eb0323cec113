"""The embedding cache seen through the Embedder."""

from __future__ import annotations


def test_embedder_derives_truncated_vectors_from_cached_full_ones(tmp_path, embedder):
    """A cached full-dim normalized vector serves a truncate_dim run without encoding."""
    import numpy as np

    from retrievekit.cache import EmbeddingCache
    from retrievekit.embedding import Embedder

    texts = ["alpha beta", "gamma delta"]
    cache = EmbeddingCache(tmp_path / "c.sqlite")
    full = Embedder(model=embedder.config.model)
    full._model = embedder.model
    full.cache = cache
    vecs = full.embed_documents(texts)
    short = Embedder(model=embedder.config.model, truncate_dim=64)
    short._model = embedder.model
    short.cache = cache
    calls = []
    real = embedder.model.encode
    short._model = type("Spy", (), {"encode": lambda self, *a, **k: calls.append(a) or real(*a, **k),
                                    "get_embedding_dimension": lambda self: 384,
                                    "get_sentence_embedding_dimension": lambda self: 384})()
    got = short.embed_documents(texts)
    assert calls == []
    expected = vecs[:, :64] / np.linalg.norm(vecs[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    cache.close()
