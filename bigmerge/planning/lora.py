"""LoRA adapters as sources: mergekit's `BASE+ADAPTER` and PEFT adapter directories.

A source `base+adapter` is the base checkpoint whose targeted weights are W + scale * B @ A
(PEFT's merge_and_unload, computed per block by the reader: bigmerge.engine.reader). Here, from
headers and adapter_config.json alone, every adapter tensor is mapped onto the base tensor it
changes, and everything that would make the result wrong is refused with one line naming the
adapter file and what was expected.

What a term is (one per adapted base tensor; a plain dict, since it travels in the plan):
    {"a": [file, start, end, dtype, shape], "b": [...], "scale": float, "embedding": bool,
     "config": url of adapter_config.json}
For a linear module A is [r, in] and B [out, r]: rows r0..r1 of the delta are B[r0:r1] @ A.
For an embedding (lora_embedding_A [r, vocab], lora_embedding_B [dim, r]) the delta is
(B @ A).T: rows r0..r1 are (B @ A[:, r0:r1]).T.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any

from bigmerge.errors import ConfigError, SourceError, StorageError
from bigmerge.storage.fs import Location, location
from bigmerge.storage.jsonio import loads_bounded
from bigmerge.storage.safetensors import FLOAT_DTYPES, TensorInfo, read_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_LINEAR = re.compile(r"(.+)\.lora_([AB])\.weight")
_EMBEDDING = re.compile(r"(.+)\.lora_embedding_([AB])")
# adapter_config.json keys whose non-default values change what merge_and_unload computes
_REFUSED = {
    "use_dora": "DoRA (use_dora) rescales the merged weight by a magnitude vector",
    "lora_bias": "lora_bias adds a trained bias",
    "fan_in_fan_out": "fan_in_fan_out (GPT-2 Conv1D layers) stores the weights transposed",
    "layer_replication": "layer_replication changes the model's layers",
    "target_parameters": "target_parameters adapts parameters, not modules",
    "trainable_token_indices": "trainable_token_indices trains single token rows",
    "use_bdlora": "BD-LoRA is another factorisation",
}


def split_ref(ref: str) -> tuple[str, str | None]:
    """mergekit's model reference '<MODEL>(+<LORA>)?': (base, adapter or None)."""
    parts = ref.split("+")
    if len(parts) == 1:
        return ref, None
    if len(parts) == 2 and parts[0].strip() and parts[1].strip():
        return parts[0].strip(), parts[1].strip()
    raise ConfigError(f"{ref}: a model with a LoRA adapter is written BASE+ADAPTER (one '+', both named)")


def is_adapter_dir(root: Location) -> bool:
    return root.join(ADAPTER_CONFIG).exists()


@dataclass
class Adapter:
    url: str
    terms: dict[str, dict[str, Any]] = field(default_factory=dict)  # base tensor name -> term
    replaced: dict[str, TensorInfo] = field(default_factory=dict)  # base tensor name -> the adapter's tensor
    hashes: dict[str, str] = field(default_factory=dict)  # what the plan's fingerprint covers


def read_config(ref: str, storage_options: dict[str, Any] | None) -> tuple[Location, dict[str, Any], bytes]:
    root = location(ref, storage_options)
    cfg_loc = root.join(ADAPTER_CONFIG)
    if not cfg_loc.exists():
        raise SourceError(
            f"{cfg_loc.url}: not found; a LoRA adapter is a PEFT directory with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
        )
    raw = cfg_loc.read_bytes()
    try:
        cfg = loads_bounded(raw, cfg_loc.url)
    except StorageError as exc:
        raise SourceError(f"{cfg_loc.url}: not a JSON adapter config ({exc})") from None
    if not isinstance(cfg, dict):
        raise SourceError(f"{cfg_loc.url}: expected a JSON object")
    return root, cfg, raw


def base_of(ref: str, storage_options: dict[str, Any] | None) -> str:
    """The base model a bare PEFT adapter directory names (base_model_name_or_path)."""
    root, cfg, _ = read_config(ref, storage_options)
    base = cfg.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise SourceError(
            f"{root.join(ADAPTER_CONFIG).url}: no base_model_name_or_path; name the base model as BASE+{ref}"
        )
    return base


def pattern_key(keys: list[str], module: str) -> str | None:
    """PEFT's rule for rank_pattern / alpha_pattern: the first key that matches the module
    name's end at a dot boundary (the key is a regular expression)."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _number(cfg: dict[str, Any], key: str, url: str) -> float:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise SourceError(f"{url}: {key} must be a positive number, got {v!r}")
    return float(v)


def read_adapter(
    ref: str, base_ref: str, base: dict[str, TensorInfo], storage_options: dict[str, Any] | None
) -> Adapter:
    """Map the adapter at `ref` onto the base checkpoint's tensors (headers only)."""
    root, cfg, raw_cfg = read_config(ref, storage_options)
    cfg_url = root.join(ADAPTER_CONFIG).url
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise SourceError(f"{cfg_url}: peft_type {peft_type!r} is not supported; only LoRA adapters (LORA) are")
    for key, why in _REFUSED.items():
        if cfg.get(key) not in (None, False, [], {}):
            raise SourceError(f"{cfg_url}: {key} is set; not supported ({why}): only plain LoRA adapters are")
    r_default = _number(cfg, "r", cfg_url)
    alpha_default = _number(cfg, "lora_alpha", cfg_url)
    rslora = bool(cfg.get("use_rslora"))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise SourceError(f"{cfg_url}: rank_pattern and alpha_pattern must be objects")

    weights = root.join(ADAPTER_WEIGHTS)
    if not weights.exists():
        pickle = root.join("adapter_model.bin").exists()
        raise SourceError(
            f"{weights.url}: not found"
            + ("; only adapter_model.bin (pickle) is there: save the adapter with safe_serialization" if pickle else "")
            + f" (a LoRA adapter needs {ADAPTER_WEIGHTS} beside {ADAPTER_CONFIG})"
        )
    tensors, _meta, raw_header = read_header(weights)
    out = Adapter(root.url)
    out.hashes = {
        f"adapter:{ADAPTER_CONFIG}": hashlib.sha256(raw_cfg).hexdigest(),
        f"adapter:{ADAPTER_WEIGHTS}": hashlib.sha256(raw_header).hexdigest(),
    }
    where = weights.url
    factors: dict[tuple[str, bool], dict[str, TensorInfo]] = {}  # (module, embedding) -> {"A": .., "B": ..}
    for key, info in tensors.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        if info.dtype not in FLOAT_DTYPES:
            raise SourceError(f"{where}: tensor {key!r} has dtype {info.dtype}; expected floating point")
        m = _LINEAR.fullmatch(name)
        e = _EMBEDDING.fullmatch(name)
        if m or e:
            mod, which = (m or e).groups()  # type: ignore[union-attr]
            factors.setdefault((mod, e is not None), {})[which] = info
            continue
        if ".lora_" in name or "lora_magnitude_vector" in name:
            raise SourceError(f"{where}: tensor {key!r} is not a plain LoRA factor (lora_A/lora_B); not supported")
        # modules_to_save, and an embedding saved whole beside its LoRA: they replace the base's tensor
        target = name.replace(".base_layer.", ".")
        have = base.get(target)
        if have is None:
            raise SourceError(f"{where}: tensor {key!r} replaces {target!r}, which the base model {base_ref} lacks")
        if have.shape != info.shape:
            raise SourceError(
                f"{where}: tensor {key!r} has shape {list(info.shape)}, expected {list(have.shape)} as {target!r} "
                f"in the base model {base_ref}"
            )
        out.replaced[target] = info

    for (mod, embedding), ab in sorted(factors.items()):
        kind = "lora_embedding_" if embedding else "lora_"
        for which in "AB":
            if which not in ab:
                other = "B" if which == "A" else "A"
                raise SourceError(f"{where}: module {mod!r} has {kind}{other} but no {kind}{which}")
        a, b = ab["A"], ab["B"]
        target = f"{mod}.weight"
        have = base.get(target)
        if have is None:
            raise SourceError(
                f"{where}: target module {mod!r} has no tensor {target!r} in the base model {base_ref} "
                "(an adapter for another model?)"
            )
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise SourceError(
                f"{where}: {kind}A and {kind}B of {mod!r} must be matrices, got {list(a.shape)}, {list(b.shape)}"
            )
        if a.shape[0] != b.shape[1]:
            raise SourceError(
                f"{where}: rank mismatch in {mod!r}: {kind}A has {a.shape[0]} rows, {kind}B has {b.shape[1]} columns "
                "(both must be the rank r)"
            )
        rk = pattern_key(list(rank_pattern), mod)
        ak = pattern_key(list(alpha_pattern), mod)
        r = float(rank_pattern[rk]) if rk is not None else r_default
        alpha = float(alpha_pattern[ak]) if ak is not None else alpha_default
        if a.shape[0] != r:
            raise SourceError(
                f"{where}: rank mismatch in {mod!r}: {cfg_url} gives r={r:g}"
                + (f" (rank_pattern {rk!r})" if rk is not None else "")
                + f", {kind}A has rank {a.shape[0]}"
            )
        delta_shape = (a.shape[1], b.shape[0]) if embedding else (b.shape[0], a.shape[1])
        if tuple(have.shape) != delta_shape:
            raise SourceError(
                f"{where}: {mod!r}'s adapter makes a [{delta_shape[0]}, {delta_shape[1]}] update, but {target!r} "
                f"in the base model {base_ref} has shape {list(have.shape)}"
            )
        out.terms[target] = {
            "a": [a.file, a.start, a.end, a.dtype, list(a.shape)],
            "b": [b.file, b.start, b.end, b.dtype, list(b.shape)],
            "scale": alpha / (math.sqrt(r) if rslora else r),
            "embedding": embedding,
            "config": cfg_url,
        }
    if not out.terms and not out.replaced:
        raise SourceError(f"{where}: no LoRA tensors (lora_A/lora_B) in the adapter")
    return out


def term_files(term: dict[str, Any]) -> list[str]:
    """The files whose bytes (or contents) a term depends on."""
    return [term["a"][0], term["b"][0], term["config"]]
