"""Reinforced Agent Merging (RAM, RAM+ tensor-local), with mergekit 0.1.5's arithmetic.

Per element, the task vectors whose magnitude exceeds `epsilon` contribute: an element only
one model changed takes that model's change whole; an element several models changed takes
their average. RAM+ (tensor-local) scales each model's unique changes by
1 + r * clamp(shared / unique, 0, alpha), where shared and unique count that model's changed
elements the others also changed or did not, over the whole tensor: integer statistics,
summed exactly across blocks and ranks.

The element-wise arithmetic is mergekit's torch code in its dtypes: with a 16-bit compute
dtype RAM stays in it, while RAM+'s float32 scale promotes its sum to float32 (rounded once
to the output dtype), as in mergekit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bigmerge.ops.base import Block, MergeOp, Param, Stats, StatsOp, TensorTask, as_compute, require_base, task_vectors
from bigmerge.ops.sums import sum_rows

EPSILON = Param("epsilon", float, "shared", default=1e-5, doc="a task vector element counts as changed above this")


def _prepare(
    op: MergeOp, task: TensorTask, block: Block
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mergekit's _prepare_ram_vectors on the block: (base, task vectors [k, m], changed [k, m],
    contributors per element [1, m])."""
    base, tv = task_vectors(op, task, block, "ram")
    nonzero = tv.abs() > task.shared["epsilon"]
    counts = nonzero.sum(dim=0, keepdim=True)
    return base, tv, nonzero, counts


def _merged_rows(
    tv: torch.Tensor, nonzero: torch.Tensor, counts: torch.Tensor, scale: torch.Tensor | None
) -> list[torch.Tensor]:
    """The per-model terms mergekit sums over dim 0."""
    overlap = counts > 1
    unique = counts == 1
    tv_z = tv * nonzero
    shared_part = tv_z * overlap / counts.clamp(min=1)
    own = tv_z * unique if scale is None else tv_z * unique * scale.unsqueeze(-1)
    return list(own + shared_part)


def _finish(task: TensorTask, base: torch.Tensor, rows: list[torch.Tensor], block: Block) -> torch.Tensor:
    sc = block.scratch
    total = sum_rows(rows, sc.get("ram_sum", rows[0].shape, rows[0].dtype), sc)
    return (base + total).view(block.inputs[0].shape)


class RamOp(MergeOp):
    """Reinforced Agent Merging: each changed element from the one model that changed it, or the average of several."""

    name = "ram"
    params = (EPSILON,)
    base = "required"
    min_models = 1
    workspace_per_source = 3.0

    def apply(self, task: TensorTask, block: Block, stats: Any) -> torch.Tensor:
        dt = task.compute_dtype
        if not task.non_base:
            return as_compute(block.inputs[require_base(self, task)], dt, block.scratch)
        base, tv, nonzero, counts = _prepare(self, task, block)
        return _finish(task, base, _merged_rows(tv, nonzero, counts, None), block)


class RamPlusTlOp(StatsOp):
    """RAM+ (tensor-local): RAM, with each model's unique changes scaled up by its share of changes shared with others."""

    name = "ramplus_tl"
    params = (
        Param("r", float, "shared", default=0.1, doc="strength of the rescaling of unique changes"),
        Param("alpha", float, "shared", default=0.2, doc="largest shared/unique ratio the rescaling uses"),
        EPSILON,
    )
    base = "required"
    min_models = 1
    workspace_per_source = 4.0
    float32_result = True  # a float32 factor: mergekit's result under bf16 compute is float32

    def stat_rounds(self, task: TensorTask) -> int:
        return 1 if task.non_base and task.numel else 0

    def stats(self, rnd: int, task: TensorTask, block: Block, prev: Any) -> Stats:
        _, _, nonzero, counts = _prepare(self, task, block)
        return {
            "shared": (nonzero & (counts > 1)).sum(dim=1).cpu().numpy().astype(np.int64),
            "unique": (nonzero & (counts == 1)).sum(dim=1).cpu().numpy().astype(np.int64),
        }

    def finish(self, rnd: int, task: TensorTask, reduced: Stats, prev: Any) -> Any:
        shared = torch.from_numpy(reduced["shared"].astype(np.int64))
        unique = torch.from_numpy(reduced["unique"].astype(np.int64))
        eps, r, alpha = task.shared["epsilon"], task.shared["r"], task.shared["alpha"]
        rho = shared / unique.clamp(min=eps)  # mergekit's types: float32
        return 1 + r * rho.clamp(min=0, max=alpha)

    def apply(self, task: TensorTask, block: Block, stats: Any) -> torch.Tensor:
        dt = task.compute_dtype
        if not task.non_base:
            return as_compute(block.inputs[require_base(self, task)], dt, block.scratch)
        if task.numel == 0:
            return torch.empty(block.inputs[0].shape, dtype=dt)
        lam = self.stats_or_local(task, block, stats).to(block.scratch.device)
        base, tv, nonzero, counts = _prepare(self, task, block)
        return _finish(task, base, _merged_rows(tv, nonzero, counts, lam), block)
