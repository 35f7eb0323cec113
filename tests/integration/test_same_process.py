"""A second retriever on a directory this process already holds: the error says which one
holds it and how to release it (a notebook cell run twice, a second snippet)."""

from __future__ import annotations

import pytest

from retrievekit.errors import StoreLockedError
from retrievekit.pipeline import HybridRetriever


def test_second_open_in_process_names_the_holder(tmp_path, embedder):
    path = str(tmp_path / "kb")
    first = HybridRetriever(path=path, embedder=embedder)
    first.add_documents(["Kettles boil water."])
    with pytest.raises(StoreLockedError) as err:
        HybridRetriever(path=path, embedder=embedder)
    msg = str(err.value)
    assert "already open in this process" in msg and ".close()" in msg
    assert f"{__file__}:" in msg  # where `first` was opened
    first.close()
    with HybridRetriever.open(path) as again:  # released: opens
        assert again.count() == 1


def test_another_process_is_named_as_such(tmp_path, embedder):
    import subprocess
    import sys

    path = str(tmp_path / "kb")
    HybridRetriever(path=path, embedder=embedder).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from retrievekit.store import ChromaStore, "
         "StoreConfig; s = ChromaStore(StoreConfig(path=sys.argv[1])); s.client; "
         "print('ready', flush=True); time.sleep(60)", path],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLockedError, match="another process"):
            HybridRetriever(path=path, embedder=embedder)
    finally:
        holder.kill()
        holder.wait()
