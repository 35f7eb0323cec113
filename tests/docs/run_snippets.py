"""Run the ```python blocks of a Markdown file in order, in one namespace, as a reader would
paste them into one session. A block right after a line ``<!-- not run: <reason> -->`` is
skipped (code for another machine, or for packages a reader may not have).

Usage: python tests/docs/run_snippets.py FILE.md  (run it from a scratch directory: snippets
write stores such as ./index). Exit status 1 names the failing block and its first line.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import sys
import traceback
from pathlib import Path

BLOCK = re.compile(r"(?P<skip><!-- not run: [^>]*-->\s*\n)?```python\n(?P<code>.*?)```", re.S)


def blocks(text: str) -> list[tuple[int, str, bool]]:
    """(line number, code, run?) for each python block."""
    return [(text[:m.start("code")].count("\n") + 1, m.group("code"), m.group("skip") is None)
            for m in BLOCK.finditer(text)]


def main(path: str) -> int:
    ns: dict = {"__name__": "__main__"}
    ran = 0
    for line, code, run in blocks(Path(path).read_text()):
        if not run:
            continue
        try:
            compiled = compile(code, f"{path}:{line}", "exec",
                               flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            result = eval(compiled, ns)
            if inspect.iscoroutine(result):
                asyncio.run(result)
        except BaseException:
            traceback.print_exc()
            print(f"FAILED: the block at {path}:{line}: {code.splitlines()[0]!r}")
            return 1
        ran += 1
    print(f"ran {ran} blocks of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
