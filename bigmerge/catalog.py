"""The catalog: what every source checkpoint holds, from its headers and index alone.

No tensor data is read here. A checkpoint is a directory (local or any fsspec URL) with
`model.safetensors`, or shards listed in `model.safetensors.index.json`.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from bigmerge.errors import SourceError, StorageError
from bigmerge.storage.fs import Location, location
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

    def num_layers(self) -> int | None:
        if not self.config:
            return None
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            value = self.config.get(key)
            if isinstance(value, int):
                return value
        return None


def _load_json(loc: Location) -> Any:
    raw = loc.read_bytes()
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{loc.url}: not valid JSON: {exc}") from None


def _safe_file_name(name: Any, where: str) -> str:
    # An index is data from someone else: a shard name must stay inside the checkpoint.
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") or "\x00" in name:
        raise SourceError(f"{where}: shard file name {name!r} is not a plain file name")
    return name


def catalog_model(ref: str, storage_options: dict[str, Any] | None = None) -> ModelCatalog:
    root = location(ref, storage_options)
    index_loc = root.join(INDEX_NAME)
    single_loc = root.join(SINGLE_NAME)
    if index_loc.exists():
        index = _load_json(index_loc)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise SourceError(f"{index_loc.url}: no 'weight_map' object in the index")
        files = sorted({_safe_file_name(f, index_loc.url) for f in weight_map.values()})
    elif single_loc.exists():
        weight_map = None
        files = [SINGLE_NAME]
    elif not root.exists():
        raise SourceError(f"{ref}: model not found (no such directory or bucket prefix)")
    else:
        if any(root.join(n).exists() for n in PICKLE_NAMES):
            raise SourceError(
                f"{ref}: only pickle weights (pytorch_model.bin) found; bigmerge reads safetensors. "
                "Convert the checkpoint to safetensors first."
            )
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


def catalog_models(refs: list[str], storage_options: dict[str, Any] | None = None) -> list[ModelCatalog]:
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(refs)))) as pool:
        return list(pool.map(lambda r: catalog_model(r, storage_options), refs))
