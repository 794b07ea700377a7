"""What the task-vector operators share: the statistics phases, the exact top-k selections
(TopK) and their keep masks, the block's sources as the fused kernels read them, sign election,
the L1 rescale factor and a sum of rows in a fixed order."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from bigmerge.ops import kernels
from bigmerge.ops.base import Block, Param, Scratch, TensorTask, as_compute
from bigmerge.ops.sums import as_scalars
from bigmerge.ops.task_vector import select

# The statistics phases of a selecting operator: high-bits histogram, low-bits histogram (the
# threshold), ties per block (skipped unless ties straddle the k-th element), then statistics
# that need the final masks (the L1 norm after masking for `rescale`).
HI, LO, TIES, AFTER = "hi", "lo", "ties", "after"
LO_BINS = select.LO_BINS

Sources = tuple[np.ndarray, ...]  # a block's flat sources as the fused kernels read them (see flat_sources)
Selection = tuple[int, int, int, int]  # (tA, cA, tB, cB): kernels.task_vector_merge's keep rule


@dataclass
class TopK:
    """Exact top-k selections (by key) and per-model L1 rescale factors.

    A selection keeps exactly k elements of its source's magnitudes, as mergekit does: all
    above the threshold and, of those equal to it, the first `k - n_above` in flat index order
    (`tie_quota[key][block]` per block, of the `tie_count[key][block]` ties each block holds).
    A selection with k = 0 keeps nothing.
    """

    k: dict[str, int] = field(default_factory=dict)
    hi_bin: dict[str, int] = field(default_factory=dict)
    rank_in_bin: dict[str, int] = field(default_factory=dict)
    threshold: dict[str, float] = field(default_factory=dict)
    tie_quota: dict[str, list[int]] = field(default_factory=dict)
    tie_count: dict[str, list[int]] = field(default_factory=dict)
    l1_before: dict[int, float] = field(default_factory=dict)
    scale: dict[int, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def sign_agreement(deltas: torch.Tensor, sc: Scratch) -> torch.Tensor:
    """mergekit's sign election ("sum"): per row, where sign(delta) equals the sign of the sum
    over rows (zero counting as positive). Bool [n, *shape] in scratch."""
    shape = deltas.shape[1:]
    dt = deltas.dtype
    total = sum_rows_in_order(deltas, sc.get("sign_total", shape, dt), sc)
    majority = as_float(torch.ge(total, 0, out=sc.get("ge", shape, torch.bool)), dt, sc, "majority")
    majority.mul_(2).sub_(1)
    sign = sc.get("sign", shape, dt)
    agree = sc.get("agree", deltas.shape, torch.bool)
    for row in range(deltas.shape[0]):
        torch.sign(deltas[row], out=sign)
        torch.eq(sign, majority, out=agree[row])
    return agree


def with_defaults(params: tuple[Param, ...], **defaults: Any) -> tuple[Param, ...]:
    """`params` with other defaults (mergekit's variants differ only in those)."""
    return tuple(replace(p, default=defaults[p.name]) if p.name in defaults else p for p in params)


def l1_scale(before: float, after: float, dt: torch.dtype) -> float | None:
    """mergekit's L1 rescale factor before / after in the compute dtype; None where either
    norm is below its 1e-7 tolerance (the masked delta is then left as it is)."""
    b = as_scalars(before, dt)  # a 16-bit dtype's sums round through float32, as torch's
    a = as_scalars(after, dt)
    return (b / a).item() if b >= 1e-7 and a >= 1e-7 else None


def use_fused(task: TensorTask, block: Block | None = None) -> bool:
    on_cpu = block is None or block.scratch.device.type == "cpu"
    exact = task.compute_dtype in (torch.float32, torch.bfloat16)  # the kernels' arithmetic
    return kernels.use_numba() and on_cpu and exact and task.numel > 0


def stacked_sources(block: Block, sc: Scratch, dt: torch.dtype = torch.float32) -> np.ndarray:
    """Every source of the block as one float32 [n_sources, m] array (exact widening casts;
    sources cast to the compute dtype first when that is bfloat16).

    Made once per block object: a one-block tensor runs its statistics rounds and apply on
    the same block, which would otherwise cast every source up to four times.
    """
    if "stack" in block.memo:
        return block.memo["stack"]
    m = block.inputs[0].numel()
    x = sc.get("stack", (len(block.inputs), m), torch.float32)
    for i, src in enumerate(block.inputs):
        x[i].copy_((src if dt == torch.float32 else as_compute(src, dt, sc, "stack_cast")).reshape(-1))
    block.memo["stack"] = x.numpy()
    return block.memo["stack"]


def flat_sources(block: Block, sc: Scratch, dt: torch.dtype = torch.float32) -> Sources:
    """Every source of the block, flat, as the fused kernels read them: the bfloat16 bit
    patterns themselves (uint16; widening to float32, or to a bfloat16 compute dtype, is
    exact, so the kernels widen as they read and no copy is made) when every source is
    bfloat16, else the rows of the float32 stack (stacked_sources). Made once per block object."""
    if "sources" in block.memo:
        return block.memo["sources"]
    xs: Sources = ()
    if all(x.dtype == torch.bfloat16 and x.is_contiguous() for x in block.inputs):
        xs = tuple(x.reshape(-1).view(torch.uint16).numpy() for x in block.inputs)
        if not all(a.flags.aligned and a.flags.writeable for a in xs):  # one array type for the kernels
            xs = ()
    if not xs:
        x = stacked_sources(block, sc, dt)
        xs = tuple(x[i] for i in range(x.shape[0]))
    block.memo["sources"] = xs
    return xs


def fused_masks(block: Block, n: int, m: int) -> np.ndarray:
    """The uint8 keep masks [n non-base models, m] that kernels.task_vector_merge reads where a
    mask is given, in the block's scratch (the same memory on every call for this block)."""
    return block.scratch.get("fused_masks", (n, m), torch.uint8).numpy()


def mag_bits(delta: torch.Tensor, sc: Scratch) -> torch.Tensor:
    return select.magnitude_bits(delta, sc.get("mag", (delta.numel(),), torch.float32))


def keep_mask(bits: torch.Tensor, topk: TopK, key: str, block: int, sc: Scratch, name: str = "keep") -> torch.Tensor:
    """The top-k mask of one selection on one block: above the threshold, plus this block's ties."""
    if key not in topk.threshold:  # k = 0
        return torch.zeros(bits.shape, dtype=torch.bool, out=sc.get(name, bits.shape, torch.bool))
    thr = threshold_bits(topk.threshold[key])
    quota = topk.tie_quota.get(key)
    if quota is None:
        return torch.ge(bits, thr, out=sc.get(name, bits.shape, torch.bool))
    keep = torch.gt(bits, thr, out=sc.get(name, bits.shape, torch.bool))
    if quota[block]:
        ties = torch.eq(bits, thr)
        first = ties & (torch.cumsum(ties, 0, dtype=torch.int64) <= quota[block])
        keep |= first
    return keep


def as_float(mask: torch.Tensor, dt: torch.dtype, sc: Scratch, name: str = "mask_f") -> torch.Tensor:
    return sc.get(name, mask.shape, dt).copy_(mask)


def sum_rows_in_order(x: torch.Tensor, out: torch.Tensor, sc: Scratch | None = None) -> torch.Tensor:
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


def threshold_bits(thr: float) -> int:
    return int(np.array([thr], dtype=np.float32).view(np.int32)[0])
