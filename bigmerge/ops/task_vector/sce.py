"""SCE (Wan et al., FuseChat): select, calculate, erase.

As mergekit 0.1.5 (`merge_methods/sce.py`): the task vectors tv_i = model_i - base; with
`select_topk` < 1, keep the k = int(nonzero * select_topk) elements of largest variance across
the task vectors (nonzero: elements whose variance is not 0), the same mask for every model;
weights w_i = mean(tv_i^2) over the whole tensor, normalised to sum 1 (uniform when that sum
is below 1e-6); erase the elements whose sign disagrees with the sign of the sum of task
vectors; base + sum_i(tv_i * w_i * agree_i) / max(sum_i(w_i * agree_i), 1e-6).

Whole-tensor statistics, reduced exactly across blocks and ranks: the variance top-k is an
exact radix select (task_arithmetic.py; ties at the threshold kept lowest index first, where
mergekit's topk leaves them unordered), the count of nonzero variances an integer sum, the
sums of squares float64 sums in block order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bigmerge.ops.base import Block, Param, Stats, TensorTask, as_compute, require_base
from bigmerge.ops.task_vector.common import TopK, as_float, keep_mask, mag_bits, sign_agreement, sum_rows_in_order
from bigmerge.ops.task_vector.task_arithmetic import TaskArithmeticOp

VAR = "var"  # the one selection: variance across the task vectors


class SceOp(TaskArithmeticOp):
    """SCE: keep the elements of largest variance across task vectors, weight models by mean square, erase minority signs."""

    name = "sce"
    params = (
        Param("select_topk", float, "shared", default=1.0, doc="fraction of elements kept, by variance across models"),
        Param("int8_mask", bool, "shared", default=False, doc="accepted for mergekit configs; no effect on values"),
    )
    select_deltas = False
    workspace_per_source = 3.0

    def check(self, task: TensorTask) -> None:
        pass  # any select_topk: <= 0 keeps nothing, >= 1 everything, as in mergekit

    def _selections(self, task: TensorTask) -> dict[str, int]:
        return {VAR: -1} if task.shared["select_topk"] < 1 and task.numel and task.non_base else {}

    def _needs_after(self, task: TensorTask) -> bool:
        return bool(task.non_base) and task.numel > 0

    def _k(self, task: TensorTask, key: str, reduced: Stats) -> int:
        # mergekit: int(count_nonzero(var) * select_topk), a float32 product in torch
        return max(0, int(torch.tensor(int(reduced["nonzero"].sum())) * task.shared["select_topk"]))

    def _task_vectors(self, task: TensorTask, block: Block, name: str = "sce_tvs") -> torch.Tensor:
        """Every non-base model's task vector on this block: [n, m] in the compute dtype."""
        dt = task.compute_dtype
        sc = block.scratch
        base = as_compute(block.inputs[require_base(self, task)], dt, sc, "cast_base").reshape(-1)
        tvs = sc.get(name, (len(task.non_base), base.numel()), dt)
        for row, i in enumerate(task.non_base):
            torch.sub(as_compute(block.inputs[i], dt, sc).reshape(-1), base, out=tvs[row])
        return tvs

    def _variance_bits(self, tvs: torch.Tensor, block: Block) -> torch.Tensor:
        # torch.var over the models, per element: the same bits whatever the block's shape
        var = torch.var(tvs, dim=0, unbiased=False)
        return mag_bits(var, block.scratch)

    def _select(self, task: TensorTask, block: Block, stats: Any, tvs: torch.Tensor) -> None:
        """Zero the elements outside the variance top-k, in every task vector (in place)."""
        if not isinstance(stats, TopK) or VAR not in stats.k:
            return
        keep = keep_mask(self._variance_bits(tvs, block), stats, VAR, block.index, block.scratch)
        tvs.mul_(as_float(keep, tvs.dtype, block.scratch))

    def _values(self, task: TensorTask, block: Block, src: int) -> torch.Tensor:
        return self._variance_bits(self._task_vectors(task, block), block)

    def _first_stats(self, task: TensorTask, block: Block, out: Stats) -> None:
        bits = self._values(task, block, -1)
        out["nonzero"] = np.array([int(torch.count_nonzero(bits))], dtype=np.int64)

    def _after_stats(self, task: TensorTask, block: Block, prev: Any, out: Stats) -> None:
        tvs = self._task_vectors(task, block)
        self._select(task, block, prev, tvs)
        for row, i in enumerate(task.non_base):
            out[f"sq{i}"] = np.array([tvs[row].square().sum(dtype=torch.float64).item()])

    def _finish_after(self, task: TensorTask, reduced: Stats, topk: TopK) -> None:
        # mergekit: tvs.square().mean() per model in the compute dtype, then w / sum(w).item()
        means = [float(reduced[f"sq{i}"].sum()) / task.numel for i in task.non_base]
        weights = torch.tensor(means, dtype=torch.float64).to(task.compute_dtype)
        total = torch.sum(weights).item()
        weights = torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6 else weights / total
        topk.extra["weights"] = weights.tolist()

    def apply(self, task: TensorTask, block: Block, stats: Any) -> torch.Tensor:
        dt = task.compute_dtype
        sc = block.scratch
        src = block.inputs[require_base(self, task)]
        n = len(task.non_base)
        if n == 0:
            return sc.get("base", src.shape, dt).copy_(src)
        if stats is None:
            stats = self._local_stats(task, block)
        tvs = self._task_vectors(task, block, "deltas")
        self._select(task, block, stats, tvs)
        agree = sign_agreement(tvs, sc)
        weights = torch.tensor(stats.extra["weights"], dtype=dt)
        erased = sc.get("wmask", tvs.shape, dt)
        masked = sc.get("masked", tvs.shape, dt)
        for row in range(n):
            torch.mul(as_float(agree[row], dt, sc, "agree_f"), weights[row], out=erased[row])
            torch.mul(tvs[row], erased[row], out=masked[row])
        mixed = sum_rows_in_order(masked, sc.get("mixed", tvs.shape[1:], dt), sc)
        divisor = sum_rows_in_order(erased, sc.get("divisor", tvs.shape[1:], dt), sc).clamp_(min=1e-6)
        base = sc.get("base", src.shape, dt).copy_(src)
        return base.add_(mixed.div_(divisor).view(src.shape))
