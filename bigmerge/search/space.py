"""Search spaces: a vector x (what CMA-ES moves) <-> a merge config that ``bigmerge merge`` runs.

- ``WeightSpace``: one weight per model of the pool. CMA-ES works on x = N·w, so x0 = 1 is the
  uniform soup whatever N, and sigma0 is relative to the uniform weight.
  ``simplex``: w = max(x, 0) / Σ max(x, 0) (weights cut to 0 drop their model from the merge);
  ``normalized``: w = x / Σ x (with ``negative: false`` x is cut at 0 first);
  ``none``: w = x / N as given (task arithmetic's scale), cut at 0 unless ``negative``.
- ``LayerGroupsSpace``: for every non-base model, every group of consecutive layers (plus one
  group for the tensors outside the layers: embeddings, final norm, head) and every named
  parameter, a value in [low, high]; CMA-ES works on [0, 1] per coordinate (bounded). The merge
  config gets per-model ``{filter: "layers.i.", value}`` lists, mergekit's own vocabulary.

Values written into configs are rounded to 6 decimals: the config evaluated is the config written.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from bigmerge.errors import ConfigError
from bigmerge.search.config import LayerGroupSpace, SearchConfig, WeightSpace

DECIMALS = 6


def _clean(v: float) -> float:
    r = round(float(v), DECIMALS)
    return 0.0 if r == 0 else r  # no -0.0 in configs


def pool_models(merge: dict[str, Any]) -> list[str]:
    """The searched models: the template's models, the base left out."""
    base = merge.get("base_model")
    return [m["model"] for m in merge.get("models") or [] if m["model"] != base]


def _common(merge: dict[str, Any]) -> dict[str, Any]:
    keys = ("dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template", "storage_options")
    return {k: merge[k] for k in keys if merge.get(k) is not None}


def linear_config(merge: dict[str, Any], weights: dict[str, float]) -> dict[str, Any]:
    """A linear merge (model soup) of the pool with these weights; models of weight 0 left out."""
    models = [{"model": m, "parameters": {"weight": _clean(w)}} for m, w in weights.items() if _clean(w) != 0]
    return {"merge_method": "linear", "models": models, **_common(merge)}


class Space:
    dim: int
    x0: np.ndarray
    sigma0: float
    bounds: tuple[float, float] | None = None

    def config(self, x: np.ndarray) -> dict[str, Any] | None:
        """The merge config of x, or None when x is infeasible (all weights zero)."""
        raise NotImplementedError

    def describe(self, config: dict[str, Any]) -> dict[str, Any]:
        """What the plots show of a candidate: {model: weight} or {model: {param: [per group]}}."""
        raise NotImplementedError


class WeightsSpace(Space):
    def __init__(self, spec: WeightSpace, merge: dict[str, Any]) -> None:
        self.spec = spec
        self.merge = merge
        self.models = pool_models(merge)
        self.dim = len(self.models)
        self.x0 = np.ones(self.dim)
        self.sigma0 = 0.3

    def weights(self, x: np.ndarray) -> list[float] | None:
        x = np.asarray(x, dtype=np.float64)
        c = self.spec.constraint
        if c == "simplex" or not self.spec.negative:
            x = np.maximum(x, 0.0)
        if c in ("simplex", "normalized"):
            s = float(x.sum())
            if abs(s) < 1e-9:
                return None
            w = x / s
        else:
            w = x / self.dim
        out = [_clean(v) for v in w]
        return None if not any(out) else out

    def config(self, x: np.ndarray) -> dict[str, Any] | None:
        w = self.weights(x)
        if w is None:
            return None
        return self.with_weights(dict(zip(self.models, w)))

    def with_weights(self, weights: dict[str, float]) -> dict[str, Any]:
        """The template with these weights; a model of weight 0 leaves the merge (the base stays)."""
        merge = copy.deepcopy(self.merge)
        base = merge.get("base_model")
        models = []
        for m in merge["models"]:
            if m["model"] == base:
                models.append(m)
                continue
            w = _clean(weights.get(m["model"], 0.0))
            if w == 0:
                continue
            params = dict(m.get("parameters") or {})
            params[self.spec.parameter] = w
            models.append({**m, "parameters": params})
        merge["models"] = models
        return merge

    def describe(self, config: dict[str, Any]) -> dict[str, Any]:
        got = {m["model"]: (m.get("parameters") or {}).get(self.spec.parameter, 0.0) for m in config["models"]}
        return {m: float(got.get(m, 0.0)) for m in self.models}


def layer_filter(i: int) -> str:
    return f"layers.{i}."


class LayerGroupsSpace(Space):
    def __init__(self, spec: LayerGroupSpace, merge: dict[str, Any], num_layers: int) -> None:
        self.spec = spec
        self.merge = merge
        self.models = pool_models(merge)
        self.params = list(spec.parameters)
        self.num_layers = num_layers
        self.groups = min(spec.groups, max(1, num_layers))
        # group of layer i: consecutive, as equal as possible; group `self.groups` is the rest
        self.group_of = [i * self.groups // max(1, num_layers) for i in range(num_layers)]
        self.dim = len(self.models) * (self.groups + 1) * len(self.params)
        self.x0 = np.full(self.dim, 0.5)
        self.sigma0 = 0.25
        self.bounds = (0.0, 1.0)

    def values(self, x: np.ndarray) -> np.ndarray:
        """[model, group, param] in each parameter's range."""
        v = np.clip(np.asarray(x, dtype=np.float64), 0, 1).reshape(len(self.models), self.groups + 1, len(self.params))
        lo = np.array([self.spec.parameters[p][0] for p in self.params])
        hi = np.array([self.spec.parameters[p][1] for p in self.params])
        return lo + v * (hi - lo)

    def config(self, x: np.ndarray) -> dict[str, Any] | None:
        vals = self.values(x)
        merge = copy.deepcopy(self.merge)
        k = {m: i for i, m in enumerate(self.models)}
        for m in merge["models"]:
            if m["model"] not in k:
                continue  # the base
            params = dict(m.get("parameters") or {})
            for j, p in enumerate(self.params):
                v = vals[k[m["model"]], :, j]
                params[p] = [
                    {"filter": layer_filter(i), "value": _clean(v[self.group_of[i]])} for i in range(self.num_layers)
                ]
                params[p].append({"value": _clean(v[self.groups])})
            m["parameters"] = params
        return merge

    def describe(self, config: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for m in config["models"]:
            if m["model"] not in self.models:
                continue
            per: dict[str, list[float]] = {}
            for p in self.params:
                entries = m["parameters"][p]
                firsts = [
                    next(e["value"] for e in entries if e.get("filter") == layer_filter(i)) for i in self.group_starts()
                ]
                per[p] = [float(v) for v in firsts] + [float(entries[-1]["value"])]
            out[m["model"]] = per
        return out

    def group_starts(self) -> list[int]:
        return [self.group_of.index(g) for g in range(self.groups)]


def make_space(cfg: SearchConfig, num_layers: int | None) -> Space:
    if isinstance(cfg.space, WeightSpace):
        return WeightsSpace(cfg.space, cfg.merge)
    if not num_layers:
        raise ConfigError("space: 'layer_groups' needs models with numbered layers (config.json num_hidden_layers)")
    return LayerGroupsSpace(cfg.space, cfg.merge, num_layers)
