"""Task vectors: task arithmetic and TIES (magnitude top-k per tensor, then sign election).

Arithmetic follows mergekit 0.1.5 operation by operation, so the same config gives the
same bits; the top-k threshold is exact over the whole tensor but found by a radix
select (select.py), never by sorting the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from bigmerge.errors import ConfigError
from bigmerge.ops import select
from bigmerge.ops.base import Block, MergeOp, Param, Stats, TensorTask, as_compute, require_base


@dataclass
class TopK:
    """Per non-base model: the magnitude threshold (None = keep all) and the L1 rescale factor."""

    k: list[Optional[int]]
    hi_bin: list[Optional[int]]
    rank_in_bin: list[Optional[int]]
    threshold: list[Optional[float]]
    l1_before: list[float]
    scale: list[Optional[float]]


class TaskArithmeticOp(MergeOp):
    name = "task_arithmetic"
    params = (
        Param("weight", float, "non_base", required=True),
        Param("normalize", bool, "shared", default=False),
        Param("lambda", float, "shared", default=1.0),
        Param("int8_mask", bool, "shared", default=False),
        Param("rescale", bool, "shared", default=False),
        Param("density", float, "non_base", default=1.0),
    )
    base = "required"
    sign_consensus = False
    sparsify = False
    workspace_per_source = 2.0

    # -- statistics: exact magnitude thresholds (only operators that sparsify) --------

    def check(self, task: TensorTask) -> None:
        for i in task.non_base:
            d = task.per_model[i]["density"]
            if not 0.0 < d <= 1.0:
                raise ConfigError(f"parameter 'density' must be in (0, 1], got {d} for tensor {task.name!r}")

    def _sparse_models(self, task: TensorTask) -> list[int]:
        if not self.sparsify or task.numel == 0:
            return []
        return [i for i in task.non_base if task.per_model[i]["density"] < 1.0]

    def rounds(self, task: TensorTask) -> int:
        if not self._sparse_models(task):
            return 0
        return 3 if task.shared["rescale"] else 2

    def _delta(self, task: TensorTask, block: Block, i: int) -> torch.Tensor:
        dt = task.compute_dtype
        base = block.inputs[require_base(self, task)]
        out = block.scratch.get("stats_delta", base.shape, dt)
        return torch.sub(as_compute(block.inputs[i], dt, block.scratch, "cast_x"), as_compute(base, dt, block.scratch, "cast_base"), out=out)

    def stats(self, rnd: int, task: TensorTask, block: Block, prev: Any) -> Stats:
        out: Stats = {}
        for i in self._sparse_models(task):
            delta = self._delta(task, block, i)
            bits = select.magnitude_bits(delta)
            if rnd == 0:
                out[f"hi{i}"] = select.hist_high(bits)
                out[f"l1_{i}"] = np.array([delta.abs().sum(dtype=torch.float64).item()])
            elif rnd == 1:
                out[f"lo{i}"] = select.hist_low(bits, prev.hi_bin[i])
            else:
                kept = delta * (bits >= _threshold_bits(prev.threshold[i])).reshape(delta.shape).to(delta.dtype)
                out[f"l1k_{i}"] = np.array([kept.abs().sum(dtype=torch.float64).item()])
        return out

    def finish(self, rnd: int, task: TensorTask, reduced: Stats, prev: Any) -> Any:
        n = len(task.per_model)
        if rnd == 0:
            topk = TopK([None] * n, [None] * n, [None] * n, [None] * n, [0.0] * n, [None] * n)
            for i in self._sparse_models(task):
                # mergekit keeps k = max(1, int(density * numel)) elements
                k = max(1, int(task.per_model[i]["density"] * task.numel))
                topk.k[i] = k
                topk.hi_bin[i], topk.rank_in_bin[i] = select.find_bin(reduced[f"hi{i}"], k)
                topk.l1_before[i] = float(reduced[f"l1_{i}"].sum())
            return topk
        topk = prev
        if rnd == 1:
            for i in self._sparse_models(task):
                lo, _ = select.find_bin(reduced[f"lo{i}"], topk.rank_in_bin[i])
                topk.threshold[i] = select.threshold_value(topk.hi_bin[i], lo)
        else:
            for i in self._sparse_models(task):
                before = torch.tensor(topk.l1_before[i], dtype=task.compute_dtype)
                after = torch.tensor(float(reduced[f"l1k_{i}"].sum()), dtype=task.compute_dtype)
                if before >= 1e-7 and after >= 1e-7:
                    topk.scale[i] = (before / after).item()
        return topk

    # -- apply: the arithmetic of mergekit's generalized task arithmetic ---------------

    def apply(self, task: TensorTask, block: Block, stats: Any) -> torch.Tensor:
        dt = task.compute_dtype
        sc = block.scratch
        src = block.inputs[require_base(self, task)]
        base = sc.get("base", src.shape, dt)
        base.copy_(src)
        others = task.non_base
        if not others:
            return base
        deltas = sc.get("deltas", (len(others), *base.shape), dt)
        for row, i in enumerate(others):
            delta = deltas[row]
            torch.sub(as_compute(block.inputs[i], dt, sc), base, out=delta)
            thr = stats.threshold[i] if isinstance(stats, TopK) else None
            if thr is not None:
                keep = select.magnitude_bits(delta) >= _threshold_bits(thr)
                delta.mul_(keep.view(delta.shape))
                if stats.scale[i] is not None:
                    delta.mul_(torch.tensor(stats.scale[i], dtype=dt))
        weights = torch.tensor([task.per_model[i]["weight"] for i in others], dtype=dt)
        while deltas.dim() > weights.dim():
            weights.unsqueeze_(-1)
        deltas.mul_(weights)
        if self.sign_consensus:
            mask_dtype = torch.int8 if task.shared["int8_mask"] else dt
            sign = torch.sign(deltas, out=sc.get("sign", deltas.shape, dt)).to(mask_dtype)
            majority = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
            agree = torch.eq(sign, majority, out=sc.get("agree", deltas.shape, torch.bool))
            del sign, majority
            mixed = torch.mul(deltas, agree, out=sc.get("masked", deltas.shape, dt)).sum(dim=0)
            divisor = torch.mul(weights, agree, out=sc.get("wmask", deltas.shape, dt)).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if task.shared["normalize"]:
            mixed /= divisor
        lam = task.shared["lambda"]
        if lam != 1:
            mixed *= lam
        return base.add_(mixed)


def _threshold_bits(thr: float) -> int:
    return int(np.array([thr], dtype=np.float32).view(np.int32)[0])


class TiesOp(TaskArithmeticOp):
    name = "ties"
    params = tuple(
        Param(p.name, p.type, p.scope, default=True) if p.name == "normalize" else p for p in TaskArithmeticOp.params
    )
    sign_consensus = True
    sparsify = True
