"""Layer surgery: copy tensors through unchanged (optionally scaled), for `slices:` configs.

Frankenmerges and depth up-scaling stack layer ranges of one or more models; each output
tensor then has exactly one source, which `passthrough` copies (times `scale` if given).
"""

from __future__ import annotations

from typing import Any

import torch

from bigmerge.errors import ConfigError
from bigmerge.ops.base import Block, MergeOp, Param, TensorTask, as_compute


class PassthroughOp(MergeOp):
    """Copy each tensor from its one source (layer slices: frankenmerges, depth up-scaling)."""

    name = "passthrough"
    params = (Param("scale", float, "input", default=None, doc="multiply the tensor by this factor"),)
    base = "ignored"
    workspace_per_source = 0.0

    def check(self, task: TensorTask) -> None:
        if len(task.per_model) != 1:
            raise ConfigError(
                f"merge_method 'passthrough' takes exactly one source per tensor, got {len(task.per_model)} "
                f"for {task.name!r} (give each slice a single source)"
            )

    def apply(self, task: TensorTask, block: Block, stats: Any) -> torch.Tensor:
        x = as_compute(block.inputs[0], task.compute_dtype, block.scratch)
        scale = task.per_model[0]["scale"]
        if scale is None:
            return x
        return x * torch.tensor(scale, dtype=x.dtype)
