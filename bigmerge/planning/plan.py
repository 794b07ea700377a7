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
import posixpath
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

import torch
from pydantic import TypeAdapter, ValidationError

from bigmerge.errors import ConfigError, SourceError
from bigmerge.ops import get_op
from bigmerge.ops.base import MergeOp, TensorTask
from bigmerge.planning.catalog import ModelCatalog
from bigmerge.planning.config import (
    DTYPE_NAMES,
    MERGEKIT_PARAMETERS,
    ConditionalParameter,
    MergeConfig,
    OutputModule,
    OutputSlice,
    Parameters,
    evaluate_setting,
)
from bigmerge.planning.modules import (
    ARCHITECTURES,
    ModuleTable,
    architecture_of,
    config_value,
    module_tables,
    split_by_module,
)
from bigmerge.planning.vocab import TokenRule, build_tokenizer, is_identity, token_rules, vocab_plan
from bigmerge.storage.fs import location
from bigmerge.storage.safetensors import DTYPES, FLOAT_DTYPES, PAGE, TensorInfo, read_header

PLAN_VERSION = 1
DEFAULT_BLOCK_BYTES = 32 * 1024 * 1024
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass
class SourceSpan:
    file: str
    start: int
    end: int
    dtype: str
    tensor: str = ""  # the tensor's name in that file (slices rename layers)
    # a LoRA adapter's term on this tensor (bigmerge.planning.lora): the reader adds scale * B @ A
    lora: dict[str, Any] | None = None


@dataclass
class AuxSpan:
    """An operator's auxiliary tensor (MergeOp.aux_inputs): file, absolute byte range, dtype, shape."""

    file: str
    start: int
    end: int
    dtype: str
    shape: list[int]
    rows: bool = False  # read row-blocked with the block (AuxInput.rows), else whole


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
    aux: list[dict[str, AuxSpan]] = field(default_factory=list)  # per source, by key; [] = none
    # position of the base model among this tensor's sources (slices may differ per tensor)
    base_index: int | None = None
    # mergekit's rule: the config's dtype, else the promoted dtype of this tensor's sources
    compute_dtype: str | None = None
    # rows permuted onto the output vocabulary (tokenizer_source): see bigmerge.planning.vocab.vocab_plan
    vocab: dict[str, Any] | None = None

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

    def block_out_bytes(self, b: int) -> int:
        """Bytes of block b in the output dtype."""
        r0, r1 = self.block_range(b)
        return (r1 - r0) * self.row_elems * DTYPES[self.out_dtype][1]


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
    # whose config.json the output takes, and what changes in it (the layer count of slices)
    config_model: str = ""
    config_updates: dict[str, Any] = field(default_factory=dict)

    # -- serialisation -----------------------------------------------------------------

    def _dict(self) -> dict[str, Any]:
        d = asdict(self)
        for t in d["tensors"]:
            for src in t["sources"]:
                if src["lora"] is None:
                    del src["lora"]  # plans without adapters keep the fingerprint they always had
        return d

    def to_json(self) -> str:
        return json.dumps(self._dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        tensors = []
        for t in d.pop("tensors"):
            t["sources"] = [SourceSpan(**s) for s in t["sources"]]
            t["aux"] = [{k: AuxSpan(**v) for k, v in a.items()} for a in t.get("aux", [])]
            tensors.append(TensorPlan(**t))
        return cls(tensors=tensors, **d)

    def fingerprint(self) -> str:
        """What the merged bytes depend on; not the world size nor the owners of blocks."""
        d = self._dict()
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
            base_index=t.base_index,
            shared=t.shared,
            per_model=t.per_model,
            compute_dtype=DTYPES[t.compute_dtype or self.compute_dtype][0],
            out_dtype=DTYPES[t.out_dtype][0],
            seed=self.seed,
            # the reader hands vocabulary-remapped blocks over in the compute dtype
            source_dtypes=tuple(
                DTYPES[t.compute_dtype or self.compute_dtype][0] if t.vocab is not None else DTYPES[s.dtype][0]
                for s in t.sources
            ),
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
            if t.vocab is not None and "vocab" in t.vocab:
                # A padded vocabulary: its padding rows are the mean of all rows before them, summed
                # as the blocks are read (engine/reader.py PadFold): one rank reads them all, once.
                r = min(range(world_size), key=lambda q: (load[q], q))
                owners = [r] * t.n_blocks
                load[r] += t.n_blocks * per_block
            elif t.n_blocks >= world_size:
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
        peak = 0
        for t in self.tensors:
            if t.n_blocks == 0:
                continue
            elems = t.block_rows * t.row_elems
            raw = sum(elems * DTYPES[s.dtype][1] for s in t.sources)
            # an adapted source: its factors (B's rows, A whole) and the float32 delta of the block
            raw += sum(lora_block_bytes(s.lora, t.block_rows, elems) for s in t.sources if s.lora)
            csize = DTYPES[t.compute_dtype or self.compute_dtype][1]
            # aux inputs: row-blocked ones travel with the block; whole ones (Gram matrices) are
            # cached by the reader for two tensors and copied to float64 by the operator
            aux_rows, aux_whole = _aux_bytes(t)
            block = block_memory(op, len(t.sources), elems, raw + aux_rows, csize, prefetch)
            peak = max(peak, block + 5 * aux_whole)
        return peak + cache_bytes


def lora_block_bytes(term: dict[str, Any], block_rows: int, elems: int) -> int:
    """Bytes a LoRA term adds to one block: the factors it reads (in float32) and the delta."""
    (ar, ac), (br, bc) = term["a"][4], term["b"][4]
    factors = ar * ac + br * bc if term["embedding"] else ar * ac + block_rows * bc
    return 4 * (factors + elems)


SPILL_POLICIES = ("auto", "always", "never")


def spills(policy: str, t: TensorPlan, is_far: Callable[[str], bool]) -> bool:
    """--spill's decision for tensor t, whose blocks exceed the cache between statistics passes:
    spilled to local scratch (always), read from its sources again (never), or with auto spilled
    when one of its sources is far (is_far(url): object storage, a network file system, where a
    second read crosses the network again) and read again when all are local (a local re-read
    costs what reading the spill back costs, and the spill adds a write). The executor and
    `bigmerge plan`'s estimate both decide with it."""
    if policy not in SPILL_POLICIES:
        raise ValueError(f"spill must be one of {', '.join(SPILL_POLICIES)}, not {policy!r}")
    if policy != "auto":
        return policy == "always"
    return any(is_far(src.file) for src in t.sources)


def block_memory(op: MergeOp, n_sources: int, elems: int, raw_bytes: int, compute_size: int, prefetch: int) -> int:
    """Peak bytes for one block of `elems` elements per source: the raw blocks in flight
    (prefetched, plus the one being merged) and the operator's work buffers (16-bit compute
    works in float32 too)."""
    csize = max(4, compute_size)
    work = int((op.workspace_per_source + 1) * n_sources * elems * csize) + elems * 4
    return (prefetch + 1) * raw_bytes + work


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
    # a parameter whose default is None is optional: None means "not set"
    return {
        p.name: TypeAdapter(p.type if p.required or p.default is not None else Optional[p.type])  # noqa: UP045
        for p in op.params
    }


@dataclass
class _Output:
    """One output tensor before it is planned: its inputs and where its parameters come from."""

    name: str
    inputs: list[tuple[int, str]]  # (index into the plan's models, tensor name in that model)
    base: int | None  # position of the base among `inputs`
    t: float  # relative depth for gradients
    shared_scopes: list[Any]  # parameter dicts, highest precedence first
    input_scopes: list[list[Any]]  # per input, highest precedence first
    # mergekit plans this tensor twice, at t = 0 and t = 1, and keeps either (see bigmerge.planning.modules)
    twice: str | None = None


def _model_outputs(cfg: MergeConfig, refs: list[str], ref_model: ModelCatalog, base_index: int | None) -> list[_Output]:
    """The `models:` form: every tensor of the reference model, from every model."""
    num_layers = ref_model.num_layers()
    scopes = [[cfg.model_parameters(r), cfg.parameters] for r in refs]
    outs = []
    for name in ref_model.tensors:
        _, t = layer_position(name, num_layers)
        outs.append(_Output(name, [(i, name) for i in range(len(refs))], base_index, t, [cfg.parameters], scopes))
    return outs


def _is_pre_weight(name: str) -> bool:
    # Tensors outside the layers: embeddings come before the layers, the rest (final norm,
    # LM head) after them; mergekit takes the first slice's sources for the former and the
    # last slice's for the latter.
    return "embed" in name or name.endswith(("wte.weight", "wpe.weight"))


@dataclass(frozen=True)
class _Layout:
    """Where a model's layers are: the plain forms use LAYER_RE over every tensor; a module of a
    multimodal model (bigmerge.planning.modules) its own prefixes and layer pattern."""

    owns: Callable[[str], bool]
    layer_of: Callable[[str], Optional[int]]  # noqa: UP045
    with_layer: Callable[[str, int], str]
    is_post: Callable[[str], bool]  # outside the layers, after them


_PLAIN = _Layout(
    lambda n: True, lambda n: _layer_of(n), lambda n, i: _with_layer(n, i), lambda n: not _is_pre_weight(n)
)


def _module_layout(table: ModuleTable) -> _Layout:
    return _Layout(table.owns, table.layer_of, table.with_layer, table.is_post)


def _slice_outputs(
    op: MergeOp,
    cfg: MergeConfig,
    refs: list[str],
    by_ref: dict[str, ModelCatalog],
    slices: list[OutputSlice] | None = None,
    module: tuple[str, Parameters | None, ModuleTable] | None = None,
) -> tuple[list[_Output], int]:
    """The `slices:` form (layer surgery): output layers are the slices' layer ranges in order.

    As mergekit: within a slice, layer i of n gets t = i/(n-1) (t = 1 for a one-layer slice);
    parameters resolve slice source > slice > (module >) global; filters match the input
    tensor's name for per-model parameters and the output name for global ones. `module`: the
    slices of one module of a multimodal model (its name, parameters and layout), else the config's.
    """
    slices = slices if slices is not None else cfg.slices or []
    where, module_params, layout = "", None, _PLAIN
    if module is not None:
        where, module_params, layout = f"modules.{module[0]}.", module[1], _module_layout(module[2])

    def layer_count(model: ModelCatalog) -> int | None:
        if module is None:
            return model.num_layers()
        return module[2].num_layers(model.config, list(model.tensors))

    outs: list[_Output] = []

    def base_of(k: int) -> int | None:
        sl = slices[k]
        base = sl.base_model or cfg.base_model
        models = [src.model for src in sl.sources]
        if base is None or base not in models:
            if op.base == "required":
                raise ConfigError(
                    f"{where}slices[{k}]: merge_method {op.name!r} needs its base model among the slice's sources"
                    + (f" ({base} is not)" if base else " (no base_model given)")
                )
            return None
        return models.index(base)

    def unmerged(k: int, names: list[str], t: float) -> None:
        sl = slices[k]
        for name in names:
            outs.append(
                _Output(
                    name,
                    [(refs.index(src.model), name) for src in sl.sources],
                    base_of(k),
                    t,
                    [sl.parameters, module_params, cfg.parameters],
                    [[src.parameters, sl.parameters, module_params, cfg.parameters] for src in sl.sources],
                )
            )

    for k, sl in enumerate(slices):
        if not sl.sources:
            raise ConfigError(f"{where}slices[{k}]: no sources")
    first = [n for n in by_ref[slices[0].sources[0].model].tensors if layout.owns(n)]
    last = [n for n in by_ref[slices[-1].sources[0].model].tensors if layout.owns(n)]
    unmerged(0, [n for n in first if layout.layer_of(n) is None and not layout.is_post(n)], 0.0)
    out_layer = 0
    for k, sl in enumerate(slices):
        if len(sl.sources) < op.min_models:
            raise ConfigError(
                f"{where}slices[{k}]: merge_method {op.name!r} needs at least {op.min_models} sources, "
                f"got {len(sl.sources)}"
            )
        lengths = {src.layer_range[1] - src.layer_range[0] for src in sl.sources}
        if len(lengths) != 1:
            raise ConfigError(
                f"{where}slices[{k}]: every source must span the same number of layers, got {sorted(lengths)}"
            )
        for j, src in enumerate(sl.sources):
            lo, hi = src.layer_range
            have = layer_count(by_ref[src.model])
            if lo < 0 or hi <= lo or (have is not None and hi > have):
                raise ConfigError(
                    f"{where}slices[{k}].sources[{j}]: layer_range [{lo}, {hi}] is not a non-empty range inside "
                    f"{src.model}'s {have if have is not None else '?'} layers"
                )
        n = lengths.pop()
        shared_scopes = [sl.parameters, module_params, cfg.parameters]
        input_scopes = [[src.parameters, sl.parameters, module_params, cfg.parameters] for src in sl.sources]
        base = base_of(k)
        head = by_ref[sl.sources[0].model]
        for idx in range(n):
            t = idx / (n - 1) if n > 1 else 1.0
            src_layer = sl.sources[0].layer_range[0] + idx
            names = [nm for nm in head.tensors if layout.owns(nm) and layout.layer_of(nm) == src_layer]
            if not names:
                raise SourceError(f"{head.ref}: no tensors of layer {src_layer} ({where}slices[{k}])")
            for nm in names:
                inputs = [
                    (refs.index(src.model), layout.with_layer(nm, src.layer_range[0] + idx)) for src in sl.sources
                ]
                outs.append(_Output(layout.with_layer(nm, out_layer), inputs, base, t, shared_scopes, input_scopes))
            out_layer += 1
    unmerged(len(slices) - 1, [n for n in last if layout.layer_of(n) is None and layout.is_post(n)], 0.0)
    return outs, out_layer


def _check_models_form(op: MergeOp, cfg: MergeConfig, refs: list[str], base_index: int | None) -> None:
    if op.base == "required" and base_index is None:
        raise ConfigError(f"merge_method {op.name!r} needs a base_model")
    if op.base == "ignored" and cfg.base_model and cfg.base_model not in [m.model for m in cfg.models or []]:
        # mergekit adds an unlisted base as a source; for methods that ignore the base that only
        # asks for a weight it cannot have, so say it plainly.
        raise ConfigError(f"merge_method {op.name!r} does not use base_model; list it under models or drop it")
    if len(refs) < op.min_models:
        raise ConfigError(f"merge_method {op.name!r} needs at least {op.min_models} models, got {len(refs)}")


def _as_modules(cfg: MergeConfig, config_model: ModelCatalog) -> MergeConfig:
    """The plain forms on a model of several modules (a multimodal architecture of
    bigmerge.planning.modules), read as mergekit reads them: `models:` is every module merged
    from those models (each module's layers its own depth for gradients); `slices:` is refused,
    as mergekit refuses it (whose layers would a layer range mean?)."""
    archs = (config_model.config or {}).get("architectures")
    arch = archs[0] if isinstance(archs, list) and len(archs) == 1 else None
    if cfg.modules or not isinstance(arch, str) or arch not in ARCHITECTURES:
        return cfg
    if cfg.slices:
        raise ConfigError(
            f"{config_model.ref}: architecture {arch} has several modules ({', '.join(ARCHITECTURES[arch])}): "
            "slices need the modules: form, slices per module (as mergekit)"
        )
    modules = {name: OutputModule(models=cfg.models) for name in ARCHITECTURES[arch]}
    return cfg.model_copy(update={"models": None, "modules": modules})


def _module_outputs(
    op: MergeOp, cfg: MergeConfig, refs: list[str], by_ref: dict[str, ModelCatalog], config_model: ModelCatalog
) -> tuple[list[_Output], dict[str, int]]:
    """mergekit's `modules:` form of a multimodal model: every module of the architecture
    (bigmerge.planning.modules) merged from its own models or slices, its parameters ranked
    between the slice's (or the models' own) and the global ones, with the one merge_method.
    A module's `models` read as mergekit reads them: one slice over all of the module's layers,
    the base model added as its last source when it is not listed. Returns the outputs and the
    layer count of every module merged in slices (config.json's key, where the output's config
    has one: count)."""
    assert cfg.modules
    arch = architecture_of(config_model.config, config_model.ref)
    tables = module_tables(arch, list(cfg.modules), config_model.ref)
    for ref in refs:  # every tensor of every source in exactly one module, before any is planned
        split_by_module(tables, list(by_ref[ref].tensors), ref)
    outs: list[_Output] = []
    layer_counts: dict[str, int] = {}
    for name, module in cfg.modules.items():
        table = tables[name]
        if module.slices:
            got, n_layers = _slice_outputs(op, cfg, refs, by_ref, module.slices, (name, module.parameters, table))
            outs += got
            key = table.layers_key(config_model.config)
            if key is not None:
                layer_counts[key] = n_layers
            continue
        models = module.models or []
        sources = [m.model for m in models]
        if cfg.base_model and cfg.base_model not in sources:
            if op.base == "ignored":
                raise ConfigError(
                    f"modules.{name}: merge_method {op.name!r} does not use base_model; list it under the module's "
                    "models or drop it"
                )
            sources.append(cfg.base_model)
        base = sources.index(cfg.base_model) if cfg.base_model else None
        if op.base == "required" and base is None:
            raise ConfigError(f"modules.{name}: merge_method {op.name!r} needs a base_model")
        if len(sources) < op.min_models:
            raise ConfigError(
                f"modules.{name}: merge_method {op.name!r} needs at least {op.min_models} models, got {len(sources)}"
            )
        own = {m.model: m.parameters for m in models}
        head = by_ref[sources[base if base is not None else 0]]
        names = [n for n in head.tensors if table.owns(n)]
        n_layers = table.num_layers(head.config, names)
        shared_scopes = [module.parameters, cfg.parameters]
        input_scopes = [[own.get(r), module.parameters, cfg.parameters] for r in sources]
        for n in names:
            t = table.position(n, n_layers)
            twice = f"modules.{name}" if table.planned_twice(n) else None
            outs.append(_Output(n, [(refs.index(r), n) for r in sources], base, t, shared_scopes, input_scopes, twice))
    return outs, layer_counts


def _is_vocab_tensor(out: _Output, models: list[ModelCatalog], vocab_sizes: list[int]) -> bool:
    """Embeddings and LM heads: outside the layers, one row per token in every source."""
    if LAYER_RE.search(out.name):
        return False
    for i, name in out.inputs:
        info = models[i].tensors.get(name)
        if info is None or len(info.shape) != 2 or info.shape[0] != vocab_sizes[i]:
            return False
    return True


def _layer_of(name: str) -> int | None:
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def _with_layer(name: str, layer: int) -> str:
    m = LAYER_RE.search(name)
    assert m is not None
    return f"{name[: m.start(1)]}{layer}{name[m.end(1) :]}"


def _check_architectures(models: list[ModelCatalog]) -> None:
    """Models of different architectures do not merge tensor by tensor (mergekit refuses them too)."""
    known = [(m.ref, (m.config or {}).get("architectures")) for m in models if (m.config or {}).get("architectures")]
    for ref, arch in known[1:]:
        if arch != known[0][1]:
            raise SourceError(
                f"{ref}: architecture {arch} differs from {known[0][0]}'s {known[0][1]} (config.json 'architectures'); "
                "merging needs models of one architecture"
            )


def _all_settings(cfg: MergeConfig) -> list[tuple[str, Any]]:
    """(parameter name, setting) for every parameter written anywhere in the config."""
    return [(k, v) for _, sc in _parameter_scopes(cfg) for k, v in (sc or {}).items()]


def _parameter_scopes(cfg: MergeConfig) -> list[tuple[str, Any]]:
    """(where, parameters) for every place a config gives parameters, modules' included."""
    out: list[tuple[str, Any]] = [("parameters", cfg.parameters)]

    def models_and_slices(prefix: str, models: list[Any] | None, slices: list[OutputSlice] | None) -> None:
        out.extend((f"{prefix}models[{i}].parameters", m.parameters) for i, m in enumerate(models or []))
        for k, sl in enumerate(slices or []):
            out.append((f"{prefix}slices[{k}].parameters", sl.parameters))
            out.extend(
                (f"{prefix}slices[{k}].sources[{j}].parameters", src.parameters) for j, src in enumerate(sl.sources)
            )

    models_and_slices("", cfg.models, cfg.slices)
    for name, module in (cfg.modules or {}).items():
        out.append((f"modules.{name}.parameters", module.parameters))
        models_and_slices(f"modules.{name}.", module.models, module.slices)
    return out


def _filters_and_gradients(setting: Any, filters: set[str]) -> bool:
    """Collect the name filters of a setting; True when it holds a gradient (a list of 2+ values)."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if not isinstance(setting, list):
        return False
    if all(not isinstance(e, ConditionalParameter) for e in setting):
        return len(setting) > 1
    gradient = False
    for e in setting:
        if isinstance(e, ConditionalParameter):
            if e.filter not in (None, "*"):
                filters.add(e.filter)
            gradient |= _filters_and_gradients(e.value, filters)
    return gradient


def _check_settings_against_tensors(cfg: MergeConfig, names: list[str], warnings: list[str]) -> None:
    """A gradient needs layers to spread over; a filter that matches no tensor is most likely a typo."""
    has_layers = any(LAYER_RE.search(n) for n in names)
    for pname, setting in _all_settings(cfg):
        filters: set[str] = set()
        if _filters_and_gradients(setting, filters) and not has_layers:
            raise ConfigError(
                f"parameter {pname!r} is a gradient (a list over layer depth) but the model has no layers "
                "(no tensor named like '...layers.N...'); give one value"
            )
        for f in sorted(filters):
            if not any(f in n for n in names):
                warnings.append(f"parameter {pname!r}: filter {f!r} matches no tensor")


def _check_parameter_names(op: MergeOp, cfg: MergeConfig) -> list[str]:
    """Refuse a parameter name no merge method knows (a typo); one warning per name that
    mergekit 0.1.5 knows but ignores here (another method's parameter, a method parameter at
    the top level, or the base model's own value of a parameter of the other models), as
    mergekit would merge the config without it."""
    known = {p.name for p in op.params}
    ignored: dict[str, list[str]] = {}
    for where, params in _parameter_scopes(cfg):
        for key in params or {}:
            if key not in known and key in MERGEKIT_PARAMETERS:
                ignored.setdefault(key, []).append(where)
            elif key not in known:
                raise ConfigError(
                    f"{where}: unknown parameter {key!r} for merge_method {op.name!r} (known: {', '.join(sorted(known))})"
                )
    warnings = [
        f"parameter {key!r} in {', '.join(places)} is ignored: merge_method {op.name!r} does not take it "
        "(mergekit 0.1.5 ignores it too)"
        for key, places in ignored.items()
    ]
    warnings += [
        f"top-level key {key!r} is ignored: a merge method parameter belongs under 'parameters:' "
        "(mergekit 0.1.5 ignores it too)"
        for key in cfg.ignored_top_level
    ]
    warnings += list(cfg.module_warnings)
    # a parameter of the other models given to the base model itself: never read
    non_base = {p.name for p in op.params if p.scope == "non_base"}
    base_params: dict[str, list[str]] = {}
    groups: list[tuple[str, list[Any] | None, list[OutputSlice] | None]] = [("", cfg.models, cfg.slices)]
    groups += [(f"modules.{name}.", m.models, m.slices) for name, m in (cfg.modules or {}).items()]
    for prefix, models, slices in groups:
        for i, m in enumerate(models or []):
            if cfg.base_model and m.model == cfg.base_model:
                for key in (m.parameters or {}).keys() & non_base:
                    base_params.setdefault(key, []).append(f"{prefix}models[{i}].parameters")
        for k, sl in enumerate(slices or []):
            for j, src in enumerate(sl.sources):
                if src.model == (sl.base_model or cfg.base_model):
                    for key in (src.parameters or {}).keys() & non_base:
                        base_params.setdefault(key, []).append(f"{prefix}slices[{k}].sources[{j}].parameters")
    warnings += [
        f"parameter {key!r} of the base model ({', '.join(places)}) is ignored: merge_method {op.name!r} "
        "applies it to the other models only (mergekit 0.1.5 ignores it too)"
        for key, places in sorted(base_params.items())
    ]
    return warnings


def build_plan(
    cfg: MergeConfig,
    catalogs: list[ModelCatalog],
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    seed: int | None = None,
    world_size: int = 1,
) -> Plan:
    op = get_op(cfg.merge_method)
    if block_bytes < 64:
        raise ConfigError(f"block size {block_bytes} bytes is too small (minimum 64)")
    refs = cfg.model_refs()
    by_ref = {c.ref: c for c in catalogs}
    models = [by_ref[r] for r in refs]
    base_index = refs.index(cfg.base_model) if cfg.base_model else None
    ignored = _check_parameter_names(op, cfg)
    _check_architectures(models)
    warnings: list[str] = ignored
    config_updates: dict[str, Any] = {}
    fingerprint = cfg.fingerprint()
    if cfg.models:
        _check_models_form(op, cfg, refs, base_index)
    cfg = _as_modules(cfg, by_ref[cfg.base_model or refs[0]])
    if cfg.modules:
        head = by_ref[refs[base_index] if base_index is not None else refs[0]]
        config_model = head.ref
        outputs, counts = _module_outputs(op, cfg, refs, by_ref, head)
        config_updates.update(counts)  # dotted keys: see bigmerge.planning.modules.update_config
    elif cfg.slices:
        outputs, n_layers = _slice_outputs(op, cfg, refs, by_ref)
        config_model = cfg.base_model or cfg.slices[0].sources[0].model
        cfg_json = by_ref[config_model].config or {}
        key = next(
            (k for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(cfg_json.get(k), int)), None
        )
        if key is not None:
            config_updates[key] = n_layers
    else:
        ref_model = models[base_index] if base_index is not None else models[0]
        outputs = _model_outputs(cfg, refs, ref_model, base_index)
        config_model = ref_model.ref
        for m in models:
            extra = sorted(set(m.tensors) - set(ref_model.tensors))
            if extra:
                warnings.append(
                    f"{m.ref}: {len(extra)} tensor(s) not in {ref_model.ref} are ignored, e.g. {extra[0]!r}"
                )

    compute = DTYPE_NAMES[cfg.dtype] if cfg.dtype else None
    perms: list[list[int]] | None = None
    vocab_sizes: list[int] = []
    rules: list[TokenRule] = []
    pad_to: int | None = None
    vocab_source = cfg.vocabulary_source()
    if vocab_source is not None:
        base_ref = cfg.base_model or refs[0]
        tokens = cfg.tokenizer.tokens if cfg.tokenizer else None
        tok, perms, vocab_sizes = build_tokenizer(
            vocab_source, base_ref, refs, by_ref, cfg.storage_options, tuple(tokens or ())
        )
        multiple = cfg.tokenizer.pad_to_multiple_of if cfg.tokenizer else None
        if tok is not None and multiple and len(perms[0]) % multiple:
            pad_to = len(perms[0]) + multiple - len(perms[0]) % multiple
        if tok is not None and tokens:
            rules = token_rules(tokens, tok, refs, "tokenizer")
        if tok is None or (is_identity(perms, vocab_sizes) and pad_to is None and not any(r.force for r in rules)):
            perms = None
        else:
            config_updates[_vocab_key(by_ref[config_model].config)] = pad_to or len(perms[0])
    adapters = _validator(op)

    aux_files = _AuxFiles(cfg.storage_options)
    tensors: list[TensorPlan] = []
    ambiguous: dict[str, list[str]] = {}
    for out in sorted(outputs, key=lambda o: _natural_key(o.name)):
        name = out.name
        first_idx, first_name = out.inputs[out.base if out.base is not None else 0]
        ref_info = models[first_idx].tensors.get(first_name)
        vocab = None
        if perms is not None and ref_info is not None and _is_vocab_tensor(out, models, vocab_sizes):
            vocab = vocab_plan(
                [perms[i] for i, _ in out.inputs],
                out.base,
                refs=[refs[i] for i, _ in out.inputs],
                sizes=[vocab_sizes[i] for i, _ in out.inputs],
                rules=rules,
                pad_to=pad_to,
                where=name,
            )
        spans: list[SourceSpan] = []
        for i, in_name in out.inputs:
            m = models[i]
            info = m.tensors.get(in_name)
            if info is None:
                raise SourceError(f"{m.ref}: tensor {in_name!r} is missing (present in {models[first_idx].ref})")
            assert ref_info is not None
            if info.shape != ref_info.shape and not (vocab and info.shape[1:] == ref_info.shape[1:]):
                raise SourceError(
                    f"{m.ref}: tensor {in_name!r} has shape {list(info.shape)}, expected {list(ref_info.shape)} as in {models[first_idx].ref}"
                )
            if info.dtype not in FLOAT_DTYPES:
                raise SourceError(f"{m.ref}: tensor {in_name!r} has dtype {info.dtype}; merging needs floating point")
            spans.append(SourceSpan(info.file, info.start, info.end, info.dtype, in_name, m.lora.get(in_name)))
        assert ref_info is not None
        src_dtype = _promote([s.dtype for s in spans])
        t_compute = compute or src_dtype
        out_dtype = DTYPE_NAMES[cfg.out_dtype] if cfg.out_dtype else t_compute
        if not cfg.out_dtype and op.float32_result and t_compute in ("BF16", "F16"):
            out_dtype = "F32"  # mergekit writes the float32 its arithmetic promotes to
        shared, per_model = _resolve(op, out, refs, adapters)
        if out.twice and _resolve(op, replace(out, t=1.0), refs, adapters) != (shared, per_model):
            ambiguous.setdefault(out.twice, []).append(name)
        shape = list(ref_info.shape)
        if vocab:
            shape[0] = vocab["rows"]
        rows = shape[0] if shape else 1
        row_elems = math.prod(shape[1:]) if len(shape) > 1 else 1
        row_bytes = max(1, row_elems * max(DTYPES[s.dtype][1] for s in spans))
        block_rows = max(1, min(rows, block_bytes // row_bytes))  # a small tensor is one block of its own size
        # blocks that start on a page of the output file can be written there with direct I/O
        page_rows = PAGE // math.gcd(max(1, row_elems * DTYPES[out_dtype][1]), PAGE)
        if rows > block_rows >= page_rows:
            block_rows -= block_rows % page_rows
        n_blocks = math.ceil(rows / block_rows) if rows * row_elems > 0 else 0
        tp = TensorPlan(
            len(tensors),
            name,
            shape,
            out_dtype,
            spans,
            shared,
            per_model,
            rows,
            row_elems,
            block_rows,
            n_blocks,
            base_index=out.base,
            compute_dtype=t_compute,
            vocab=vocab,
        )
        task = TensorTask(name, tuple(shape), tp.numel, n_blocks, out.base, shared, per_model, DTYPES[t_compute][0])
        op.check(task)
        tp.aux = aux_files.resolve(op, task, [(refs[i], in_name) for i, in_name in out.inputs], bool(tp.vocab))
        tensors.append(tp)

    warnings += [
        f"{where}: a gradient reaches {len(names)} tensor(s) (e.g. {names[0]!r}) that mergekit 0.1.5 plans twice, "
        "at t = 0 and t = 1, keeping either one; bigmerge merges them at t = 0"
        for where, names in ambiguous.items()
    ]
    _check_settings_against_tensors(
        cfg, sorted({t.name for t in tensors} | {n for o in outputs for _, n in o.inputs}), warnings
    )
    plan = Plan(
        version=PLAN_VERSION,
        merge_method=op.name,
        models=refs,
        base_index=base_index,
        compute_dtype=compute or _promote([t.compute_dtype or "F32" for t in tensors] or ["F32"]),
        seed=int(seed if seed is not None else (cfg.seed or 0)),
        block_bytes=block_bytes,
        world_size=world_size,
        tensors=tensors,
        source_headers={m.ref: m.header_sha256 for m in models},
        config_fingerprint=fingerprint,
        warnings=warnings,
        config_model=config_model,
        config_updates=config_updates,
    )
    aux_files.annotate(plan)
    plan.assign(world_size)
    return plan


def _vocab_key(config: dict[str, Any] | None) -> str:
    """config.json's vocabulary size: `vocab_size`, or a multimodal model's text_config's."""
    if config_value(config, "vocab_size") is None and isinstance(config_value(config, "text_config.vocab_size"), int):
        return "text_config.vocab_size"
    return "vocab_size"


def _promote(dtypes: list[str]) -> str:
    out = DTYPES[dtypes[0]][0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, DTYPES[d][0])
    return {v[0]: k for k, v in DTYPES.items()}[out]


_FLOAT32_MAX = 3.4028234663852886e38


def _finite(v: Any) -> bool:
    """No NaN or infinity in a parameter's value (a number, or a list of them), nor a number
    that float32, the widest usual compute dtype, would hold as one (1e300 is inf there)."""
    if isinstance(v, float):
        return math.isfinite(v) and abs(v) <= _FLOAT32_MAX
    if isinstance(v, (list, tuple)):
        return all(_finite(x) for x in v)
    return True


def _resolve(
    op: MergeOp, out: _Output, refs: list[str], adapters: dict[str, TypeAdapter[Any]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    def value(pname: str, scopes: list[Any], tensor: str, who: str) -> Any:
        def validate(v: Any) -> Any:
            try:
                got = adapters[pname].validate_python(v)
            except ValidationError as exc:
                msg = exc.errors()[0]["msg"]
                raise ConfigError(f"parameter {pname!r}{who}: bad value {v!r}: {msg}") from None
            if not _finite(got):  # YAML's .nan and .inf are floats: they would merge into NaN weights
                raise ConfigError(
                    f"parameter {pname!r}{who}: bad value {v!r}: must be a finite number within float32's range"
                )
            return got

        for scope in scopes:
            if scope and pname in scope:
                v = evaluate_setting(tensor, scope[pname], out.t, validate)
                if v is not None:
                    return v
        spec = next(p for p in op.params if p.name == pname)
        if spec.required:
            raise ConfigError(f"missing parameter {pname!r}{who} for tensor {tensor!r}")
        return adapters[pname].validate_python(spec.default)

    shared = {p.name: value(p.name, out.shared_scopes, out.name, "") for p in op.params if p.scope == "shared"}
    per_model: list[dict[str, Any]] = []
    for pos, (i, in_name) in enumerate(out.inputs):
        per_model.append(
            {
                p.name: value(p.name, out.input_scopes[pos], in_name, f" of model {refs[i]}")
                for p in op.params
                if p.scope == "input" or (p.scope == "non_base" and pos != out.base)
            }
        )
    return shared, per_model


def _aux_bytes(t: TensorPlan) -> tuple[int, int]:
    """(bytes of t's row-blocked aux inputs per block, bytes of its whole aux inputs)."""
    rows = whole = 0
    for per in t.aux:
        for span in per.values():
            if span.rows:
                rows += t.block_rows * t.row_elems * DTYPES[span.dtype][1]
            else:
                whole += span.end - span.start
    return rows, whole


class _AuxFiles:
    """The headers of the files operators read auxiliary inputs from (statistics), each read once."""

    def __init__(self, storage_options: dict[str, Any] | None) -> None:
        self.storage_options = storage_options
        self.headers: dict[str, tuple[str, dict[str, TensorInfo], str]] = {}  # as given -> url, tensors, sha256
        self.used: dict[str, int] = {}

    def _header(self, file: str) -> tuple[str, dict[str, TensorInfo], str]:
        if file not in self.headers:
            loc = location(file, self.storage_options)
            if not loc.exists():
                raise SourceError(f"{loc.url}: statistics file not found (`bigmerge stats` writes it)")
            tensors, _meta, raw = read_header(loc)
            self.headers[file] = (loc.url, tensors, hashlib.sha256(raw).hexdigest())
            self.used[file] = 0
        return self.headers[file]

    def resolve(
        self, op: MergeOp, task: TensorTask, sources: list[tuple[str, str]], permuted: bool = False
    ) -> list[dict[str, AuxSpan]]:
        wanted = op.aux_inputs(task, sources)
        if not wanted:
            return []
        if permuted and any(req.rows for per in wanted for req in per.values()):
            # the statistics' rows are in each source's own vocabulary order, the block's are not
            raise ConfigError(
                f"merge_method {op.name!r} with a tokenizer_source that changes the vocabulary: the statistics "
                f"of {task.name!r} would need the same row permutation (not supported; use the sources' tokenizer)"
            )
        out: list[dict[str, AuxSpan]] = []
        for per in wanted:
            spans: dict[str, AuxSpan] = {}
            for key, req in per.items():
                url, tensors, _ = self._header(req.file)
                info = tensors.get(req.tensor)
                if info is None:
                    if req.optional:
                        continue
                    raise SourceError(f"{url}: no tensor {req.tensor!r} (needed to merge {task.name!r})")
                if tuple(info.shape) != tuple(req.shape):
                    raise SourceError(
                        f"{url}: tensor {req.tensor!r} has shape {list(info.shape)}, expected {list(req.shape)} "
                        f"(to merge {task.name!r})"
                    )
                if info.dtype not in FLOAT_DTYPES:
                    raise SourceError(f"{url}: tensor {req.tensor!r} has dtype {info.dtype}; expected floating point")
                if req.rows and tuple(req.shape) != tuple(task.shape):
                    raise ValueError(f"{op.name}: a row-blocked aux input must have the shape of {task.name!r}")
                spans[key] = AuxSpan(info.file, info.start, info.end, info.dtype, list(info.shape), req.rows)
                self.used[req.file] += 1
            out.append(spans)
        for key in sorted({k for per in wanted for k in per}):
            have = [key in spans for spans in out]
            if any(have) and not all(have):
                req = wanted[have.index(False)][key]
                other = wanted[have.index(True)][key]
                raise SourceError(
                    f"{self.headers[req.file][0]}: no tensor {req.tensor!r}, which {self.headers[other.file][0]} has"
                )
        return out

    def annotate(self, plan: Plan) -> None:
        """Record each file's header hash beside the sources' (a changed file is another merge)."""
        for file, (url, _, digest) in self.headers.items():
            plan.source_headers[url] = {posixpath.basename(url): digest}
            if not self.used[file]:
                plan.warnings.append(f"{url}: none of its tensors is used by this merge")
