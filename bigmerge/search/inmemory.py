"""Merge a model that fits one process into memory: the executor's own code, a dict for a store.

``merge_in_memory(cfg)`` builds the same plan as ``bigmerge merge`` (same block size, world size 1)
and runs the same executor loop (reads, operator rounds, statistics, apply, the cast to the output
dtype), but each finished block is copied into a whole tensor in memory instead of a zarr shard.
The tensors are therefore bit-identical to what ``bigmerge merge`` of the same config writes
(``tests/test_search.py`` pins it). ``build_model`` turns them into a transformers model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bigmerge.engine.comm import SerialComm
from bigmerge.engine.executor import execute
from bigmerge.engine.reader import BlockReader
from bigmerge.errors import SourceError
from bigmerge.planning.catalog import ModelCatalog, catalog_models
from bigmerge.planning.config import MergeConfig
from bigmerge.planning.modules import update_config
from bigmerge.planning.plan import DEFAULT_BLOCK_BYTES, Plan, TensorPlan, build_plan
from bigmerge.storage.safetensors import DTYPES


class MemoryStore:
    """The executor's store interface (``write_block``) over whole in-memory tensors."""

    def __init__(self, plan: Plan) -> None:
        self.tensors: dict[str, torch.Tensor] = {
            t.name: torch.empty(tuple(t.shape), dtype=DTYPES[t.out_dtype][0]) for t in plan.tensors
        }

    def write_block(self, t: TensorPlan, b: int, x: torch.Tensor) -> None:
        # x is a ring buffer the executor reuses: copy it out now
        r0, r1 = t.block_range(b)
        dst = self.tensors[t.name]
        if dst.dim() == 0:
            dst.copy_(x.reshape(()))
        else:
            dst[r0:r1].copy_(x.reshape(r1 - r0, *t.shape[1:]))


@dataclass
class InMemoryMerger:
    """Merges configs over one fixed set of sources; their headers are read once."""

    catalogs: list[ModelCatalog]
    block_bytes: int = DEFAULT_BLOCK_BYTES
    io_threads: int = 2

    @classmethod
    def for_config(cls, cfg: MergeConfig, block_bytes: int = DEFAULT_BLOCK_BYTES) -> InMemoryMerger:
        return cls(catalog_models(cfg.model_refs(), cfg.storage_options), block_bytes)

    def plan(self, cfg: MergeConfig, seed: int | None = None) -> Plan:
        by_ref = {c.ref: c for c in self.catalogs}
        missing = [r for r in cfg.model_refs() if r not in by_ref]
        if missing:
            self.catalogs = self.catalogs + catalog_models(missing, cfg.storage_options)
        return build_plan(cfg, self.catalogs, block_bytes=self.block_bytes, seed=seed, world_size=1)

    def merge(self, cfg: MergeConfig, seed: int | None = None) -> tuple[dict[str, torch.Tensor], Plan]:
        """{output tensor name: merged tensor} and the plan that made it."""
        plan = self.plan(cfg, seed)
        store = MemoryStore(plan)
        reader = BlockReader(plan, cfg.storage_options, threads=self.io_threads, prefetch=1)
        try:
            execute(plan, SerialComm(), store, reader, set())
        finally:
            reader.close()
        return store.tensors, plan

    def hf_config(self, plan: Plan) -> dict[str, Any]:
        """The merged model's config.json, chosen and updated as the export chooses it."""
        by_ref = {c.ref: c for c in self.catalogs}
        base_ref = plan.models[plan.base_index] if plan.base_index is not None else plan.models[0]
        src = by_ref.get(plan.config_model or base_ref)
        if src is None or src.config is None:
            raise SourceError(f"{plan.config_model or base_ref}: no config.json, cannot build a model in memory")
        cfg = dict(src.config)
        update_config(cfg, plan.config_updates)
        return cfg


def merge_in_memory(
    cfg: MergeConfig, *, block_bytes: int = DEFAULT_BLOCK_BYTES, seed: int | None = None
) -> dict[str, torch.Tensor]:
    """The merged tensors of ``cfg``, bit-identical to ``bigmerge merge`` of it."""
    return InMemoryMerger.for_config(cfg, block_bytes).merge(cfg, seed)[0]


def build_model(tensors: dict[str, torch.Tensor], hf_config: dict[str, Any], dtype: str = "float32") -> Any:
    """A transformers causal LM (eval mode) holding ``tensors``; tied weights may be absent from them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {k: v for k, v in hf_config.items() if k not in ("model_type", "transformers_version")}
    config = AutoConfig.for_model(hf_config["model_type"], **kw)
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise SourceError(f"merged tensors unknown to {config.model_type}: {', '.join(sorted(unexpected)[:5])}")
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    untied = [k for k in missing if k not in tied and not (config.tie_word_embeddings and k == "lm_head.weight")]
    if untied:
        raise SourceError(f"the merge does not give the model's tensor(s) {', '.join(untied[:5])}")
    model.tie_weights()
    model.eval()
    return model
