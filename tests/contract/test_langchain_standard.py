"""LangChain's standard test suites (langchain-tests) run against the adapters.

Stores are in-memory Chroma collections with a unique name per test; the bundled model is
the session `embedder`, so it loads once.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

pytest.importorskip("langchain_tests")

from langchain_tests.integration_tests import (  # noqa: E402
    EmbeddingsIntegrationTests, RetrieversIntegrationTests, VectorStoreIntegrationTests)
from langchain_tests.integration_tests.indexer import (  # noqa: E402
    AsyncDocumentIndexTestSuite, DocumentIndexerTestSuite)
from langchain_tests.unit_tests import EmbeddingsUnitTests  # noqa: E402

from retrievekit.langchain import (RetrieveKitEmbeddings,  # noqa: E402
                                   RetrieveKitRetriever, RetrieveKitVectorStore)
from retrievekit.pipeline import HybridRetriever  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"

TEXTS = [
    ("python", "Python is a programming language known for readable syntax."),
    ("rust", "Rust is a systems programming language with memory safety."),
    ("go", "Go is a compiled programming language designed at Google."),
    ("cats", "Cats are small carnivorous mammals that purr."),
    ("bread", "Sourdough bread is leavened with a fermented starter."),
]


def _memory_retriever(embedder: Any) -> HybridRetriever:
    return HybridRetriever(path=":memory:", collection=f"lc-{uuid.uuid4().hex[:12]}",
                           embedder=embedder)


def _dispose(hr: HybridRetriever) -> None:
    hr.store.client.delete_collection(hr.config.store.collection)
    hr.close()


class TestRetrieveKitEmbeddingsUnit(EmbeddingsUnitTests):
    """Construction only: the model loads lazily, so these need no model."""

    @property
    def embeddings_class(self) -> type[RetrieveKitEmbeddings]:
        return RetrieveKitEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"model": MODEL, "truncate_dim": 128}


class TestRetrieveKitEmbeddingsIntegration(EmbeddingsIntegrationTests):
    @pytest.fixture(autouse=True)
    def _shared_embedder(self, embedder: Any) -> None:
        self._embedder = embedder

    @property
    def embeddings_class(self) -> type[RetrieveKitEmbeddings]:
        return RetrieveKitEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"embedder": self._embedder}


@pytest.fixture(scope="module")
def indexed(embedder: Any):
    hr = _memory_retriever(embedder)
    from retrievekit.types import Document

    hr.add_documents([Document(text=t, id=i) for i, t in TEXTS])
    yield hr
    _dispose(hr)


class TestRetrieveKitRetrieverStandard(RetrieversIntegrationTests):
    @pytest.fixture(autouse=True)
    def _shared_store(self, indexed: HybridRetriever) -> None:
        self._hybrid = indexed

    @property
    def retriever_constructor(self) -> type[RetrieveKitRetriever]:
        return RetrieveKitRetriever

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return {"retriever": self._hybrid}

    @property
    def retriever_query_example(self) -> str:
        return "programming language"


class TestRetrieveKitDocumentIndex(DocumentIndexerTestSuite):
    @pytest.fixture
    def index(self, embedder: Any):
        hr = _memory_retriever(embedder)
        yield RetrieveKitRetriever(retriever=hr)
        _dispose(hr)


class TestRetrieveKitAsyncDocumentIndex(AsyncDocumentIndexTestSuite):
    @pytest.fixture
    def index(self, embedder: Any):
        hr = _memory_retriever(embedder)
        yield RetrieveKitRetriever(retriever=hr)
        _dispose(hr)


class TestRetrieveKitVectorStoreHybrid(VectorStoreIntegrationTests):
    """The standard suite with the store's default mode: hybrid search."""

    mode = "hybrid"

    @pytest.fixture
    def vectorstore(self, embedder: Any):
        hr = _memory_retriever(embedder)
        yield RetrieveKitVectorStore(hr, retrieval_mode=self.mode)
        _dispose(hr)


class TestRetrieveKitVectorStoreDense(TestRetrieveKitVectorStoreHybrid):
    mode = "dense"
