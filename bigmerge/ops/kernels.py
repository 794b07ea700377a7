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


def threads() -> int:
    """Parts to split a block into: a few per numba thread, for balance."""
    if not AVAILABLE:
        return 1
    from numba import get_num_threads

    return int(get_num_threads())


HI_BINS = 1 << 15
LO_BINS = 1 << 16
_CHUNK = 1 << 16


@njit(cache=True)
def _round(v: np.float32, bf16: bool) -> np.float32:
    """v itself, or v rounded to bfloat16 (to nearest, ties to even) as torch rounds every
    bfloat16 operation's float32 result: with bf16 the kernels do bfloat16 arithmetic."""
    if not bf16:
        return v
    b = np.float32(v).view(np.int32)
    b = (b + np.int32(0x7FFF) + ((b >> 16) & np.int32(1))) & np.int32(-65536)
    return np.int32(b).view(np.float32)


@njit(cache=True, parallel=True)
def magnitude_hists(
    x: np.ndarray, base_row: int, rows: np.ndarray, params: np.ndarray, mode: int, nparts: int, bf16: bool = False
) -> np.ndarray:
    """Counts over |x[r] - x[base]| for each r in rows, in one pass.

    mode 0: histogram of the high 16 bits of the bit patterns (32768 bins);
    mode 1: histogram of the low 16 bits of values whose high bits equal params[k];
    mode 2: how many values equal the float32 whose bit pattern is params[k] (1 bin).
    x is float32 [n_sources, m]. Each thread fills its own histogram; counts are exact.
    """
    m = x.shape[1]
    nbins = HI_BINS if mode == 0 else (LO_BINS if mode == 1 else 1)
    nparts = max(1, min(nparts, (m + _CHUNK - 1) // _CHUNK))
    local = np.zeros((nparts, rows.shape[0], nbins), dtype=np.int64)
    step = (m + nparts - 1) // nparts
    for p in prange(nparts):
        j0 = p * step
        j1 = min(m, j0 + step)
        mag = np.empty(min(_CHUNK, max(1, j1 - j0)), dtype=np.float32)
        bits = mag.view(np.int32)  # |delta| as its bit pattern: monotonic for non-negative floats
        for c0 in range(j0, j1, _CHUNK):
            c1 = min(j1, c0 + _CHUNK)
            for k in range(rows.shape[0]):
                r = rows[k]
                want = params[k]
                for j in range(c0, c1):
                    mag[j - c0] = np.abs(_round(np.float32(x[r, j] - x[base_row, j]), bf16))
                for q in range(c1 - c0):
                    b = bits[q]
                    if mode == 0:
                        local[p, k, b >> 16] += 1
                    elif mode == 1:
                        if (b >> 16) == want:
                            local[p, k, b & 0xFFFF] += 1
                    elif b == want:
                        local[p, k, 0] += 1
    out = np.zeros((rows.shape[0], nbins), dtype=np.int64)
    for p in range(nparts):
        out += local[p]
    return out


@njit(cache=True)
def tie_split_mask(
    x: np.ndarray, base_row: int, row: int, thr_bits: np.int32, quota: int, out: np.ndarray, bf16: bool = False
) -> None:
    """Top-k mask of one source where ties straddle k: above the threshold, plus the first
    `quota` values equal to it in index order (sequential by nature; one pass)."""
    taken = 0
    m = x.shape[1]
    mag = np.empty(min(_CHUNK, max(1, m)), dtype=np.float32)
    bits = mag.view(np.int32)
    for c0 in range(0, m, _CHUNK):
        c1 = min(m, c0 + _CHUNK)
        for j in range(c0, c1):
            mag[j - c0] = np.abs(_round(np.float32(x[row, j] - x[base_row, j]), bf16))
        for q in range(c1 - c0):
            b = bits[q]
            if b > thr_bits:
                out[c0 + q] = 1
            elif b == thr_bits and taken < quota:
                out[c0 + q] = 1
                taken += 1
            else:
                out[c0 + q] = 0


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
    nparts: int,
    bf16: bool = False,
) -> None:
    """mergekit's generalized task arithmetic for one block, fused.

    Per element: delta_r = x_r - base; top-k mask (|delta| >= thr, or a precomputed mask where
    ties are split); optional L1 rescale; times weight; then either the TIES sign election
    (majority of the weighted sum, agreeing deltas summed, divided by agreeing weights) or a
    plain sum divided by the sum of weights; times lambda; plus base.
    """
    m = x.shape[1]
    n = others.shape[0]
    step = (m + nparts - 1) // nparts
    for p in prange(nparts):
        d = np.empty(n, dtype=np.float32)  # one scratch per part, not per element
        for j in range(p * step, min(m, (p + 1) * step)):
            b = x[base_row, j]
            for r in range(n):
                v = _round(np.float32(x[others[r], j] - b), bf16)
                if not math.isnan(thr[r]):
                    if use_mask[r]:
                        keep = keep_masks[r, j] != 0
                    else:
                        # |v| >= thr compares like their bit patterns do (NaN counts as large)
                        keep = np.abs(v) >= thr[r] or math.isnan(v)
                    v = np.float32(v * (np.float32(1.0) if keep else np.float32(0.0)))
                if not math.isnan(scale[r]):
                    v = _round(np.float32(v * scale[r]), bf16)
                d[r] = _round(np.float32(v * weights[r]), bf16)
            mixed = d[0]
            for r in range(1, n):
                mixed = np.float32(mixed + d[r])
            mixed = _round(mixed, bf16)  # rows summed in float32, rounded once (task_arithmetic._sum_rows)
            if consensus:
                majority = np.float32(1.0) if mixed >= 0 else np.float32(-1.0)
                mixed = np.float32(0.0)
                div = np.float32(0.0)
                for r in range(n):
                    v = d[r]
                    sgn = (
                        np.float32(1.0)
                        if v > 0
                        else (np.float32(-1.0) if v < 0 else (v if math.isnan(v) else np.float32(0.0)))
                    )
                    a = np.float32(1.0) if sgn == majority else np.float32(0.0)
                    mv = np.float32(v * a)
                    wv = np.float32(a * weights[r])
                    if r == 0:
                        mixed = mv
                        div = wv
                    else:
                        mixed = np.float32(mixed + mv)
                        div = np.float32(div + wv)
                mixed = _round(mixed, bf16)
                div = _round(div, bf16)
                if div == 0:
                    div = np.float32(1.0)
            else:
                div = plain_divisor
            if normalize:
                mixed = _round(np.float32(mixed / div), bf16)
            if lam != 1:
                mixed = _round(np.float32(mixed * lam), bf16)
            out[j] = _round(np.float32(b + mixed), bf16)


@njit(cache=True, parallel=True)
def rank_keep(
    bits: np.ndarray,
    outer: int,
    flen: int,
    inner: int,
    u: np.ndarray,
    lo: float,
    eps: float,
    density: float,
    out: np.ndarray,
    nparts: int,
) -> None:
    """DELLA's keep mask: within each fiber (element (a, b, c) of a [outer, flen, inner] view, fibers
    along b), rank |delta| from the smallest (ties by index, as a stable sort), and keep
    element j where u[j] < lo + (rank / (flen - 1)) * 2 * eps (density itself for a fiber of one).

    The ranks come from a stable LSD radix sort of the bit patterns (11 + 11 + 9 bits): exact
    ranks are what the method defines, and a radix pass per digit is O(flen) per fiber.
    """
    nfib = outer * inner
    nparts = max(1, min(nparts, nfib))
    step = (nfib + nparts - 1) // nparts
    for p in prange(nparts):
        keys = np.empty(flen, dtype=np.int32)
        idx = np.empty(flen, dtype=np.int32)
        keys2 = np.empty(flen, dtype=np.int32)
        idx2 = np.empty(flen, dtype=np.int32)
        count = np.empty(2048, dtype=np.int64)
        for f in range(p * step, min(nfib, (p + 1) * step)):
            a = f // inner
            c = f - a * inner
            start = a * flen * inner + c
            for b in range(flen):
                keys[b] = bits[start + b * inner]
                idx[b] = b
            for shift in (0, 11, 22):
                count[:] = 0
                for b in range(flen):
                    count[(keys[b] >> shift) & 2047] += 1
                if count[(keys[0] >> shift) & 2047] == flen:
                    continue  # every key has this digit: the order stays
                total = 0
                for d in range(2048):
                    n_d = count[d]
                    count[d] = total
                    total += n_d
                for b in range(flen):
                    d = (keys[b] >> shift) & 2047
                    pos = count[d]
                    count[d] = pos + 1
                    keys2[pos] = keys[b]
                    idx2[pos] = idx[b]
                keys, keys2 = keys2, keys
                idx, idx2 = idx2, idx
            for r in range(flen):
                j = start + idx[r] * inner
                prob = density if flen == 1 else lo + (r / (flen - 1)) * 2.0 * eps
                out[j] = u[j] < prob


@njit(cache=True, parallel=True)
def l1_kept(x: np.ndarray, base_row: int, row: int, keep: np.ndarray, out: np.ndarray, bf16: bool) -> None:
    """sum |x[row] - x[base]| and the same over the kept elements, in float64, per chunk of
    _CHUNK elements (out: [n_chunks, 2]; the caller adds the chunks in order). Fixed chunks, not
    per-thread parts, so the sums do not depend on the number of threads."""
    m = x.shape[1]
    for c in prange(out.shape[0]):
        before = 0.0
        after = 0.0
        for j in range(c * _CHUNK, min(m, (c + 1) * _CHUNK)):
            a = np.float64(np.abs(_round(np.float32(x[row, j] - x[base_row, j]), bf16)))
            before += a
            if keep[j]:
                after += a
        out[c, 0] = before
        out[c, 1] = after


def l1_before_after(
    x: np.ndarray, base_row: int, row: int, keep: np.ndarray, bf16: bool = False
) -> tuple[float, float]:
    """(L1 of a delta, L1 of its kept elements), each summed chunk by chunk in index order."""
    out = np.zeros(((x.shape[1] + _CHUNK - 1) // _CHUNK, 2), dtype=np.float64)
    l1_kept(x, base_row, row, keep, out, bf16)
    before = after = 0.0
    for c in range(out.shape[0]):
        before += float(out[c, 0])
        after += float(out[c, 1])
    return before, after


# splitmix64 (Steele, Lea & Flood): a counter-based generator, u = f(key, element index), so draws
# are the same whatever the blocks, threads or ranks, and cost one hash per element.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_TO_UNIT = np.float32(2.0**-24)


@njit(cache=True, parallel=True)
def _uniform_kernel(key: np.uint64, start: np.uint64, out: np.ndarray, nparts: int) -> None:
    n = out.shape[0]
    step = (n + nparts - 1) // nparts
    for p in prange(nparts):
        for j in range(p * step, min(n, (p + 1) * step)):
            z = key + (start + np.uint64(j) + np.uint64(1)) * _GOLDEN
            z = (z ^ (z >> np.uint64(30))) * _MIX1
            z = (z ^ (z >> np.uint64(27))) * _MIX2
            z = z ^ (z >> np.uint64(31))
            out[j] = np.float32(z >> np.uint64(40)) * _TO_UNIT


def uniform(key: int, start: int, out: np.ndarray) -> np.ndarray:
    """U[0, 1) float32 draws number start, start + 1, ... of the stream `key` (24-bit, exact),
    into out: the numba kernel, or the same integer arithmetic in numpy."""
    if AVAILABLE:
        _uniform_kernel(np.uint64(key), np.uint64(start), out, max(1, min(4 * threads(), out.shape[0] // _CHUNK)))
        return out
    z = np.arange(start + 1, start + 1 + out.shape[0], dtype=np.uint64) * _GOLDEN + np.uint64(key)
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z ^= z >> np.uint64(31)
    np.multiply((z >> np.uint64(40)).astype(np.float32), _TO_UNIT, out=out)
    return out
