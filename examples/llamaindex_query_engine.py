"""A LlamaIndex query engine over retrievekit, offline: the bundled MiniLM embeds, an in-memory
Chroma stores, and LlamaIndex's MockLLM stands in for the LLM (it answers with its prompt).

    HF_HUB_OFFLINE=1 python examples/llamaindex_query_engine.py
    HF_HUB_OFFLINE=1 python examples/llamaindex_query_engine.py --reranker cross-encoder/ms-marco-MiniLM-L-6-v2

Prints the response and the source nodes with the rank they had at each stage (dense,
sparse, fused, and rerank when a cross-encoder is given; none is bundled, so pass a name in
your Hugging Face cache or a local directory). Then the same documents through the vector
store: `VectorStoreIndex.from_vector_store(...)` queried with
`vector_store_query_mode="hybrid"`, the way LlamaIndex users do hybrid search. Swap MockLLM
for any LlamaIndex LLM to get real answers.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llama_index.core import Document, VectorStoreIndex  # noqa: E402
from llama_index.core.llms import MockLLM  # noqa: E402
from llama_index.core.query_engine import RetrieverQueryEngine  # noqa: E402
from llama_index.core.vector_stores.types import MetadataFilter, MetadataFilters  # noqa: E402

from retrievekit.llama_index import (RetrieveKitReranker, RetrieveKitRetriever,  # noqa: E402
                                     RetrieveKitVectorStore)

DOCS = [
    Document(id_="rrf", text="Reciprocal rank fusion merges ranked lists by summing "
             "1 / (60 + rank) for each document.", metadata={"topic": "search"}),
    Document(id_="bm25", text="BM25 scores documents by term frequency and inverse document "
             "frequency, with length normalisation.", metadata={"topic": "search"}),
    Document(id_="e1042", text="Error E1042 means the index was built with another embedding "
             "model; rebuild it or reopen it with its settings.", metadata={"topic": "errors"}),
    Document(id_="e2001", text="Error E2001 means the store directory is locked by another "
             "process; close that process first.", metadata={"topic": "errors"}),
    Document(id_="sourdough", text="Sourdough bread rises thanks to a fermented starter of "
             "flour and water.", metadata={"topic": "cooking"}),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reranker", help="cross-encoder name or directory (optional)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, min(4, (os.cpu_count() or 2) // 2)))
    question = "What does error E1042 mean?"
    only_errors = MetadataFilters(filters=[MetadataFilter(key="topic", value="errors")])
    with RetrieveKitRetriever.from_defaults(
            path=":memory:", collection="llamaindex-example",
            model="sentence-transformers/all-MiniLM-L6-v2", similarity_top_k=3) as retriever:
        retriever.add_documents(DOCS)
        postprocessors = [RetrieveKitReranker(args.reranker, top_n=2)] if args.reranker else []
        engine = RetrieverQueryEngine.from_args(retriever, llm=MockLLM(),
                                                node_postprocessors=postprocessors)
        response = engine.query(question)

        filtered = RetrieveKitRetriever(retriever.retriever, similarity_top_k=3,
                                        filters=only_errors).retrieve("locked directory")

    print("response (MockLLM repeats its prompt):\n" + str(response) + "\n")
    print("source nodes:")
    for n in response.source_nodes:
        ranks = ", ".join(f"{stage} #{rank}" for stage, rank in
                          n.node.metadata["retrievekit_ranks"].items())
        print(f"  {n.node.node_id:<10} score={n.score:.4f}  ({ranks})")
    print("with MetadataFilters(topic == errors), 'locked directory' finds:",
          [n.node.node_id for n in filtered])

    with RetrieveKitVectorStore(path=":memory:", collection="llamaindex-vector-store",
                                model="sentence-transformers/all-MiniLM-L6-v2") as vs:
        vs.add(DOCS)
        index = VectorStoreIndex.from_vector_store(vs, embed_model=vs.embed_model)
        engine = index.as_query_engine(llm=MockLLM(), vector_store_query_mode="hybrid",
                                       similarity_top_k=2, sparse_top_k=20, alpha=0.5)
        hybrid = engine.query(question)
    print("vector store, vector_store_query_mode='hybrid':",
          [(n.node.node_id, round(n.score, 4)) for n in hybrid.source_nodes])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
