"""Data-informed merges: Fisher-weighted averaging and RegMean.

Both read per-source statistics that `bigmerge stats` computes on a small data set
(`bigmerge/stats.py`), through the engine's auxiliary inputs (`MergeOp.aux_inputs`):

- `fisher` (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging"): a diagonal
  Fisher estimate Fᵢ per source, the same names and shapes as the model, read row-blocked
  with each block; θ = Σᵢ wᵢ(Fᵢ + ε)θᵢ / Σᵢ wᵢ(Fᵢ + ε), elementwise in float64.
- `regmean` (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models"):
  the Gram matrix Gᵢ = XᵢᵀXᵢ/N of each linear layer's inputs per source, read whole; in the
  [out, in] layout W = (Σᵢ WᵢGᵢ)(Σᵢ Gᵢ)⁻¹, so a row block of W needs its rows of every Wᵢ and
  the whole Gᵢ. Tensors without a Gram matrix (embeddings, norms) get the plain average.

Where statistics live (parameters of both operators): `statistics_dir` is the `--out` of
`bigmerge stats`, holding DIR/<model-name>/fisher.safetensors or gram.safetensors, with
<model-name> the last component of the model's path; a model's own `statistics` (its
file, or the directory holding it) takes precedence.
"""

from __future__ import annotations

from typing import Any

import torch

from bigmerge.errors import ConfigError
from bigmerge.ops.base import AuxInput, Block, MergeOp, Param, TensorTask, as_compute

FISHER_FILE = "fisher.safetensors"
GRAM_FILE = "gram.safetensors"
# RegMean multiplies fixed-shape row tiles: BLAS picks its summation order by the matrix
# shape, so a row's result would otherwise depend on the block it falls in.
TILE_ROWS = 128


def model_dir_name(ref: str) -> str:
    """The directory `bigmerge stats` writes a model's statistics into: its path's last component."""
    name = ref.rstrip("/").rsplit("/", 1)[-1]
    return name or "model"


def statistics_file(task: TensorTask, i: int, ref: str, filename: str, op: str) -> str:
    own = task.per_model[i].get("statistics") or ""
    if own:
        return own if own.endswith(".safetensors") else own.rstrip("/") + "/" + filename
    root = task.shared.get("statistics_dir") or ""
    if root:
        return f"{root.rstrip('/')}/{model_dir_name(ref)}/{filename}"
    raise ConfigError(
        f"merge_method {op!r} needs statistics for model {ref}: set parameters.statistics_dir "
        f"(the --out of `bigmerge stats`) or that model's parameters.statistics"
    )


STATISTICS_PARAMS = (
    Param(
        "statistics",
        str,
        "input",
        default="",
        doc="this model's statistics file, or the directory holding it (overrides statistics_dir)",
    ),
    Param(
        "statistics_dir",
        str,
        "shared",
        default="",
        doc="the --out DIR of `bigmerge stats`: DIR/<model-name>/<file>, <model-name> the path's last component",
    ),
)


class FisherOp(MergeOp):
    """Fisher-weighted average: each parameter weighted by its diagonal Fisher information (`bigmerge stats --kind fisher`)."""

    name = "fisher"
    params = (
        Param("weight", float, "input", default=1.0, doc="this model's weight, multiplying its Fisher information"),
        Param(
            "epsilon",
            float,
            "shared",
            default=1e-12,
            doc="added to every Fisher value: where all are zero the result is the weighted average",
        ),
        *STATISTICS_PARAMS,
    )
    base = "ignored"
    workspace_per_source = 2.0  # float64 numerator and denominator, one source's float64 terms

    def check(self, task: TensorTask) -> None:
        weights = [p["weight"] for p in task.per_model]
        if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
            raise ConfigError(f"fisher: weights must be >= 0 and not all 0, got {weights} for {task.name!r}")
        if task.shared["epsilon"] < 0:
            raise ConfigError(f"fisher: epsilon must be >= 0, got {task.shared['epsilon']}")

    def aux_inputs(self, task: TensorTask, sources: list[tuple[str, str]]) -> list[dict[str, AuxInput]]:
        return [
            {"fisher": AuxInput(statistics_file(task, i, ref, FISHER_FILE, self.name), tensor, task.shape, rows=True)}
            for i, (ref, tensor) in enumerate(sources)
        ]

    def apply(self, task: TensorTask, block: Block, stats: Any) -> torch.Tensor:
        dev = block.scratch.device
        f64 = torch.float64
        shape = block.inputs[0].shape
        num = block.scratch.get("fisher_num", shape, f64).zero_()
        den = block.scratch.get("fisher_den", shape, f64).zero_()
        for i, x in enumerate(block.inputs):
            f = block.scratch.get("fisher_f", shape, f64)
            f.copy_(block.aux[i]["fisher"].to(dev)).add_(task.shared["epsilon"]).mul_(task.per_model[i]["weight"])
            den.add_(f)
            num.addcmul_(f, block.scratch.get("fisher_x", shape, f64).copy_(x))
        # Σ wF = 0 only with epsilon 0 where every Fisher is 0: the weighted average there
        weights = torch.tensor([p["weight"] for p in task.per_model], dtype=f64, device=dev)
        zero = den == 0
        if bool(zero.any()):
            avg = torch.zeros(shape, dtype=f64, device=dev)
            for x, w in zip(block.inputs, weights):
                avg.add_(x.to(f64) * w)
            num = torch.where(zero, avg / weights.sum(), num)
            den = torch.where(zero, torch.ones_like(den), den)
        return num.div_(den).to(task.compute_dtype)


class RegMeanOp(MergeOp):
    """RegMean: closed-form merge of linear layers from their inputs' Gram matrices (`bigmerge stats --kind regmean`); average elsewhere."""

    name = "regmean"
    params = (
        Param(
            "reduce_non_diagonal_ratio",
            float,
            "shared",
            default=0.9,
            doc="alpha: off-diagonal Gram entries are multiplied by it, the diagonal kept "
            "(1: the unreduced closed form, ill-conditioned when a layer's inputs span few directions)",
        ),
        Param(
            "ridge",
            float,
            "shared",
            default=1e-8,
            doc="lambda / mean(diag sum G): (sum W_i G_i + lambda avg W)(sum G_i + lambda I)^-1; "
            "input directions no example reached get the average",
        ),
        *STATISTICS_PARAMS,
    )
    base = "ignored"
    workspace_per_source = 1.0

    def __init__(self) -> None:
        # (tensor name, stacked float64 Grams [n*in, in], float64 (sum G + lambda I)^-1, lambda)
        self._memo: tuple[str, torch.Tensor, torch.Tensor, float] | None = None

    def check(self, task: TensorTask) -> None:
        alpha = task.shared["reduce_non_diagonal_ratio"]
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"regmean: reduce_non_diagonal_ratio must be in [0, 1], got {alpha}")
        if task.shared["ridge"] < 0:
            raise ConfigError(f"regmean: ridge must be >= 0, got {task.shared['ridge']}")

    def aux_inputs(self, task: TensorTask, sources: list[tuple[str, str]]) -> list[dict[str, AuxInput]]:
        files = [statistics_file(task, i, ref, GRAM_FILE, self.name) for i, (ref, _) in enumerate(sources)]
        if len(task.shape) != 2:
            return []
        n_in = task.shape[1]
        return [
            {"gram": AuxInput(file, tensor, (n_in, n_in), optional=True)} for file, (_, tensor) in zip(files, sources)
        ]

    def _solve(self, task: TensorTask, block: Block) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Per tensor, once per rank: the α-reduced Grams and (Σ G + λI)⁻¹, in float64."""
        if self._memo is not None and self._memo[0] == task.name:
            return self._memo[1], self._memo[2], self._memo[3]
        self._memo = None  # the previous tensor's matrices go before this one's are made
        dev = block.scratch.device
        alpha = task.shared["reduce_non_diagonal_ratio"]
        n, n_in = len(block.aux), block.aux[0]["gram"].shape[0]
        stacked = torch.empty((n * n_in, n_in), dtype=torch.float64, device=dev)  # [G_1; ...; G_n]
        total = torch.zeros((n_in, n_in), dtype=torch.float64, device=dev)
        for i, aux in enumerate(block.aux):
            g = stacked[i * n_in : (i + 1) * n_in]
            g.copy_(aux["gram"])
            if alpha != 1.0:
                diag = g.diagonal().clone()
                g.mul_(alpha).diagonal().copy_(diag)
            total.add_(g)
        scale = float(total.diagonal().mean())
        lam = task.shared["ridge"] * scale if scale > 0 else 1.0
        total.diagonal().add_(lam)
        factor, info = torch.linalg.cholesky_ex(total)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
        else:  # not positive definite in floating point (a Gram is PSD): the general inverse
            inverse = torch.linalg.inv(total)
        del total, factor
        self._memo = (task.name, stacked, inverse, lam)
        return stacked, inverse, lam

    def apply(self, task: TensorTask, block: Block, stats: Any) -> torch.Tensor:
        n = len(block.inputs)
        if not block.aux or "gram" not in block.aux[0]:
            acc = torch.float64 if task.compute_dtype == torch.float64 else torch.float32
            out = block.scratch.get("acc", block.inputs[0].shape, acc).zero_()
            for x in block.inputs:
                out.add_(as_compute(x, task.compute_dtype, block.scratch))
            return out.div_(n).to(task.compute_dtype)
        stacked, inverse, lam = self._solve(task, block)
        dev = block.scratch.device
        rows, n_in = block.inputs[0].shape
        f64 = torch.float64
        out = torch.empty((rows, n_in), dtype=f64, device=dev)
        tile = block.scratch.get("regmean_tile", (TILE_ROWS, n * n_in), f64)
        for r0 in range(0, rows, TILE_ROWS):
            r1 = min(rows, r0 + TILE_ROWS)
            tile.zero_()
            for i, x in enumerate(block.inputs):
                tile[: r1 - r0, i * n_in : (i + 1) * n_in].copy_(x[r0:r1])
            y = tile @ stacked  # Σᵢ Wᵢ Gᵢ for these rows
            if lam:
                avg = tile[:, :n_in].clone()
                for i in range(1, n):
                    avg.add_(tile[:, i * n_in : (i + 1) * n_in])
                y.add_(avg.div_(n), alpha=lam)
            out[r0:r1] = (y @ inverse)[: r1 - r0]
        return out.to(task.compute_dtype)
