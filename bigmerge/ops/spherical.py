"""Spherical operators: SLERP, NuSLERP, Multi-SLERP and the Karcher mean.

Each follows mergekit 0.1.5 operation by operation. Their whole-tensor statistics (norms
and dot products) are sums of exact float64 products of the compute-dtype values, reduced
in block order (so the same on any world size); the scalar arithmetic that turns them into
coefficients is mergekit's own torch code on the rounded values, and the element-wise
arithmetic is mergekit's, in the same dtype and order. The only difference left is in the
statistics: mergekit sums float32 products in float32, in an order torch picks; bigmerge
sums them exactly and rounds once.

The Karcher mean runs mergekit's fixed-point iteration on the coefficients of the mean in
the span of the inputs (every vector it forms is such a combination), so one Gram matrix of
the inputs, one reduction round, gives every norm and dot product of every iteration.

SLERP's sums and interpolation also run as fused numba kernels that read float32 or bf16
sources in place; they do the same float operations in the same order (tested to the bit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bigmerge.errors import ConfigError
from bigmerge.ops.base import Block, Param, Scratch, Stats, StatsOp, TensorTask, as_compute, require_base
from bigmerge.ops.kernels import bf16_bits, njit, prange, use_numba
from bigmerge.ops.sums import (
    LANES,
    PARALLEL_MIN,
    SEG,
    SUB,
    as_scalars,
    col_gram,
    lane_total,
    lincomb,
    rounded_products,
    rounds_scalars,
    seg_gram,
    stack_rows,
    sum_rows,
    whole_gram,
    wide,
    widened_chunk,
)


@njit(cache=True)
def _pair_gram_part(
    xf: np.ndarray, yf: np.ndarray, xb: np.ndarray, yb: np.ndarray, bf16: bool, j0: int, j1: int, out: np.ndarray
) -> None:  # pragma: no cover - compiled
    """_gram_part of the rows (x, y) in one pass, read straight from the sources: each of the
    three sums takes the same lanes in the same order, so the bits are the same."""
    bx = np.empty(SUB, dtype=np.uint32)
    by = np.empty(SUB, dtype=np.uint32)
    xx = np.zeros(LANES)
    xy = np.zeros(LANES)
    yy = np.zeros(LANES)
    for c0 in range(j0, j1, SUB):
        c1 = min(j1, c0 + SUB)
        n = c1 - c0
        x = widened_chunk(xf, xb, bf16, c0, c1, bx)
        y = widened_chunk(yf, yb, bf16, c0, c1, by)
        nw = n - n % LANES  # n is a multiple of LANES but in the last piece
        for j in range(0, nw, LANES):
            px = x[j : j + LANES]
            py = y[j : j + LANES]
            for v in range(LANES):
                a = np.float64(px[v])
                b = np.float64(py[v])
                xx[v] += a * a
                xy[v] += a * b
                yy[v] += b * b
        for j in range(nw, n):
            a = np.float64(x[j])
            b = np.float64(y[j])
            xx[j - nw] += a * a
            xy[j - nw] += a * b
            yy[j - nw] += b * b
    out[0, 0] = lane_total(xx)
    out[0, 1] = out[1, 0] = lane_total(xy)
    out[1, 1] = lane_total(yy)


@njit(cache=True)
def _pair_gram_serial(
    xf: np.ndarray, yf: np.ndarray, xb: np.ndarray, yb: np.ndarray, bf16: bool, m: int, out: np.ndarray
) -> None:  # pragma: no cover - compiled
    for s in range(out.shape[0]):
        _pair_gram_part(xf, yf, xb, yb, bf16, s * SEG, min(m, (s + 1) * SEG), out[s])


@njit(cache=True, parallel=True)
def _pair_gram_parallel(
    xf: np.ndarray, yf: np.ndarray, xb: np.ndarray, yb: np.ndarray, bf16: bool, m: int, out: np.ndarray
) -> None:  # pragma: no cover - compiled
    for s in prange(out.shape[0]):
        _pair_gram_part(xf, yf, xb, yb, bf16, s * SEG, min(m, (s + 1) * SEG), out[s])


@njit(cache=True)
def _pair_lerp_part(
    xf: np.ndarray,
    yf: np.ndarray,
    xb: np.ndarray,
    yb: np.ndarray,
    bf16: bool,
    ca: np.float32,
    cb: np.float32,
    j0: int,
    j1: int,
    out: np.ndarray,
    bf16_out: bool,
) -> None:  # pragma: no cover - compiled
    """out[j0:j1] = ca * x + cb * y in float32, each product rounded, as torch computes it;
    out: float32 bits (uint32), or bfloat16 bits (uint16) rounded to nearest even as torch's
    float32 -> bfloat16 copy rounds (one pass instead of a float32 result and a cast)."""
    bx = np.empty(SUB, dtype=np.uint32)
    by = np.empty(SUB, dtype=np.uint32)
    acc = np.empty(SUB, dtype=np.float32)
    bits = acc.view(np.uint32)
    for c0 in range(j0, j1, SUB):
        c1 = min(j1, c0 + SUB)
        n = c1 - c0
        x = widened_chunk(xf, xb, bf16, c0, c1, bx)
        y = widened_chunk(yf, yb, bf16, c0, c1, by)
        for j in range(n):
            acc[j] = np.float32(ca * x[j]) + np.float32(cb * y[j])
        o = out[c0:c1]  # 0-based slices: LLVM vectorizes the loops (out[c0 + j] it did not)
        if bf16_out:
            for j in range(n):
                o[j] = bf16_bits(bits[j])
        else:
            for j in range(n):
                o[j] = bits[j]


@njit(cache=True)
def _pair_lerp_serial(
    xf: np.ndarray,
    yf: np.ndarray,
    xb: np.ndarray,
    yb: np.ndarray,
    bf16: bool,
    ca: np.float32,
    cb: np.float32,
    out: np.ndarray,
    bf16_out: bool,
) -> None:  # pragma: no cover - compiled
    m = out.shape[0]
    for s in range((m + SEG - 1) // SEG):
        _pair_lerp_part(xf, yf, xb, yb, bf16, ca, cb, s * SEG, min(m, (s + 1) * SEG), out, bf16_out)


@njit(cache=True, parallel=True)
def _pair_lerp_parallel(
    xf: np.ndarray,
    yf: np.ndarray,
    xb: np.ndarray,
    yb: np.ndarray,
    bf16: bool,
    ca: np.float32,
    cb: np.float32,
    out: np.ndarray,
    bf16_out: bool,
) -> None:  # pragma: no cover - compiled
    m = out.shape[0]
    for s in prange((m + SEG - 1) // SEG):
        _pair_lerp_part(xf, yf, xb, yb, bf16, ca, cb, s * SEG, min(m, (s + 1) * SEG), out, bf16_out)


def fused_pair(task: TensorTask, block: Block, i: int, j: int) -> tuple[np.ndarray, ...] | None:
    """Sources i and j of the block as (xf, yf, xb, yb, bf16) for the fused kernels, or None
    where those do not apply: no numba, not on the CPU, sources of two dtypes, or a cast that
    rounds (float32 sources, bf16 compute). The kernels compute in float32 either way."""
    dt = task.compute_dtype
    x, y = block.inputs[i], block.inputs[j]
    if not use_numba() or block.scratch.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    if y.dtype != x.dtype or dt not in (x.dtype, torch.float32) or not (x.is_contiguous() and y.is_contiguous()):
        return None
    empty_f, empty_b = np.empty(0, np.float32), np.empty(0, np.int16)
    if x.dtype == torch.bfloat16:
        return empty_f, empty_f, x.reshape(-1).view(torch.int16).numpy(), y.reshape(-1).view(torch.int16).numpy(), True
    return x.reshape(-1).numpy(), y.reshape(-1).numpy(), empty_b, empty_b, False


def _scalar(v: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(v, dtype=dtype)


def _flat(block: Block, sc: Scratch, i: int, dtype: torch.dtype, name: str) -> torch.Tensor:
    """Source i of the block, flattened, in `dtype`, in its own scratch buffer."""
    x = block.inputs[i].reshape(-1)
    return sc.get(name, x.shape, dtype).copy_(x)


# -- SLERP -------------------------------------------------------------------------------


class SlerpOp(StatsOp):
    """Spherical interpolation from base_model (t = 0) to the other model (t = 1), per tensor."""

    name = "slerp"
    params = (
        Param("t", float, "shared", required=True, doc="position on the arc: 0 gives base_model, 1 the other model"),
    )
    base = "required"
    min_models = 2
    workspace_per_source = 2.0
    DOT_THRESHOLD = 0.9995  # above it (|cos|), mergekit interpolates linearly
    EPS = 1e-8

    def check(self, task: TensorTask) -> None:
        if len(task.per_model) != 2:
            raise ConfigError(
                f"merge_method 'slerp' needs exactly two models (base_model and one other), got {len(task.per_model)}"
            )

    def stat_rounds(self, task: TensorTask) -> int:
        return 1 if task.numel else 0

    def checks_finite(self, task: TensorTask) -> bool:
        return task.numel > 0  # by the sums of squares in stats

    def _pair(self, task: TensorTask, block: Block) -> torch.Tensor:
        """[base, other] of the block in the compute dtype, then in float32 (float64) as mergekit."""
        b = require_base(self, task)
        sc = block.scratch
        rows = [as_compute(block.inputs[i], task.compute_dtype, sc, f"cast{i}") for i in (b, 1 - b)]
        return stack_rows(rows, sc, wide(task), "pair")

    def stats(self, rnd: int, task: TensorTask, block: Block, prev: Any) -> Stats:
        b = require_base(self, task)
        fused = fused_pair(task, block, b, 1 - b)
        if fused is None:
            acc = whole_gram(self._pair(task, block))
        else:
            m = block.inputs[b].numel()
            parts = np.zeros(((m + SEG - 1) // SEG, 2, 2))
            (_pair_gram_parallel if 2 * m >= PARALLEL_MIN else _pair_gram_serial)(*fused, m, parts)
            acc = np.zeros((2, 2))
            for p in parts:  # the same order and bits as whole_gram
                acc = acc + p
        # a sum of squares is finite exactly when every value is (float32 squares cannot overflow
        # float64, and nothing cancels an Inf or a NaN): the reader's scan is not needed
        block.checked(0 if math.isfinite(acc[0, 0]) and math.isfinite(acc[1, 1]) else 1)
        return {"gram": acc}

    def finish(self, rnd: int, task: TensorTask, reduced: Stats, prev: Any) -> Any:
        g = reduced["gram"]
        f = wide(task)
        t = torch.tensor([[task.shared["t"]]], dtype=f)
        norm_a = _scalar(math.sqrt(g[0, 0]), f).view(1, 1)
        norm_b = _scalar(math.sqrt(g[1, 1]), f).view(1, 1)
        norm_a = torch.where(norm_a > self.EPS, norm_a, 1)
        norm_b = torch.where(norm_b > self.EPS, norm_b, 1)
        # mergekit dots the normalised vectors: the same sum, divided once
        dot = _scalar(float(g[0, 1]) / (float(norm_a) * float(norm_b)), f).view(1, 1).clamp(-1, 1)
        linear = dot.abs() > self.DOT_THRESHOLD
        theta = torch.acos(torch.where(linear, 0, dot))
        sin_theta = torch.sin(theta)
        coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
        coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
        return coef_a.view(()), coef_b.view(())

    def apply(self, task: TensorTask, block: Block, stats: Any) -> torch.Tensor:
        shape = block.inputs[0].shape
        dt = task.compute_dtype
        if task.numel == 0:
            return torch.empty(shape, dtype=dt)
        coef_a, coef_b = self.stats_or_local(task, block, stats)
        sc = block.scratch
        f = wide(task)
        b = require_base(self, task)
        fused = fused_pair(task, block, b, 1 - b)
        if fused is not None:  # the same float32 operations in one pass
            # bfloat16 stored from float32 compute: rounded in the same pass, into the writer's buffer
            bf16_out = dt == torch.float32 and task.out_dtype == torch.bfloat16
            kind = torch.bfloat16 if bf16_out else torch.float32
            out = block.output("out", shape, kind)
            flat = out.reshape(-1).view(torch.int16 if bf16_out else torch.int32).numpy()
            lerp = _pair_lerp_parallel if 2 * out.numel() >= PARALLEL_MIN else _pair_lerp_serial
            lerp(*fused, np.float32(coef_a.item()), np.float32(coef_b.item()), flat, bf16_out)
            return out if dt == f or bf16_out else sc.get("res", shape, dt).copy_(out)
        x, y = (as_compute(block.inputs[i], dt, sc, f"cast{i}").reshape(-1) for i in (b, 1 - b))
        # coef_a * x + coef_b * y in float32 (float64), from the compute dtype as mergekit
        out = torch.mul(as_compute(x, f, sc, "wide_x"), coef_a, out=sc.get("out", x.shape, f))
        out.add_(torch.mul(as_compute(y, f, sc, "wide_y"), coef_b, out=sc.get("tmp", y.shape, f)))
        if dt == f:
            return out.view(shape)
        return sc.get("res", shape, dt).copy_(out.view(shape))


# -- NuSLERP -----------------------------------------------------------------------------


@dataclass
class NuSlerpCoefs:
    """Per normalised vector (broadcast over a [rows, cols] view): mergekit's scalars."""

    colinear: torch.Tensor
    sin_theta: torch.Tensor
    sin_a: torch.Tensor
    sin_b: torch.Tensor


class NuSlerpOp(StatsOp):
    """SLERP of two models (or of their task vectors, with a base_model), weighted, per tensor or per row."""

    name = "nuslerp"
    params = (
        Param("weight", float, "non_base", required=True, doc="weight of this model; t = w2 / (w1 + w2)"),
        Param("nuslerp_flatten", bool, "shared", default=True, doc="interpolate the whole tensor as one vector"),
        Param(
            "nuslerp_row_wise",
            bool,
            "shared",
            default=False,
            doc="without flatten: interpolate each column (dim 0) instead of each row (last dim)",
        ),
    )
    base = "optional"
    min_models = 2
    workspace_per_source = 3.0
    EPS = 1e-8
    NORM_EPS = 1e-7

    def check(self, task: TensorTask) -> None:
        if len(task.non_base) != 2:
            raise ConfigError(
                f"merge_method 'nuslerp' needs exactly two models besides base_model, got {len(task.non_base)}"
            )

    @staticmethod
    def mode(task: TensorTask) -> str:
        """whole: one vector; cols: one vector per index of dims 1.. (across rows); rows: per last-dim vector."""
        if task.shared["nuslerp_flatten"] or len(task.shape) <= 1:
            return "whole"
        return "cols" if task.shared["nuslerp_row_wise"] else "rows"

    @staticmethod
    def cols(task: TensorTask) -> int:
        if NuSlerpOp.mode(task) == "rows":
            return task.shape[-1]
        return max(1, task.numel // task.shape[0]) if len(task.shape) > 1 else 1

    def t(self, task: TensorTask) -> float:
        w = [task.per_model[i]["weight"] for i in task.non_base]
        total = sum(w)
        return 0.5 if abs(total) < 1e-6 else w[1] / total

    def stat_rounds(self, task: TensorTask) -> int:
        if not task.numel or self.mode(task) == "rows":
            return 0
        # 16-bit compute: the norms first, then the dot of the rounded unit vectors (mergekit's)
        return 2 if rounds_scalars(task) else 1

    def _vectors(self, task: TensorTask, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        """The two vectors of the block in the compute dtype: the models, or their task vectors."""
        dt = task.compute_dtype
        sc = block.scratch
        i, j = task.non_base
        v0 = _flat(block, sc, i, dt, "v0")
        v1 = _flat(block, sc, j, dt, "v1")
        if task.base_index is not None:
            base = as_compute(block.inputs[task.base_index], dt, sc, "cast_base").reshape(-1)
            v0.sub_(base)
            v1.sub_(base)
        return v0, v1

    def _gram(self, task: TensorTask, block: Block) -> np.ndarray:
        v0, v1 = self._vectors(task, block)
        x = stack_rows([v0, v1], block.scratch, wide(task), "pair")
        mode = self.mode(task)
        if mode == "whole":
            return whole_gram(x)
        if mode == "cols":
            return col_gram(x, self.cols(task))
        return seg_gram(x, self.cols(task))

    def _units(
        self, task: TensorTask, block: Block, norms: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's two vectors divided by their norms, [-1, cols], rounded to the compute
        dtype as mergekit's `_normalize` rounds them."""
        v0, v1 = self._vectors(task, block)
        cols = self.cols(task) if self.mode(task) != "whole" else max(1, v0.numel())
        dev = block.scratch.device
        return v0.view(-1, cols).div_(norms[0].to(dev)), v1.view(-1, cols).div_(norms[1].to(dev))

    def stats(self, rnd: int, task: TensorTask, block: Block, prev: Any) -> Stats:
        if rnd == 0:
            return {"gram": self._gram(task, block)}
        u0, u1 = self._units(task, block, prev)
        if self.mode(task) == "whole":
            acc = 0.0
            for part in rounded_products(u0, u1, SEG):
                acc = acc + part
            return {"dot": np.array([acc])}
        return {"dot": (u0 * u1).to(torch.float64).cpu().numpy().sum(axis=0)}  # per column, rows in order

    def finish(self, rnd: int, task: TensorTask, reduced: Stats, prev: Any) -> Any:
        if not rounds_scalars(task):
            return self._coefs(task, reduced["gram"])
        if rnd == 0:  # mergekit's torch.norm(...).clamp(min=1e-7) in the compute dtype
            g = reduced["gram"].reshape(-1, 2, 2)
            view = (1, -1)
            return tuple(
                as_scalars(np.sqrt(g[:, i, i]), task.compute_dtype).clamp(min=self.NORM_EPS).view(view) for i in (0, 1)
            )
        return self._coefs_cos(task, as_scalars(reduced["dot"], task.compute_dtype).clamp(-1, 1))

    def _coefs(self, task: TensorTask, g: np.ndarray) -> NuSlerpCoefs:
        dt = task.compute_dtype
        g = g.reshape(-1, 2, 2)
        n0 = torch.from_numpy(np.sqrt(g[:, 0, 0])).to(dt).clamp(min=self.NORM_EPS)
        n1 = torch.from_numpy(np.sqrt(g[:, 1, 1])).to(dt).clamp(min=self.NORM_EPS)
        # mergekit sums the products of the normalised vectors: the same sum, divided once
        prod = n0.to(torch.float64) * n1.to(torch.float64)
        cos = (torch.from_numpy(g[:, 0, 1]) / prod).to(dt).clamp(-1, 1)
        return self._coefs_cos(task, cos)

    def _rows_cos(self, task: TensorTask, block: Block) -> torch.Tensor:
        """16-bit compute, one vector per row: mergekit's own arithmetic on the block's rows."""
        v0, v1 = self._vectors(task, block)
        cols = self.cols(task)
        n0 = torch.norm(v0.view(-1, cols), dim=-1, keepdim=True).clamp(min=self.NORM_EPS)
        n1 = torch.norm(v1.view(-1, cols), dim=-1, keepdim=True).clamp(min=self.NORM_EPS)
        u0, u1 = self._units(task, block, (n0, n1))
        return (u0 * u1).sum(dim=-1).clamp(-1, 1)

    def _coefs_cos(self, task: TensorTask, cos: torch.Tensor) -> NuSlerpCoefs:
        colinear = (1 - cos.square()) <= self.EPS**2
        theta = torch.acos(torch.where(colinear, 0, cos))
        t = self.t(task)
        view = (1, -1) if self.mode(task) != "rows" else (-1, 1)
        return NuSlerpCoefs(
            colinear.view(view),
            torch.sin(theta).view(view),
            torch.sin((1 - t) * theta).view(view),
            torch.sin(t * theta).view(view),
        )

    def apply(self, task: TensorTask, block: Block, stats: Any) -> torch.Tensor:
        shape = block.inputs[0].shape
        dt = task.compute_dtype
        if task.numel == 0:
            return torch.empty(shape, dtype=dt)
        if self.mode(task) == "rows":
            if rounds_scalars(task):
                stats = self._coefs_cos(task, self._rows_cos(task, block).cpu())
            else:
                stats = self._coefs(task, self._gram(task, block))
        c: NuSlerpCoefs = self.stats_or_local(task, block, stats)
        dev = block.scratch.device
        c = NuSlerpCoefs(c.colinear.to(dev), c.sin_theta.to(dev), c.sin_a.to(dev), c.sin_b.to(dev))
        sc = block.scratch
        v0, v1 = self._vectors(task, block)
        cols = self.cols(task) if self.mode(task) != "whole" else v0.numel()
        v0 = v0.view(-1, cols)
        v1 = v1.view(-1, cols)
        t = self.t(task)
        out = torch.mul(c.sin_a, v0, out=sc.get("out", v0.shape, dt))
        out.add_(torch.mul(c.sin_b, v1, out=sc.get("tmp", v1.shape, dt)))
        out.div_(c.sin_theta)
        if bool(c.colinear.any()):
            lin = torch.mul(v0, 1 - t, out=sc.get("lin", v0.shape, dt))
            lin.add_(torch.mul(v1, t, out=sc.get("tmp", v1.shape, dt)))
            out = torch.where(c.colinear, lin, out)
        if task.base_index is not None:
            base = as_compute(block.inputs[task.base_index], dt, sc, "cast_base").reshape(v0.shape)
            out = torch.add(base, out, out=sc.get("res", v0.shape, dt))
        return out.view(shape)


# -- Multi-SLERP -------------------------------------------------------------------------


@dataclass
class MultiSlerpState:
    weights: torch.Tensor  # [n, 1], compute dtype, normalised if asked
    norms: torch.Tensor  # [n, 1]
    mean_norm: torch.Tensor | None = None
    dots: torch.Tensor | None = None  # [n, 1]
    linear: bool = False  # the weighted mean vanished with two models: mergekit's linear fallback
    tangent_norm: torch.Tensor | None = None


def _on(st: MultiSlerpState, device: torch.device) -> MultiSlerpState:
    """The state's per-model vectors on the block's device (statistics are kept on the host)."""
    if device.type == "cpu":
        return st
    return MultiSlerpState(
        st.weights.to(device),
        st.norms.to(device),
        st.mean_norm,
        None if st.dots is None else st.dots.to(device),
        st.linear,
        st.tangent_norm,
    )


class MultiSlerpOp(StatsOp):
    """Barycentric interpolation of any number of models on the hypersphere (optionally of task vectors)."""

    name = "multislerp"
    params = (
        Param("weight", float, "non_base", required=True, doc="this model's weight"),
        Param("normalize_weights", bool, "shared", default=True, doc="divide the weights by their sum"),
        Param("eps", float, "shared", default=1e-8, doc="added to norms for numerical stability"),
    )
    base = "optional"
    min_models = 1
    workspace_per_source = 3.0

    def stat_rounds(self, task: TensorTask) -> int:
        # 0: norms; 1: norm of the weighted mean and the dots with it; 2: norm of the tangent.
        # 16-bit compute: the dots take a round of their own (DOTS), after the mean's norm, as
        # mergekit sums the products of the units with the normalised mean rounded to the dtype
        if not task.numel or len(task.non_base) < 2:
            return 0
        return 4 if rounds_scalars(task) else 3

    DOTS = 2  # the round of the dots with a 16-bit compute dtype

    def _phase(self, task: TensorTask, rnd: int) -> int | str:
        if not rounds_scalars(task) or rnd < self.DOTS:
            return rnd
        return "dots" if rnd == self.DOTS else rnd - 1

    def _vectors(self, task: TensorTask, block: Block) -> torch.Tensor:
        dt = task.compute_dtype
        sc = block.scratch
        rows = [block.inputs[i] for i in task.non_base]
        x = sc.get("ms_x", (len(rows), rows[0].numel()), dt)
        for r, src in enumerate(rows):
            x[r].copy_(src.reshape(-1))
        if task.base_index is not None:
            x -= as_compute(block.inputs[task.base_index], dt, sc, "cast_base").reshape(1, -1)
        return x

    def _weights(self, task: TensorTask) -> torch.Tensor:
        w = torch.tensor([task.per_model[i]["weight"] for i in task.non_base], dtype=task.compute_dtype)
        if task.shared["normalize_weights"]:
            w = w / w.sum()
        return w.view(-1, 1)

    def _units_mean(self, task: TensorTask, block: Block, st: MultiSlerpState) -> tuple[torch.Tensor, torch.Tensor]:
        sc = block.scratch
        x = self._vectors(task, block)
        units = x.div_(st.norms + task.shared["eps"])
        weighted = torch.mul(units, st.weights, out=sc.get("ms_w", units.shape, units.dtype))
        mean = sum_rows(list(weighted), sc.get("ms_mean", units.shape[1:], units.dtype), sc)
        return units, mean

    def _tangent(self, task: TensorTask, block: Block, st: MultiSlerpState) -> tuple[torch.Tensor, torch.Tensor]:
        sc = block.scratch
        units, mean = self._units_mean(task, block, st)
        assert st.mean_norm is not None and st.dots is not None
        mean.div_(st.mean_norm)
        tv = units.sub_(torch.mul(st.dots, mean, out=sc.get("ms_w", units.shape, units.dtype)))
        tv.mul_(st.weights)
        tangent = sum_rows(list(tv), sc.get("ms_tan", mean.shape, mean.dtype), sc)
        return mean, tangent

    def stats(self, rnd: int, task: TensorTask, block: Block, prev: Any) -> Stats:
        sc = block.scratch
        f = wide(task)
        rnd = self._phase(task, rnd)  # type: ignore[assignment]
        if rnd == 0:
            x = self._vectors(task, block)
            return {"sq": np.diagonal(whole_gram(stack_rows(list(x), sc, f))).copy()}
        if rnd == "dots":
            if prev.linear:
                return {}
            st = _on(prev, sc.device)
            units, mean = self._units_mean(task, block, st)
            mean.div_(st.mean_norm)
            dots = np.zeros(units.shape[0])
            for i in range(units.shape[0]):
                for part in rounded_products(units[i], mean, SEG):
                    dots[i] = dots[i] + part
            return {"dots": dots}
        if rnd == 1:
            units, mean = self._units_mean(task, block, _on(prev, sc.device))
            g = whole_gram(stack_rows([*units, mean], sc, f))
            return {"mean": g[-1].copy()}
        if prev.linear:
            return {}
        _, tangent = self._tangent(task, block, _on(prev, sc.device))
        return {"tan": whole_gram(stack_rows([tangent], sc, f))[0]}

    def finish(self, rnd: int, task: TensorTask, reduced: Stats, prev: Any) -> Any:
        dt = task.compute_dtype
        eps = task.shared["eps"]
        rnd = self._phase(task, rnd)  # type: ignore[assignment]
        if rnd == 0:
            norms = as_scalars(np.sqrt(reduced["sq"]), dt).view(-1, 1)
            return MultiSlerpState(self._weights(task), norms)
        st: MultiSlerpState = prev
        if rnd == "dots":
            if not st.linear:
                st.dots = as_scalars(reduced["dots"], dt).view(-1, 1)
            return st
        if rnd == 1:
            g = reduced["mean"]
            st.mean_norm = as_scalars(math.sqrt(g[-1]), dt)
            if st.mean_norm < eps:
                if len(task.non_base) != 2:
                    raise ConfigError(
                        f"multislerp: the weighted sum of the inputs of tensor {task.name!r} is zero (antipodal "
                        "vectors with weights that balance out); try different weights"
                    )
                st.linear = True
                return st
            if not rounds_scalars(task):
                # mergekit dots the units with the normalised mean: the same sum, divided once
                st.dots = (torch.from_numpy(g[:-1]) / float(st.mean_norm)).to(dt).view(-1, 1)
            return st
        if not st.linear:
            st.tangent_norm = as_scalars(math.sqrt(reduced["tan"][0]), dt) + eps
        return st

    def apply(self, task: TensorTask, block: Block, stats: Any) -> torch.Tensor:
        shape = block.inputs[0].shape
        dt = task.compute_dtype
        sc = block.scratch
        if len(task.non_base) == 1:  # mergekit returns the one model as is, base or not
            return as_compute(block.inputs[task.non_base[0]], dt, sc)
        if task.numel == 0:
            return torch.empty(shape, dtype=dt)
        st: MultiSlerpState = self.stats_or_local(task, block, stats)
        st = _on(st, sc.device)
        if st.linear:
            x = self._vectors(task, block)
            w = self._weights(task).view(-1)
            out = torch.mul(x[0], w[0], out=sc.get("ms_out", x[0].shape, dt))
            out.add_(x[1].mul_(w[1]))
        else:
            mean, tangent = self._tangent(task, block, st)
            tn = st.tangent_norm
            assert tn is not None
            out = mean.mul_(torch.cos(tn)).add_(tangent.mul_(torch.sin(tn) / tn))
            avg_norm = (st.norms.squeeze(-1) * st.weights.view(-1)).sum()
            out.mul_(avg_norm)
        if task.base_index is not None:
            out.add_(as_compute(block.inputs[task.base_index], dt, sc, "cast_base").reshape(-1))
        return out.view(shape)


# -- Karcher mean ------------------------------------------------------------------------


@dataclass
class KarcherRun:
    """The scalars of mergekit's Karcher iteration so far (16-bit compute)."""

    norms: list[torch.Tensor]  # float32, per input
    valid: list[int]
    alphas: dict[int, float]  # normalised, per valid input
    done: bool = False
    mean_norm: torch.Tensor | None = None
    dots: list[list[torch.Tensor]] = field(default_factory=list)  # per iteration, per valid input
    tangent_norms: list[torch.Tensor] = field(default_factory=list)
    unit_norms: list[torch.Tensor] = field(default_factory=list)


def _karcher_step(rnd: int) -> tuple[str, int]:
    """Which statistic round `rnd` (>= 1) of the 16-bit Karcher iteration reduces."""
    if rnd == 1:
        return "mean", 0
    k, j = divmod(rnd - 2, 3)
    return ("dots", "tangent", "unit")[j], k


class KarcherOp(StatsOp):
    """Weighted Karcher (Riemannian) mean of the models' directions on the sphere, times their mean norm."""

    name = "karcher"
    params = (
        Param("max_iter", int, "shared", default=10, doc="most fixed-point iterations"),
        Param("tol", float, "shared", default=1e-5, doc="stop when the tangent step is shorter than this"),
    )
    base = "ignored"
    min_models = 1
    workspace_per_source = 1.0

    def stat_rounds(self, task: TensorTask) -> int:
        if not task.numel or len(task.per_model) < 2:
            return 0
        if rounds_scalars(task):  # the norms, the first mean's norm, then three per iteration
            return 2 + 3 * task.shared["max_iter"]
        return 1

    def stats(self, rnd: int, task: TensorTask, block: Block, prev: Any) -> Stats:
        if rounds_scalars(task):
            return self._stats16(rnd, task, block, prev)
        return {"gram": whole_gram(self._stack(task, block))}

    def _stack(self, task: TensorTask, block: Block) -> torch.Tensor:
        sc = block.scratch
        rows = [as_compute(x, task.compute_dtype, sc, f"cast{i}") for i, x in enumerate(block.inputs)]
        return stack_rows(rows, sc, wide(task), "karcher")

    def finish(self, rnd: int, task: TensorTask, reduced: Stats, prev: Any) -> Any:
        if rounds_scalars(task):
            return self._finish16(rnd, task, reduced, prev)
        return self.solve(task, reduced["gram"])

    # -- 16-bit compute: mergekit's element-wise iteration, replayed per block ------------------
    #
    # With a bf16 (fp16) compute dtype mergekit rounds every vector it forms (the units, the
    # mean, the tangent) to that dtype, element by element, and the dots to it: no combination
    # of the inputs reproduces those bits. Every block replays mergekit's element-wise
    # operations with the scalars reduced so far, and each norm or dot is one statistics round
    # (exact sums, rounded as torch rounds its float32 reductions): 2 + 3 * max_iter rounds,
    # the ones after convergence empty.

    def _stats16(self, rnd: int, task: TensorTask, block: Block, st: KarcherRun | None) -> Stats:
        if rnd == 0:
            rows = [as_compute(x, task.compute_dtype).reshape(-1) for x in block.inputs]
            return {"sq": np.diagonal(whole_gram(stack_rows(rows, block.scratch, torch.float32, "karcher"))).copy()}
        assert st is not None
        if st.done:
            return {}
        kind, k = _karcher_step(rnd)
        v = self._replay(task, block, st, (kind, k))
        if kind == "dots":
            units = self._units16(task, block, st)
            x = stack_rows([v, *(units[i] for i in st.valid)], block.scratch, torch.float32, "karcher")
            return {"dots": whole_gram(x)[0, 1:].copy()}
        return {"sq": whole_gram(stack_rows([v], block.scratch, torch.float32, "karcher"))[0]}

    def _finish16(self, rnd: int, task: TensorTask, reduced: Stats, st: KarcherRun | None) -> Any:
        tol = task.shared["tol"]
        if rnd == 0:
            norms = [_scalar(math.sqrt(v), torch.float32) for v in reduced["sq"]]
            valid = [i for i, nm in enumerate(norms) if nm.item() > tol]
            alphas = [1.0 / len(norms)] * len(norms)
            total = sum(alphas[i] for i in valid)
            return KarcherRun(norms, valid, {i: alphas[i] / total for i in valid}, done=not valid)
        assert st is not None
        if st.done:
            return st
        kind, k = _karcher_step(rnd)
        if kind == "dots":
            st.dots.append([as_scalars(d, task.compute_dtype).clamp(-1.0, 1.0) for d in reduced["dots"]])
            return st
        norm = _scalar(math.sqrt(reduced["sq"][0]), torch.float32)
        if kind == "mean":
            st.mean_norm = norm
        elif kind == "tangent":
            st.tangent_norms.append(norm)
            st.done = norm.item() < tol
        else:
            st.unit_norms.append(norm)
        return st

    def _units16(self, task: TensorTask, block: Block, st: KarcherRun) -> dict[int, torch.Tensor]:
        dt = task.compute_dtype
        if "karcher_units" not in block.memo:
            block.memo["karcher_units"] = {
                i: (as_compute(block.inputs[i], dt).reshape(-1) / st.norms[i]).to(dt) for i in st.valid
            }
        return block.memo["karcher_units"]

    # The mean at the start of iteration k depends on the scalars of iterations before k only:
    # kept per block (on the block object, or here across the executor's per-round block
    # objects, up to KEEP_BYTES per tensor), a round resumes from it instead of replaying
    # every iteration again (max_iter^2 / 2 passes over the block otherwise).
    KEEP_BYTES = 1 << 30
    _kept: tuple[str, dict[int, tuple[int, torch.Tensor]]] | None = None

    def _resume_at(self, task: TensorTask, block: Block) -> tuple[int, torch.Tensor] | None:
        if "karcher_resume" in block.memo:
            return block.memo["karcher_resume"]
        kept = self._kept
        if kept is None or kept[0] != task.name:
            return None
        return kept[1].get(block.index)

    def _keep(self, task: TensorTask, block: Block, k: int, mean: torch.Tensor) -> None:
        block.memo["karcher_resume"] = (k, mean.clone())
        kept = self._kept
        if kept is None or kept[0] != task.name:
            kept = (task.name, {})
            self._kept = kept
        if task.numel * mean.element_size() <= self.KEEP_BYTES:
            kept[1][block.index] = block.memo["karcher_resume"]

    def _replay(self, task: TensorTask, block: Block, st: KarcherRun, stop: tuple[str, int] | None) -> torch.Tensor:
        """mergekit's vectors on this block, up to `stop` (the vector whose statistic is next:
        ("mean", 0) the first weighted mean, ("dots", k) the mean dotted in iteration k,
        ("tangent", k), ("unit", k) the updated mean); None: the final mean."""
        tol = task.shared["tol"]
        units = self._units16(task, block, st)
        first = units[st.valid[0]]
        resume = self._resume_at(task, block)
        k0 = 0
        if resume is not None and stop != ("mean", 0) and (stop is None or stop[1] >= resume[0]):
            k0, mean = resume[0], resume[1].clone()
        else:
            mean = torch.zeros_like(first)
            for i in st.valid:
                mean += st.alphas[i] * units[i]
            if stop == ("mean", 0):
                return mean
            assert st.mean_norm is not None
            mean = first.clone() if st.mean_norm.item() < tol else (mean / st.mean_norm).to(mean.dtype)
        for k in range(k0, task.shared["max_iter"]):
            if stop == ("dots", k):
                self._keep(task, block, k, mean)
                return mean
            if k >= len(st.dots):
                break
            tangent = torch.zeros_like(mean)
            for i, dot in zip(st.valid, st.dots[k]):
                theta = torch.arccos(dot)
                if theta.item() < tol:
                    continue
                tangent += st.alphas[i] * (theta / torch.sin(theta)) * (units[i] - dot * mean)
            if stop == ("tangent", k):
                return tangent
            if k >= len(st.tangent_norms) or st.tangent_norms[k].item() < tol:
                break
            tn = st.tangent_norms[k]
            mean = (torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)).to(mean.dtype)
            if stop == ("unit", k):
                return mean
            if k < len(st.unit_norms) and st.unit_norms[k].item() > tol:
                mean = (mean / st.unit_norms[k]).to(mean.dtype)
        if stop is not None:
            raise AssertionError(f"karcher replay: no step {stop}")
        return mean

    def solve(self, task: TensorTask, gram: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """mergekit's iteration, run on the coefficients of the mean in the span of the inputs.

        Every vector mergekit forms (units, the mean, the tangent) is a combination of the
        inputs, so a Gram matrix of the inputs gives every norm and dot product it takes;
        the scalars are rounded to the dtypes mergekit computes them in and go through the
        same torch operations. Returns (coefficient of each input, scale) with the output
        scale * sum_i coef_i * input_i.
        """
        f = wide(task)
        dt = task.compute_dtype
        max_iter, tol = task.shared["max_iter"], task.shared["tol"]
        n = gram.shape[0]
        norms = [_scalar(math.sqrt(gram[i, i]), f) for i in range(n)]
        nv = np.array([float(x) for x in norms])
        alphas = [1.0 / n] * n
        scale = sum(alpha * norm for alpha, norm in zip(alphas, norms))
        valid = [i for i in range(n) if float(norms[i]) > tol]
        if not valid:
            return np.zeros(n), torch.zeros((), dtype=f)
        safe = np.where(nv == 0, 1.0, nv)
        units = gram / np.outer(safe, safe)  # Gram matrix of the unit vectors
        alpha_sum = sum(alphas[i] for i in valid)
        norm_alphas = {i: alphas[i] / alpha_sum for i in valid}

        def norm_of(a: np.ndarray) -> torch.Tensor:
            return _scalar(math.sqrt(max(float(a @ units @ a), 0.0)), f)

        mean = np.zeros(n)
        for i in valid:
            mean[i] += norm_alphas[i]
        mean_norm = norm_of(mean)
        if float(mean_norm) < tol:
            mean = np.zeros(n)
            mean[valid[0]] = 1.0
        else:
            mean = mean / float(mean_norm)
        for _ in range(max_iter):
            tangent = np.zeros(n)
            for i in valid:
                dot = _scalar(float(mean @ units[:, i]), dt).clamp(-1.0, 1.0)
                theta = torch.arccos(dot)
                if theta.item() < tol:
                    continue
                c = float(norm_alphas[i] * (theta / torch.sin(theta)))
                step = -float(dot) * mean
                step[i] += 1.0
                tangent += c * step
            tangent_norm = norm_of(tangent)
            if tangent_norm.item() < tol:
                break
            mean = float(torch.cos(tangent_norm)) * mean + float(torch.sin(tangent_norm)) * (
                tangent / float(tangent_norm)
            )
            unit_norm = norm_of(mean)
            if unit_norm.item() > tol:
                mean = mean / float(unit_norm)
        return mean / safe, scale

    def apply(self, task: TensorTask, block: Block, stats: Any) -> torch.Tensor:
        dt = task.compute_dtype
        sc = block.scratch
        shape = block.inputs[0].shape
        if len(block.inputs) == 1:
            return as_compute(block.inputs[0], dt, sc)
        if task.numel == 0:
            return torch.empty(shape, dtype=dt)
        if rounds_scalars(task):
            st: KarcherRun = self.stats_or_local(task, block, stats)
            if not st.valid:  # mergekit's constant-zero branch
                return torch.zeros(shape, dtype=dt)
            alpha = 1.0 / len(st.norms)
            scale = sum(alpha * norm for norm in st.norms)
            return (scale * self._replay(task, block, st, None)).view(shape)
        coef, scale = self.stats_or_local(task, block, stats)
        x = self._stack(task, block)
        mean = lincomb(x, coef, sc.get("karcher_mean", (x.shape[1],), x.dtype))
        if mean.dtype != dt:  # mergekit keeps the mean in the compute dtype
            mean = sc.get("karcher_mean_c", mean.shape, dt).copy_(mean)
        return torch.mul(scale, mean).view(shape)
