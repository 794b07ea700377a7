"""Exact top-k magnitude thresholds in O(n), reduced across blocks: a radix select.

For non-negative float32 values the int32 bit patterns sort like the values. Round 0
counts the high 16 bits (32768 bins: the sign bit is 0), which finds the bin holding the
k-th largest value; round 1 counts the low 16 bits inside that bin, which finds the value.
Counts are integers, so summing them over blocks and ranks is exact in any order.
"""

from __future__ import annotations

import numpy as np
import torch

HI_BINS = 1 << 15
LO_BINS = 1 << 16


def magnitude_bits(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """|x| as float32, viewed as int32 bit patterns (monotonic in |x|), flat.

    `out`, a float32 buffer of x's size, avoids an allocation per call.
    """
    x = x.detach().reshape(-1)
    if x.dtype == torch.float32:
        a = torch.abs(x, out=out.reshape(-1)) if out is not None else x.abs()
    else:
        a = x.abs().to(torch.float32)
    return a.view(torch.int32)


def hist_high(bits: torch.Tensor, work: torch.Tensor | None = None) -> np.ndarray:
    hi = torch.bitwise_right_shift(bits, 16, out=work) if work is not None else torch.bitwise_right_shift(bits, 16)
    return torch.bincount(hi, minlength=HI_BINS).cpu().numpy().astype(np.int64)


def hist_low(bits: torch.Tensor, hi_bin: int, work: torch.Tensor | None = None) -> np.ndarray:
    # Compare the bit patterns with the bin's bounds instead of shifting: one pass fewer.
    lo_bound = hi_bin << 16
    inside = (bits >= lo_bound) & (bits < lo_bound + LO_BINS)
    lo = torch.bitwise_and(bits[inside], 0xFFFF)
    return torch.bincount(lo, minlength=LO_BINS).cpu().numpy().astype(np.int64)


def find_bin(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest element (k >= 1), and k's rank inside that bin."""
    above = np.cumsum(hist[::-1])  # above[j] = count in the top j+1 bins
    j = int(np.searchsorted(above, k))  # first j with above[j] >= k
    b = len(hist) - 1 - j
    before = int(above[j - 1]) if j > 0 else 0
    return b, k - before


def threshold_value(hi_bin: int, lo_bin: int) -> float:
    bits = np.array([(hi_bin << 16) | lo_bin], dtype=np.int32)
    return float(bits.view(np.float32)[0])
