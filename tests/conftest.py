"""Shared fixtures: offline hub, one torch thread, the bundled model loaded once per session,
a tiny cross-encoder built from it, and stores in tmp_path."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

import pytest  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"

CORPUS = [
    ("cats", "Cats are small domesticated carnivorous mammals that purr and hunt mice.",
     {"topic": "animals", "lang": "en", "year": 2020}),
    ("dogs", "Dogs are loyal companions descended from wolves and kept as pets.",
     {"topic": "animals", "lang": "en", "year": 2021}),
    ("python", "Python is a programming language known for readable syntax and a large "
     "standard library.", {"topic": "code", "lang": "en", "year": 2022}),
    ("rust", "Rust is a systems programming language that guarantees memory safety without "
     "a garbage collector.", {"topic": "code", "lang": "en", "year": 2023}),
    ("bread", "Sourdough bread is leavened with a fermented starter of flour and water.",
     {"topic": "food", "lang": "en", "year": 2020}),
    ("chat", "Le chat dort sur le canapé toute la journée.",
     {"topic": "animals", "lang": "fr", "year": 2022}),
    ("xq7", "The error code XQ7-42 means the flux capacitor overheated.",
     {"topic": "code", "lang": "en", "year": 2024}),
    ("tea", "Green tea contains catechins and less caffeine than coffee.",
     {"topic": "food", "lang": "en", "year": 2021}),
]


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory):
    # the user's ~/.cache/retrievekit (ONNX exports made by a benchmark, say) must neither
    # change what the tests see (backend="auto" serves small calls from an export it finds)
    # nor be written by them; tests that need a cache of their own still set their own
    mp = pytest.MonkeyPatch()
    mp.setenv("RETRIEVEKIT_CACHE", str(tmp_path_factory.mktemp("retrievekit-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    # two threads collapse under load on this 2-core machine (15 ms -> 500 ms per query)
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def embedder():
    """The bundled all-MiniLM-L6-v2, loaded once for the session."""
    from retrievekit.embedding import Embedder

    e = Embedder(model=MODEL)
    _ = e.model
    return e


@pytest.fixture(scope="session")
def st_oracle():
    """The bundled model as plain sentence-transformers in float32 on the CPU: the
    independent oracle of the embedding tests (the `embedder` fixture picks its precision
    and engine automatically: bfloat16 torch, or an ONNX export when one exists)."""
    from sentence_transformers import SentenceTransformer

    from retrievekit.models import resolve_model

    return SentenceTransformer(resolve_model(MODEL).load_from, device="cpu",
                               local_files_only=True)


@pytest.fixture(scope="session")
def tiny_cross_encoder_path(tmp_path_factory):
    """A cross-encoder built from the bundled MiniLM checkpoint with a fresh 1-label head.

    Its scores are not meaningful; it exercises the reranking code paths for real."""
    import torch
    from sentence_transformers import CrossEncoder

    from retrievekit.models import resolve_model

    path = tmp_path_factory.mktemp("tiny-ce")
    torch.manual_seed(0)
    ce = CrossEncoder(resolve_model(MODEL).load_from, num_labels=1, max_length=128,
                      local_files_only=True)
    ce.save(str(path))
    return str(path)


@pytest.fixture
def corpus_docs():
    from retrievekit.types import Document

    return [Document(text=t, id=i, metadata=m) for i, t, m in CORPUS]


@pytest.fixture
def retriever(tmp_path, embedder, corpus_docs):
    """A HybridRetriever over a persistent Chroma store in tmp_path, with CORPUS indexed."""
    from retrievekit.pipeline import HybridRetriever

    r = HybridRetriever(path=str(tmp_path / "store"), embedder=embedder)
    r.add_documents(corpus_docs)
    yield r
    r.close()


@pytest.fixture(scope="session")
def chroma_server(tmp_path_factory):
    """A real `chroma run` server for the session (tests/chroma_server.py), stopped by PID.

    Each test must use its own collection name. Skipped only when no `chroma` CLI exists."""
    from chroma_server import ChromaServer, chroma_binary  # tests/ is on sys.path

    binary = chroma_binary()
    if binary is None:
        pytest.skip("the `chroma` CLI of chromadb is not installed")
    server = ChromaServer(tmp_path_factory.mktemp("chroma-server") / "data", binary).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 1-layer, 32-dim BERT with random weights and the bundled MiniLM tokenizer, saved as a
    sentence-transformers model: thousands of texts a second on one thread, for crash tests.
    Scores are meaningless; identical texts still get identical vectors."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    from retrievekit.models import resolve_model

    raw = tmp_path_factory.mktemp("tiny-raw")
    out = tmp_path_factory.mktemp("tiny-st")
    tok = AutoTokenizer.from_pretrained(resolve_model(MODEL).load_from, local_files_only=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=256)).save_pretrained(raw)
    tok.save_pretrained(raw)
    st = SentenceTransformer(modules=[models.Transformer(str(raw), max_seq_length=128),
                                      models.Pooling(32, "mean"), models.Normalize()])
    st.save(str(out))
    return str(out)


@pytest.fixture(scope="session")
def tiny_embedder(tiny_model):
    from retrievekit.embedding import Embedder

    return Embedder(model=tiny_model, batch_size=256)
