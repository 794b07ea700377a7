"""Weighted averaging: the model soup. `linear` with equal weights is the uniform soup."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bigmerge.errors import ConfigError
from bigmerge.ops import kernels
from bigmerge.ops.base import Block, MergeOp, Param, TensorTask, as_compute
from bigmerge.ops.kernels import njit, prange, threads

_CHUNK = 4096


if kernels.HAVE_NUMBA:
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic

    @intrinsic
    def _fma32(typingctx, a, b, c):  # type: ignore[no-untyped-def]
        """a * b + c rounded once (llvm.fma), as torch's addcmul computes it on the CPU."""
        sig = types.float32(types.float32, types.float32, types.float32)

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            f32 = ir.FloatType()
            fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
            return builder.call(fn, args)

        return sig, codegen
else:  # pragma: no cover - without numba the torch code runs

    def _fma32(a, b, c):  # type: ignore[no-untyped-def]
        return a * b + c


@njit(cache=True, parallel=True, nogil=True)
def _linear_kernel(xs, w, divisor, normalize, bf16_in, bf16_out, out, bad):  # type: ignore[no-untyped-def]
    """out = (sum_i xs[i] * w[i]) [/ divisor], the torch code's float32 operations in its order
    (addcmul is a fused multiply-add on the CPU: so is this).

    xs: a tuple of flat sources, bfloat16 bits (uint16) or float32; out: bfloat16 bits (uint16,
    rounded to nearest even as torch rounds) or float32. One pass over memory; the work goes
    through small per-thread buffers in simple loops that LLVM vectorizes (no branches inside).
    bad[p]: the non-finite sums part p met. Every source value enters every sum (a weight of 0
    times Inf is NaN), so a NaN or Inf in a source always shows there; so does an overflow.
    """
    m = out.size
    n = w.shape[0]  # xs holds kernels.SOURCE_SLOTS entries or more: the first n are the sources
    nparts = bad.size
    step = (m + nparts - 1) // nparts
    for p in prange(nparts):
        lo0 = p * step
        hi0 = min(m, lo0 + step)
        acc = np.empty(_CHUNK, dtype=np.float32)
        acc_bits = acc.view(np.uint32)
        wide = np.empty(_CHUNK, dtype=np.float32)
        wide_bits = wide.view(np.uint32)
        for lo in range(lo0, hi0, _CHUNK):
            c = min(_CHUNK, hi0 - lo)
            for i in range(n):
                wi = w[i]
                if bf16_in:
                    src = xs[i][lo : lo + c]
                    for k in range(c):
                        wide_bits[k] = np.uint32(src[k]) << np.uint32(16)
                    x = wide
                else:
                    x = xs[i].view(np.float32)[lo : lo + c]
                if i == 0:
                    for k in range(c):
                        acc[k] = _fma32(x[k], wi, np.float32(0.0))
                else:
                    for k in range(c):
                        acc[k] = _fma32(x[k], wi, acc[k])
            if normalize:
                for k in range(c):
                    acc[k] = acc[k] / divisor
            nf = 0
            for k in range(c):
                nf += (acc_bits[k] & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
            bad[p] += nf
            if bf16_out:
                o = out[lo : lo + c]
                for k in range(c):
                    o[k] = kernels.bf16_bits(acc_bits[k])
            else:
                of = out.view(np.float32)[lo : lo + c]
                for k in range(c):
                    of[k] = acc[k]


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

    def checks_finite(self, task: TensorTask) -> bool:
        return _fusable_dtypes(task, set(task.source_dtypes))

    def apply(self, task: TensorTask, block: Block, stats: Any) -> torch.Tensor:
        # mergekit's arithmetic: a float32 (float64 for float64) accumulator, addcmul per model.
        acc = torch.float64 if task.compute_dtype == torch.float64 else torch.float32
        weights = torch.tensor([p["weight"] for p in task.per_model], dtype=acc, device=block.scratch.device)
        if _fusable(task, block):
            return self._apply_fused(task, block, weights)
        out = block.scratch.get("acc", block.inputs[0].shape, acc).zero_()
        for x, w in zip(block.inputs, weights):
            out.addcmul_(as_compute(x, task.compute_dtype, block.scratch), w)
        if task.shared["normalize"]:
            out.div_(weights.sum())
        return out.to(task.compute_dtype)

    def _apply_fused(self, task: TensorTask, block: Block, weights: torch.Tensor) -> torch.Tensor:
        """The same float32 operations as the torch code, in one pass straight to the stored dtype."""
        src = block.inputs[0].dtype
        # rounding to bfloat16 once: in the compute dtype (bf16) or when stored (f32 compute, bf16 out)
        bf16_out = task.compute_dtype == torch.bfloat16 or task.out_dtype == torch.bfloat16
        kind = torch.bfloat16 if bf16_out else torch.float32
        out = block.output("lin_out", block.inputs[0].shape, kind)  # the writer's buffer, if it can be
        bad = np.zeros(max(1, min(4 * threads(), out.numel() // _CHUNK)), dtype=np.int64)
        flat = [
            x.reshape(-1).view(torch.uint16 if src == torch.bfloat16 else torch.float32).numpy() for x in block.inputs
        ]
        _linear_kernel(
            kernels.slots(flat),
            weights.numpy(),
            np.float32(weights.sum().item()),
            bool(task.shared["normalize"]),
            src == torch.bfloat16,
            bf16_out,
            out.reshape(-1).view(torch.uint16 if bf16_out else torch.float32).numpy(),
            bad,
        )
        block.checked(int(bad.sum()))
        return out


def _fusable(task: TensorTask, block: Block) -> bool:
    """The kernel covers bf16 or float32 sources (all alike), float32 or bf16 compute, on the CPU."""
    return block.scratch.device.type == "cpu" and _fusable_dtypes(task, {x.dtype for x in block.inputs})


def _fusable_dtypes(task: TensorTask, dtypes: set[torch.dtype]) -> bool:
    if not kernels.use_numba() or len(dtypes) != 1 or next(iter(dtypes)) not in (torch.bfloat16, torch.float32):
        return False
    if task.compute_dtype == torch.float32:
        return task.out_dtype in (torch.float32, torch.bfloat16)
    return task.compute_dtype == torch.bfloat16 and task.out_dtype == torch.bfloat16
