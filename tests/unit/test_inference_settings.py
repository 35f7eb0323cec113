"""Inference settings: validation, dtype resolution, engine choice, thread defaults, round trips.

No model is loaded here; tests/integration/test_inference.py runs the engines."""

from __future__ import annotations

import pytest

from retrievekit import inference
from retrievekit.config import RetrieverConfig
from retrievekit.embedding import EmbedderConfig
from retrievekit.errors import ConfigError
from retrievekit.rerank import RerankConfig


def test_inference_settings_round_trip_through_dict():
    cfg = RetrieverConfig.from_dict({
        "embedder": {"backend": "onnx", "onnx_quantize": "int8", "num_threads": 3,
                     "dtype": "bfloat16"},
        "reranker": {"model": "cross-encoder/ms-marco-MiniLM-L-6-v2", "backend": "torch",
                     "dtype": "float32", "num_threads": 1},
    })
    d = cfg.to_dict()
    assert d["embedder"]["backend"] == "onnx" and d["embedder"]["onnx_quantize"] == "int8"
    assert d["reranker"]["backend"] == "torch" and d["reranker"]["num_threads"] == 1
    assert RetrieverConfig.from_dict(d) == cfg


def test_defaults_are_automatic():
    e, r = EmbedderConfig(), RerankConfig()
    assert (e.backend, e.dtype, e.onnx_quantize, e.num_threads) == ("auto", "auto", None, None)
    assert (r.backend, r.dtype, r.onnx_quantize, r.num_threads) == ("auto", "auto", None, None)


@pytest.mark.parametrize("given,stored", [(True, "int8"), (False, None), (None, None),
                                          ("int8", "int8")])
def test_onnx_quantize_accepts_a_bool_or_int8(given, stored):
    assert EmbedderConfig(backend="onnx", onnx_quantize=given).onnx_quantize == stored
    assert RerankConfig(onnx_quantize=given).onnx_quantize == stored


@pytest.mark.parametrize("kind,kwargs,fragment", [
    (EmbedderConfig, {"backend": "tensorrt"}, "backend must be one of"),
    (EmbedderConfig, {"dtype": "int4"}, "dtype must be one of"),
    (EmbedderConfig, {"onnx_quantize": "int4"}, "onnx_quantize must be"),
    (EmbedderConfig, {"backend": "torch", "onnx_quantize": "int8"}, "backend='torch'"),
    (EmbedderConfig, {"backend": "onnx", "device": "cuda"}, "runs on the CPU"),
    (EmbedderConfig, {"num_threads": 0}, "num_threads must be"),
    (EmbedderConfig, {"num_threads": True}, "num_threads must be"),
    (RerankConfig, {"backend": "gpu"}, "reranker.backend"),
    (RerankConfig, {"num_threads": 2.5}, "reranker.num_threads"),
])
def test_bad_inference_settings_name_the_setting(kind, kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        kind(**kwargs)


def test_auto_dtype_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    assert inference.resolve_dtype("auto", "cpu") == "bfloat16"
    assert inference.resolve_dtype("auto", "cuda:0") == "float16"
    assert inference.resolve_dtype("auto", "mps") == "float32"
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    assert inference.resolve_dtype("auto", "cpu") == "float32"
    for explicit in ("float32", "bfloat16", "float16"):
        assert inference.resolve_dtype(explicit, "cpu") == explicit


def test_native_bf16_is_read_from_the_cpu_flags():
    flags = ""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        pass
    expected = "avx512_bf16" in flags.split() or "amx_bf16" in flags.split()
    assert inference.cpu_has_native_bf16() is expected


@pytest.mark.parametrize("backend,dtype,quantize,device,n,engine", [
    ("torch", "float32", None, "cpu", 1, "torch"),
    ("onnx", "bfloat16", None, "cpu", 1000, "onnx"),
    ("auto", "bfloat16", None, "cpu", 1, "onnx"),        # a query: ONNX fp32
    ("auto", "bfloat16", None, "cpu", 1000, "torch"),    # bulk: torch bf16
    ("auto", "float32", None, "cpu", 1000, "onnx"),      # no half precision: ONNX for all
    ("auto", "bfloat16", "int8", "cpu", 1000, "onnx"),   # int8 asked for: ONNX for all
    ("auto", "float16", None, "cuda", 1, "torch"),       # GPUs stay on torch
])
def test_engine_choice(backend, dtype, quantize, device, n, engine):
    assert inference.choose_engine(backend, dtype, quantize, device, n) == engine


def test_auto_threshold_is_inclusive():
    n = inference.AUTO_ONNX_MAX_ITEMS
    assert inference.choose_engine("auto", "bfloat16", None, "cpu", n) == "onnx"
    assert inference.choose_engine("auto", "bfloat16", None, "cpu", n + 1) == "torch"


def test_default_threads_never_oversubscribe(monkeypatch):
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = inference.physical_cores()
    assert 1 <= inference.default_num_threads() <= min(cores, inference.MAX_DEFAULT_THREADS,
                                                        torch.get_num_threads())
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert inference.default_num_threads() == 3
    assert inference.resolve_num_threads(5) == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    assert inference.default_num_threads() <= inference.MAX_DEFAULT_THREADS


def test_torch_threads_are_set_only_when_asked_or_untouched(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(1)  # a process that chose one thread (as tests/conftest.py does)
        inference.configure_torch_threads(None)
        assert torch.get_num_threads() == 1  # respected
        inference.configure_torch_threads(2)
        assert torch.get_num_threads() == 2  # explicit setting applied
        monkeypatch.setattr(inference, "physical_cores", lambda: 16)
        torch.set_num_threads(16)  # torch's untouched default on a 16-core machine
        inference.configure_torch_threads(None)
        assert torch.get_num_threads() == inference.MAX_DEFAULT_THREADS
        monkeypatch.setenv("OMP_NUM_THREADS", "16")
        torch.set_num_threads(16)
        inference.configure_torch_threads(None)
        assert torch.get_num_threads() == 16  # OMP_NUM_THREADS is the user's word
    finally:
        torch.set_num_threads(before)


def test_importing_retrievekit_leaves_torch_threads_alone():
    import subprocess
    import sys

    code = ("import torch; n = torch.get_num_threads(); import retrievekit, retrievekit.embedding, "
            "retrievekit.rerank, retrievekit.inference; assert torch.get_num_threads() == n")
    subprocess.run([sys.executable, "-c", code], check=True)
