"""The catalog: what every source checkpoint holds, from its headers and index alone.

No tensor data is read here. A checkpoint is a directory (local or any fsspec URL) with
`model.safetensors`, or shards listed in `model.safetensors.index.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from bigmerge.errors import SourceError, StorageError
from bigmerge.planning.lora import base_of as adapter_base
from bigmerge.planning.lora import is_adapter_dir, read_adapter, split_ref
from bigmerge.storage.fs import Location, location
from bigmerge.storage.jsonio import loads_bounded
from bigmerge.storage.safetensors import TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class ModelCatalog:
    """One source checkpoint: its tensors and the hash of each file's header."""

    ref: str
    root: Location
    tensors: dict[str, TensorInfo]
    header_sha256: dict[str, str]
    config: dict[str, Any] | None = None
    files: list[str] = field(default_factory=list)
    # LoRA terms by base tensor name (bigmerge.planning.lora): the reader adds scale * B @ A
    lora: dict[str, dict[str, Any]] = field(default_factory=dict)

    def num_layers(self) -> int | None:
        if not self.config:
            return None
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            value = self.config.get(key)
            if isinstance(value, int):
                return value
        return None


def _load_json(loc: Location) -> Any:
    return loads_bounded(loc.read_bytes(), loc.url)


def _safe_file_name(name: Any, where: str) -> str:
    # An index is data from someone else: a shard name must stay inside the checkpoint.
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") or "\x00" in name:
        raise SourceError(f"{where}: shard file name {name!r} is not a plain file name")
    return name


def _read_index(index_loc: Location) -> tuple[dict[str, str], list[str]]:
    """An index's weight map and its shard file names (checked to stay inside the checkpoint)."""
    index = _load_json(index_loc)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceError(f"{index_loc.url}: no 'weight_map' object in the index")
    return weight_map, sorted({_safe_file_name(f, index_loc.url) for f in weight_map.values()})


def catalog_model(
    ref: str, storage_options: dict[str, Any] | None = None, bin_cache: Location | None = None
) -> ModelCatalog:
    """`bin_cache`: where pickle checkpoints (pytorch_model*.bin) may be converted to safetensors;
    None refuses them. `ref` may carry a LoRA adapter (mergekit's BASE+ADAPTER), or be a PEFT
    adapter directory whose adapter_config.json names its base (base_model_name_or_path)."""
    base_ref, adapter_ref = split_ref(ref)
    if adapter_ref is None:
        root = location(ref, storage_options)
        if (
            not root.join(INDEX_NAME).exists()
            and not root.join(SINGLE_NAME).exists()
            and root.exists()
            and is_adapter_dir(root)
        ):
            base_ref, adapter_ref = adapter_base(ref, storage_options), ref
    cat = _catalog_checkpoint(base_ref, storage_options, bin_cache)
    if adapter_ref is None:
        return cat
    adapter = read_adapter(adapter_ref, base_ref, cat.tensors, storage_options)
    cat.ref = ref
    cat.tensors.update(adapter.replaced)
    cat.lora = adapter.terms
    cat.header_sha256.update(adapter.hashes)
    return cat


def _catalog_checkpoint(
    ref: str, storage_options: dict[str, Any] | None = None, bin_cache: Location | None = None
) -> ModelCatalog:
    root = location(ref, storage_options)
    index_loc = root.join(INDEX_NAME)
    single_loc = root.join(SINGLE_NAME)
    if index_loc.exists():
        weight_map, files = _read_index(index_loc)
    elif single_loc.exists():
        weight_map = None
        files = [SINGLE_NAME]
    elif not root.exists():
        raise SourceError(f"{ref}: model not found (no such directory or bucket prefix)")
    else:
        if any(root.join(n).exists() for n in PICKLE_NAMES):
            if bin_cache is None:
                raise SourceError(
                    f"{ref}: only pickle weights (pytorch_model.bin) found; bigmerge reads safetensors. "
                    "Convert the checkpoint, or pass --allow-bin to load it with torch.load(weights_only=True)"
                )
            converted = convert_bin(root, bin_cache.join(hashlib.sha256(root.url.encode()).hexdigest()[:16]))
            cat = _catalog_checkpoint(converted.url, storage_options)
            cat.ref, cat.root = ref, root  # config and tokenizer from the model itself
            cfg_loc = root.join("config.json")
            cat.config = _load_json(cfg_loc) if cfg_loc.exists() else None
            return cat
        raise SourceError(f"{ref}: no {SINGLE_NAME} or {INDEX_NAME} in the model directory")

    def one(fname: str) -> tuple[str, dict[str, TensorInfo], str]:
        loc = root.join(fname)
        if not loc.exists():
            raise SourceError(f"{loc.url}: shard named in {INDEX_NAME} does not exist")
        tensors, _meta, raw = read_header(loc)
        return fname, tensors, hashlib.sha256(raw).hexdigest()

    with ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:
        results = list(pool.map(one, files))
    tensors: dict[str, TensorInfo] = {}
    hashes: dict[str, str] = {}
    for fname, file_tensors, digest in results:
        hashes[fname] = digest
        for name, info in file_tensors.items():
            if weight_map is not None and weight_map.get(name) not in (None, fname):
                continue  # the index says another shard owns this name
            if name in tensors:
                raise SourceError(
                    f"{ref}: tensor {name!r} appears in two shards ({tensors[name].file} and {info.file})"
                )
            tensors[name] = info
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in tensors:
                raise SourceError(f"{root.join(fname).url}: tensor {name!r} named in {INDEX_NAME} is not in that shard")
    config = None
    cfg_loc = root.join("config.json")
    try:
        if cfg_loc.exists():
            config = _load_json(cfg_loc)
    except StorageError:
        config = None
    return ModelCatalog(ref, root, tensors, hashes, config if isinstance(config, dict) else None, files)


def catalog_models(
    refs: list[str], storage_options: dict[str, Any] | None = None, bin_cache: Location | None = None
) -> list[ModelCatalog]:
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(refs)))) as pool:
        return list(pool.map(lambda r: catalog_model(r, storage_options, bin_cache), refs))


def convert_bin(root: Location, dest: Location) -> Location:
    """pytorch_model*.bin under root as safetensors under dest (reused when already done).

    Loaded with torch.load(weights_only=True): a pickle holding anything but tensors and
    plain containers is refused by torch's restricted unpickler, never executed. One shard is
    held in memory at a time (as transformers does when it loads one).
    """
    import tempfile

    import torch
    from safetensors.torch import save_file

    done = dest.join("converted.json")
    index_loc = root.join("pytorch_model.bin.index.json")
    if index_loc.exists():
        _, shards = _read_index(index_loc)
    else:
        shards = ["pytorch_model.bin"]
    sizes = {f: root.join(f).size() for f in shards}
    if done.exists() and _load_json(done) == {"sources": sizes}:
        return dest
    weight_map_out: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bigmerge-bin-") as tmp:
        for k, fname in enumerate(shards):
            src = root.join(fname)
            local = src.path if src.is_local else f"{tmp}/{fname}"
            if not src.is_local:
                src.call("download", lambda src=src, local=local: src.fs.get(src.path, local))
            try:
                state = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # noqa: BLE001 - the unpickler's refusals come in many types
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise SourceError(f"{src.url}: refused by torch.load(weights_only=True): {first}") from None
            if not isinstance(state, dict) or not all(
                isinstance(n, str) and isinstance(t, torch.Tensor) for n, t in state.items()
            ):
                raise SourceError(f"{src.url}: not a state dict of named tensors")
            out_name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            # clone: tied weights share storage, which safetensors refuses to write twice
            save_file({n: t.contiguous().clone() for n, t in state.items()}, f"{tmp}/{out_name}", {"format": "pt"})
            target = dest.join(out_name)
            if target.is_local:
                os.makedirs(dest.path, exist_ok=True)
                os.replace(f"{tmp}/{out_name}", target.path)
            else:
                target.call("upload", lambda target=target, f=f"{tmp}/{out_name}": target.fs.put(f, target.path))
            weight_map_out.update({n: out_name for n in state})
            if not src.is_local:
                os.unlink(local)
    dest.join(INDEX_NAME).write_bytes(json.dumps({"metadata": {}, "weight_map": weight_map_out}).encode())
    done.write_bytes(json.dumps({"sources": sizes}).encode())  # last: a partial conversion is redone
    return dest
