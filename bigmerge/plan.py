"""The plan: every tensor's sources, resolved parameters, blocks and owning rank.

Built on rank 0 from the config and the catalog (headers only), then broadcast. It is a
plain JSON-serialisable object: `bigmerge plan` prints it without reading tensor data.
Block sizes depend on the tensor and the block budget, never on the number of ranks, so
the same plan on any world size computes the same blocks.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError

from bigmerge.catalog import ModelCatalog
from bigmerge.config import DTYPE_NAMES, MergeConfig, evaluate_setting
from bigmerge.errors import ConfigError, SourceError
from bigmerge.ops import get_op
from bigmerge.ops.base import MergeOp, TensorTask
from bigmerge.storage.safetensors import DTYPES, FLOAT_DTYPES

PLAN_VERSION = 1
DEFAULT_BLOCK_BYTES = 32 * 1024 * 1024
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass
class SourceSpan:
    file: str
    start: int
    end: int
    dtype: str


@dataclass
class TensorPlan:
    index: int
    name: str
    shape: list[int]
    out_dtype: str
    sources: list[SourceSpan]
    shared: dict[str, Any]
    per_model: list[dict[str, Any]]
    rows: int
    row_elems: int
    block_rows: int
    n_blocks: int
    owners: list[int] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return self.rows * self.row_elems

    def block_range(self, b: int) -> tuple[int, int]:
        r0 = b * self.block_rows
        return r0, min(self.rows, r0 + self.block_rows)

    def in_bytes(self) -> int:
        return sum(s.end - s.start for s in self.sources)

    def out_bytes(self) -> int:
        return self.numel * DTYPES[self.out_dtype][1]


@dataclass
class Plan:
    version: int
    merge_method: str
    models: list[str]
    base_index: int | None
    compute_dtype: str
    seed: int
    block_bytes: int
    world_size: int
    tensors: list[TensorPlan]
    source_headers: dict[str, dict[str, str]]
    config_fingerprint: str
    warnings: list[str] = field(default_factory=list)

    # -- serialisation -----------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        tensors = []
        for t in d.pop("tensors"):
            t["sources"] = [SourceSpan(**s) for s in t["sources"]]
            tensors.append(TensorPlan(**t))
        return cls(tensors=tensors, **d)

    def fingerprint(self) -> str:
        """What the merged bytes depend on; not the world size nor the owners of blocks."""
        d = asdict(self)
        d.pop("world_size")
        d.pop("warnings")
        for t in d["tensors"]:
            t.pop("owners")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    # -- queries ---------------------------------------------------------------------------

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return DTYPES[self.compute_dtype][0]

    def task(self, t: TensorPlan) -> TensorTask:
        return TensorTask(
            name=t.name,
            shape=tuple(t.shape),
            numel=t.numel,
            n_blocks=t.n_blocks,
            base_index=self.base_index,
            shared=t.shared,
            per_model=t.per_model,
            compute_dtype=self.torch_compute_dtype,
            seed=self.seed,
        )

    def blocks_of(self, rank: int) -> list[tuple[TensorPlan, int]]:
        return [(t, b) for t in self.tensors for b in range(t.n_blocks) if t.owners[b] == rank]

    def assign(self, world_size: int) -> None:
        """Spread blocks over ranks, balanced by bytes; deterministic for a given world size."""
        self.world_size = world_size
        load = [0] * world_size
        for t in self.tensors:
            per_block = t.in_bytes() // max(1, t.n_blocks)
            owners: list[int] = []
            if t.n_blocks >= world_size:
                # Big tensors: a contiguous, even share per rank so per-tensor stats finish together.
                base, extra = divmod(t.n_blocks, world_size)
                order = sorted(range(world_size), key=lambda r: (load[r], r))
                counts = [base] * world_size
                for r in order[:extra]:
                    counts[r] += 1
                for r in range(world_size):
                    owners.extend([r] * counts[r])
                    load[r] += counts[r] * per_block
            else:
                for _ in range(t.n_blocks):
                    r = min(range(world_size), key=lambda q: (load[q], q))
                    owners.append(r)
                    load[r] += per_block
            t.owners = owners

    def rank_bytes(self) -> list[int]:
        out = [0] * self.world_size
        for t in self.tensors:
            per_block = t.in_bytes() // max(1, t.n_blocks)
            for r in t.owners:
                out[r] += per_block
        return out

    def peak_memory_estimate(self, prefetch: int = 2, cache_bytes: int = 0) -> int:
        op = get_op(self.merge_method)
        csize = DTYPES[self.compute_dtype][1]
        peak = 0
        n = len(self.models)
        for t in self.tensors:
            if t.n_blocks == 0:
                continue
            elems = t.block_rows * t.row_elems
            raw = sum(elems * DTYPES[s.dtype][1] for s in t.sources)
            work = int((op.workspace_per_source + 1) * n * elems * csize) + elems * 4
            peak = max(peak, (prefetch + 1) * raw + work)
        return peak + cache_bytes


def layer_position(name: str, num_layers: int | None) -> tuple[int | None, float]:
    """(layer index, t in [0, 1]) as mergekit computes t; tensors outside layers get t = 0."""
    m = LAYER_RE.search(name)
    if not m:
        return None, 0.0
    i = int(m.group(1))
    n = num_layers or (i + 1)
    return i, (i / (n - 1) if n > 1 else 1.0)


def _natural_key(name: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _validator(op: MergeOp) -> dict[str, TypeAdapter[Any]]:
    return {p.name: TypeAdapter(p.type) for p in op.params}


def build_plan(
    cfg: MergeConfig,
    catalogs: list[ModelCatalog],
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    seed: int | None = None,
    world_size: int = 1,
) -> Plan:
    op = get_op(cfg.merge_method)
    if cfg.slices:
        raise ConfigError("'slices' (passthrough and layer surgery) is not supported by this version yet")
    if cfg.tokenizer_source == "union":
        raise ConfigError("tokenizer_source: union is not supported by this version yet (use base or a model path)")
    if block_bytes < 64:
        raise ConfigError(f"block size {block_bytes} bytes is too small (minimum 64)")
    refs = cfg.model_refs()
    by_ref = {c.ref: c for c in catalogs}
    models = [by_ref[r] for r in refs]
    base_index = refs.index(cfg.base_model) if cfg.base_model else None
    if op.base == "required" and base_index is None:
        raise ConfigError(f"merge_method {op.name!r} needs a base_model")
    if op.base == "ignored" and cfg.base_model and cfg.base_model not in [m.model for m in cfg.models or []]:
        # mergekit adds an unlisted base as a source; for methods that ignore the base that only
        # asks for a weight it cannot have, so say it plainly.
        raise ConfigError(f"merge_method {op.name!r} does not use base_model; list it under models or drop it")
    if len(refs) < op.min_models:
        raise ConfigError(f"merge_method {op.name!r} needs at least {op.min_models} models, got {len(refs)}")

    known = {p.name for p in op.params}
    settings_global = cfg.parameters or {}
    for where, params in [("parameters", settings_global)] + [
        (f"models[{i}].parameters", m.parameters or {}) for i, m in enumerate(cfg.models or [])
    ]:
        for key in params:
            if key not in known:
                raise ConfigError(
                    f"{where}: unknown parameter {key!r} for merge_method {op.name!r} (known: {', '.join(sorted(known))})"
                )

    compute = DTYPE_NAMES[cfg.dtype] if cfg.dtype else "F32"
    ref_model = models[base_index] if base_index is not None else models[0]
    num_layers = ref_model.num_layers()
    adapters = _validator(op)
    warnings: list[str] = []

    for m in models:
        extra = sorted(set(m.tensors) - set(ref_model.tensors))
        if extra:
            warnings.append(f"{m.ref}: {len(extra)} tensor(s) not in {ref_model.ref} are ignored, e.g. {extra[0]!r}")

    tensors: list[TensorPlan] = []
    for name in sorted(ref_model.tensors, key=_natural_key):
        ref_info = ref_model.tensors[name]
        spans: list[SourceSpan] = []
        for m in models:
            info = m.tensors.get(name)
            if info is None:
                raise SourceError(f"{m.ref}: tensor {name!r} is missing (present in {ref_model.ref})")
            if info.shape != ref_info.shape:
                raise SourceError(
                    f"{m.ref}: tensor {name!r} has shape {list(info.shape)}, expected {list(ref_info.shape)} as in {ref_model.ref}"
                )
            if info.dtype not in FLOAT_DTYPES:
                raise SourceError(f"{m.ref}: tensor {name!r} has dtype {info.dtype}; merging needs floating point")
            spans.append(SourceSpan(info.file, info.start, info.end, info.dtype))
        src_dtype = _promote([s.dtype for s in spans])
        out_dtype = DTYPE_NAMES[cfg.out_dtype] if cfg.out_dtype else (compute if cfg.dtype else src_dtype)
        _, t = layer_position(name, num_layers)
        shared, per_model = _resolve(op, cfg, refs, base_index, name, t, adapters)
        shape = list(ref_info.shape)
        rows = shape[0] if shape else 1
        row_elems = math.prod(shape[1:]) if len(shape) > 1 else 1
        row_bytes = max(1, row_elems * max(DTYPES[s.dtype][1] for s in spans))
        block_rows = max(1, min(rows, block_bytes // row_bytes))  # a small tensor is one block of its own size
        n_blocks = math.ceil(rows / block_rows) if rows * row_elems > 0 else 0
        tp = TensorPlan(
            len(tensors), name, shape, out_dtype, spans, shared, per_model, rows, row_elems, block_rows, n_blocks
        )
        task = TensorTask(name, tuple(shape), tp.numel, n_blocks, base_index, shared, per_model, DTYPES[compute][0])
        op.check(task)
        tensors.append(tp)

    plan = Plan(
        version=PLAN_VERSION,
        merge_method=op.name,
        models=refs,
        base_index=base_index,
        compute_dtype=compute,
        seed=int(seed if seed is not None else (cfg.seed or 0)),
        block_bytes=block_bytes,
        world_size=world_size,
        tensors=tensors,
        source_headers={m.ref: m.header_sha256 for m in models},
        config_fingerprint=cfg.fingerprint(),
        warnings=warnings,
    )
    plan.assign(world_size)
    return plan


def _promote(dtypes: list[str]) -> str:
    out = DTYPES[dtypes[0]][0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, DTYPES[d][0])
    return {v[0]: k for k, v in DTYPES.items()}[out]


def _resolve(
    op: MergeOp,
    cfg: MergeConfig,
    refs: list[str],
    base_index: int | None,
    name: str,
    t: float,
    adapters: dict[str, TypeAdapter[Any]],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    def value(pname: str, scopes: list[Any], who: str) -> Any:
        def validate(v: Any) -> Any:
            try:
                return adapters[pname].validate_python(v)
            except ValidationError as exc:
                msg = exc.errors()[0]["msg"]
                raise ConfigError(f"parameter {pname!r}{who}: bad value {v!r}: {msg}") from None

        for scope in scopes:
            if scope and pname in scope:
                v = evaluate_setting(name, scope[pname], t, validate)
                if v is not None:
                    return v
        spec = next(p for p in op.params if p.name == pname)
        if spec.required:
            raise ConfigError(f"missing parameter {pname!r}{who} for tensor {name!r}")
        return adapters[pname].validate_python(spec.default)

    shared = {p.name: value(p.name, [cfg.parameters], "") for p in op.params if p.scope == "shared"}
    per_model: list[dict[str, Any]] = []
    for i, ref in enumerate(refs):
        scopes = [cfg.model_parameters(ref), cfg.parameters]
        per_model.append(
            {
                p.name: value(p.name, scopes, f" of model {ref}")
                for p in op.params
                if p.scope == "input" or (p.scope == "non_base" and i != base_index)
            }
        )
    return shared, per_model
