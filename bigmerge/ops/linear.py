"""Weighted averaging: the model soup. `linear` with equal weights is the uniform soup."""

from __future__ import annotations

from typing import Any

import torch

from bigmerge.errors import ConfigError
from bigmerge.ops.base import Block, MergeOp, Param, TensorTask, as_compute


class LinearOp(MergeOp):
    """Weighted average of the models (model soup; equal weights give the uniform soup)."""

    name = "linear"
    params = (
        Param("weight", float, "input", required=True, doc="this model's weight"),
        Param("normalize", bool, "shared", default=True, doc="divide by the sum of the weights"),
    )
    base = "ignored"
    workspace_per_source = 0.0  # accumulates one source at a time

    def check(self, task: TensorTask) -> None:
        total = sum(p["weight"] for p in task.per_model)
        if task.shared["normalize"] and abs(total) < 1e-12:
            raise ConfigError(
                f"the weights of tensor {task.name!r} sum to {total:g}: 'normalize' would divide by zero "
                "(change the weights or set normalize: false)"
            )

    def apply(self, task: TensorTask, block: Block, stats: Any) -> torch.Tensor:
        # mergekit's arithmetic: a float32 (float64 for float64) accumulator, addcmul per model.
        acc = torch.float64 if task.compute_dtype == torch.float64 else torch.float32
        weights = torch.tensor([p["weight"] for p in task.per_model], dtype=acc, device=block.scratch.device)
        out = block.scratch.get("acc", block.inputs[0].shape, acc).zero_()
        for x, w in zip(block.inputs, weights):
            out.addcmul_(as_compute(x, task.compute_dtype, block.scratch), w)
        if task.shared["normalize"]:
            out.div_(weights.sum())
        return out.to(task.compute_dtype)
