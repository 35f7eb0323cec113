"""The content hash of a local model directory (recorded in stores, keys the ONNX cache)."""

from __future__ import annotations

from retrievekit import models
from retrievekit.models import ResolvedModel, model_fingerprint


def _model(root):
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"hidden_size": 8}')
    (root / "model.safetensors").write_bytes(b"weights-1")
    return ResolvedModel("m", str(root), "path")


def test_fingerprint_follows_the_weights_even_under_a_cache_directory(tmp_path):
    # models often live under ~/.cache/...: the path *above* the model must not matter
    for root in (tmp_path / "plain" / "m", tmp_path / ".cache" / "models" / "m"):
        resolved = _model(root)
        first = model_fingerprint(resolved)
        assert first and first != "e3b0c44298fc1c14"  # not the hash of no files
        (root / "model.safetensors").write_bytes(b"weights-2")
        models._hash_dir.cache_clear()
        assert model_fingerprint(resolved) != first


def test_fingerprint_ignores_exports_and_caches_inside_the_model(tmp_path):
    resolved = _model(tmp_path / "m")
    first = model_fingerprint(resolved)
    (tmp_path / "m" / "onnx").mkdir()
    (tmp_path / "m" / "onnx" / "model.onnx").write_bytes(b"export")
    (tmp_path / "m" / ".cache").mkdir()
    (tmp_path / "m" / ".cache" / "x.json").write_text("{}")
    models._hash_dir.cache_clear()
    assert model_fingerprint(resolved) == first
