"""Arcee Fusion: take the fine-tune's change only where it matters, with mergekit 0.1.5's arithmetic.

Importance of an element: |fine-tune - base| times the KL divergence between the softmaxes
(over the last dimension) of the fine-tune's and the base's vector holding it. The change is
kept where importance >= median + 1.5 (q3 - q1), the quartiles over the whole tensor.

The quartiles are whole-tensor statistics: an exact radix select over the importance
values' bit patterns (16 bits per round, integer histograms summed across blocks and ranks:
2 rounds, 4 with float64 compute), at mergekit's indices int(q * (n - 1)). mergekit sorts
every value of a tensor of up to 1,000,000 elements, so there the quartiles are the same;
above that it sorts a random sample of 1,000,000 (with replacement, from torch's global
generator), which no one can reproduce: bigmerge takes the exact quartiles of the whole
tensor instead.

The last dimension of a tensor of 2+ dimensions lies inside a block's rows, so the softmax
and KL are mergekit's torch code on the block. A 1-D tensor is one vector: on one block the
same; spread over blocks its softmax takes three more rounds (the maxima, the sums of
exponentials, the KL sum: exact sums, rounded as torch's float32 reductions round), which
can differ from torch's own in the last bit of a sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bigmerge.errors import ConfigError
from bigmerge.ops.base import Block, Stats, StatsOp, TensorTask, as_compute, require_base
from bigmerge.ops.sums import as_scalars

EPS = 1e-8
QUANTILES = (0.25, 0.5, 0.75)
DIGIT = 16
BINS = 1 << DIGIT


@dataclass
class FusionState:
    maxima: tuple[float, float] | None = None  # 1-D over blocks: of the fine-tune, of the base
    inv_sums: tuple[torch.Tensor, torch.Tensor] | None = None
    kl: torch.Tensor | None = None
    ranks: list[int] = field(default_factory=list)  # of each quartile, within its prefix
    prefixes: list[int] = field(default_factory=list)
    threshold: torch.Tensor | None = None


def _key_bits(task: TensorTask) -> int:
    return 64 if task.compute_dtype == torch.float64 else 32


def _keys(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Order-preserving unsigned keys of x's values (int64; 32-bit keys for 32-bit floats)."""
    if bits == 32:
        u = x.to(torch.float32).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        neg = (u & 0x80000000) != 0
        return torch.where(neg, (~u) & 0xFFFFFFFF, u | 0x80000000)
    b = x.to(torch.float64).view(torch.int64)
    return torch.where(b < 0, ~b, b ^ torch.iinfo(torch.int64).min)


def _value(key: int, bits: int) -> float:
    if bits == 32:
        u = key ^ 0x80000000 if key & 0x80000000 else (~key) & 0xFFFFFFFF
        return float(np.array([u], dtype=np.uint32).view(np.float32)[0])
    u = key ^ (1 << 63) if key & (1 << 63) else (~key) & ((1 << 64) - 1)
    return float(np.array([u], dtype=np.uint64).view(np.float64)[0])


class ArceeFusionOp(StatsOp):
    """Arcee Fusion: the other model's change where its importance (size of change x KL of the softmaxes) is an outlier."""

    name = "arcee_fusion"
    params = ()
    base = "required"
    min_models = 2
    workspace_per_source = 4.0
    float32_result = True  # a float32 factor: mergekit's result under bf16 compute is float32

    def check(self, task: TensorTask) -> None:
        if len(task.per_model) != 2:
            raise ConfigError(
                f"merge_method 'arcee_fusion' needs exactly two models (base_model and one other), got {len(task.per_model)}"
            )

    @staticmethod
    def softmax_rounds(task: TensorTask) -> int:
        return 3 if len(task.shape) <= 1 and task.n_blocks > 1 else 0

    def stat_rounds(self, task: TensorTask) -> int:
        return self.softmax_rounds(task) + _key_bits(task) // DIGIT if task.numel else 0

    def _pair(self, task: TensorTask, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        """(base, fine-tune) of the block in the compute dtype, as [vectors, last dim]."""
        b = require_base(self, task)
        dt = task.compute_dtype
        cols = task.shape[-1] if len(task.shape) > 1 else -1
        base = as_compute(block.inputs[b], dt).reshape(-1, cols if cols > 0 else max(1, block.inputs[b].numel()))
        other = as_compute(block.inputs[1 - b], dt).reshape(base.shape)
        return base, other

    def _wide(self, task: TensorTask, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float64 if task.compute_dtype == torch.float64 else torch.float32)

    def _softmax(self, task: TensorTask, x: torch.Tensor, m: float, inv: torch.Tensor) -> torch.Tensor:
        """torch's softmax over blocks: exp(x - max) times 1 / sum, in float32 (float64), to the dtype."""
        return (torch.exp(self._wide(task, x) - m) * inv).to(task.compute_dtype)

    def importance(self, task: TensorTask, block: Block, st: FusionState | None) -> torch.Tensor:
        base, other = self._pair(task, block)
        diff = (other - base).abs()
        if self.softmax_rounds(task):
            assert st is not None and st.kl is not None
            kl = st.kl
        else:
            p = F.softmax(other, dim=-1) + EPS
            q = F.softmax(base, dim=-1) + EPS
            kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
        return (diff * kl).reshape(-1)

    def stats(self, rnd: int, task: TensorTask, block: Block, prev: Any) -> Stats:
        st: FusionState = prev if prev is not None else FusionState()
        sm = self.softmax_rounds(task)
        if rnd < sm:
            base, other = self._pair(task, block)
            if rnd == 0:
                return {"pb_max": np.array([float(other.max()), float(base.max())])}
            assert st.maxima is not None
            if rnd == 1:
                return {
                    "sums": np.array(
                        [
                            np.sum(torch.exp(self._wide(task, x) - m).to(torch.float64).cpu().numpy())
                            for x, m in zip((other, base), st.maxima)
                        ]
                    )
                }
            assert st.inv_sums is not None
            p = self._softmax(task, other, st.maxima[0], st.inv_sums[0]) + EPS
            q = self._softmax(task, base, st.maxima[1], st.inv_sums[1]) + EPS
            return {"kl": np.array([np.sum((p * torch.log(p / q)).to(torch.float64).cpu().numpy())])}
        bits = _key_bits(task)
        r = rnd - sm
        shift = bits - DIGIT * (r + 1)
        keys = _keys(self.importance(task, block, st), bits)
        hists = []
        for j in range(len(QUANTILES)):
            sel = keys
            if r:
                sel = keys[((keys >> (shift + DIGIT)) & ((1 << (DIGIT * r)) - 1)) == st.prefixes[j]]
            hists.append(torch.bincount((sel >> shift) & (BINS - 1), minlength=BINS).cpu().numpy())
        return {"hist": np.stack(hists).astype(np.int64)}

    def finish(self, rnd: int, task: TensorTask, reduced: Stats, prev: Any) -> Any:
        st: FusionState = prev if prev is not None else FusionState()
        sm = self.softmax_rounds(task)
        wide = torch.float64 if task.compute_dtype == torch.float64 else torch.float32
        if rnd == 0 and sm:
            mx = reduced["pb_max"].max(axis=0)
            st.maxima = (float(mx[0]), float(mx[1]))
            return st
        if rnd == 1 and sm:
            sums = [torch.tensor(float(s), dtype=wide) for s in reduced["sums"]]
            st.inv_sums = (1 / sums[0], 1 / sums[1])
            return st
        if rnd == 2 and sm:
            st.kl = as_scalars(reduced["kl"][0], task.compute_dtype)
            return st
        r = rnd - sm
        if r == 0:  # mergekit's indices into the sorted values
            idx = (torch.tensor(QUANTILES) * (task.numel - 1)).long()
            st.ranks = [int(i) for i in idx]
            st.prefixes = [0] * len(QUANTILES)
        for j, hist in enumerate(reduced["hist"]):
            cum = np.cumsum(hist)
            b = int(np.searchsorted(cum, st.ranks[j], side="right"))
            st.ranks[j] -= int(cum[b - 1]) if b else 0
            st.prefixes[j] = (st.prefixes[j] << DIGIT) | b
        bits = _key_bits(task)
        if r == bits // DIGIT - 1:
            q1, median, q3 = torch.tensor([_value(k, bits) for k in st.prefixes], dtype=task.compute_dtype)
            st.threshold = median + 1.5 * (q3 - q1)
        return st

    def apply(self, task: TensorTask, block: Block, stats: Any) -> torch.Tensor:
        dt = task.compute_dtype
        shape = block.inputs[0].shape
        if task.numel == 0:
            return torch.empty(shape, dtype=dt)
        st: FusionState = self.stats_or_local(task, block, stats)
        assert st.threshold is not None
        mask = (self.importance(task, block, st) >= st.threshold.to(block.scratch.device)).float()
        base, other = self._pair(task, block)
        base, other = base.reshape(-1), other.reshape(-1)
        return (base + (other - base) * mask).view(shape)
