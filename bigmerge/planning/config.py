"""The merge config: mergekit's YAML vocabulary, read as is, plus a few keys of ours.

A parameter may be a scalar, a gradient (a list interpolated over layer depth), or a
list of `{filter, value}` where `filter` is a substring of the tensor name (no filter or
"*" is the fallback). Precedence, highest first: slice source > slice > module > global; for
the `models:` form a model's own `parameters` play the role of the slice source.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, PrivateAttr, field_validator, model_validator

from bigmerge.errors import ConfigError
from bigmerge.planning.validation import validate

ScalarParameter = Union[bool, int, float, str]
ScalarOrGradient = Union[ScalarParameter, list[ScalarParameter]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConditionalParameter(_Strict):
    value: ScalarOrGradient
    filter: str | None = None


ParameterSetting = Union[ConditionalParameter, list[ConditionalParameter], ScalarOrGradient]
Parameters = dict[str, ParameterSetting]


class InputModel(_Strict):
    model: str
    parameters: Parameters | None = None


class InputSlice(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None


class OutputSlice(_Strict):
    sources: list[InputSlice]
    base_model: str | None = None
    residual_weight: float | None = None
    parameters: Parameters | None = None


class ModelTokenEmbedding(_Strict):
    """A token's row taken from a model's own vocabulary: by id, or by the token's text there."""

    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ModelTokenEmbedding:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id or token")
        return self


class ZeroEmbedding(_Strict):
    kind: Literal["zero"]


class TokenEmbedding(_Strict):
    """How a token's embedding (and LM head) row is made: mergekit's `tokenizer.tokens.<tok>`."""

    source: ModelTokenEmbedding | ZeroEmbedding | str | None = None
    force: bool = False


class TokenizerConfig(_Strict):
    """mergekit's `tokenizer:` block: the output vocabulary (`union` by default, as mergekit),
    tokens added to it with the rows they start from, and padding to a multiple."""

    source: str = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = None

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be a positive integer")
        return v


class OutputModule(_Strict):
    """One module of mergekit's `modules:` form: its own models or slices, and parameters that
    rank between the slice's and the global ones."""

    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    parameters: Parameters | None = None


DTYPE_NAMES = {
    "float32": "F32",
    "fp32": "F32",
    "float": "F32",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float64": "F64",
}


# Every parameter that a merge method of mergekit 0.1.5 declares. mergekit resolves only its
# method's own parameters and never reads the others (and its config model drops unknown
# top-level keys), so a config written for mergekit may carry these where they do nothing:
# `lambda` or `weight` under sce, `normalize` under multislerp, `int8_mask` at the top level.
# bigmerge accepts them with one warning line each; any other unknown name stays an error
# (a typo must not silently change a merge). See docs/operators.md.
MERGEKIT_PARAMETERS = frozenset(
    {
        "alpha",
        "density",
        "eps",
        "epsilon",
        "filter_wise",
        "gamma",
        "int8_mask",
        "lambda",
        "max_iter",
        "normalize",
        "normalize_weights",
        "nuslerp_flatten",
        "nuslerp_row_wise",
        "r",
        "rescale",
        "scale",
        "select_topk",
        "t",
        "tol",
        "weight",
    }
)


class MergeConfig(_Strict):
    """One merge, as written in YAML. Field names are mergekit's where mergekit has them."""

    merge_method: str
    base_model: str | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[str, OutputModule] | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    name: str | None = None
    # bigmerge's own keys
    storage_options: dict[str, Any] | None = None
    seed: int | None = None
    # method parameters written at the top level, which mergekit ignores: warned about, not merged
    _ignored_top_level: list[str] = PrivateAttr(default_factory=list)
    # a module's own merge_method or base_model, which mergekit ignores: the warnings
    _module_warnings: list[str] = PrivateAttr(default_factory=list)

    @property
    def ignored_top_level(self) -> tuple[str, ...]:
        return tuple(self._ignored_top_level)

    @property
    def module_warnings(self) -> tuple[str, ...]:
        return tuple(self._module_warnings)

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _known_dtype(cls, v: str | None) -> str | None:
        if v is not None and v not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {v!r}; expected one of float32, bfloat16, float16, float64")
        return v

    def vocabulary_source(self) -> str | None:
        """Where the output vocabulary comes from (`tokenizer_source`, or the `tokenizer:` block's
        source); None keeps the sources' vocabulary untouched."""
        if self.tokenizer is not None:
            return self.tokenizer.source
        return self.tokenizer_source

    def model_refs(self) -> list[str]:
        """Every source in merge order: the listed models, then the base if it is not listed."""
        refs: list[str] = []
        if self.models:
            refs = [m.model for m in self.models]
        elif self.slices:
            for s in self.slices:
                refs.extend(src.model for src in s.sources if src.model not in refs)
        for module in (self.modules or {}).values():
            named = [m.model for m in module.models or []]
            named += [src.model for s in module.slices or [] for src in s.sources]
            refs.extend(r for r in dict.fromkeys(named) if r not in refs)
        if self.base_model and self.base_model not in refs:
            refs.append(self.base_model)
        return refs

    def model_parameters(self, ref: str) -> Parameters | None:
        for m in self.models or []:
            if m.model == ref:
                return m.parameters
        return None

    def fingerprint(self) -> str:
        # keys added later count only when set, so a config's fingerprint (and the resume of its
        # interrupted merge) does not change with the version of bigmerge
        later = {k for k in ("tokenizer", "modules") if getattr(self, k) is None}
        data = self.model_dump(mode="json", exclude=later)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def parse_config(data: Any, source: str = "config") -> MergeConfig:
    # method parameters at the top level: mergekit's config model drops them (see MERGEKIT_PARAMETERS)
    ignored: list[str] = []
    if isinstance(data, dict):
        ignored = [k for k in data if k in MERGEKIT_PARAMETERS and k not in MergeConfig.model_fields]
        data = {k: v for k, v in data.items() if k not in ignored}
    branches = ("ConditionalParameter", "ModelTokenEmbedding", "ZeroEmbedding", "TokenEmbedding")
    data, module_warnings = _module_keys_ignored(data)
    cfg = validate(MergeConfig, data, source, branches=branches)
    if sum(bool(x) for x in (cfg.models, cfg.slices, cfg.modules)) != 1:
        raise ConfigError(f"{source}: exactly one of 'models', 'slices' or 'modules' must be given")
    if cfg.modules:
        cfg = _from_modules(cfg, source)
    if cfg.tokenizer_source is not None and cfg.tokenizer is not None:
        raise ConfigError(f"{source}: give either 'tokenizer_source' or 'tokenizer', not both (as mergekit)")
    _check_duplicates(cfg, source)
    cfg._ignored_top_level.extend(ignored)
    cfg._module_warnings.extend(module_warnings)
    return cfg


def _module_keys_ignored(data: Any) -> tuple[Any, list[str]]:
    """A module of mergekit 0.1.5 has models or slices, and parameters. Its config model drops
    other keys, so a module's own `merge_method` or `base_model` is ignored there (every module
    is merged with the top-level method and base): bigmerge does the same, so that a published
    config gives the checkpoint it gave, and says so in one warning per key. Returns the data
    without those keys and the warnings."""
    modules = data.get("modules") if isinstance(data, dict) else None
    if not isinstance(modules, dict):
        return data, []
    warnings: list[str] = []
    kept: dict[Any, Any] = {}
    for name, module in modules.items():
        if isinstance(module, dict):
            for key in ("merge_method", "base_model"):
                if key in module:
                    top = data.get(key)
                    warnings.append(
                        f"modules.{name}.{key} ({module[key]!r}) is ignored: mergekit 0.1.5 merges every module "
                        f"with the top-level {key} ({top!r}), and so does bigmerge; for one method per module, "
                        "see 'modules:' in docs/mergekit.md"
                    )
            module = {k: v for k, v in module.items() if k not in ("merge_method", "base_model")}
        kept[name] = module
    return {**data, "modules": kept}, warnings


def _from_modules(cfg: MergeConfig, source: str) -> MergeConfig:
    """mergekit's `modules:` form. A one-module model (mergekit names its module `default`:
    every decoder-only architecture) is the plain form with the module's parameters ranked
    between the slice's and the global ones. Several modules (multimodal models: a text
    decoder, a vision tower, a projector under their own tensor names) stay as they are: the
    plan merges each from its own sources (bigmerge.planning.modules has their tables)."""
    assert cfg.modules
    for name, module in cfg.modules.items():
        if module.models and module.slices:
            raise ConfigError(f"{source}: modules.{name}: give either 'models' or 'slices', not both (as mergekit)")
        if not module.models and not module.slices:
            raise ConfigError(f"{source}: modules.{name} names no models: give its 'models' or 'slices'")
    if list(cfg.modules) != ["default"]:
        return cfg
    module = cfg.modules["default"]
    params = {**(cfg.parameters or {}), **(module.parameters or {})} or None
    return cfg.model_copy(
        update={"modules": None, "models": module.models, "slices": module.slices, "parameters": params}
    )


def _check_duplicates(cfg: MergeConfig, source: str) -> None:
    """The same model twice is refused, as mergekit refuses duplicate merge inputs: the entries'
    parameters would silently collapse into the first one's."""
    groups = [("models", [m.model for m in cfg.models or []])]
    groups += [(f"slices[{k}].sources", [s.model for s in sl.sources]) for k, sl in enumerate(cfg.slices or [])]
    for name, module in (cfg.modules or {}).items():
        groups.append((f"modules.{name}.models", [m.model for m in module.models or []]))
        groups += [
            (f"modules.{name}.slices[{k}].sources", [s.model for s in sl.sources])
            for k, sl in enumerate(module.slices or [])
        ]
    for where, refs in groups:
        seen: set[str] = set()
        for ref in refs:
            if ref in seen:
                raise ConfigError(f"{source}: model {ref!r} is listed twice in {where} (duplicate merge inputs)")
            seen.add(ref)


def read_yaml(path: str | Path) -> Any:
    """A YAML file's data; an unreadable or malformed file is a one-line ConfigError naming it."""
    return load_yaml_bounded(_config_text(path), str(path))


def _config_text(path: str | Path) -> str:
    """A config file's text: at most MAX_CONFIG_BYTES are read (a checkpoint named by mistake
    is not read whole), and it must be UTF-8; either refusal is a one-line ConfigError."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes: not a merge config")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start}, line {line}: {raw[exc.start : exc.start + 1]!r}): "
            "a config is a YAML file"
        ) from None


# A config is a few KB (a 70B slices config with per-layer parameters: ~50 KB). The bounds
# stop what a hostile file could do: aliases that expand exponentially ("billion laughs": a
# few hundred bytes that would build billions of nodes), nesting deep enough to overflow
# Python's stack, or plain size.
MAX_CONFIG_BYTES = 4 * 2**20
MAX_YAML_NODES = 200_000  # after every alias is expanded
MAX_YAML_DEPTH = 32


def load_yaml_bounded(text: str, source: str) -> Any:
    """YAML's data (the safe loader), or one ConfigError line when the text is malformed or
    would expand beyond the bounds above; aliases are measured before anything is built."""
    docs = load_yaml_documents(text, source)
    if len(docs) > 1:
        raise ConfigError(
            f"{source}: several YAML documents (a mergekit-multi config): `bigmerge merge` runs them; "
            "this command reads one merge"
        )
    return docs[0] if docs else None


def load_yaml_documents(text: str, source: str) -> list[Any]:
    """Every document of a YAML stream (`---` between them), with load_yaml_bounded's bounds
    (the node count over all documents together)."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: {len(text)} bytes; a config may have at most {MAX_CONFIG_BYTES}")
    loader: _BoundedLoader | None = None
    docs: list[Any] = []
    nodes = 0
    try:
        loader = _BoundedLoader(text)
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            _check_yaml_size(node, source)
            nodes += sum(1 for _ in _walk(node))
            if nodes > MAX_YAML_NODES:
                raise ConfigError(f"{source}: more than {MAX_YAML_NODES} values over its documents; refused")
            docs.append(loader.construct_document(node))
        return docs
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"{source}: not valid YAML{at}: {problem}") from None
    except (RecursionError, _TooDeep):
        raise ConfigError(f"{source}: nests more than {MAX_YAML_DEPTH} levels deep; refused") from None
    finally:
        if loader is not None:
            loader.dispose()


def _walk(root: yaml.Node) -> Iterator[yaml.Node]:
    """Each distinct node of a document once (its size is bounded by _check_yaml_size first)."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(n for pair in node.value for n in pair)


def read_yaml_documents(path: str | Path) -> list[Any]:
    """A YAML file's documents; errors as read_yaml's."""
    return load_yaml_documents(_config_text(path), str(path))


class _TooDeep(Exception):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader, stopped at MAX_YAML_DEPTH levels of nesting while it scans: PyYAML's
    scanner does work per open level for every token (3 s for 3000 nested '['), and its
    composer recurses once per level."""

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:  # noqa: N803 - PyYAML's name
        if self.flow_level >= MAX_YAML_DEPTH:
            raise _TooDeep
        super().fetch_flow_collection_start(TokenClass)  # type: ignore[misc]

    def add_indent(self, column: int) -> bool:
        if len(self.indents) >= MAX_YAML_DEPTH:
            raise _TooDeep
        return bool(super().add_indent(column))  # type: ignore[misc]


def _check_yaml_size(root: yaml.Node, source: str) -> None:
    """Nodes and depth of the document with every alias expanded, counted without expanding:
    each node once, iteratively (a shared node counts as often as it is used)."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in size:
            continue
        kids: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            kids = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            kids = [n for pair in node.value for n in pair]
        if children_done:
            open_.discard(key)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            if size[key] > MAX_YAML_NODES:
                raise ConfigError(
                    f"{source}: expands to more than {MAX_YAML_NODES} values (aliases repeating aliases?); refused"
                )
            if depth[key] > MAX_YAML_DEPTH:
                raise ConfigError(f"{source}: nests more than {MAX_YAML_DEPTH} levels deep; refused")
            continue
        if key in open_:
            raise ConfigError(f"{source}: an alias refers to a node that contains it (an endless structure)")
        open_.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in size)


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, object) for every non-blank line of a jsonl data file; errors name file and line."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"{p}: data file not found") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read data: {exc.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}:{n}: not valid JSON: {exc.msg}") from None


def load_config(path: str | Path) -> MergeConfig:
    return load_config_and_text(path)[0]


def load_config_and_text(path: str | Path) -> tuple[MergeConfig, str]:
    """The config and the text it was parsed from, read once (the text is the recipe written
    beside the merged weights: it must be what was merged)."""
    text = _config_text(path)
    return parse_config(load_yaml_bounded(text, str(path)), str(path)), text


def evaluate_setting(tensor_name: str, setting: ParameterSetting, t: float, validate: Callable[[Any], Any]) -> Any:
    """A setting's value for one tensor at relative depth t in [0, 1]; None when no filter matches."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return validate(setting)
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        values = [validate(e) for e in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]  # discrete values pick, they do not blend
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return validate((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:
        if not isinstance(cond, ConditionalParameter):
            raise ConfigError(
                f"a parameter list must hold only scalars or only {{filter, value}} entries, got {cond!r}"
            )
        if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
            return evaluate_setting(tensor_name, cond.value, t, validate)
    return None


Scope = Literal["shared", "input", "non_base"]
