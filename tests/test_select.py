"""The radix select finds exactly the k-th largest magnitude, like a sort would."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bigmerge.ops.task_vector import select


def _threshold(x: torch.Tensor, k: int, splits: int) -> float:
    parts = torch.tensor_split(x.reshape(-1), splits)
    hi = sum(select.hist_high(select.magnitude_bits(p)) for p in parts)
    b, r = select.find_bin(np.asarray(hi), k)
    lo = sum(select.hist_low(select.magnitude_bits(p), b) for p in parts)
    lb, _ = select.find_bin(np.asarray(lo), r)
    return select.threshold_value(b, lb)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=300),
    st.data(),
)
def test_threshold_is_kth_largest(values: list[float], data: st.DataObject) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(1, len(values)))
    splits = data.draw(st.integers(1, 5))
    want = torch.sort(x.abs(), descending=True).values[k - 1].item()
    assert _threshold(x, k, splits) == want


def test_many_ties_and_zeros() -> None:
    x = torch.tensor([0.0] * 50 + [0.5] * 30 + [-0.5] * 5 + [2.0] * 3)
    assert _threshold(x, 3, 4) == 2.0
    assert _threshold(x, 4, 4) == 0.5
    assert _threshold(x, 38, 4) == 0.5
    assert _threshold(x, 39, 4) == 0.0
