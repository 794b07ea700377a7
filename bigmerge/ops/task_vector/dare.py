"""DARE (Yu et al.): drop each element of a task vector at random, keeping `density` of them
on average, then task arithmetic (`dare_linear`) or TIES's sign election (`dare_ties`).

As mergekit 0.1.5 (`sparsify.bernoulli`): each element is kept with probability `density`;
with `rescale` (the default) the kept delta is scaled to the L1 norm of the whole delta
(mergekit's norm matching, about 1 / density; not the paper's exact 1 / p). The draws come
from a counter-based stream keyed by (seed, tensor, model) and indexed by the element's
position in the tensor, never from a global generator, so the output is the same bits on any
number of ranks, for any block size and in any block order; mergekit draws from torch's
global generator, so the two agree in distribution, not bit for bit. The L1 norms are whole-tensor
sums, reduced exactly across blocks and ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bigmerge.ops import kernels
from bigmerge.ops.base import Block, Param, Stats, TensorTask, block_generator, require_base
from bigmerge.ops.task_vector.common import (
    AFTER,
    Sources,
    TopK,
    flat_sources,
    fused_masks,
    stacked_sources,
    use_fused,
    with_defaults,
)
from bigmerge.ops.task_vector.task_arithmetic import TaskArithmeticOp, TiesOp


class RandomDropOp(TaskArithmeticOp):
    """Base of the operators that drop task-vector elements at random (DARE, DELLA)."""

    params = tuple(
        Param(p.name, p.type, p.scope, p.default, p.required, "fraction of each task vector kept, at random")
        if p.name == "density"
        else p
        for p in with_defaults(TaskArithmeticOp.params, rescale=True)
    )
    sparsify = True
    random = True

    def _phases(self, task: TensorTask) -> list[str]:
        # No selection: one round of L1 norms (before and after the mask) when rescaling.
        return [AFTER] if self._needs_after(task) else []

    def _draws_into(self, task: TensorTask, stats: Any) -> bool:
        """Whether the fused path draws the masks with _draw_into (else: _keep's, copied)."""
        return True

    def _draw_into(
        self, task: TensorTask, block: Block, stats: Any, i: int, row: np.ndarray, l1: np.ndarray | None
    ) -> None:
        """Model i's keep mask on this block into row (uint8), as _draw draws it, and with l1
        ([n_chunks, 2]) the L1 sums l1_before_after takes. DARE: one pass (kernels.drop_keep)."""
        key = block_generator(task, 0, f"drop{i}").initial_seed()
        n = row.shape[0]
        start = block.row0 * (n // max(1, block.row1 - block.row0))
        kernels.drop_keep(
            flat_sources(block, block.scratch, task.compute_dtype),
            require_base(self, task),
            i,
            np.uint64(key),
            np.uint64(start),
            np.float32(task.per_model[i]["density"]),  # torch compares u < density in float32
            row,
            np.zeros((1, 2)) if l1 is None else l1,
            l1 is not None,
            task.compute_dtype == torch.bfloat16,
        )

    def _uniform(self, task: TensorTask, block: Block, i: int, n: int) -> torch.Tensor:
        """U[0, 1) draws for model i on this block's elements, the same whenever drawn again.

        One counter-based stream per (seed, tensor, model), keyed like block_generator's seeds
        (block 0's), indexed by the element's flat position in the tensor: the draws depend on
        neither the world size nor the block size, and take one hash per element.
        """
        key = block_generator(task, 0, f"drop{i}").initial_seed()
        start = block.row0 * (n // max(1, block.row1 - block.row0))
        out = block.scratch.get("uniform", (n,), torch.float32)
        if out.device.type == "cpu":
            kernels.uniform(key, start, out.numpy())
            return out
        return out.copy_(torch.from_numpy(kernels.uniform(key, start, np.empty(n, dtype=np.float32))))

    def _draw(self, task: TensorTask, block: Block, stats: Any, i: int, delta: torch.Tensor) -> torch.Tensor:
        """Model i's random keep mask on this block (bool, flat, in scratch)."""
        u = self._uniform(task, block, i, delta.numel())
        return torch.lt(u, task.per_model[i]["density"], out=block.scratch.get("keep", u.shape, torch.bool))

    def _keep(self, task: TensorTask, block: Block, stats: Any, i: int, delta: torch.Tensor) -> torch.Tensor | None:
        if i not in self._sparse_models(task):
            return None
        if f"keep{i}" in block.memo:
            return block.memo[f"keep{i}"]
        keep = self._draw(task, block, stats, i, delta)
        if task.n_blocks == 1 and self._stat_rounds(task):
            # a one-block tensor runs its statistics and apply on this same block: draw once
            block.memo[f"keep{i}"] = keep = keep.clone()
        return keep

    def _fused_keep(
        self, task: TensorTask, block: Block, stats: Any, i: int, xs: Sources, mask_row: Callable[[], np.ndarray]
    ) -> np.ndarray | None:
        if self._draws_into(task, stats):
            if i not in self._sparse_models(task):
                return None
            row = mask_row()
            if not block.memo.get(f"drawn{i}"):  # else drawn into this very row by _after_stats
                self._draw_into(task, block, stats, i, row, None)
            return row
        if f"keep{i}" in block.memo:
            row = mask_row()
            torch.from_numpy(row).copy_(block.memo[f"keep{i}"])
            return row
        return self._fused_keep_from_torch(task, block, stats, i, xs, mask_row)

    def _after_stats(self, task: TensorTask, block: Block, prev: Any, out: Stats) -> None:
        if use_fused(task, block) and self._draws_into(task, prev):  # the mask and both norms
            n, m = len(task.non_base), block.inputs[0].numel()
            rows = fused_masks(block, n, m)  # where _apply_fused reads them: a one-block tensor draws once
            for i in self._sparse_models(task):
                l1 = np.zeros(((m + kernels.CHUNK - 1) // kernels.CHUNK, 2), dtype=np.float64)
                self._draw_into(task, block, prev, i, rows[task.non_base.index(i)], l1)
                block.memo[f"drawn{i}"] = True
                out[f"l1_{i}"] = np.array([kernels.ordered_sum(l1[:, 0])])
                out[f"l1k_{i}"] = np.array([kernels.ordered_sum(l1[:, 1])])
            return
        if use_fused(task, block):  # both norms in one pass
            x = stacked_sources(block, block.scratch, task.compute_dtype)
            b = require_base(self, task)
            for i, delta in self._deltas(task, block, self._sparse_models(task)):
                keep = self._keep(task, block, prev, i, delta)
                bf16 = task.compute_dtype == torch.bfloat16
                before, after = kernels.l1_before_after(x, b, i, keep.numpy(), bf16)
                out[f"l1_{i}"] = np.array([before])
                out[f"l1k_{i}"] = np.array([after])
            return
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
