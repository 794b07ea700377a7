"""DAM's learned coefficients (Gauthier-Caron et al., "Merging in a Bottle"), applied block by block.

`bigmerge dam` trains, per source model i, multipliers a_i = f(c_i) and writes them to one
safetensors file per source under the model's own tensor names; this operator reads them through
the engine's auxiliary inputs (`MergeOp.aux_inputs`) and computes

    W = sum_i W_i diag(a_i)      a_i [in]:   linear and embedding weights (per input column), read whole
    w = sum_i a_i * w_i          a_i [dim]:  1-D weights (norms), read row-blocked with the block
    b = sum_i a_i b_i            a_i [1]:    biases (`*.bias`), one scalar per source

A row block of W needs the whole coefficient vectors (one per input column), which are small.
Tensors absent from every coefficient file get the plain average. Elementwise in float32 (float64
for float64), left to right over the sources: the bytes do not depend on block size or world size.
"""

from __future__ import annotations

from typing import Any

import torch

from bigmerge.errors import ConfigError
from bigmerge.ops.base import AuxInput, Block, MergeOp, Param, TensorTask, as_compute


def coefficient_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a tensor's coefficient vector in the files `bigmerge dam` writes."""
    if len(shape) >= 2:
        return (shape[-1],)
    if len(shape) == 0 or name.endswith(".bias"):
        return (1,)
    return tuple(shape)


class DamOp(MergeOp):
    """DAM: per-input-column coefficients per model, learned by `bigmerge dam`: W = sum_i W_i diag(a_i)."""

    name = "dam"
    params = (
        Param(
            "coefficients",
            str,
            "input",
            required=True,
            doc="this model's coefficients file (coefficients/<i>-<name>.safetensors written by `bigmerge dam`)",
        ),
    )
    base = "ignored"
    workspace_per_source = 0.0  # accumulates one source at a time

    def aux_inputs(self, task: TensorTask, sources: list[tuple[str, str]]) -> list[dict[str, AuxInput]]:
        shape = coefficient_shape(task.name, task.shape)
        out = []
        for i, (ref, tensor) in enumerate(sources):
            file = task.per_model[i].get("coefficients") or ""
            if not file:
                raise ConfigError(f"merge_method 'dam' needs parameters.coefficients for model {ref}")
            # a vector tensor's coefficients are elementwise (row-blocked); a matrix's per column (whole)
            out.append({"coef": AuxInput(file, tensor, shape, optional=True, rows=shape == tuple(task.shape))})
        return out

    def apply(self, task: TensorTask, block: Block, stats: Any) -> torch.Tensor:
        acc = torch.float64 if task.compute_dtype == torch.float64 else torch.float32
        dev = block.scratch.device
        out = block.scratch.get("acc", block.inputs[0].shape, acc).zero_()
        n = len(block.inputs)
        for i, x in enumerate(block.inputs):
            if block.aux and "coef" in block.aux[i]:
                a = block.aux[i]["coef"].to(device=dev, dtype=acc)
            else:
                a = torch.tensor(1.0 / n, dtype=acc, device=dev)
            if len(task.shape) >= 2 and x.dim() > 2:
                a = a.reshape((1,) * (x.dim() - 1) + (-1,))
            out.addcmul_(as_compute(x, task.compute_dtype, block.scratch), a)
        return out.to(task.compute_dtype)
