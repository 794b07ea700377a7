"""DELLA (Deep et al., MagPrune): drop task-vector elements at random with a keep probability
that grows with their magnitude rank, then TIES's sign election (`della`) or task arithmetic
(`della_linear`).

As mergekit 0.1.5 (`sparsify.della_magprune`): |delta| is ranked along dim 1 (every row of a
matrix on its own; a 1-D tensor is one row), rank_norm = (rank - 1) / (n - 1) from the smallest,
keep probability (density - epsilon) + rank_norm * 2 * epsilon (mean: density), then the L1
rescale of DARE. Ranks are exact, as the method defines them: a stable radix sort of each row
(per-row work inside one block, kernels.rank_keep); ties are ranked by index where mergekit's
argsort leaves them unordered, and ranks are exact integers for bfloat16 compute too (mergekit
holds them in the compute dtype). A 1-D tensor spread over several blocks is one row across
blocks: its magnitudes are gathered in a statistics round (1-D tensors are small) and ranked
once. Draws as in DARE (keyed by seed, tensor and model, indexed by position): the same bits on any
number of ranks and for any block size.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from bigmerge.errors import ConfigError
from bigmerge.ops import kernels
from bigmerge.ops.base import Block, Param, Stats, TensorTask, require_base
from bigmerge.ops.task_vector.common import TopK, flat_sources, mag_bits, with_defaults
from bigmerge.ops.task_vector.dare import RandomDropOp
from bigmerge.ops.task_vector.task_arithmetic import TiesOp

GATHER = "gather"  # the statistics round that gathers a multi-block 1-D tensor's magnitudes
EPSILON = Param("epsilon", float, "non_base", default=0.15, doc="keep probabilities span density +/- epsilon by rank")


class DellaOp(RandomDropOp):
    """DELLA: drop task-vector elements at random, keeping large magnitudes more often; rescale, then TIES sign election."""

    name = "della"
    params = (*with_defaults(RandomDropOp.params, normalize=True), EPSILON)
    sign_consensus = TiesOp.sign_consensus

    def check(self, task: TensorTask) -> None:
        super().check(task)
        for i in self._sparse_models(task):
            d, e = task.per_model[i]["density"], task.per_model[i]["epsilon"]
            if d + e >= 1 or d - e <= 0:
                raise ConfigError(
                    f"parameter 'epsilon' ({e}) must keep density +/- epsilon in (0, 1) (density {d}) "
                    f"for tensor {task.name!r}"
                )

    def _gathers(self, task: TensorTask) -> bool:
        return len(task.shape) == 1 and task.n_blocks > 1 and bool(self._sparse_models(task))

    def _phases(self, task: TensorTask) -> list[str]:
        return ([GATHER] if self._gathers(task) else []) + super()._phases(task)

    def stats(self, rnd: int, task: TensorTask, block: Block, prev: Any) -> Stats:
        if self._phases(task)[rnd] != GATHER:
            return super().stats(rnd, task, block, prev)
        # every block contributes a row of block_rows magnitudes (NaN-padded: the last is short)
        block_rows = block.row0 // block.index if block.index else block.row1 - block.row0
        out: Stats = {}
        for i, delta in self._deltas(task, block, self._sparse_models(task)):
            row = np.full(block_rows, np.nan)
            row[: delta.numel()] = delta.abs().float().cpu().numpy()
            out[f"pb_mag{i}"] = row
        return out

    def finish(self, rnd: int, task: TensorTask, reduced: Stats, prev: Any) -> Any:
        if self._phases(task)[rnd] != GATHER:
            return super().finish(rnd, task, reduced, prev)
        topk = TopK()
        for i in self._sparse_models(task):
            mags = reduced[f"pb_mag{i}"].reshape(-1)[: task.numel].astype(np.float32)
            order = np.argsort(mags.view(np.int32), kind="stable")  # the one row: a per-row sort
            ranks = np.empty(task.numel, dtype=np.int64)
            ranks[order] = np.arange(task.numel)
            topk.extra[f"ranks{i}"] = ranks
        return topk

    def _draws_into(self, task: TensorTask, stats: Any) -> bool:
        # a 1-D tensor over several blocks takes its ranks from the statistics: _draw
        return not (isinstance(stats, TopK) and any(k.startswith("ranks") for k in stats.extra))

    def _draw_into(
        self, task: TensorTask, block: Block, stats: Any, i: int, row: np.ndarray, l1: np.ndarray | None
    ) -> None:
        """_draw's mask into row (uint8) from the sources themselves: |delta| bits in one pass
        (kernels.magnitude_bits), rank_keep, and with l1 the L1 sums from those bits."""
        d, e = task.per_model[i]["density"], task.per_model[i]["epsilon"]
        n = row.shape[0]
        u = self._uniform(task, block, i, n).numpy()
        bits = block.scratch.get("della_bits", (n,), torch.int32).numpy()
        kernels.magnitude_bits(
            flat_sources(block, block.scratch, task.compute_dtype),
            require_base(self, task),
            i,
            bits,
            task.compute_dtype == torch.bfloat16,
        )
        flen, inner, outer = _fibers(task.shape, n)
        kernels.rank_keep(bits, outer, flen, inner, u, d - e, e, d, row, 4 * kernels.threads())
        if l1 is not None:
            kernels.l1_of_bits(bits, row, l1)

    def _draw(self, task: TensorTask, block: Block, stats: Any, i: int, delta: torch.Tensor) -> torch.Tensor:
        d, e = task.per_model[i]["density"], task.per_model[i]["epsilon"]
        n = delta.numel()
        u = self._uniform(task, block, i, n)
        keep = block.scratch.get("keep", (n,), torch.bool)
        if isinstance(stats, TopK) and f"ranks{i}" in stats.extra:  # a 1-D tensor over several blocks
            ranks = torch.from_numpy(stats.extra[f"ranks{i}"][block.row0 : block.row1]).to(u.device)
            return torch.lt(u.double(), _probabilities(ranks, task.numel, d, e), out=keep)
        flen, inner, outer = _fibers(task.shape, n)
        bits = mag_bits(delta, block.scratch)
        if kernels.use_numba() and bits.device.type == "cpu":
            kernels.rank_keep(
                bits.numpy(), outer, flen, inner, u.numpy(), d - e, e, d, keep.numpy(), 4 * kernels.threads()
            )
            return keep
        # the same ranks by a stable sort along each fiber, the same float64 arithmetic
        fibers = bits.view(outer, flen, inner).transpose(1, 2)
        order = torch.sort(fibers, dim=-1, stable=True).indices
        ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(flen, device=order.device).expand_as(order))
        return torch.lt(u.double(), _probabilities(ranks.transpose(1, 2).reshape(-1), flen, d, e), out=keep)


def _fibers(shape: tuple[int, ...], n: int) -> tuple[int, int, int]:
    """(fiber length, inner, outer) of n elements of a tensor of this shape: fibers along dim 1."""
    flen = shape[1] if len(shape) > 1 else n
    inner = math.prod(shape[2:]) if len(shape) > 2 else 1
    return flen, inner, n // max(1, flen * inner)


def _probabilities(ranks: torch.Tensor, n: int, density: float, epsilon: float) -> torch.Tensor:
    """Keep probabilities of 0-based ranks among n, in float64 (as kernels.rank_keep)."""
    if n == 1:
        return torch.full(ranks.shape, density, dtype=torch.float64, device=ranks.device)
    return (density - epsilon) + (ranks.double() / (n - 1)) * 2.0 * epsilon


class DellaLinearOp(DellaOp):
    """DELLA, linear: drop task-vector elements at random, keeping large magnitudes more often; rescale, then task arithmetic."""

    name = "della_linear"
    params = (*RandomDropOp.params, EPSILON)
    sign_consensus = False
