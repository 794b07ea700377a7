"""`bigmerge dam logits`: every source's top-k logits on its own data, computed once, into a data set.

    mpirun -n 16 bigmerge dam logits CONFIG      # or torchrun / deepspeed; or one process

For each source k alone (a one-source model: its weights partitioned over the processes by ZeRO-3
and gathered one layer at a time, as DeepSpeed inference does; never the N-source DAM model), the
examples of k's data file, tokenized and shuffled exactly as training does, go through the model
`training.batch_size` at a time and every token keeps the `loss.top_k` largest logits (float32
values, int32 vocabulary indices) and the log-sum-exp over the whole vocabulary (so the top-k
values can be renormalised into the teacher's true log-probabilities). The data set is a zarr v3
group (a local path or any fsspec URL), the training's `loss.dataset` (default OUTPUT/teacher-logits):

    <k>/values     float32 [examples, max_length, top_k]   zarr shards of `examples_per_shard` examples
    <k>/indices    int32   [examples, max_length, top_k]   (one inner chunk per example: training reads
    <k>/logsumexp  float32 [examples, max_length]           one example without the rest of its shard)
    <k>/lengths    int32   [examples]
    <k>/done       uint8   [shards]                         one object per shard, written after its data

Shards go round-robin to the processes; each is written whole by one process (two writers of one
zarr shard lose data: shared/STACK.md), and its `done` flag last, so a rerun skips finished shards
and redoes any other. The group's attributes hold a fingerprint of everything that decides the
logits (models, data files, tokenization, seed, top_k, dtype); a data set of other settings is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from bigmerge.dam.config import Coefficients, DamConfig
from bigmerge.dam.model import Sources, build_dam_model, open_sources
from bigmerge.errors import ConfigError

FORMAT = "bigmerge-dam-logits/1"
EXAMPLES_PER_SHARD = 16  # default; small enough that a killed run loses little, large enough for few objects
# Fault injection for the resume tests: "RANK:SHARDS:kill" kills RANK after it wrote SHARDS shards
FAULT_ENV = "BIGMERGE_FAULT_DAM_LOGITS"


def logits_fingerprint(cfg: DamConfig, sources: Sources) -> str:
    """Everything that decides the data set's bytes: sources, data files, tokenization, order, k, dtype."""
    h = hashlib.sha256(sources.fingerprint().encode())
    for m in cfg.models:
        p = Path(m.data)
        st = p.stat()
        h.update(f"{m.model}\0{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    keep = {
        "data": cfg.data.model_dump(mode="json"),
        "seed": cfg.training.seed,
        "top_k": cfg.loss.top_k,
        "dtype": cfg.training.dtype,
    }
    h.update(json.dumps(keep, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _open_group(url: str, mode: Literal["r", "r+", "w"]) -> Any:
    import zarr

    return zarr.open_group(store=url, mode=mode, zarr_format=3)


@dataclass
class LogitsDataset:
    """An opened data set: its group and attributes."""

    url: str
    group: Any
    attrs: dict[str, Any]

    @property
    def top_k(self) -> int:
        return int(self.attrs["top_k"])

    @property
    def max_length(self) -> int:
        return int(self.attrs["max_length"])

    @property
    def per_shard(self) -> int:
        return int(self.attrs["examples_per_shard"])

    def examples(self, k: int) -> int:
        return int(self.attrs["examples"][k])

    def shards(self, k: int) -> int:
        return math.ceil(self.examples(k) / self.per_shard)

    def done(self, k: int) -> np.ndarray:
        return np.asarray(self.group[f"{k}/done"][:], dtype=bool)

    def write_shard(
        self, k: int, shard: int, values: np.ndarray, indices: np.ndarray, lse: np.ndarray, lengths: np.ndarray
    ) -> None:
        lo = shard * self.per_shard
        hi = lo + len(lengths)
        g = self.group
        g[f"{k}/values"][lo:hi] = values
        g[f"{k}/indices"][lo:hi] = indices
        g[f"{k}/logsumexp"][lo:hi] = lse
        g[f"{k}/lengths"][lo:hi] = lengths
        g[f"{k}/done"][shard] = 1  # last: a shard without its flag is redone by a rerun

    def read(self, k: int, example: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One example's [width, top_k] values and indices (zeros past its length, as padding)."""
        w = min(width, self.max_length)
        v = torch.zeros((width, self.top_k))
        i = torch.zeros((width, self.top_k), dtype=torch.long)
        v[:w] = torch.from_numpy(np.asarray(self.group[f"{k}/values"][example, :w]))
        i[:w] = torch.from_numpy(np.asarray(self.group[f"{k}/indices"][example, :w]).astype(np.int64))
        return v, i


def open_dataset(url: str, fingerprint: str | None = None, mode: Literal["r", "r+"] = "r") -> LogitsDataset:
    """The finished or partial data set at url (mode r+ to write shards); ConfigError when there is
    none or it has other settings."""
    try:
        group = _open_group(url, mode)
    except (FileNotFoundError, KeyError, ValueError):
        raise ConfigError(f"{url}: no teacher-logits data set here; run `bigmerge dam logits CONFIG` first") from None
    attrs = dict(group.attrs)
    if attrs.get("format") != FORMAT:
        raise ConfigError(f"{url}: not a teacher-logits data set of bigmerge dam (format {attrs.get('format')!r})")
    if fingerprint is not None and attrs.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"{url}: teacher logits of other models, data or settings (fingerprint {attrs.get('fingerprint')}, "
            f"this config {fingerprint}); rerun `bigmerge dam logits` into another path or remove it"
        )
    return LogitsDataset(url, group, attrs)


def create_dataset(url: str, attrs: dict[str, Any], examples: list[int]) -> LogitsDataset:
    """The data set's group and empty arrays (rank 0, before any shard is written); an existing data
    set of the same fingerprint is opened as it is (a resume)."""
    try:
        return open_dataset(url, attrs["fingerprint"], "r+")
    except ConfigError as exc:
        if "no teacher-logits data set" not in str(exc):
            raise
    import zarr

    group = _open_group(url, "w")
    kk, length, per = attrs["top_k"], attrs["max_length"], attrs["examples_per_shard"]
    for k, n in enumerate(examples):
        shard = min(per, n)
        sub = group.create_group(str(k))
        # per token: top_k float32 values and int32 indices, a float32 log-sum-exp; one inner chunk an example
        for name, tail, dtype, compress in (
            ("values", (length, kk), "float32", False),  # logits do not compress
            ("indices", (length, kk), "int32", True),
            ("logsumexp", (length,), "float32", False),
        ):
            sub.create_array(
                name,
                shape=(n, *tail),
                shards=(shard, *tail),
                chunks=(1, *tail),
                dtype=dtype,
                fill_value=0,
                **({} if compress else {"compressors": None}),
            )
        sub.create_array("lengths", shape=(n,), shards=(shard,), chunks=(shard,), dtype="int32", fill_value=0)
        sub.create_array("done", shape=(math.ceil(n / per),), chunks=(1,), dtype="uint8", fill_value=0)
    group.attrs.update({**attrs, "examples": list(examples)})  # last: a group with attributes is complete
    del zarr
    return LogitsDataset(url, group, dict(group.attrs))


def dataset_bytes(examples: list[int], length: int, top_k: int) -> int:
    """Uncompressed size: float32 values and int32 indices per token and k, a float32 log-sum-exp per token."""
    return sum(n * length * (top_k * 8 + 4) + n * 4 for n in examples)


# ---------------------------------------------------------------------------- the command


@dataclass
class LogitsOptions:
    quiet: bool = False
    examples_per_shard: int = EXAMPLES_PER_SHARD  # a new data set's shard size (a resumed one keeps its own)


def _fault_after(rank: int) -> int | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    r, shards, _ = spec.split(":")
    return int(shards) if int(r) == rank else None


def _one_source(ref: str) -> Sources:
    return open_sources([ref])


@torch.no_grad()
def top_logits(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, indices, log-sum-exp) of logits z [B, T, V] in float32, as `TopkTeachers` takes them."""
    z = z.float()
    v, i = z.topk(min(k, z.shape[-1]), dim=-1)
    return v, i, torch.logsumexp(z, dim=-1)


def compute_logits(cfg: DamConfig, opts: LogitsOptions) -> dict[str, Any]:
    """Write (or complete) the data set; returns a summary (on every rank)."""
    from bigmerge.dam.train import batch_of, begin, buffers_to, import_deepspeed, zero_stage

    device, sources, data, pads, rank, world, say = begin(cfg, opts.quiet, "bigmerge dam logits")
    t = cfg.training
    url = cfg.logits_url()
    examples = [len(d) for d in data]
    per = opts.examples_per_shard
    if per < 1:
        raise ConfigError(f"--examples-per-shard must be at least 1, not {per}")
    fingerprint = logits_fingerprint(cfg, sources)
    attrs: dict[str, Any] = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "top_k": cfg.loss.top_k,
        "max_length": cfg.data.max_length,
        "examples_per_shard": per,
        "models": [m.model for m in cfg.models],
        "data": [m.data for m in cfg.models],
        "dtype": t.dtype,
    }
    params = sum(math.prod(s) for s in sources.tensors.values())
    tokens = [sum(len(x) for x in d) for d in data]
    size = dataset_bytes(examples, cfg.data.max_length, cfg.loss.top_k)
    say(
        f"{len(data)} sources x {', '.join(map(str, examples))} examples ({sum(tokens):,} tokens), top-{cfg.loss.top_k}: "
        f"{size / 1e9:.3f} GB into {url}; {2 * params * sum(tokens) / 1e12:.2f} TFLOP of forwards "
        f"({world} process(es), {device.type})"
    )
    if rank == 0:
        ds = create_dataset(url, attrs, examples)
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        ds = open_dataset(url, fingerprint, "r+")
    per = ds.per_shard  # a resumed data set keeps the shards it was made with
    # which shards are left, as rank 0 saw them before anyone wrote: the same list on every process
    todo = [[int(s) for s in np.flatnonzero(~ds.done(k))] for k in range(len(data))]
    if world > 1:
        box = [todo]
        torch.distributed.broadcast_object_list(box, src=0)
        todo = box[0]
    left = sum(len(x) for x in todo)
    total = sum(ds.shards(k) for k in range(len(data)))
    say(f"{total - left} of {total} shards already written; {left} to compute")

    dtype = torch.bfloat16 if t.dtype == "bfloat16" else torch.float32
    frozen = Coefficients(linear=False, biases=False)  # a one-source model: no coefficient trains
    kill_after = _fault_after(rank)
    written = 0
    t0 = time.perf_counter()
    done_tokens = 0
    for k, shards in enumerate(todo):
        if not shards:
            continue
        t_src = time.perf_counter()
        one = _one_source(sources.refs[k])
        engine: Any
        if t.engine == "deepspeed":
            deepspeed = import_deepspeed()
            ds_config = cfg.deepspeed_config(1)
            ds_config["zero_optimization"].pop("offload_optimizer", None)
            partition = deepspeed.zero.Init(config_dict_or_path=ds_config) if zero_stage(ds_config) == 3 else None
            model = build_dam_model(one, frozen, dtype, t.seed, partition)
            buffers_to(model.module, device)
            engine = deepspeed.initialize(model=model.module, config=ds_config)[0]
        else:
            model = build_dam_model(one, frozen, dtype, t.seed)
            model.module.to(device)
            engine = model.module
        model.set_teacher(0)
        say(f"source {k} ({sources.refs[k]}): {len(shards)} shards ({time.perf_counter() - t_src:.1f} s to load)")
        batches = math.ceil(per / t.batch_size)  # forwards per shard: the same on every process (ZeRO-3)
        rounds = math.ceil(len(shards) / world)
        for r in range(rounds):
            j = r * world + rank
            shard = shards[j] if j < len(shards) else None
            lo = (shard or 0) * per
            rows = list(range(lo, min(lo + per, examples[k]))) if shard is not None else []
            vals = np.zeros((len(rows), cfg.data.max_length, cfg.loss.top_k), dtype=np.float32)
            idx = np.zeros(vals.shape, dtype=np.int32)
            lse = np.zeros((len(rows), cfg.data.max_length), dtype=np.float32)
            lengths = np.zeros(len(rows), dtype=np.int32)
            for b in range(batches):
                chunk = rows[b * t.batch_size : (b + 1) * t.batch_size]
                if not chunk:  # keep step with the other processes: ZeRO-3 gathers in every forward
                    engine(input_ids=torch.full((1, 1), pads[k], device=device), use_cache=False)
                    continue
                ids, mask = batch_of([data[k][i] for i in chunk], 0, 0, 1, len(chunk), pads[k])
                z = engine(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
                v, i, s = top_logits(z, cfg.loss.top_k)
                for jj, row in enumerate(chunk):
                    n = int(mask[jj].sum())
                    at = row - lo
                    vals[at, :n], idx[at, :n], lse[at, :n] = v[jj, :n].cpu(), i[jj, :n].cpu(), s[jj, :n].cpu()
                    lengths[at] = n
                    done_tokens += n
            if shard is not None:
                ds.write_shard(k, shard, vals, idx, lse, lengths)
                written += 1
                if kill_after is not None and written >= kill_after:
                    import signal

                    os.kill(os.getpid(), signal.SIGKILL)
            el = time.perf_counter() - t0
            say(
                f"source {k}: {min((r + 1) * world, len(shards))}/{len(shards)} shards, "
                f"{done_tokens * world / max(el, 1e-9):,.0f} tokens/s"
            )
        del engine, model
    if world > 1:
        torch.distributed.barrier()
    missing = [k for k in range(len(data)) if not ds.done(k).all()]
    if missing:
        raise ConfigError(f"{url}: source {missing[0]}'s shards are not all written (a writer failed?); rerun")
    el = time.perf_counter() - t0
    say(f"done: {left} shards computed in {el:.1f} s; {url}")
    return {"url": url, "shards": total, "computed": left, "seconds": el, "bytes": size}


def run_logits(config_path: str, opts: LogitsOptions) -> int:
    from bigmerge.dam.config import load_dam_config

    compute_logits(load_dam_config(config_path), opts)
    return 0
