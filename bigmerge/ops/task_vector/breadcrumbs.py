"""Model breadcrumbs (Davari & Belilovsky): per task vector, drop the largest `gamma` fraction
of magnitudes as outliers and the smallest ones, keeping `density`; then task arithmetic
(`breadcrumbs`) or TIES's sign election (`breadcrumbs_ties`).

mergekit 0.1.5 (`sparsify.magnitude_outliers`) sorts |delta| and keeps the ranks
[n_bot, n_bot + target) counted from the smallest, with target = int(density * numel),
n_top = int(gamma * numel) and n_bot = max(0, numel - target - n_top). Counted from the
largest that is a window [n_drop, n_drop + target): top-(n_drop + target) minus top-n_drop,
two exact top-k selections (radix select, task_arithmetic.py), no sort. Ties at either
boundary are ranked by flat index, lowest first (mergekit's sort leaves them unordered).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bigmerge.errors import ConfigError
from bigmerge.ops.base import Block, Param, Stats, TensorTask
from bigmerge.ops.task_vector.common import Selection, Sources, TopK, keep_mask, mag_bits
from bigmerge.ops.task_vector.task_arithmetic import TaskArithmeticOp, TiesOp

GAMMA = Param(
    "gamma", float, "non_base", default=0.01, doc="fraction of largest-magnitude elements dropped as outliers"
)
DROP = "x"  # key suffix of the selection of outliers (the top n_drop)


class BreadcrumbsOp(TaskArithmeticOp):
    """Model breadcrumbs: drop the largest `gamma` and smallest magnitudes, keep `density`; then task arithmetic."""

    name = "breadcrumbs"
    params = (*TaskArithmeticOp.params, GAMMA)
    sparsify = True

    def check(self, task: TensorTask) -> None:
        super().check(task)
        for i in task.non_base:
            g = task.per_model[i]["gamma"]
            if not 0.0 <= g <= 1.0:
                raise ConfigError(f"parameter 'gamma' must be in [0, 1], got {g} for tensor {task.name!r}")

    def _window(self, task: TensorTask, i: int) -> tuple[int, int]:
        """(n_drop, target): ranks [n_drop, n_drop + target) from the largest are kept."""
        n = task.numel
        target = int(task.per_model[i]["density"] * n)
        n_top = int(task.per_model[i]["gamma"] * n)
        n_bot = max(0, n - target - n_top)  # fewer outliers dropped when density needs them
        return n - n_bot - target, target

    def _selections(self, task: TensorTask) -> dict[str, int]:
        out: dict[str, int] = {}
        for i in self._sparse_models(task):
            out[str(i)] = i  # the top n_drop + target (k = 0: nothing kept)
            if self._window(task, i)[0] > 0:
                out[f"{i}{DROP}"] = i
        return out

    def _k(self, task: TensorTask, key: str, reduced: Stats) -> int:
        n_drop, target = self._window(task, int(key.removesuffix(DROP)))
        return n_drop if key.endswith(DROP) else n_drop + target

    def _keep(self, task: TensorTask, block: Block, stats: Any, i: int, delta: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(stats, TopK) or str(i) not in stats.k:
            return None
        bits = mag_bits(delta, block.scratch)
        keep = keep_mask(bits, stats, str(i), block.index, block.scratch)
        if f"{i}{DROP}" in stats.k:
            keep &= ~keep_mask(bits, stats, f"{i}{DROP}", block.index, block.scratch, "drop")
        return keep

    def _fused_keep(
        self, task: TensorTask, block: Block, stats: Any, i: int, xs: Sources, mask_row: Callable[[], np.ndarray]
    ) -> Selection | np.ndarray | None:
        if not isinstance(stats, TopK) or f"{i}{DROP}" not in stats.k:  # no outliers: a plain top-k
            return super()._fused_keep(task, block, stats, i, xs, mask_row)
        # the top n_drop + target, less the top n_drop: no mask, the kernel tests both
        return (*self._fused_sel(task, block, stats, str(i)), *self._fused_sel(task, block, stats, f"{i}{DROP}"))


class BreadcrumbsTiesOp(BreadcrumbsOp):
    """Model breadcrumbs with TIES: drop outliers and small magnitudes, then sign election and disjoint mean."""

    name = "breadcrumbs_ties"
    sign_consensus = TiesOp.sign_consensus
