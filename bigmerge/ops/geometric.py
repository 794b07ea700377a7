"""Geometric operators: Model Stock and NearSwap, with mergekit 0.1.5's arithmetic.

Model Stock's cosines between task vectors are whole-tensor statistics (per row with
`filter_wise`): exact float64 sums of the compute-dtype products, reduced in block order,
then mergekit's scalar arithmetic on the rounded values (see spherical.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bigmerge.errors import ConfigError
from bigmerge.ops.base import Block, MergeOp, Param, Stats, TensorTask, as_compute, require_base
from bigmerge.ops.spherical import StatsOp, seg_gram, stack_rows, whole_gram, wide


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
        dt = task.compute_dtype
        sc = block.scratch
        base = as_compute(block.inputs[require_base(self, task)], dt, sc, "ms_base").reshape(-1)
        off = sc.get("ms_off", (len(task.non_base), base.numel()), dt)
        for r, i in enumerate(task.non_base):
            torch.sub(as_compute(block.inputs[i], dt, sc).reshape(-1), base, out=off[r])
        return off

    def _gram(self, task: TensorTask, block: Block) -> np.ndarray:
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
        norms = [torch.from_numpy(np.sqrt(g[:, i, i])).to(dt) for i in range(k)]
        cos_thetas = []
        for a in range(k):
            for b in range(a + 1, k):
                norm_product = norms[a] * norms[b]
                dot = torch.from_numpy(g[:, a, b].copy()).to(dt)
                cos_thetas.append((dot / norm_product.clamp(min=1e-6)).clamp(-1, 1))
        if whole:  # one cosine per pair, as mergekit's 0-d (or [1] for a filter-wise 1-d tensor)
            shape = () if not task.shared["filter_wise"] else (1,)
            cos_theta = torch.stack([c.reshape(shape) for c in cos_thetas]).mean(dim=0)
        else:
            # torch's mean over dim 0 is left to right for up to 4 rows; a fixed order beyond,
            # so that rows never depend on how many of them a block holds
            acc = cos_thetas[0].clone()
            for c in cos_thetas[1:]:
                acc = acc + c
            cos_theta = acc / len(cos_thetas)
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
