"""Every ```python block of README.md and docs/*.md runs as written (tests/docs/run_snippets.py),
so the documentation cannot drift from the code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_snippets_run(page, tmp_path, tiny_cross_encoder_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           # the pages read the cross-encoder's name from here (none exists offline)
           "RETRIEVEKIT_RERANKER": str(tiny_cross_encoder_path)}
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "docs" / "run_snippets.py"),
                          str(page)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_the_runner_fails_on_a_broken_block(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 1\n```\n<!-- not run: elsewhere -->\n```python\n"
                    "raise SystemExit(3)\n```\n```python\nassert x == 2\n```\n")
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "docs" / "run_snippets.py"),
                          str(page)], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 1 and "page.md:9" in out.stdout
