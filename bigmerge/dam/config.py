"""The DAM config: models with their own data, coefficients, loss, training, and DeepSpeed.

Every knob is one typed field with a default; the DeepSpeed config is part of this file
(`deepspeed:`), merged key by key over `DEFAULT_DEEPSPEED` (ZeRO-3, parameters and
optimizer offloaded to the CPU), so nobody edits a separate JSON file.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bigmerge.planning.config import read_yaml
from bigmerge.planning.validation import validate

Activation = Literal["identity", "tanh", "sigmoid", "relu"]

# What ran on these machines (shared/STACK.md): stage 3, everything offloaded to the CPU, a torch
# optimizer passed in (no CPU-Adam JIT build), persistence threshold 0 so every parameter,
# even a small coefficient vector, is partitioned.
DEFAULT_DEEPSPEED: dict[str, Any] = {
    "zero_optimization": {
        "stage": 3,
        "offload_param": {"device": "cpu", "pin_memory": False},
        "offload_optimizer": {"device": "cpu", "pin_memory": False},
        "stage3_param_persistence_threshold": 0,
        "overlap_comm": False,
        "contiguous_gradients": True,
    },
    "zero_allow_untested_optimizer": True,
    "zero_force_ds_cpu_optimizer": False,
    "gradient_clipping": 0.0,
    "wall_clock_breakdown": False,
    "steps_per_print": 1 << 30,  # bigmerge prints its own progress
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceModel(_Strict):
    model: str  # a local Hugging Face checkpoint directory
    data: str  # jsonl, one object with a `text` field per line: this model's own data


class Coefficients(_Strict):
    init: Literal["uniform", "random"] = "uniform"  # uniform: every entry 1/N
    init_std: float = Field(0.01, ge=0)  # random: 1/N + N(0, init_std), seeded
    activation: Activation = "identity"  # f in W = sum_i W_i diag(f(c_i))
    linear: bool = True  # train the linear layers' per-input-column coefficients
    biases: bool = True  # one trainable scalar per model for each bias
    embeddings: bool = False  # per-dimension coefficients of the embeddings (and of a tied LM head)
    norms: bool = False  # per-dimension coefficients of the RMSNorm weights


class Loss(_Strict):
    temperature: float = Field(2.0, gt=0)  # T: T^2 KL(softmax(z_k/T) || softmax(z/T))
    # online: z_k computed at every step; topk: once, kept in memory; dataset: read from the data set that
    # `bigmerge dam logits` wrote (no teacher forward in training, one merged forward per step)
    teacher: Literal["online", "topk", "dataset"] = "online"
    top_k: int = Field(64, ge=1)  # topk, dataset: the teacher's k largest logits per token (renormalised over them)
    dataset: str | None = None  # dataset: its path or fsspec URL; default OUTPUT/teacher-logits
    similarity: float = Field(0.01, ge=0)  # lambda_sim x mean pairwise cosine similarity of c_i, c_j
    l1: float = Field(0.0, ge=0)  # lambda x sum |f(c)|; the paper's value when on: 1e-6
    l2: float = Field(0.0, ge=0)  # lambda x sum f(c)^2; the paper's value when on: 1e-6
    entropy: float = Field(0.0, ge=0)  # lambda x mean entropy of softmax over models, per column
    overlap: float = Field(0.0, ge=0)  # lambda x mean over pairs and columns of min(|f(c_i)|, |f(c_j)|)


class Data(_Strict):
    max_length: int = Field(512, ge=2)  # tokens per example, truncated
    max_examples: int | None = Field(None, ge=1)  # per source; None: the whole file
    shuffle: bool = True  # once, seeded by training.seed


class Training(_Strict):
    engine: Literal["deepspeed", "torch"] = "deepspeed"  # torch: one process, no DeepSpeed (debugging, tests)
    epochs: float = Field(1.0, gt=0)
    lr: float = Field(1e-3, gt=0)  # constant
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = Field(4, ge=1)  # examples per source per micro step, per process
    gradient_accumulation: int = Field(1, ge=1)  # micro steps per optimizer step (each covers every source)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps; caps the epochs
    dtype: Literal["float32", "bfloat16"] = "float32"  # the engine's dtype (bf16: bf16 weights, fp32 coefficients)
    seed: int = 0
    log_every: int = Field(10, ge=1)  # optimizer steps between progress lines
    checkpoint_every: int = Field(100, ge=1)  # optimizer steps between checkpoints (and one at the end)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: each process's local GPU when there is one
    # recompute each decoder layer in backward instead of keeping its activations (long sequences, 70B)
    activation_checkpointing: bool = False


class MergeOutput(_Strict):
    dtype: str = "float32"  # compute dtype of the written merge config
    out_dtype: str | None = None  # default: the sources' dtype


class DamConfig(_Strict):
    models: list[SourceModel] = Field(min_length=2)
    output: str  # directory: coefficients/, checkpoints/, merge.yaml, train-log.jsonl
    coefficients: Coefficients = Coefficients()
    loss: Loss = Loss()
    data: Data = Data()
    training: Training = Training()
    merge: MergeOutput = MergeOutput()
    deepspeed: dict[str, Any] = Field(default_factory=dict)  # merged over DEFAULT_DEEPSPEED

    @field_validator("models")
    @classmethod
    def _distinct(cls, v: list[SourceModel]) -> list[SourceModel]:
        refs = [m.model for m in v]
        dup = sorted({r for r in refs if refs.count(r) > 1})
        if dup:
            raise ValueError(f"model {dup[0]!r} is listed twice")
        return v

    @field_validator("deepspeed")
    @classmethod
    def _not_ours(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer"):
            if key in v:
                raise ValueError(
                    f"{key} is set by bigmerge from training.batch_size, gradient_accumulation and lr; remove it"
                )
        return v

    def logits_url(self) -> str:
        """Where `bigmerge dam logits` writes the teachers' top-k logits and training reads them."""
        return self.loss.dataset or str(Path(self.output) / "teacher-logits")

    def deepspeed_config(self, accumulation_micro_steps: int) -> dict[str, Any]:
        """The DeepSpeed config: the defaults, the user's `deepspeed:` over them, then what the
        training section decides (batch, accumulation, dtype), which must not be set twice."""
        ds = _deep_merge(copy.deepcopy(DEFAULT_DEEPSPEED), self.deepspeed)
        ds["train_micro_batch_size_per_gpu"] = self.training.batch_size
        ds["gradient_accumulation_steps"] = accumulation_micro_steps
        ds.setdefault("bf16", {})["enabled"] = self.training.dtype == "bfloat16"
        return ds


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v
    return base


def parse_dam_config(data: Any, source: str = "config") -> DamConfig:
    return validate(DamConfig, data, source)


def load_dam_config(path: str | Path) -> DamConfig:
    # paths as given: relative to the working directory, as in merge configs
    return parse_dam_config(read_yaml(path), str(path))
