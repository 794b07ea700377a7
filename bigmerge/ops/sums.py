"""Exact float64 sums and Gram matrices of a block's rows, and linear combinations of them:
the statistics of the spherical and geometric operators (numba kernels; the torch code runs
when the torch path is forced, see kernels.use_numba).

Every sum has a fixed shape (LANES partial sums per segment of SEG elements, segments added
in order), so the bits never depend on thread counts, block sizes or the CPU.
"""

from __future__ import annotations

import numpy as np
import torch

from bigmerge.ops.base import Scratch, TensorTask
from bigmerge.ops.kernels import njit, prange, use_numba

SEG = 1 << 16  # elements per partial sum: fixed, so sums never depend on thread counts
PARALLEL_MIN = 1 << 20  # elements of a block below which the kernels run on one thread
SUB = 4096  # elements widened at a time by the fused kernels: small buffers, no page faults
LANES = 16  # partial sums per exact float64 sum (fixed, and a multiple of the vector width)


# -- exact-ish float64 sums (numba; torch when numba is missing) ----------------------------


@njit(cache=True)
def lane_total(acc: np.ndarray) -> float:  # pragma: no cover - compiled
    """The LANES partial sums of acc added in one fixed pairwise tree."""
    s0 = (acc[0] + acc[1]) + (acc[2] + acc[3])
    s1 = (acc[4] + acc[5]) + (acc[6] + acc[7])
    s2 = (acc[8] + acc[9]) + (acc[10] + acc[11])
    s3 = (acc[12] + acc[13]) + (acc[14] + acc[15])
    return (s0 + s1) + (s2 + s3)


@njit(cache=True)
def dot_lanes(p: np.ndarray, q: np.ndarray, acc: np.ndarray) -> None:  # pragma: no cover - compiled
    """acc[l] += p[j] * q[j] in float64 for every j = l (mod LANES): LANES independent sums in a
    fixed order, which LLVM runs as vector lanes (the same bits on any CPU and thread count)."""
    n = p.shape[0]
    nw = n - n % LANES
    for j in range(0, nw, LANES):
        pp = p[j : j + LANES]
        qq = q[j : j + LANES]
        for v in range(LANES):
            acc[v] += np.float64(pp[v]) * np.float64(qq[v])
    for j in range(nw, n):
        acc[j - nw] += np.float64(p[j]) * np.float64(q[j])


@njit(cache=True)
def _gram_part(x: np.ndarray, j0: int, j1: int, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """out[k, k] = sums of x[a, j] * x[b, j] for j in [j0, j1), in float64 (products of float32
    values are exact), LANES fixed lanes per sum: the same bits on any thread count."""
    k = x.shape[0]
    acc = np.empty(LANES)
    for a in range(k):
        for b in range(a, k):
            acc[:] = 0.0
            dot_lanes(x[a][j0:j1], x[b][j0:j1], acc)
            tot = lane_total(acc)
            out[a, b] = tot
            out[b, a] = tot


@njit(cache=True)
def gram_lanes(x: np.ndarray, n: int, lanes: np.ndarray) -> None:  # pragma: no cover - compiled
    """Add x[a, :n] * x[b, :n] into the lanes of lanes[a, b], as _gram_part does: a run of calls
    on consecutive pieces (each a multiple of LANES long but the last) gives _gram_part's sums."""
    k = x.shape[0]
    for a in range(k):
        for b in range(a, k):
            dot_lanes(x[a][:n], x[b][:n], lanes[a, b])


@njit(cache=True)
def gram_finish(lanes: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    k = lanes.shape[0]
    for a in range(k):
        for b in range(a, k):
            tot = lane_total(lanes[a, b])
            out[a, b] = tot
            out[b, a] = tot


@njit(cache=True)
def _seg_gram_serial(x: np.ndarray, seg: int, out: np.ndarray) -> None:  # pragma: no cover - compiled
    m = x.shape[1]
    for s in range(out.shape[0]):
        _gram_part(x, s * seg, min(m, (s + 1) * seg), out[s])


@njit(cache=True, parallel=True)
def _seg_gram_parallel(x: np.ndarray, seg: int, out: np.ndarray) -> None:  # pragma: no cover - compiled
    m = x.shape[1]
    for s in prange(out.shape[0]):
        _gram_part(x, s * seg, min(m, (s + 1) * seg), out[s])


@njit(cache=True)
def _col_gram_part(x: np.ndarray, cols: int, c0: int, c1: int, out: np.ndarray) -> None:  # pragma: no cover
    """out[c, k, k] for columns c in [c0, c1): sums over rows of x[a, r, c] * x[b, r, c]."""
    k, m = x.shape
    for r in range(m // cols):
        o = r * cols
        for c in range(c0, c1):
            for a in range(k):
                va = np.float64(x[a, o + c])
                for b in range(a, k):
                    out[c, a, b] += va * np.float64(x[b, o + c])
    for c in range(c0, c1):
        for a in range(k):
            for b in range(a):
                out[c, a, b] = out[c, b, a]


@njit(cache=True)
def _col_gram_serial(x: np.ndarray, cols: int, out: np.ndarray) -> None:  # pragma: no cover - compiled
    _col_gram_part(x, cols, 0, cols, out)


@njit(cache=True, parallel=True)
def _col_gram_parallel(x: np.ndarray, cols: int, out: np.ndarray) -> None:  # pragma: no cover - compiled
    step = 256
    for p in prange((cols + step - 1) // step):
        _col_gram_part(x, cols, p * step, min(cols, (p + 1) * step), out)


@njit(cache=True)
def _lincomb_part(x: np.ndarray, coef: np.ndarray, j0: int, j1: int, out: np.ndarray) -> None:  # pragma: no cover
    """out[j] = sum_i coef[i] * x[i, j] for j in [j0, j1), accumulated in float64, rounded once."""
    for j in range(j0, j1):
        acc = 0.0
        for i in range(x.shape[0]):
            acc += coef[i] * np.float64(x[i, j])
        out[j] = acc


@njit(cache=True)
def _lincomb_serial(x: np.ndarray, coef: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    _lincomb_part(x, coef, 0, x.shape[1], out)


@njit(cache=True, parallel=True)
def _lincomb_parallel(x: np.ndarray, coef: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    m = x.shape[1]
    for s in prange((m + SEG - 1) // SEG):
        _lincomb_part(x, coef, s * SEG, min(m, (s + 1) * SEG), out)


@njit(cache=True)
def widened_chunk(
    xf: np.ndarray, xb: np.ndarray, bf16: bool, j0: int, j1: int, buf: np.ndarray
) -> np.ndarray:  # pragma: no cover
    """x[j0:j1] as float32: the float32 source itself, or bfloat16 bits widened (exact) into buf."""
    if not bf16:
        return xf[j0:j1]
    src = xb[j0:j1]
    for j in range(j1 - j0):
        buf[j] = np.uint32(np.uint16(src[j])) << np.uint32(16)
    return buf[: j1 - j0].view(np.float32)


def parallel(x: torch.Tensor) -> bool:
    """Threads only pay off on large blocks: starting them costs more than a small block's sums."""
    return x.numel() >= PARALLEL_MIN


def seg_gram(x: torch.Tensor, seg: int) -> np.ndarray:
    """Gram matrices of the rows of x [k, m] over segments of `seg` elements: [n_seg, k, k]."""
    k, m = x.shape
    if m == 0:
        return np.zeros((0, k, k))
    nseg = (m + seg - 1) // seg
    if use_numba() and x.device.type == "cpu":
        out = np.zeros((nseg, k, k))
        (_seg_gram_parallel if parallel(x) else _seg_gram_serial)(x.numpy(), seg, out)
        return out
    pad = torch.zeros((k, nseg * seg), dtype=torch.float64, device=x.device)
    pad[:, :m] = x
    v = pad.view(k, nseg, seg)
    return torch.einsum("asj,bsj->sab", v, v).cpu().numpy()


def whole_gram(x: torch.Tensor) -> np.ndarray:
    """Gram matrix [k, k] of the rows of x over all of the block, segments summed in order."""
    parts = seg_gram(x, SEG)
    acc = np.zeros((x.shape[0], x.shape[0]))
    for p in parts:
        acc = acc + p
    return acc


def col_gram(x: torch.Tensor, cols: int) -> np.ndarray:
    """Per column: the Gram matrix over rows of x [k, rows * cols] -> [cols, k, k]."""
    k = x.shape[0]
    if use_numba() and x.device.type == "cpu":
        out = np.zeros((cols, k, k))
        (_col_gram_parallel if parallel(x) else _col_gram_serial)(x.numpy(), cols, out)
        return out
    v = x.to(torch.float64).view(k, -1, cols)
    return torch.einsum("arc,brc->cab", v, v).cpu().numpy()


def lincomb(x: torch.Tensor, coef: np.ndarray, out: torch.Tensor) -> torch.Tensor:
    """out = sum_i coef[i] * x[i], in float64, rounded once to out's dtype (float32/64)."""
    if use_numba() and x.device.type == "cpu" and out.dtype == x.dtype:
        (_lincomb_parallel if parallel(x) else _lincomb_serial)(x.numpy(), coef.astype(np.float64), out.numpy())
        return out
    acc = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for i in range(x.shape[0]):
        acc.add_(x[i].to(torch.float64), alpha=float(coef[i]))
    return out.copy_(acc)


def wide(task: TensorTask) -> torch.dtype:
    """The dtype exact sums start from: float64 for float64, else float32 (exact widening)."""
    return torch.float64 if task.compute_dtype == torch.float64 else torch.float32


def stack_rows(rows: list[torch.Tensor], sc: Scratch, dtype: torch.dtype, name: str = "stack") -> torch.Tensor:
    """Tensors of one block, flattened into one [k, m] buffer of `dtype` (exact widening)."""
    m = rows[0].numel()
    out = sc.get(name, (len(rows), m), dtype)
    for i, r in enumerate(rows):
        out[i].copy_(r.reshape(-1))
    return out


def sum_rows(parts: list[torch.Tensor], out: torch.Tensor, sc: Scratch) -> torch.Tensor:
    """torch's sum over dim 0 of stacked rows, left to right (its order up to 4 rows), with
    16-bit floats accumulated in float32 and rounded once, as torch does; for 5+ rows a fixed
    order, so the result never depends on the block size."""
    if out.dtype in (torch.bfloat16, torch.float16):
        acc = sc.get("sum_rows_acc", out.shape, torch.float32).copy_(parts[0])
        for p in parts[1:]:
            acc.add_(p)
        return out.copy_(acc)
    out.copy_(parts[0])
    for p in parts[1:]:
        out.add_(p)
    return out


def rounds_scalars(task: TensorTask) -> bool:
    """Whether mergekit takes this tensor's norms and dot products in a 16-bit compute dtype:
    it then rounds each to that dtype (and rounds element-wise products before summing them,
    where it writes `(a * b).sum()`), and bigmerge rounds at the same places. With float32 or
    float64 compute the statistics stay exact sums (mergekit's float32 sums differ in the
    last bits only; see test_vs_mergekit)."""
    return task.compute_dtype in (torch.bfloat16, torch.float16)


def rounded_products(a: torch.Tensor, b: torch.Tensor, seg: int) -> np.ndarray:
    """Sums over segments of `seg` elements of a * b rounded element-wise to a's 16-bit dtype
    (torch's `(a * b).sum()` rounds each product, then accumulates): float64 sums of the
    rounded products (at most 22 significant bits each: exact but for extreme spreads of
    magnitude) in numpy's fixed pairwise order, the same on any thread count."""
    m = a.numel()
    if m == 0:
        return np.zeros(0)
    nseg = (m + seg - 1) // seg
    p = np.zeros(nseg * seg)
    p[:m] = (a.reshape(-1) * b.reshape(-1)).to(torch.float64).cpu().numpy()
    return p.reshape(nseg, seg).sum(axis=1)


def rounded_gram(x: torch.Tensor, seg: int) -> np.ndarray:
    """seg_gram of the rows of x [k, m] (a 16-bit dtype) as mergekit's torch code sums them:
    the diagonal (torch.norm, which squares in float32) exact, every other entry the sum of
    the products rounded to x's dtype (rounded_products)."""
    k = x.shape[0]
    out = seg_gram(x.to(torch.float32), seg)
    for a in range(k):
        for b in range(a + 1, k):
            s = rounded_products(x[a], x[b], seg)
            out[:, a, b] = s
            out[:, b, a] = s
    return out


def as_scalars(x: np.ndarray | float, dt: torch.dtype) -> torch.Tensor:
    """float64 statistics as torch's reductions return them in `dt`: a 16-bit dtype's sums
    and norms are accumulated in float32 and rounded from it, so these go through float32."""
    t = torch.as_tensor(np.asarray(x, dtype=np.float64))
    if dt in (torch.bfloat16, torch.float16):
        t = t.to(torch.float32)
    return t.to(dt)
