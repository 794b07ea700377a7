"""The search config: a merge template, a space over its parameters, an optimiser, a fitness.

    merge:                      # a bigmerge merge config; the search fills in the searched parameters
      merge_method: linear
      models: [{model: zoo/pool_arith}, {model: zoo/pool_text}, ...]
    space: {type: weights, constraint: simplex}            # or: {type: layer_groups, groups: 4,
                                                            #      parameters: {weight: [0, 1], density: [0.1, 1]}}
    optimizer: {name: cmaes, sigma0: 0.3, popsize: 8, budget: 64, seed: 0}     # or {name: greedy}
    fitness:
      tasks: {zoo_add: 1, zoo_rev: 1, zoo_sort: 1, zoo_fin: 1}   # weights of the macro-average
      heldout: 0.5              # the first half of every task's documents: only for the final report
      limit: 100                # documents per task the search scores (after the held-out ones; default all)
    evaluation: {mode: auto, workers: 1}

See docs/search.md for every key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bigmerge.errors import ConfigError
from bigmerge.eval.backends import CommandBackend, HFBackend, VLLMBackend, check_backend
from bigmerge.planning.config import MergeConfig, parse_config, read_yaml
from bigmerge.planning.validation import validate

OPTIMIZERS = ("cmaes", "greedy")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WeightSpace(_Strict):
    """One weight per model of the pool."""

    type: Literal["weights"] = "weights"
    # simplex: w = max(x, 0) / sum (non-negative, sum 1); normalized: w = x / sum(x); none: w = x
    constraint: Literal["simplex", "normalized", "none"] = "simplex"
    negative: bool = False  # normalized / none: allow negative weights
    parameter: str = "weight"


class LayerGroupSpace(_Strict):
    """Per-layer-group values of operator parameters, per model (evolutionary merging's space)."""

    type: Literal["layer_groups"] = "layer_groups"
    groups: int = Field(default=4, ge=1)
    # parameter -> [low, high]; the search moves each (group, model, parameter) inside its range
    parameters: dict[str, tuple[float, float]]


class Optimizer(_Strict):
    name: str = "cmaes"
    sigma0: float | None = Field(default=None, gt=0)
    popsize: int | None = Field(default=None, ge=2)
    budget: int = Field(default=64, ge=1)  # evaluations of candidates (baselines not counted)
    seed: int = Field(default=0, ge=0)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {v!r}; expected one of {', '.join(OPTIMIZERS)}")
        return v


class Fitness(_Strict):
    tasks: dict[str, float] | list[str] | str
    heldout: float = Field(default=0.5, gt=0)  # < 1: fraction of each task's documents; >= 1: a count
    limit: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=64, ge=1)
    device: str = "cpu"
    dtype: str = "float32"
    # where candidates are scored: lm-eval's hf model (default), its vllm model, or a command
    backend: HFBackend | VLLMBackend | CommandBackend = Field(default_factory=HFBackend, discriminator="type")

    def task_weights(self) -> dict[str, float]:
        from bigmerge.eval import resolve_tasks

        if isinstance(self.tasks, dict):
            if not self.tasks:
                raise ConfigError("fitness.tasks: no task given")
            out: dict[str, float] = {}
            for name, w in self.tasks.items():
                if w < 0:
                    raise ConfigError(f"fitness.tasks: weight of {name!r} is negative ({w:g})")
                for t in resolve_tasks(name):
                    out[t] = float(w)
            if sum(out.values()) <= 0:
                raise ConfigError("fitness.tasks: the task weights sum to zero")
            return out
        return {t: 1.0 for t in resolve_tasks(self.tasks)}


class Evaluation(_Strict):
    mode: Literal["auto", "memory", "disk"] = "auto"
    workers: int = Field(default=1, ge=1)  # processes scoring candidates in parallel (MPI: the ranks)
    scratch: str | None = None  # disk mode: where candidates are merged (default OUT/scratch)
    memory_limit_gb: float = Field(default=8.0, gt=0)  # auto: in memory when the merged model is smaller
    # disk mode: candidates on disk at once, merged or being merged and not yet scored. 2: the
    # merge of candidate i+1 overlaps the scoring of candidate i; 1: one after the other
    in_flight: int = Field(default=2, ge=1)
    evaluators: int = Field(default=1, ge=1)  # disk mode: scorings at once (e.g. separate jobs)
    keep_best: bool = True  # disk mode: keep the best search candidate's checkpoint in scratch


class SearchConfig(_Strict):
    merge: dict[str, Any]
    space: WeightSpace | LayerGroupSpace = Field(default_factory=WeightSpace, discriminator="type")
    optimizer: Optimizer = Field(default_factory=Optimizer)
    fitness: Fitness
    evaluation: Evaluation = Field(default_factory=Evaluation)
    baselines: bool = True  # also score each checkpoint, the uniform soup and the greedy soup

    @model_validator(mode="before")
    @classmethod
    def _space_type(cls, data: Any) -> Any:
        # `type` may be left out of a weights space
        if isinstance(data, dict) and isinstance(data.get("space"), dict) and "type" not in data["space"]:
            data = {**data, "space": {**data["space"], "type": "weights"}}
        fit = data.get("fitness") if isinstance(data, dict) else None
        if isinstance(fit, dict) and isinstance(fit.get("backend"), dict) and "type" not in fit["backend"]:
            data = {**data, "fitness": {**fit, "backend": {**fit["backend"], "type": "hf"}}}
        return data

    def template(self) -> MergeConfig:
        return parse_config(self.merge, "merge")

    def fingerprint(self) -> str:
        """What the journal's entries depend on: the merge, space, optimiser and fitness, the
        backend included with the arguments that can change a score (not the evaluation's
        parallelism or scratch, nor a command's timeout and retries: see ``backend_fingerprint``)."""
        d = self.model_dump(mode="json")
        d.pop("evaluation")
        d["fitness"].pop("backend")
        d["backend"] = self.backend_fingerprint()
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def backend_fingerprint(self) -> dict[str, Any]:
        """The backend as far as it decides the scores: its type and arguments, less a command's
        ``timeout_s``, ``retries`` and ``retry_delay_s`` (they decide whether a score comes, not
        which)."""
        b = self.fitness.backend.model_dump(mode="json")
        for k in SCORE_NEUTRAL.get(b["type"], ()):
            b.pop(k, None)
        return dict(b)


# Backend arguments that cannot change a score: a resume may change them.
SCORE_NEUTRAL: dict[str, tuple[str, ...]] = {"command": ("timeout_s", "retries", "retry_delay_s")}


def parse_search_config(data: Any, source: str = "search config") -> SearchConfig:
    cfg = validate(SearchConfig, data, source, branches=("weights", "layer_groups", "hf", "vllm", "command"))
    if cfg.merge.get("slices"):
        raise ConfigError(f"{source}: merge.slices: a search runs over 'models', not slices")
    models = cfg.merge.get("models") or []
    base = cfg.merge.get("base_model")
    if not isinstance(models, list) or not [m for m in models if not isinstance(m, dict) or m.get("model") != base]:
        raise ConfigError(f"{source}: merge.models: the pool is empty (list the checkpoints to merge)")
    try:
        cfg.template()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if cfg.optimizer.name == "greedy" and not isinstance(cfg.space, WeightSpace):
        raise ConfigError(f"{source}: optimizer 'greedy' searches weights: use space.type 'weights'")
    if isinstance(cfg.space, WeightSpace) and cfg.space.constraint == "simplex" and cfg.space.negative:
        raise ConfigError(f"{source}: space: negative weights need constraint 'normalized' or 'none', not 'simplex'")
    if isinstance(cfg.space, LayerGroupSpace):
        for name, (lo, hi) in cfg.space.parameters.items():
            if not lo < hi:
                raise ConfigError(f"{source}: space.parameters.{name}: expected [low, high] with low < high")
        if not cfg.space.parameters:
            raise ConfigError(f"{source}: space.parameters: name at least one parameter to search")
    if cfg.fitness.heldout >= 1 and cfg.fitness.heldout != int(cfg.fitness.heldout):
        raise ConfigError(f"{source}: fitness.heldout: a fraction below 1 or a whole number of documents")
    cfg.fitness.task_weights()  # unknown zoo task names are known now
    try:
        check_backend(cfg.fitness.backend, own={"dtype": cfg.fitness.dtype})
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if cfg.evaluation.mode == "memory" and not cfg.fitness.backend.in_memory():
        raise ConfigError(
            f"{source}: evaluation.mode 'memory': the {cfg.fitness.backend.type!r} backend scores a checkpoint "
            "on disk; use mode 'disk' or 'auto'"
        )
    return cfg


def load_search_config(path: str | Path) -> SearchConfig:
    return parse_search_config(read_yaml(path), str(path))
