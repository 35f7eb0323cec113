"""Crash-safe persistence of derived state in plain formats (JSON and `.npy`, never pickle).

A snapshot is written into a new folder, synced, renamed into place, and only then made
current by atomically replacing `current.json`. A crash leaves the old snapshot or the new
one current, never half of one; leftovers are removed by the next save.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np

FORMAT_VERSION = 1


def write_json(path: Path, obj: Any) -> None:
    """Write JSON to `path` atomically (temporary name, fsync, rename)."""
    tmp = path.with_name(path.name + f".{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_snapshot(directory: str | os.PathLike, prefix: str,
                  files: Mapping[str, Any]) -> Path:
    """Write `files` (name -> ndarray for `.npy`, anything else as JSON) as the new current
    snapshot under `directory`; returns its folder."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    tmp = root / (name + ".tmp")
    tmp.mkdir()
    for fname, obj in files.items():
        if isinstance(obj, np.ndarray):
            np.save(tmp / f"{fname}.npy", obj, allow_pickle=False)
        else:
            write_json(tmp / f"{fname}.json", obj)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.rename(tmp, root / name)
    write_json(root / "current.json", {"dir": name, "format": FORMAT_VERSION})
    for old in root.iterdir():  # earlier snapshots and folders of crashed saves
        if old.is_dir() and old.name != name and old.name.startswith(prefix + "-"):
            shutil.rmtree(old, ignore_errors=True)
    return root / name


def current_snapshot(directory: str | os.PathLike) -> Path:
    """The folder of the current snapshot (OSError/KeyError/ValueError when there is none)."""
    root = Path(directory)
    current = json.loads((root / "current.json").read_text())
    return root / current["dir"]


def load_json(folder: Path, name: str) -> Any:
    return json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))


def load_array(folder: Path, name: str) -> np.ndarray:
    return np.load(folder / f"{name}.npy", allow_pickle=False)
