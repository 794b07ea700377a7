"""Fused CPU kernels for the task-vector family (numba), one pass over a block.

The torch code in task_arithmetic.py states the arithmetic; these kernels do exactly the
same float32 operations in the same order, element by element (numba does not contract
a*b+c into FMA unless fastmath is on), in one pass instead of a dozen: the same bits,
several times faster. A test pins kernels and torch code to identical output. Without
numba, or for other compute dtypes, the torch code runs.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

try:  # numba is a dependency, but keep the torch path usable without it
    if os.environ.get("BIGMERGE_NO_NUMBA") == "1":
        raise ImportError("disabled by BIGMERGE_NO_NUMBA")
    from numba import njit, prange

    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised by BIGMERGE_NO_NUMBA=1 in tests
    AVAILABLE = False

    def njit(*args: Any, **kwargs: Any) -> Any:
        return lambda f: f

    prange = range

HI_BINS = 1 << 15
LO_BINS = 1 << 16
_CHUNK = 1 << 16


@njit(cache=True, parallel=True)
def magnitude_hists(x: np.ndarray, base_row: int, rows: np.ndarray, lo_bins: np.ndarray, mode: int) -> np.ndarray:
    """Histograms of |x[r] - x[base]| bit patterns for each r in rows, in one pass.

    mode 0: high 16 bits (32768 bins); mode 1: low 16 bits of values whose high bits equal
    lo_bins[k] (65536 bins). x is float32 [n_sources, m]. Counts are exact integers.
    """
    m = x.shape[1]
    nbins = HI_BINS if mode == 0 else LO_BINS
    nchunks = (m + _CHUNK - 1) // _CHUNK
    local = np.zeros((nchunks, rows.shape[0], nbins), dtype=np.int64)
    for c in prange(nchunks):
        j0 = c * _CHUNK
        j1 = min(m, j0 + _CHUNK)
        mag = np.empty(j1 - j0, dtype=np.float32)
        bits = mag.view(np.int32)  # |delta| as its bit pattern: monotonic for non-negative floats
        for k in range(rows.shape[0]):
            r = rows[k]
            want = lo_bins[k]
            for j in range(j0, j1):
                mag[j - j0] = np.abs(np.float32(x[r, j] - x[base_row, j]))
            for q in range(j1 - j0):
                hi = bits[q] >> 16
                if mode == 0:
                    local[c, k, hi] += 1
                elif hi == want:
                    local[c, k, bits[q] & 0xFFFF] += 1
    out = np.zeros((rows.shape[0], nbins), dtype=np.int64)
    for c in range(nchunks):
        out += local[c]
    return out


@njit(cache=True, parallel=True)
def task_vector_merge(
    x: np.ndarray,
    base_row: int,
    others: np.ndarray,
    weights: np.ndarray,
    thr: np.ndarray,
    keep_masks: np.ndarray,
    use_mask: np.ndarray,
    scale: np.ndarray,
    consensus: bool,
    normalize: bool,
    plain_divisor: np.float32,
    lam: np.float32,
    out: np.ndarray,
) -> None:
    """mergekit's generalized task arithmetic for one block, fused.

    Per element: delta_r = x_r - base; top-k mask (|delta| >= thr, or a precomputed mask where
    ties are split); optional L1 rescale; times weight; then either the TIES sign election
    (majority of the weighted sum, agreeing deltas summed, divided by agreeing weights) or a
    plain sum divided by the sum of weights; times lambda; plus base.
    """
    m = x.shape[1]
    n = others.shape[0]
    for j in prange(m):
        b = x[base_row, j]
        d = np.empty(n, dtype=np.float32)
        for r in range(n):
            v = np.float32(x[others[r], j] - b)
            if not math.isnan(thr[r]):
                if use_mask[r]:
                    keep = keep_masks[r, j] != 0
                else:
                    # |v| >= thr compares like their bit patterns do (NaN counts as large)
                    keep = np.abs(v) >= thr[r] or math.isnan(v)
                v = np.float32(v * (np.float32(1.0) if keep else np.float32(0.0)))
            if not math.isnan(scale[r]):
                v = np.float32(v * scale[r])
            d[r] = np.float32(v * weights[r])
        mixed = d[0]
        for r in range(1, n):
            mixed = np.float32(mixed + d[r])
        if consensus:
            majority = np.float32(1.0) if mixed >= 0 else np.float32(-1.0)
            mixed = np.float32(0.0)
            div = np.float32(0.0)
            for r in range(n):
                v = d[r]
                sgn = np.float32(1.0) if v > 0 else (np.float32(-1.0) if v < 0 else (v if math.isnan(v) else np.float32(0.0)))
                a = np.float32(1.0) if sgn == majority else np.float32(0.0)
                mv = np.float32(v * a)
                wv = np.float32(a * weights[r])
                if r == 0:
                    mixed = mv
                    div = wv
                else:
                    mixed = np.float32(mixed + mv)
                    div = np.float32(div + wv)
            if div == 0:
                div = np.float32(1.0)
        else:
            div = plain_divisor
        if normalize:
            mixed = np.float32(mixed / div)
        if lam != 1:
            mixed = np.float32(mixed * lam)
        out[j] = np.float32(b + mixed)
