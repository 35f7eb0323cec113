"""A LangChain RAG chain over retrievekit, offline: the bundled MiniLM embeds, an in-memory
Chroma stores, and a fake chat model stands in for the LLM.

    HF_HUB_OFFLINE=1 python examples/langchain_rag.py

Prints the prompt the model received, its answer, and the ids of the cited sources. Swap
`FakeListChatModel` for any LangChain chat model to get real answers.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from langchain_core.documents import Document  # noqa: E402
from langchain_core.language_models import FakeListChatModel  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_core.runnables import RunnableLambda, RunnablePassthrough  # noqa: E402

from retrievekit.langchain import RetrieveKitRetriever  # noqa: E402

DOCS = [
    Document(id="rrf", page_content="Reciprocal rank fusion merges ranked lists by summing "
             "1 / (60 + rank) for each document.", metadata={"topic": "search"}),
    Document(id="bm25", page_content="BM25 scores documents by term frequency and inverse "
             "document frequency, with length normalisation.", metadata={"topic": "search"}),
    Document(id="e1042", page_content="Error E1042 means the index was built with another "
             "embedding model; rebuild it or reopen it with its settings.",
             metadata={"topic": "errors"}),
    Document(id="sourdough", page_content="Sourdough bread rises thanks to a fermented "
             "starter of flour and water.", metadata={"topic": "cooking"}),
]

PROMPT = ChatPromptTemplate.from_template(
    "Answer the question from the context only and cite the ids in brackets.\n\n"
    "Context:\n{context}\n\nQuestion: {question}")


def format_docs(docs: list[Document]) -> str:
    return "\n".join(f"[{d.id}] {d.page_content}" for d in docs)


def main() -> int:
    import torch

    torch.set_num_threads(max(1, min(4, (os.cpu_count() or 2) // 2)))
    question = "What does error E1042 mean?"
    with RetrieveKitRetriever(path=":memory:", collection="langchain-rag-example",
                              model="sentence-transformers/all-MiniLM-L6-v2", k=2) as retriever:
        retriever.add_documents(DOCS)

        sources = retriever.invoke(question)  # what the chain will see, with scores
        prompts: list[str] = []

        def remember(prompt_value):
            prompts.append(prompt_value.to_string())
            return prompt_value

        llm = FakeListChatModel(responses=[
            f"E1042 means the index was built with another embedding model [{sources[0].id}]."])
        chain = ({"context": retriever | format_docs, "question": RunnablePassthrough()}
                 | PROMPT | RunnableLambda(remember) | llm | StrOutputParser())
        answer = chain.invoke(question)

    print("prompt sent to the model:\n" + prompts[0] + "\n")
    print("answer:", answer)
    print("sources:")
    for d in sources:
        ranks = ", ".join(f"{stage} #{rank}" for stage, rank in
                          d.metadata["retrievekit_ranks"].items())
        print(f"  {d.id}  score={d.metadata['score']:.4f}  ({ranks})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
