"""Task vectors: task arithmetic and TIES (magnitude top-k per tensor, then sign election).

Arithmetic follows mergekit 0.1.5 operation by operation, so the same config gives the
same bits; the top-k threshold is exact over the whole tensor but found by a radix
select (select.py), never by sorting the tensor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bigmerge.dist.comm import SerialComm, reduce_stats
from bigmerge.errors import ConfigError
from bigmerge.ops import kernels, select
from bigmerge.ops.base import Block, MergeOp, Param, Scratch, Stats, TensorTask, as_compute, require_base


@dataclass
class TopK:
    """Per non-base model: the magnitude threshold (None = keep all) and the L1 rescale factor.

    Exactly k elements are kept, as mergekit does: all above the threshold and, of those
    equal to it, the first `k - n_above` in flat index order (`tie_quota[i][block]` per block).
    """

    k: list[int | None]
    hi_bin: list[int | None]
    rank_in_bin: list[int | None]
    threshold: list[float | None]
    l1_before: list[float]
    scale: list[float | None]
    tie_quota: list[list[int] | None]


class TaskArithmeticOp(MergeOp):
    """base + lambda * sum of weighted task vectors (model - base)."""

    name = "task_arithmetic"
    params = (
        Param("weight", float, "non_base", required=True, doc="weight of this model's task vector"),
        Param("normalize", bool, "shared", default=False, doc="divide by the sum of the weights"),
        Param("lambda", float, "shared", default=1.0, doc="scale of the merged task vector"),
        Param("int8_mask", bool, "shared", default=False, doc="accepted for mergekit configs; no effect on values"),
        Param("rescale", bool, "shared", default=False, doc="rescale sparsified deltas to their L1 norm before"),
        Param("density", float, "non_base", default=1.0, doc="fraction of each task vector kept (by magnitude)"),
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
        # A tensor that is one block needs no reduction: apply computes its statistics itself.
        return self._stat_rounds(task) if task.n_blocks > 1 else 0

    def _stat_rounds(self, task: TensorTask) -> int:
        # 0: high-bits histogram, 1: low-bits histogram (the threshold), 2: ties per block
        # (skipped unless ties straddle the k-th element), 3: L1 after masking (rescale only)
        if not self._sparse_models(task):
            return 0
        return 4 if task.shared["rescale"] else 3

    def _local_stats(self, task: TensorTask, block: Block) -> Any:
        """The statistics rounds on a tensor's only block: the same stats/finish code, the
        reduction of one block being the block itself, so the result cannot differ."""
        prev: Any = None
        for rnd in range(self._stat_rounds(task)):
            reduced = reduce_stats(SerialComm(), {block.index: self.stats(rnd, task, block, prev)}, 1)
            prev = self.finish(rnd, task, reduced, prev)
        return prev

    def _delta(self, task: TensorTask, block: Block, i: int, base: torch.Tensor) -> torch.Tensor:
        out = block.scratch.get("stats_delta", base.shape, task.compute_dtype)
        return torch.sub(as_compute(block.inputs[i], task.compute_dtype, block.scratch, "cast_x"), base, out=out)

    def stats(self, rnd: int, task: TensorTask, block: Block, prev: Any) -> Stats:
        out: Stats = {}
        if rnd == 2 and not any(q is not None for q in prev.tie_quota):
            return out  # no ties straddle the k-th element: nothing to count
        sc = block.scratch
        rescale = task.shared["rescale"]
        if rnd < 3 and _fused(task, block):
            sparse = self._sparse_models(task)
            if rnd == 2:
                sparse = [i for i in sparse if prev.tie_quota[i] is not None]
            x = _stack(block, sc)
            if rnd == 0:
                params = np.zeros(len(sparse), dtype=np.int64)
            elif rnd == 1:
                params = np.array([prev.hi_bin[i] for i in sparse], dtype=np.int64)
            else:
                params = np.array([_threshold_bits(prev.threshold[i]) for i in sparse], dtype=np.int64)
            hists = kernels.magnitude_hists(
                x, require_base(self, task), np.array(sparse, dtype=np.int64), params, rnd, kernels.threads()
            )
            for k, i in enumerate(sparse):
                if rnd == 2:
                    out[f"pb_ties{i}"] = np.array([float(hists[k, 0])])
                    continue
                out[f"hi{i}" if rnd == 0 else f"lo{i}"] = hists[k]
                if rnd == 0 and rescale:
                    delta = torch.from_numpy(x[i]) - torch.from_numpy(x[require_base(self, task)])
                    out[f"l1_{i}"] = np.array([delta.abs().sum(dtype=torch.float64).item()])
            return out
        base = as_compute(block.inputs[require_base(self, task)], task.compute_dtype, sc, "cast_base")
        for i in self._sparse_models(task):
            delta = self._delta(task, block, i, base)
            mag = sc.get("mag", (delta.numel(),), torch.float32)
            bits = select.magnitude_bits(delta, mag)
            if rnd == 0:
                out[f"hi{i}"] = select.hist_high(bits, sc.get("hi", (delta.numel(),), torch.int32))
                if rescale:
                    out[f"l1_{i}"] = np.array([delta.abs().sum(dtype=torch.float64).item()])
            elif rnd == 1:
                out[f"lo{i}"] = select.hist_low(bits, prev.hi_bin[i])
            elif rnd == 2:
                if prev.tie_quota[i] is not None:  # per-block counts, kept per block ("pb_")
                    ties = int(torch.eq(bits, _threshold_bits(prev.threshold[i])).sum())
                    out[f"pb_ties{i}"] = np.array([float(ties)])
            else:
                keep = _keep_mask(bits, prev, i, block.index, sc).reshape(delta.shape)
                kept = delta * keep.to(delta.dtype)
                out[f"l1k_{i}"] = np.array([kept.abs().sum(dtype=torch.float64).item()])
        return out

    def finish(self, rnd: int, task: TensorTask, reduced: Stats, prev: Any) -> Any:
        n = len(task.per_model)
        if rnd == 0:
            topk = TopK([None] * n, [None] * n, [None] * n, [None] * n, [0.0] * n, [None] * n, [None] * n)
            for i in self._sparse_models(task):
                # mergekit keeps k = max(1, int(density * numel)) elements
                k = max(1, int(task.per_model[i]["density"] * task.numel))
                topk.k[i] = k
                topk.hi_bin[i], topk.rank_in_bin[i] = select.find_bin(reduced[f"hi{i}"], k)
                if f"l1_{i}" in reduced:
                    topk.l1_before[i] = float(reduced[f"l1_{i}"].sum())
            return topk
        topk = prev
        if rnd == 1:
            for i in self._sparse_models(task):
                lo_hist = reduced[f"lo{i}"]
                lo, rank = select.find_bin(lo_hist, topk.rank_in_bin[i])
                topk.threshold[i] = select.threshold_value(topk.hi_bin[i], lo)
                if int(lo_hist[lo]) > rank:
                    topk.tie_quota[i] = [rank]  # how many ties to keep; spread per block in round 2
        elif rnd == 2:
            for i in self._sparse_models(task):
                if topk.tie_quota[i] is None:
                    continue
                left = topk.tie_quota[i][0]
                quota = []
                for count in reduced[f"pb_ties{i}"].reshape(-1):
                    take = min(int(count), left)
                    quota.append(take)
                    left -= take
                topk.tie_quota[i] = quota
        else:
            for i in self._sparse_models(task):
                before = torch.tensor(topk.l1_before[i], dtype=task.compute_dtype)
                after = torch.tensor(float(reduced[f"l1k_{i}"].sum()), dtype=task.compute_dtype)
                if before >= 1e-7 and after >= 1e-7:
                    topk.scale[i] = (before / after).item()
        return topk

    # -- apply: the arithmetic of mergekit's generalized task arithmetic ---------------

    def _apply_fused(self, task: TensorTask, block: Block, stats: Any, shape: torch.Size) -> torch.Tensor:
        """The same arithmetic as the torch code below, in one pass (kernels.task_vector_merge)."""
        sc = block.scratch
        others = task.non_base
        b = require_base(self, task)
        x = _stack(block, sc)
        n = len(others)
        topk = stats if isinstance(stats, TopK) else None
        thr = np.full(n, np.nan, dtype=np.float32)
        scale = np.full(n, np.nan, dtype=np.float32)
        use_mask = np.zeros(n, dtype=np.bool_)
        masks = np.zeros((n, 1), dtype=np.uint8)
        if topk is not None:
            for r, i in enumerate(others):
                if topk.threshold[i] is not None:
                    thr[r] = topk.threshold[i]
                if topk.scale[i] is not None:
                    scale[r] = np.float32(torch.tensor(topk.scale[i], dtype=torch.float32).item())
                if topk.tie_quota[i] is not None:  # ties split by index: the mask says which
                    if masks.shape[1] == 1:
                        masks = sc.get("tie_masks", (n, x.shape[1]), torch.uint8).numpy()
                    thr_bits = np.int32(_threshold_bits(topk.threshold[i]))
                    kernels.tie_split_mask(x, b, i, thr_bits, topk.tie_quota[i][block.index], masks[r])
                    use_mask[r] = True
        weights = torch.tensor([task.per_model[i]["weight"] for i in others], dtype=torch.float32)
        plain = weights.sum(dim=0, keepdim=True)
        plain[plain.abs() < 1e-8] = 1
        out = sc.get("fused_out", (x.shape[1],), torch.float32)
        kernels.task_vector_merge(
            x,
            b,
            np.array(others, dtype=np.int64),
            weights.numpy(),
            thr,
            masks,
            use_mask,
            scale,
            self.sign_consensus,
            bool(task.shared["normalize"]),
            np.float32(plain.item()),
            np.float32(task.shared["lambda"]),
            out.numpy(),
            4 * kernels.threads(),
        )
        return out.view(shape)

    def apply(self, task: TensorTask, block: Block, stats: Any) -> torch.Tensor:
        dt = task.compute_dtype
        sc = block.scratch
        src = block.inputs[require_base(self, task)]
        base = sc.get("base", src.shape, dt).copy_(src)
        others = task.non_base
        if not others:
            return base
        shape = base.shape
        n = len(others)
        if stats is None and task.n_blocks == 1 and self._stat_rounds(task):
            stats = self._local_stats(task, block)
            base = sc.get("base", src.shape, dt).copy_(src)  # the stats rounds share the scratch
        if _fused(task, block):
            return self._apply_fused(task, block, stats, shape)
        deltas = sc.get("deltas", (n, *shape), dt)
        for row, i in enumerate(others):
            delta = deltas[row]
            torch.sub(as_compute(block.inputs[i], dt, sc), base, out=delta)
            thr = stats.threshold[i] if isinstance(stats, TopK) else None
            if thr is not None:
                bits = select.magnitude_bits(delta, sc.get("mag", (delta.numel(),), torch.float32))
                keep = _keep_mask(bits, stats, i, block.index, sc)
                # delta * mask as mergekit computes it, with the mask as floats: torch's
                # float-times-bool kernel is several times slower than float-times-float.
                delta.mul_(_as_float(keep, dt, sc).view(shape))
                if stats.scale[i] is not None:
                    delta.mul_(torch.tensor(stats.scale[i], dtype=dt))
        weights = torch.tensor([task.per_model[i]["weight"] for i in others], dtype=dt, device=sc.device)
        for row in range(n):
            deltas[row].mul_(weights[row])
        mixed = sc.get("mixed", shape, dt)
        divisor = sc.get("divisor", shape, dt)
        if self.sign_consensus:
            # majority sign from the weighted sum; a delta counts where its sign agrees
            _sum_rows(deltas, mixed, sc)
            majority = _as_float(torch.ge(mixed, 0, out=sc.get("ge", shape, torch.bool)), dt, sc, "majority")
            majority.mul_(2).sub_(1)
            sign = sc.get("sign", shape, dt)
            agree = sc.get("agree", shape, torch.bool)
            masked = sc.get("masked", (n, *shape), dt)
            wmask = sc.get("wmask", (n, *shape), dt)
            for row in range(n):
                torch.sign(deltas[row], out=sign)
                torch.eq(sign, majority, out=agree)
                agree_f = _as_float(agree, dt, sc, "agree_f")
                torch.mul(deltas[row], agree_f, out=masked[row])
                torch.mul(agree_f, weights[row], out=wmask[row])
            _sum_rows(masked, mixed, sc)
            _sum_rows(wmask, divisor, sc)
            divisor[divisor == 0] = 1
        else:
            _sum_rows(deltas, mixed, sc)
            divisor = weights.sum(dim=0, keepdim=True)
            divisor[divisor.abs() < 1e-8] = 1
        if task.shared["normalize"]:
            mixed /= divisor
        lam = task.shared["lambda"]
        if lam != 1:
            mixed *= lam
        return base.add_(mixed)


def _fused(task: TensorTask, block: Block | None = None) -> bool:
    on_cpu = block is None or block.scratch.device.type == "cpu"
    return kernels.AVAILABLE and on_cpu and task.compute_dtype == torch.float32 and task.numel > 0


def _stack(block: Block, sc: Scratch) -> np.ndarray:
    """Every source of the block as one float32 [n_sources, m] array (exact widening casts).

    Made once per block object: a one-block tensor runs its statistics rounds and apply on
    the same block, which would otherwise cast every source up to four times.
    """
    if "stack" in block.memo:
        return block.memo["stack"]
    m = block.inputs[0].numel()
    x = sc.get("stack", (len(block.inputs), m), torch.float32)
    for i, src in enumerate(block.inputs):
        x[i].copy_(src.reshape(-1))
    block.memo["stack"] = x.numpy()
    return block.memo["stack"]


def _keep_mask(bits: torch.Tensor, topk: TopK, i: int, block: int, sc: Scratch) -> torch.Tensor:
    """The top-k mask of model i on one block: above the threshold, plus this block's ties."""
    thr = _threshold_bits(topk.threshold[i])
    quota = topk.tie_quota[i]
    if quota is None:
        return torch.ge(bits, thr, out=sc.get("keep", bits.shape, torch.bool))
    keep = torch.gt(bits, thr, out=sc.get("keep", bits.shape, torch.bool))
    if quota[block]:
        ties = torch.eq(bits, thr)
        first = ties & (torch.cumsum(ties, 0, dtype=torch.int64) <= quota[block])
        keep |= first
    return keep


def _as_float(mask: torch.Tensor, dt: torch.dtype, sc: Scratch, name: str = "mask_f") -> torch.Tensor:
    return sc.get(name, mask.shape, dt).copy_(mask)


def _sum_rows(x: torch.Tensor, out: torch.Tensor, sc: Scratch | None = None) -> torch.Tensor:
    """x[0] + x[1] + ... left to right, accumulated in float32 for 16-bit dtypes.

    This is torch's sum over dim 0 for up to 4 rows (which also accumulates 16-bit
    floats in float32 and rounds once); for 5 or more rows torch's order depends on the
    size of the other dimensions, i.e. on the block size, so a fixed order is used to
    keep every block size (and every world size) bit-identical.
    """
    if x.dtype in (torch.bfloat16, torch.float16):
        acc = (sc.get("sum_acc", out.shape, torch.float32) if sc is not None else torch.empty(out.shape)).copy_(x[0])
        for row in range(1, x.shape[0]):
            acc.add_(x[row])
        return out.copy_(acc)
    out.copy_(x[0])
    for row in range(1, x.shape[0]):
        out.add_(x[row])
    return out


def _threshold_bits(thr: float) -> int:
    return int(np.array([thr], dtype=np.float32).view(np.int32)[0])


class TiesOp(TaskArithmeticOp):
    """TIES: top-k magnitude per task vector, sign election, disjoint mean (Yadav et al.)."""

    name = "ties"
    params = tuple(
        dataclasses.replace(p, default=True) if p.name == "normalize" else p for p in TaskArithmeticOp.params
    )
    sign_consensus = True
    sparsify = True
