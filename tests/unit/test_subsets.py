"""The filter memo (subsets.py) on its own: one subset per filter, whoever remembers it."""

from __future__ import annotations

import numpy as np

from retrievekit.subsets import Filter, Subsets

IDS = [f"r{i}" for i in range(10)]


def test_a_filter_remembered_twice_is_one_subset():
    """Two searches that remember the same filter at once get the same subset, so that
    vectors either holds count against the budget (a second would replace the first in
    the memo and its vectors would be held uncounted)."""
    memo = Subsets(lambda q: 3, lambda q, n: IDS[:n], size=len(IDS))
    f = Filter("{\"a\": 1}", None)
    first, second = memo.remember(f), memo.remember(f)
    assert first is second is memo.subset(f)
    memo.hold(first, (IDS[:3], np.ones((3, 2), dtype=np.float32)))
    assert memo.subset(f).vectors is not None
