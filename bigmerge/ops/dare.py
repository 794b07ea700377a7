"""DARE (Yu et al.): drop each element of a task vector at random, keeping `density` of them
on average, then task arithmetic (`dare_linear`) or TIES's sign election (`dare_ties`).

As mergekit 0.1.5 (`sparsify.bernoulli`): each element is kept with probability `density`;
with `rescale` (the default) the kept delta is scaled to the L1 norm of the whole delta
(mergekit's norm matching, about 1 / density; not the paper's exact 1 / p). The draws come
from a generator seeded by (seed, tensor, block, model), never a global one, so the output is
the same bits on any number of ranks and in any block order; mergekit draws one mask per
tensor, so the two agree in distribution, not bit for bit. The L1 norms are whole-tensor
sums, reduced exactly across blocks and ranks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bigmerge.ops.base import Block, Stats, TensorTask, block_generator
from bigmerge.ops.task_arithmetic import AFTER, TaskArithmeticOp, TiesOp, TopK, with_defaults


class RandomDropOp(TaskArithmeticOp):
    """Base of the operators that drop task-vector elements at random (DARE, DELLA)."""

    params = with_defaults(TaskArithmeticOp.params, rescale=True)
    sparsify = True
    random = True

    def _phases(self, task: TensorTask) -> list[str]:
        # No selection: one round of L1 norms (before and after the mask) when rescaling.
        return [AFTER] if self._needs_after(task) else []

    def _uniform(self, task: TensorTask, block: Block, i: int, n: int) -> torch.Tensor:
        """U[0, 1) draws for model i on this block, the same whenever they are drawn again."""
        gen = block_generator(task, block.index, f"drop{i}")
        return torch.rand(n, generator=gen, out=block.scratch.get("uniform", (n,), torch.float32))

    def _keep(self, task: TensorTask, block: Block, stats: Any, i: int, delta: torch.Tensor) -> torch.Tensor | None:
        if i not in self._sparse_models(task):
            return None
        u = self._uniform(task, block, i, delta.numel())
        return torch.lt(u, task.per_model[i]["density"], out=block.scratch.get("keep", u.shape, torch.bool))

    _fused_keep = TaskArithmeticOp._fused_keep_from_torch

    def _after_stats(self, task: TensorTask, block: Block, prev: Any, out: Stats) -> None:
        for i, delta in self._deltas(task, block, self._sparse_models(task)):
            out[f"l1_{i}"] = np.array([delta.abs().sum(dtype=torch.float64).item()])
        super()._after_stats(task, block, prev, out)

    def _finish_after(self, task: TensorTask, reduced: Stats, topk: TopK) -> None:
        for i in self._sparse_models(task):
            topk.l1_before[i] = float(reduced[f"l1_{i}"].sum())
        super()._finish_after(task, reduced, topk)


class DareLinearOp(RandomDropOp):
    """DARE: drop task-vector elements at random (keep `density`), rescale, then task arithmetic."""

    name = "dare_linear"


class DareTiesOp(RandomDropOp):
    """DARE-TIES: drop task-vector elements at random (keep `density`), rescale, then TIES sign election."""

    name = "dare_ties"
    sign_consensus = TiesOp.sign_consensus
