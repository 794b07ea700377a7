"""Geometric operators: Model Stock and NearSwap, with mergekit 0.1.5's arithmetic.

Model Stock's cosines between task vectors are whole-tensor statistics (per row with
`filter_wise`): exact float64 sums of the compute-dtype products, reduced in block order,
then mergekit's scalar arithmetic on the rounded values (see spherical.py). With a 16-bit
compute dtype the dot products sum the products rounded to it, as mergekit's
`(a * b).sum()` does, and every scalar is rounded to it where mergekit's is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bigmerge.errors import ConfigError
from bigmerge.ops.base import Block, MergeOp, Param, Stats, StatsOp, TensorTask, as_compute, require_base, task_vectors
from bigmerge.ops.kernels import njit, prange, use_numba
from bigmerge.ops.sums import (
    LANES,
    PARALLEL_MIN,
    SEG,
    SUB,
    as_scalars,
    gram_finish,
    gram_lanes,
    rounded_gram,
    rounds_scalars,
    seg_gram,
    stack_rows,
    whole_gram,
    wide,
    widened_chunk,
)

# -- fused kernels: offsets, sums and the interpolation read straight from the sources ---------


@njit(cache=True)
def _round_bf16(v: np.ndarray) -> None:  # pragma: no cover - compiled
    """Round float32 values to bfloat16 in place, to nearest even, as torch rounds a bf16 result."""
    u = v.view(np.uint32)
    for j in range(u.shape[0]):
        b = u[j]
        u[j] = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)


@njit(cache=True)
def _stock_gram_part(
    sf: Any, sb: Any, bf16: bool, rnd: bool, j0: int, j1: int, out: np.ndarray
) -> None:  # pragma: no cover - compiled
    """The Gram matrix of the offsets (fine-tune - base, rounded to the compute dtype) on [j0, j1),
    piece by piece with the lanes of _gram_part: the same sums as the torch code's."""
    k = len(sf) - 1
    buf = np.empty(SUB, dtype=np.uint32)
    x0 = np.empty(SUB, dtype=np.float32)
    rows = np.empty((k, SUB), dtype=np.float32)
    lanes = np.zeros((k, k, LANES))
    for c0 in range(j0, j1, SUB):
        c1 = min(j1, c0 + SUB)
        n = c1 - c0
        x0[:n] = widened_chunk(sf[0], sb[0], bf16, c0, c1, buf)
        for i in range(k):
            xi = widened_chunk(sf[i + 1], sb[i + 1], bf16, c0, c1, buf)
            for j in range(n):
                rows[i, j] = xi[j] - x0[j]
            if rnd:
                _round_bf16(rows[i, :n])
        gram_lanes(rows, n, lanes)
    gram_finish(lanes, out)


@njit(cache=True)
def _stock_gram_serial(
    sf: Any, sb: Any, bf16: bool, rnd: bool, m: int, seg: int, out: np.ndarray
) -> None:  # pragma: no cover
    for s in range(out.shape[0]):
        _stock_gram_part(sf, sb, bf16, rnd, s * seg, min(m, (s + 1) * seg), out[s])


@njit(cache=True, parallel=True)
def _stock_gram_parallel(
    sf: Any, sb: Any, bf16: bool, rnd: bool, m: int, seg: int, out: np.ndarray
) -> None:  # pragma: no cover
    for s in prange(out.shape[0]):
        _stock_gram_part(sf, sb, bf16, rnd, s * seg, min(m, (s + 1) * seg), out[s])


@njit(cache=True)
def _stock_apply_piece(
    sf: Any,
    sb: Any,
    bf16: bool,
    rnd: bool,
    t: np.ndarray,
    omt: np.ndarray,
    cols: int,
    j0: int,
    j1: int,
    out: np.ndarray,
    buf: np.ndarray,
    acc: np.ndarray,
    rest: np.ndarray,
) -> None:  # pragma: no cover - compiled
    """t * (sum(ws) / k) + (1 - t) * base on [j0, j1), each operation rounded to the compute dtype."""
    n = j1 - j0
    k = len(sf) - 1
    acc = acc[:n]
    rest = rest[:n]
    acc[:] = widened_chunk(sf[1], sb[1], bf16, j0, j1, buf)
    for i in range(2, k + 1):
        xi = widened_chunk(sf[i], sb[i], bf16, j0, j1, buf)
        for j in range(n):
            acc[j] = acc[j] + xi[j]
        if rnd:
            _round_bf16(acc)
    kk = np.float32(k)
    for j in range(n):
        acc[j] = acc[j] / kk
    if rnd:
        _round_bf16(acc)
    x0 = widened_chunk(sf[0], sb[0], bf16, j0, j1, buf)
    j = j0
    while j < j1:  # row by row: t is per row with filter_wise, else one value (cols = the block)
        r = j // cols
        end = min(j1, (r + 1) * cols)
        tr = t[r]
        omtr = omt[r]
        for q in range(j - j0, end - j0):
            acc[q] = tr * acc[q]
            rest[q] = omtr * x0[q]
        j = end
    if rnd:
        _round_bf16(acc)
        _round_bf16(rest)
    for j in range(n):
        acc[j] = acc[j] + rest[j]
    if rnd:
        _round_bf16(acc)
    out[j0:j1] = acc


@njit(cache=True)
def _stock_apply_part(
    sf: Any,
    sb: Any,
    bf16: bool,
    rnd: bool,
    t: np.ndarray,
    omt: np.ndarray,
    cols: int,
    j0: int,
    j1: int,
    out: np.ndarray,
) -> None:  # pragma: no cover - compiled
    buf = np.empty(SUB, dtype=np.uint32)
    acc = np.empty(SUB, dtype=np.float32)
    rest = np.empty(SUB, dtype=np.float32)
    for c0 in range(j0, j1, SUB):
        _stock_apply_piece(sf, sb, bf16, rnd, t, omt, cols, c0, min(j1, c0 + SUB), out, buf, acc, rest)


@njit(cache=True)
def _stock_apply_serial(
    sf: Any, sb: Any, bf16: bool, rnd: bool, t: np.ndarray, omt: np.ndarray, cols: int, out: np.ndarray
) -> None:  # pragma: no cover - compiled
    m = out.shape[0]
    for s in range((m + SEG - 1) // SEG):
        _stock_apply_part(sf, sb, bf16, rnd, t, omt, cols, s * SEG, min(m, (s + 1) * SEG), out)


@njit(cache=True, parallel=True)
def _stock_apply_parallel(
    sf: Any, sb: Any, bf16: bool, rnd: bool, t: np.ndarray, omt: np.ndarray, cols: int, out: np.ndarray
) -> None:  # pragma: no cover - compiled
    m = out.shape[0]
    for s in prange((m + SEG - 1) // SEG):
        _stock_apply_part(sf, sb, bf16, rnd, t, omt, cols, s * SEG, min(m, (s + 1) * SEG), out)


def fused_sources(task: TensorTask, block: Block, order: list[int]) -> tuple[Any, Any, bool, bool] | None:
    """The block's sources in `order` as (float32 arrays, bfloat16-bit arrays, sources are bf16,
    compute is bf16) for the fused kernels, or None where those do not apply: no numba, not on
    the CPU, sources of several dtypes, or a cast that rounds (float32 sources, bf16 compute)."""
    dt = task.compute_dtype
    xs = [block.inputs[i] for i in order]
    src = xs[0].dtype
    if not use_numba() or block.scratch.device.type != "cpu" or src not in (torch.float32, torch.bfloat16):
        return None
    if any(x.dtype != src or not x.is_contiguous() for x in xs) or dt not in (src, torch.float32):
        return None
    ef, eb = np.empty(0, np.float32), np.empty(0, np.int16)
    rnd = dt == torch.bfloat16
    if src == torch.bfloat16:
        return tuple(ef for _ in xs), tuple(x.reshape(-1).view(torch.int16).numpy() for x in xs), True, rnd
    return tuple(x.reshape(-1).numpy() for x in xs), tuple(eb for _ in xs), False, rnd


class ModelStockOp(StatsOp):
    """Model Stock: move from the base toward the fine-tunes' average by their task vectors' mean cosine."""

    name = "model_stock"
    params = (
        Param(
            "filter_wise",
            bool,
            "shared",
            default=False,
            doc="one ratio per row (last-dim vector) instead of one per tensor",
        ),
    )
    base = "required"
    min_models = 3
    workspace_per_source = 2.0

    def check(self, task: TensorTask) -> None:
        if len(task.non_base) < 2:
            raise ConfigError(
                f"merge_method 'model_stock' needs at least two models besides base_model, got {len(task.non_base)}"
            )

    @staticmethod
    def per_row(task: TensorTask) -> bool:
        return bool(task.shared["filter_wise"]) and len(task.shape) > 1

    def stat_rounds(self, task: TensorTask) -> int:
        return 1 if task.numel and not self.per_row(task) else 0

    def _offsets(self, task: TensorTask, block: Block) -> torch.Tensor:
        """[fine-tune - base for each fine-tune] of the block, flat, in the compute dtype."""
        return task_vectors(self, task, block, "ms")[1]

    def _gram(self, task: TensorTask, block: Block) -> np.ndarray:
        if rounds_scalars(task):
            # mergekit's dot products are sums of products rounded to the compute dtype
            seg = task.shape[-1] if self.per_row(task) else SEG
            parts = rounded_gram(self._offsets(task, block), seg)
            if self.per_row(task):
                return parts
            acc = np.zeros(parts.shape[1:])
            for p in parts:
                acc = acc + p
            return acc
        fused = fused_sources(task, block, [require_base(self, task), *task.non_base])
        if fused is not None:
            m = block.inputs[0].numel()
            seg = task.shape[-1] if self.per_row(task) else SEG
            parts = np.zeros(((m + seg - 1) // seg, len(task.non_base), len(task.non_base)))
            (_stock_gram_parallel if m * len(task.per_model) >= PARALLEL_MIN else _stock_gram_serial)(
                *fused, m, seg, parts
            )
            if self.per_row(task):
                return parts
            acc = np.zeros(parts.shape[1:])
            for p in parts:  # the same order and bits as whole_gram
                acc = acc + p
            return acc
        off = self._offsets(task, block)
        x = off if off.dtype == wide(task) else stack_rows(list(off), block.scratch, wide(task), "ms_wide")
        if self.per_row(task):
            return seg_gram(x, task.shape[-1])
        return whole_gram(x)

    def stats(self, rnd: int, task: TensorTask, block: Block, prev: Any) -> Stats:
        return {"gram": self._gram(task, block)}

    def finish(self, rnd: int, task: TensorTask, reduced: Stats, prev: Any) -> Any:
        return self._ratio(task, reduced["gram"])

    def _ratio(self, task: TensorTask, g: np.ndarray) -> torch.Tensor:
        """mergekit's interpolation ratio t, shaped to broadcast over a [vectors, length] view."""
        dt = task.compute_dtype
        whole = g.ndim == 2
        g = g.reshape(-1, *g.shape[-2:])
        k = g.shape[-1]
        norms = [as_scalars(np.sqrt(g[:, i, i]), dt) for i in range(k)]
        cos_thetas = []
        for a in range(k):
            for b in range(a + 1, k):
                norm_product = norms[a] * norms[b]
                dot = as_scalars(g[:, a, b].copy(), dt)
                cos_thetas.append((dot / norm_product.clamp(min=1e-6)).clamp(-1, 1))
        if whole:  # one cosine per pair, as mergekit's 0-d (or [1] for a filter-wise 1-d tensor)
            shape = () if not task.shared["filter_wise"] else (1,)
            cos_theta = torch.stack([c.reshape(shape) for c in cos_thetas]).mean(dim=0)
        else:
            # torch's mean over dim 0 is left to right for up to 4 rows; a fixed order beyond,
            # so that rows never depend on how many of them a block holds
            # (a 16-bit dtype's mean accumulates in float32 and rounds once, after the division)
            wide16 = dt in (torch.bfloat16, torch.float16)
            acc = cos_thetas[0].to(torch.float32) if wide16 else cos_thetas[0].clone()
            for c in cos_thetas[1:]:
                acc = acc + c
            cos_theta = (acc / len(cos_thetas)).to(dt)
        cos_theta = cos_theta.unsqueeze(-1)
        count = k
        denominator = 1 + (count - 1) * cos_theta
        # at the singularity mergekit keeps the base
        singular = denominator.abs() < 1e-6
        safe = torch.where(singular, torch.ones_like(denominator), denominator)
        return torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)

    def apply(self, task: TensorTask, block: Block, stats: Any) -> torch.Tensor:
        shape = block.inputs[0].shape
        dt = task.compute_dtype
        if task.numel == 0:
            return torch.empty(shape, dtype=dt)
        t = (
            self._ratio(task, self._gram(task, block))
            if self.per_row(task)
            else self.stats_or_local(task, block, stats)
        ).to(block.scratch.device)
        sc = block.scratch
        cols = task.shape[-1] if self.per_row(task) else block.inputs[0].numel()
        fused = fused_sources(task, block, [require_base(self, task), *task.non_base])
        if fused is not None:  # the same operations in one pass
            m = block.inputs[0].numel()
            out32 = sc.get("ms_out", (m,), torch.float32)
            tt = t.reshape(-1)
            t32 = tt.to(torch.float32).numpy()
            omt32 = (1 - tt).to(torch.float32).numpy()
            kernel = _stock_apply_parallel if m * len(task.per_model) >= PARALLEL_MIN else _stock_apply_serial
            kernel(*fused, t32, omt32, cols, out32.numpy())
            return out32.view(shape) if dt == torch.float32 else sc.get("ms_res", shape, dt).copy_(out32.view(shape))
        # t * (sum(ws) / count) + (1 - t) * base, the fine-tunes added left to right
        ws = [as_compute(block.inputs[i], dt, sc, f"ms_cast{i}").view(-1, cols) for i in task.non_base]
        out = torch.add(ws[0], ws[1], out=sc.get("ms_avg", ws[0].shape, dt))
        for w in ws[2:]:
            out.add_(w)
        out.div_(len(ws)).mul_(t)
        base = as_compute(block.inputs[require_base(self, task)], dt, sc, "ms_base").view(-1, cols)
        out.add_(torch.mul(base, 1 - t, out=sc.get("ms_tmp", base.shape, dt)))
        return out.view(shape)


class NearSwapOp(MergeOp):
    """NearSwap: take the other model's value where it is within t of the base, interpolate beyond."""

    name = "nearswap"
    params = (
        Param(
            "t",
            float,
            "shared",
            required=True,
            doc="distance scale: weight of the other model = clamp(t / |base - other|, 0, 1)",
        ),
    )
    base = "required"
    min_models = 2
    workspace_per_source = 1.5

    def check(self, task: TensorTask) -> None:
        if len(task.per_model) != 2:
            raise ConfigError(
                f"merge_method 'nearswap' needs exactly two models (base_model and one other), got {len(task.per_model)}"
            )

    def apply(self, task: TensorTask, block: Block, stats: Any) -> torch.Tensor:
        dt = task.compute_dtype
        sc = block.scratch
        b = require_base(self, task)
        a = sc.get("ns_a", block.inputs[b].shape, dt).copy_(block.inputs[b])
        other = as_compute(block.inputs[1 - b], dt, sc, "ns_b")
        # weight = (t / |a - b|.clamp(min=1e-6)).clamp(0, 1); `t / x` is x.reciprocal() * t in torch
        w = torch.sub(a, other, out=sc.get("ns_w", a.shape, dt)).abs_().clamp_(min=1e-6)
        w.reciprocal_().mul_(task.shared["t"]).clamp_(min=0, max=1)
        out = torch.mul(w, other, out=sc.get("ns_out", a.shape, dt))
        return out.add_(a.mul_(w.mul_(-1).add_(1)))
