"""Shared helpers of the peer and scale benchmarks: data, vectors, the two peer stacks, output.

The peers are built the way their documentation shows:

- LangChain: ``EnsembleRetriever([BM25Retriever, Chroma(...).as_retriever()])`` (RRF, c=60,
  equal weights; fused and deduplicated by ``page_content``).
- LlamaIndex: ``QueryFusionRetriever([VectorStoreIndex(ChromaVectorStore).as_retriever(),
  BM25Retriever], mode=..., num_queries=1)`` (bm25s with PyStemmer's English stemmer;
  fused and deduplicated by the node hash, i.e. text + metadata).

Vectors never come from the peers: each system gets an object that hands out precomputed
vectors (`VectorSource`), so all of them index and search the very same numbers.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import resource
import time
from dataclasses import dataclass
from importlib import metadata as _md
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("RK_DATA_DIR", REPO.parent / "shared" / "data"))
RESULTS_DIR = REPO / "benchmarks" / "results"
CACHE_FILE = REPO / "benchmarks" / ".cache" / "embeddings" / "embeddings.sqlite"
COLLECTIONS = ("nfcorpus", "cranfield", "cisi", "cacm", "npl")
PEER_PACKAGES = ("retrievekit", "chromadb", "bm25s", "rank-bm25", "PyStemmer", "numpy",
                 "torch", "sentence-transformers", "langchain-core", "langchain-classic",
                 "langchain-community", "langchain-chroma", "llama-index-core",
                 "llama-index-retrievers-bm25", "llama-index-vector-stores-chroma")


def setup_torch(threads: int = 1) -> int:
    """One torch thread by default: per-query latency on a busy 2-core machine is steadier,
    and every system runs the query encoder the same way. Returns the thread count."""
    import torch

    torch.set_num_threads(threads)
    return torch.get_num_threads()


# -- data ------------------------------------------------------------------------------------

def load_collection(name: str):
    """The BEIR collection `name` from the shared data folder (test split)."""
    from retrievekit.evaluation import load_beir

    return load_beir(DATA_DIR / name)


def collection_texts(ds) -> list[tuple[str, str]]:
    """(doc id, title + newline + body) for every document with non-blank text.

    Blank documents (cranfield has two) are left out for every system alike: the core
    rejects empty texts and no system could retrieve them by content anyway.
    """
    from retrievekit.evaluation import dataset_documents

    return [(i, t) for i, t in dataset_documents(ds) if t.strip()]


# -- measuring -------------------------------------------------------------------------------

def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    """Current resident set size of this process (MiB)."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def latency_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/mean of per-query latencies, in milliseconds."""
    arr = np.asarray(seconds, dtype=np.float64) * 1000.0
    if arr.size == 0:
        return {"p50": float("nan"), "p95": float("nan"), "mean": float("nan"), "n": 0}
    return {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
            "mean": float(arr.mean()), "n": int(arr.size)}


def time_queries(fn: Callable[[str], Any], queries: Sequence[str], warmup: int = 5
                 ) -> dict[str, float]:
    """Run `fn` on each query (after `warmup` untimed calls) and summarize the latencies."""
    for q in queries[:warmup]:
        fn(q)
    spent = []
    for q in queries:
        start = time.perf_counter()
        fn(q)
        spent.append(time.perf_counter() - start)
    return latency_ms(spent)


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``."""

    def __enter__(self) -> "Timer":
        self._start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


def machine_info() -> dict[str, Any]:
    """Where and with what the numbers were taken."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            mem_gib = int(fh.readline().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        mem_gib = float("nan")
    versions = {}
    for pkg in PEER_PACKAGES:
        try:
            versions[pkg] = _md.version(pkg)
        except _md.PackageNotFoundError:
            versions[pkg] = None
    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "platform": platform.platform(), "python": platform.python_version(),
            "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1),
            "load_avg_at_start": os.getloadavg(), "versions": versions}


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write `payload` as benchmarks/results/<name>.json (atomically) and return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats get 3 significant decimals, None becomes an em dash."""
    def cell(v: Any) -> str:
        if v is None:
            return "—"
        if isinstance(v, float):
            if v != v:
                return "—"
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# -- vectors ---------------------------------------------------------------------------------

class VectorSource:
    """Hands out document and query vectors to every system under test.

    Documents: `doc_fn(texts) -> (n, dim) float32`. Queries: with ``live=True`` the query is
    encoded by `query_fn` on each call (what a real deployment pays); with ``live=False`` its
    vector is looked up in `precomputed` (query encoding excluded from the latency).
    """

    def __init__(self, doc_fn: Callable[[list[str]], np.ndarray],
                 query_fn: Callable[[str], np.ndarray] | None = None) -> None:
        self.doc_fn = doc_fn
        self.query_fn = query_fn
        self.precomputed: dict[str, np.ndarray] = {}
        self.live = False
        self.documents_served = 0

    def documents(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        self.documents_served += len(texts)
        return self.doc_fn(texts)

    def query(self, text: str) -> np.ndarray:
        if self.live:
            if self.query_fn is None:
                raise RuntimeError("this VectorSource has no live query encoder")
            return self.query_fn(text)
        try:
            return self.precomputed[text]
        except KeyError:
            raise KeyError(f"no precomputed vector for query {text[:60]!r}") from None


class CountingCache:
    """An `EmbeddingCache` front that counts the vectors this process writes (= encodes).

    Counting ``len(cache)`` is wrong while another process fills the same file.
    """

    def __init__(self, cache) -> None:
        self.inner = cache
        self.written = 0

    def key_for(self, *args: Any) -> str:
        return self.inner.key_for(*args)

    def get_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        return self.inner.get_many(keys)

    def put_many(self, items) -> None:
        self.written += len(items)
        self.inner.put_many(items)


def cached_model_source(embedder, cache) -> VectorSource:
    """Document vectors from the embedding cache (misses are encoded once and stored there);
    live query vectors from the model itself, never from the cache.

    A passage longer than the model's window is looked up as its first window of tokens
    (`truncation_map`): that is exactly what the model reads when asked to embed the whole
    passage, and the pipeline's first chunk of it, so its vector is already in the cache.
    """
    substitute: dict[str, str] = {}

    def docs(texts: list[str]) -> np.ndarray:
        saved, embedder.cache = embedder.cache, cache
        try:
            return embedder.embed_documents([substitute.get(t, t) for t in texts],
                                            progress=False)
        finally:
            embedder.cache = saved

    def query(text: str) -> np.ndarray:
        saved, embedder.cache = embedder.cache, None
        try:
            return embedder.embed_query(text)
        finally:
            embedder.cache = saved

    source = VectorSource(docs, query)
    source.substitute = substitute  # type: ignore[attr-defined]
    return source


def truncation_map(embedder, texts: Sequence[str]) -> dict[str, str]:
    """text -> its leading slice of `window` tokens, for texts longer than the model reads.

    `window` is the model's max sequence length minus the two special tokens and the
    document prefix, as in the pipeline's chunking; the slice is the pipeline's first chunk.
    """
    from retrievekit.chunking import split_text

    tok = embedder.tokenizer
    prefix = len(tok(embedder.prefixes.document, add_special_tokens=False)["input_ids"])
    window = embedder.max_seq_length - 2 - prefix
    lengths = [len(ids) for ids in tok(list(texts), add_special_tokens=False, truncation=False,
                                       verbose=False)["input_ids"]]
    out = {}
    for text, n in zip(texts, lengths):
        if n > window:
            start, end = split_text(text, tok, window, 0)[0]
            out[text] = text[start:end]
    return out


def random_unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def random_source(dim: int = 384, seed: int = 0) -> VectorSource:
    """Random unit vectors, drawn in call order from one seeded stream (no text involved)."""
    rng = np.random.default_rng(seed)
    return VectorSource(lambda texts: random_unit(rng, len(texts), dim))


# -- tokenizers used by the LangChain BM25Retriever variants ---------------------------------

_ALNUM = re.compile(r"[a-z0-9]+")


def lower_alnum(text: str) -> list[str]:
    """Lowercase alphanumeric runs: what a user who notices str.split's weakness writes."""
    return _ALNUM.findall(text.lower())


# -- LangChain -------------------------------------------------------------------------------

def langchain_embeddings(source: VectorSource):
    from langchain_core.embeddings import Embeddings

    class SourceEmbeddings(Embeddings):
        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return source.documents(texts).tolist()

        def embed_query(self, text: str) -> list[float]:
            return source.query(text).tolist()

    return SourceEmbeddings()


@dataclass
class LangChainStack:
    vectorstore: Any
    bm25: dict[str, Any]          # tokenizer name -> BM25Retriever
    docs: list[Any]

    def ensemble(self, k: int, tokenizer: str = "split", where: dict | None = None):
        from langchain_classic.retrievers import EnsembleRetriever

        bm25 = self.bm25[tokenizer]
        bm25.k = k
        kwargs: dict[str, Any] = {"k": k}
        if where:
            kwargs["filter"] = where
        dense = self.vectorstore.as_retriever(search_kwargs=kwargs)
        return EnsembleRetriever(retrievers=[bm25, dense], weights=[0.5, 0.5])


def langchain_documents(items: Sequence[tuple[str, str, dict[str, Any]]]) -> list[Any]:
    from langchain_core.documents import Document

    return [Document(page_content=t, metadata={"doc_id": i, **m}, id=i) for i, t, m in items]


def build_langchain(docs: list[Any], source: VectorSource, client, collection: str,
                    tokenizers: Sequence[str] = ("split",)) -> tuple[LangChainStack, dict[str, float]]:
    """Chroma vector store + one BM25Retriever per tokenizer; returns the stack and timings."""
    from langchain_chroma import Chroma
    from langchain_community.retrievers import BM25Retriever

    timings: dict[str, float] = {}
    with Timer() as t:
        vs = Chroma.from_documents(docs, embedding=langchain_embeddings(source),
                                   ids=[d.id for d in docs], client=client,
                                   collection_name=collection)
    timings["vector_s"] = t.seconds
    bm25 = {}
    for name in tokenizers:
        kwargs = {} if name == "split" else {"preprocess_func": lower_alnum}
        with Timer() as t:
            bm25[name] = BM25Retriever.from_documents(docs, **kwargs)
        timings[f"bm25_{name}_s"] = t.seconds
    return LangChainStack(vs, bm25, docs), timings


def langchain_ids(results: Sequence[Any]) -> list[str]:
    return [d.metadata.get("doc_id", d.id) for d in results]


# -- LlamaIndex ------------------------------------------------------------------------------

def llama_embedding(source: VectorSource):
    from llama_index.core.embeddings import BaseEmbedding
    from pydantic import PrivateAttr

    class SourceEmbedding(BaseEmbedding):
        _source: Any = PrivateAttr()

        def __init__(self, src: VectorSource, **kwargs: Any) -> None:
            super().__init__(model_name="precomputed", **kwargs)
            self._source = src

        def _get_query_embedding(self, query: str) -> list[float]:
            return self._source.query(query).tolist()

        async def _aget_query_embedding(self, query: str) -> list[float]:
            return self._get_query_embedding(query)

        def _get_text_embedding(self, text: str) -> list[float]:
            return self._source.documents([text])[0].tolist()

        def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
            return self._source.documents(texts).tolist()

    # a batch as large as the cache lookups like; LlamaIndex's default is 10
    return SourceEmbedding(source, embed_batch_size=1000)


def llama_nodes(items: Sequence[tuple[str, str, dict[str, Any]]]) -> list[Any]:
    from llama_index.core.schema import TextNode

    return [TextNode(text=t, id_=i, metadata=dict(m), excluded_embed_metadata_keys=list(m),
                     excluded_llm_metadata_keys=list(m)) for i, t, m in items]


@dataclass
class LlamaStack:
    index: Any
    bm25: Any

    def fusion(self, k: int, mode: str = "reciprocal_rerank", where: dict | None = None):
        from llama_index.core.llms import MockLLM
        from llama_index.core.retrievers import QueryFusionRetriever

        filters = _llama_filters(where)
        self.bm25.similarity_top_k = k
        self.bm25.corpus_weight_mask = _llama_mask(self.bm25, filters)
        dense = self.index.as_retriever(similarity_top_k=k, filters=filters)
        return QueryFusionRetriever([dense, self.bm25], llm=MockLLM(), mode=mode,
                                    similarity_top_k=k, num_queries=1)


def _llama_filters(where: dict | None):
    if not where:
        return None
    from llama_index.core.vector_stores import ExactMatchFilter, MetadataFilters

    clauses = where["$and"] if set(where) == {"$and"} else [where]  # equalities only
    return MetadataFilters(filters=[ExactMatchFilter(key=k, value=v)
                                    for clause in clauses for k, v in clause.items()])


def _llama_mask(bm25, filters) -> list[int] | None:
    """The weight mask `BM25Retriever(filters=...)` computes in its constructor."""
    if filters is None:
        return None
    from llama_index.core.vector_stores.utils import build_metadata_filter_fn

    by_id = {c["node_id"]: c for c in bm25.corpus}
    keep = build_metadata_filter_fn(lambda node_id: by_id[node_id], filters)
    return [int(keep(c["node_id"])) for c in bm25.corpus]


def build_llama(nodes: list[Any], source: VectorSource, client, collection: str
                ) -> tuple[LlamaStack, dict[str, float]]:
    from llama_index.core import StorageContext, VectorStoreIndex
    from llama_index.retrievers.bm25 import BM25Retriever
    from llama_index.vector_stores.chroma import ChromaVectorStore

    timings: dict[str, float] = {}
    with Timer() as t:
        store = ChromaVectorStore(chroma_collection=client.get_or_create_collection(collection))
        index = VectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(
            vector_store=store), embed_model=llama_embedding(source))
    timings["vector_s"] = t.seconds
    with Timer() as t:
        # its defaults: PyStemmer English stemmer, bm25s English stopwords
        bm25 = BM25Retriever.from_defaults(nodes=nodes, similarity_top_k=10)
    timings["bm25_s"] = t.seconds
    return LlamaStack(index, bm25), timings


def llama_ids(results: Sequence[Any]) -> list[str]:
    return [r.node.node_id for r in results]


def unique(ids: Iterable[str]) -> list[str]:
    """First occurrence of each id, order kept."""
    return list(dict.fromkeys(ids))
