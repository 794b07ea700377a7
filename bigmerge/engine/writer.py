"""What the executor writes each merged block through. The output layer's writers (the direct
writer, the zarr store) implement it; the engine never imports them."""

from __future__ import annotations

from typing import Protocol

import torch

from bigmerge.planning.plan import TensorPlan


class BlockWriter(Protocol):
    def write_block(self, t: TensorPlan, b: int, x: torch.Tensor) -> None:
        """Store block b of tensor t (x: the stored dtype, the block's rows). Called from the
        executor's writer threads, several blocks at once, never the same block twice."""
        ...
