"""`bigmerge dam`: train the DAM coefficients, then write them and a merge config.

One optimizer step, as the paper states the loss:

    for each micro batch (gradient_accumulation of them):
        for each source k, on a batch of k's own data:
            z_k = source k alone (no grad)             # teacher logits, on the fly
            z   = the merged model                     # W = sum_i W_i diag(f(c_i)) in every layer
            loss = T^2 KL(softmax(z_k/T) || softmax(z/T)) over non-padding tokens + regularisers
            backward(loss)                             # DeepSpeed averages over the micro steps
    step()

so the gradient is that of mean_k KL_k + regularisers. Under DeepSpeed (the default) the model is
built inside `zero.Init`: every source weight is partitioned over the processes and offloaded to
the CPU as it is read; only the coefficients are trainable. `training.engine: torch` runs the
same loop in one process without DeepSpeed.

Launch with `deepspeed`, `torchrun` or `mpirun` (the rank comes from the launcher's
environment; gloo on the CPU, NCCL with GPUs), or as a plain command (one process).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bigmerge.dam.config import DamConfig, load_dam_config
from bigmerge.dam.data import as_text, model_name, read_texts
from bigmerge.dam.model import (
    DamModel,
    Sources,
    build_dam_model,
    coefficient_tensors,
    describe,
    distillation_loss,
    open_sources,
    regulariser,
    topk_distillation_loss,
)
from bigmerge.errors import ConfigError
from bigmerge.log import Log
from bigmerge.output.card import results_comment

STATE_FILE = "state.safetensors"
LATEST = "latest"


@dataclass
class DamOptions:
    merge_out: str | None = None  # also run `bigmerge merge` of the written config into this directory
    restart: bool = False  # ignore checkpoints in the output directory
    quiet: bool = False
    dry_run: bool = False
    overwrite: bool = False  # --merge: replace a finished merge at OUT
    world_size: int | None = None  # --dry-run: processes (GPUs) to plan for (default: the launcher's)
    gpu_memory: float | None = None  # --dry-run: GB per GPU
    arch: str | None = None  # --dry-run: a known architecture instead of the sources' headers


# ---------------------------------------------------------------------------- processes


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun / deepspeed or mpirun variables; (0, 1, 0) alone."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "OMPI_COMM_WORLD_RANK" in env:
        return (
            int(env["OMPI_COMM_WORLD_RANK"]),
            int(env["OMPI_COMM_WORLD_SIZE"]),
            int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
        )
    if "PMI_RANK" in env:
        return int(env["PMI_RANK"]), int(env["PMI_SIZE"]), int(env.get("MPI_LOCALRANKID", 0))
    return 0, 1, 0


def _device(cfg: DamConfig, local_rank: int) -> torch.device:
    want = cfg.training.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device is cuda, but torch sees no GPU")
    if want != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def import_deepspeed() -> Any:
    import warnings

    # torch 2.13 deprecates the collectives DeepSpeed calls, once per call
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401

    # The shared-memory comm op is a 50-85 s JIT build on the CPU; gloo does the same job here.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # type: ignore[attr-defined]
    return deepspeed


def _master_addr(rank: int, world: int) -> str:
    """Under mpirun on several nodes, rank 0's address (torchrun and deepspeed set MASTER_ADDR)."""
    if world > 1 and "OMPI_COMM_WORLD_RANK" in os.environ:
        import socket

        from mpi4py import MPI

        return str(MPI.COMM_WORLD.bcast(socket.gethostbyname(socket.gethostname()) if rank == 0 else None, root=0))
    return "127.0.0.1"


def _free_port() -> int:
    """A TCP port nobody listens on now (the kernel's pick), so two jobs on one node never collide."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _master_port(rank: int, world: int) -> int:
    """Rank 0's free port, broadcast over MPI under mpirun; a fixed port (29511 before) made a second
    job on the same node fail with EADDRINUSE."""
    if world > 1 and "OMPI_COMM_WORLD_RANK" in os.environ:
        from mpi4py import MPI

        return int(MPI.COMM_WORLD.bcast(_free_port() if rank == 0 else None, root=0))
    return _free_port()


def init_processes(cfg: DamConfig, device: torch.device) -> tuple[int, int]:
    rank, world, local_rank = dist_env()
    if cfg.training.engine == "torch":
        if world > 1:
            raise ConfigError("training.engine torch runs one process; use engine deepspeed for several")
        return 0, 1
    deepspeed = import_deepspeed()
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _master_addr(rank, world)
    if "MASTER_PORT" not in os.environ:  # torchrun and deepspeed set it; alone or under mpirun: a free one
        os.environ["MASTER_PORT"] = str(_master_port(rank, world))
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False, verbose=False
        )
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


# ---------------------------------------------------------------------------- data


def tokenize_sources(cfg: DamConfig, sources: Sources) -> list[list[list[int]]]:
    """Per source, its examples as token ids (its own tokenizer), shuffled once by the seed."""
    from transformers import AutoTokenizer

    out = []
    for k, m in enumerate(cfg.models):
        if not Path(m.data).is_file():
            raise ConfigError(f"{m.data}: data file of model {m.model} not found")
        texts = read_texts(m.data, cfg.data.max_examples)
        tok = AutoTokenizer.from_pretrained(sources.refs[k].removeprefix("file://"))
        # a chat template writes its own special tokens (<s> ...): the tokenizer adds none to it
        ids = [
            tok(
                as_text(t, tok, m.model, m.data),
                truncation=True,
                max_length=cfg.data.max_length,
                add_special_tokens=isinstance(t, str),
            )["input_ids"]
            for t in texts
        ]
        ids = [x for x in ids if len(x) >= 1]
        if not ids:
            raise ConfigError(f"{m.data}: no example has a token after tokenization")
        if cfg.data.shuffle:
            random.Random(f"{cfg.training.seed}/{k}").shuffle(ids)
        out.append(ids)
    return out


def pad_id(ref: str) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ref.removeprefix("file://"))
    for v in (tok.pad_token_id, tok.eos_token_id, 0):
        if v is not None:
            return int(v)
    return 0


def local_rows(n_examples: int, micro: int, rank: int, world: int, size: int) -> list[int]:
    """Micro step `micro`'s examples on `rank`, as indices into its share (rank, rank + world, ...), cycled."""
    n_local = len(range(rank, n_examples, world)) or n_examples
    return [(micro * size + j) % n_local for j in range(size)]


def batch_of(
    examples: list[int] | list[list[int]], micro: int, rank: int, world: int, size: int, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro step `micro`'s batch on `rank`: examples rank, rank + world, ... cycled, right-padded."""
    local = examples[rank::world] or examples
    rows = [local[i] for i in local_rows(len(examples), micro, rank, world, size)]
    width = max(len(r) for r in rows)
    ids = torch.full((size, width), pad, dtype=torch.long)
    mask = torch.zeros((size, width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r)
        mask[j, : len(r)] = 1
    return ids, mask


def micro_steps_per_epoch(data: list[list[list[int]]], world: int, batch: int) -> int:
    """The same on every process: the longest source's per-process examples over the batch size."""
    return max(math.ceil(math.ceil(len(d) / world) / batch) for d in data)


class TopkTeachers:
    """`loss.teacher: topk`: each source's top-k logits on every example of this process's share,
    computed once before training (the same number of forwards on every process, as ZeRO-3 needs)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.cache: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = []  # per source: row -> (values, indices)

    @torch.no_grad()
    def compute(
        self,
        engine: Any,
        model: DamModel,
        data: list[list[list[int]]],
        pads: list[int],
        rank: int,
        world: int,
        size: int,
        device: torch.device,
    ) -> None:
        for k, examples in enumerate(data):
            model.set_teacher(k)
            per: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            for chunk in range(math.ceil(math.ceil(len(examples) / world) / size)):
                rows = local_rows(len(examples), chunk, rank, world, size)
                ids, mask = batch_of(examples, chunk, rank, world, size, pads[k])
                z = engine(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
                v, i = z.float().topk(min(self.k, z.shape[-1]), dim=-1)
                for j, row in enumerate(rows):
                    n = int(mask[j].sum())
                    per.setdefault(row, (v[j, :n].cpu(), i[j, :n].cpu()))
            self.cache.append(per)
        model.set_teacher(None)

    def batch(self, k: int, rows: list[int], width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        kk = next(iter(self.cache[k].values()))[0].shape[-1]
        values = torch.zeros((len(rows), width, kk))
        indices = torch.zeros((len(rows), width, kk), dtype=torch.long)
        for j, row in enumerate(rows):
            v, i = self.cache[k][row]
            values[j, : len(v)], indices[j, : len(i)] = v, i
        return values.to(device), indices.to(device)


class DatasetTeachers:
    """`loss.teacher: dataset`: each source's top-k logits read from the data set of `bigmerge dam
    logits`, example by example (the same examples, in the same order, as this process trains on)."""

    def __init__(self, ds: Any, data: list[list[list[int]]], rank: int, world: int) -> None:
        for k, examples in enumerate(data):
            if ds.examples(k) != len(examples):
                raise ConfigError(
                    f"{ds.url}: {ds.examples(k)} examples of source {k}, the config gives {len(examples)}"
                )
            if not ds.done(k).all():
                raise ConfigError(f"{ds.url}: source {k}'s logits are not all written; rerun `bigmerge dam logits`")
        self.ds, self.data, self.rank, self.world = ds, data, rank, world
        self.k = ds.top_k

    def example_of(self, k: int, row: int) -> int:
        """The data set's index of row `row` of this process's share (examples rank, rank + world, ...)."""
        return self.rank + row * self.world if self.rank < len(self.data[k]) else row

    def batch(self, k: int, rows: list[int], width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        got = [self.ds.read(k, self.example_of(k, r), width) for r in rows]
        return torch.stack([v for v, _ in got]).to(device), torch.stack([i for _, i in got]).to(device)


def merged_step(
    engine: Any,
    model: DamModel,
    cfg: DamConfig,
    data: list[list[list[int]]],
    pads: list[int],
    teachers: DatasetTeachers,
    micro: int,
    rank: int,
    world: int,
    device: torch.device,
) -> tuple[float, float, int]:
    """One micro step on stored teachers: the N sources' batches side by side in one batch, one forward
    and one backward of the merged model; loss = mean_k KL_k + regularisers (the gradient of the
    per-source loop, whose N backward passes DeepSpeed averages). Returns (kl, loss, tokens)."""
    size = cfg.training.batch_size
    batches = [batch_of(data[k], micro, rank, world, size, pads[k]) for k in range(len(data))]
    width = max(ids.shape[1] for ids, _ in batches)
    ids = torch.cat([F.pad(b, (0, width - b.shape[1]), value=pads[k]) for k, (b, _) in enumerate(batches)])
    mask = torch.cat([F.pad(m, (0, width - m.shape[1])) for _, m in batches])
    ids, mask = ids.to(device), mask.to(device)
    z = engine(input_ids=ids, attention_mask=mask, use_cache=False).logits
    kls = []
    for k in range(len(data)):
        part = slice(k * size, (k + 1) * size)
        values, indices = teachers.batch(k, local_rows(len(data[k]), micro, rank, world, size), width, device)
        kls.append(topk_distillation_loss(values, indices, z[part], mask[part], cfg.loss.temperature))
    kd = torch.stack(kls).mean()
    loss = kd + regulariser(model.take_terms(), cfg.loss)
    engine.backward(loss)
    engine.step()
    return kd.item(), loss.detach().item(), int(mask.sum())


class TrainLog:
    """train-log.jsonl, one line per optimizer step, written as the step ends; a resumed run keeps the
    lines of the steps its checkpoint holds (steps after it, from a run that died, are redone)."""

    def __init__(self, path: Path, start: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if int(json.loads(line)["step"]) <= start:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a kill
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
        tmp.replace(path)
        self.path = path

    def append(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


# ---------------------------------------------------------------------------- engines


class TorchEngine:
    """DeepSpeed's engine interface (forward, backward, step) for one process without DeepSpeed."""

    def __init__(self, model: DamModel, lr: float, betas: tuple[float, float], wd: float, accumulation: int):
        self.module = model.module
        self.params = model.trainable()
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=lr, betas=betas, weight_decay=wd)
        self.accumulation = accumulation
        self.micro = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.accumulation == 0:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def full_values(self, model: DamModel) -> dict[str, torch.Tensor]:
        return {k: p.detach().float().clone() for k, p in model.coefficient_params().items()}

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.params.items():
            st = self.optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    out[f"{key}/{name}"] = st[key].detach().float().clone()
        return out

    def load(self, values: dict[str, torch.Tensor], state: dict[str, torch.Tensor], step: int) -> None:
        for name, p in self.params.items():
            with torch.no_grad():
                p.copy_(values[f"param/{name}"])
            if f"exp_avg/{name}" in state:
                self.optimizer.state[p] = {
                    "step": torch.tensor(float(step)),
                    "exp_avg": state[f"exp_avg/{name}"].clone(),
                    "exp_avg_sq": state[f"exp_avg_sq/{name}"].clone(),
                }


class DeepSpeedEngine:
    """deepspeed.initialize's engine, and the collective reads and writes of full coefficients."""

    def __init__(self, model: DamModel, cfg: DamConfig, ds_config: dict[str, Any]):
        deepspeed = import_deepspeed()
        self.params = model.trainable()
        t = cfg.training
        opt = torch.optim.AdamW(self.params.values(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model.module, optimizer=opt, model_parameters=list(self.params.values()), config=ds_config
        )
        self.module = self.engine.module
        self.deepspeed = deepspeed

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def full_values(self, model: DamModel) -> dict[str, torch.Tensor]:
        """Every coefficient, gathered (collective): fp32 master values of trainable ones."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in model.coefficient_params().items():
            if p.requires_grad:
                out[name] = safe_get_full_fp32_param(p).detach().float().clone()
            else:
                with self.deepspeed.zero.GatheredParameters([p]):
                    out[name] = p.detach().float().clone()
        return out

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_optimizer_state

        out = {}
        for name, p in self.params.items():
            for key in ("exp_avg", "exp_avg_sq"):
                v = safe_get_full_optimizer_state(p, key)
                if v is not None:
                    out[f"{key}/{name}"] = v.detach().float().clone()
        return out

    def load(self, values: dict[str, torch.Tensor], state: dict[str, torch.Tensor], step: int) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        zero = self.engine.optimizer
        inner = getattr(zero, "optimizer", None)
        if inner is not None:  # torch's AdamW makes its state at the first step: make it now, to fill in
            for flat in getattr(zero, "fp32_partitioned_groups_flat", []):
                if not inner.state.get(flat):
                    inner.state[flat] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(flat),
                        "exp_avg_sq": torch.zeros_like(flat),
                    }
        for name, p in self.params.items():
            # the optimizer's fp32 master copy, and the (offloaded) partition the forward gathers
            safe_set_full_fp32_param(p, values[f"param/{name}"])
            with self.deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if torch.distributed.get_rank() == 0:
                    p.data.copy_(values[f"param/{name}"].to(p.dtype))
            for key in ("exp_avg", "exp_avg_sq"):
                if f"{key}/{name}" in state:
                    safe_set_full_optimizer_state(p, state[f"{key}/{name}"], key)
        if inner is not None:  # Adam's bias correction counts steps: continue from the checkpoint's
            for st in inner.state.values():
                if "step" in st:
                    st["step"] = torch.full_like(torch.as_tensor(st["step"]), float(step))


# ---------------------------------------------------------------------------- checkpoints


def run_fingerprint(cfg: DamConfig, sources: Sources) -> str:
    import hashlib

    keep = cfg.model_dump(
        mode="json",
        exclude={
            "output": True,
            "merge": True,
            "training": {"log_every", "checkpoint_every", "max_steps", "epochs", "device"},
        },
    )
    return hashlib.sha256((json.dumps(keep, sort_keys=True) + sources.fingerprint()).encode()).hexdigest()[:16]


def save_checkpoint(out: Path, step: int, engine: Any, model: DamModel, fingerprint: str, rank: int) -> None:
    """Collective: every process gathers; rank 0 writes checkpoints/step-N/state.safetensors, then `latest`."""
    values = {f"param/{k}": v for k, v in engine.full_values(model).items()}
    state = engine.optimizer_state()
    if rank != 0:
        return
    from safetensors.torch import save_file

    d = out / "checkpoints" / f"step-{step:08d}"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / (STATE_FILE + ".tmp")
    save_file({**values, **state}, str(tmp), metadata={"step": str(step), "fingerprint": fingerprint})
    tmp.replace(d / STATE_FILE)
    latest = out / "checkpoints" / LATEST
    (out / "checkpoints" / "latest.tmp").write_text(d.name + "\n")
    (out / "checkpoints" / "latest.tmp").replace(latest)


def find_checkpoint(out: Path, fingerprint: str) -> tuple[int, dict[str, torch.Tensor]] | None:
    latest = out / "checkpoints" / LATEST
    if not latest.is_file():
        return None
    path = out / "checkpoints" / latest.read_text().strip() / STATE_FILE
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"{path}: a checkpoint of another DAM run (other models, data or settings); "
            "use --restart to train from the start, or another output directory"
        )
    return int(meta["step"]), load_file(str(path))


# ---------------------------------------------------------------------------- outputs


def write_outputs(cfg: DamConfig, sources: Sources, model: DamModel, values: dict[str, torch.Tensor]) -> Path:
    """coefficients/<i>-<model-name>.safetensors per source and merge.yaml; returns merge.yaml's path."""
    import yaml
    from safetensors.torch import save_file

    out = Path(cfg.output)
    (out / "coefficients").mkdir(parents=True, exist_ok=True)
    per_source = coefficient_tensors(model, values)
    files = []
    for i, ref in enumerate(sources.refs):
        f = out / "coefficients" / f"{i}-{model_name(ref)}.safetensors"
        tmp = f.with_suffix(".tmp")
        save_file(per_source[i], str(tmp), metadata={"model": ref, "activation": cfg.coefficients.activation})
        tmp.replace(f)
        files.append(f)
    merge = {
        "merge_method": "dam",
        "models": [
            {"model": ref, "parameters": {"coefficients": str(f.resolve())}} for ref, f in zip(sources.refs, files)
        ],
        "dtype": cfg.merge.dtype,
    }
    if cfg.merge.out_dtype:
        merge["out_dtype"] = cfg.merge.out_dtype
    path = out / "merge.yaml"
    path.write_text(
        "# written by `bigmerge dam`: the merged model is sum_i W_i diag(a_i), a_i in each coefficients file\n"
        + results_comment(dam_results(cfg, sources, out / "train-log.jsonl"))
        + yaml.safe_dump(merge, sort_keys=False)
    )
    return path


def dam_results(cfg: DamConfig, sources: Sources, train_log: Path) -> str:
    """How the coefficients were obtained and how far the loss fell (train-log.jsonl: every step,
    across resumes), for the model card of the merge (markdown)."""
    from bigmerge.output.card import public_name

    steps = []
    for line in train_log.read_text(encoding="utf-8").splitlines() if train_log.is_file() else []:
        try:
            steps.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    lo, t = cfg.loss, cfg.training
    teacher = {
        "online": "computed at every step",
        "topk": f"top-{lo.top_k} logits",
        "dataset": f"top-{lo.top_k} logits, stored",
    }
    regs = ", ".join(
        f"{k} {getattr(lo, k):g}" for k in ("similarity", "l1", "l2", "entropy", "overlap") if getattr(lo, k)
    )
    lines = [
        "Coefficients trained by `bigmerge dam` (DAM: the merge W = sum_i W_i diag(f(c_i)) distilled from each "
        "source on its own data): loss T² KL(source || merge) at temperature "
        f"{lo.temperature:g}, teachers {teacher[lo.teacher]}" + (f", plus {regs}" if regs else "") + "; "
        f"lr {t.lr:g}, {t.batch_size} example(s) per source per micro step, {t.gradient_accumulation} micro step(s) "
        f"per step, at most {t.max_steps or 'all'} step(s), {t.epochs:g} epoch(s), seed {t.seed}.",
        "",
        "Data: "
        + ", ".join(f"{public_name(ref)}: {public_name(m.data)}" for ref, m in zip(sources.refs, cfg.models))
        + ".",
    ]
    if steps:
        first, last = steps[0], steps[-1]
        lines += [
            "",
            "| | step | KL | loss |",
            "|---|---|---|---|",
            f"| first step | {first['step']} | {first['kl']:.5f} | {first['loss']:.5f} |",
            f"| final step | {last['step']} | {last['kl']:.5f} | {last['loss']:.5f} |",
            "",
            f"{last['step']} optimizer steps; final loss {last['loss']:.5f} (KL {last['kl']:.5f}).",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the loop


def begin(
    cfg: DamConfig, quiet: bool, prefix: str
) -> tuple[torch.device, Sources, list[list[list[int]]], list[int], int, int, Callable[[str], None]]:
    """What training and `dam logits` both begin with: the device, the checked sources, the
    tokenized data, pad ids, then the processes joined (rank, world) and rank 0's progress printer."""
    _, _, local_rank = dist_env()
    device = _device(cfg, local_rank)
    sources = open_sources([m.model for m in cfg.models])
    data = tokenize_sources(cfg, sources)
    pads = [pad_id(r) for r in sources.refs]
    rank, world = init_processes(cfg, device)

    return device, sources, data, pads, rank, world, Log(prefix, rank=rank, quiet=quiet)


def buffers_to(module: torch.nn.Module, device: torch.device) -> None:
    """Buffers (rotary frequencies) onto the device: ZeRO-3 partitions parameters, not buffers."""
    for mod in module.modules():
        for key, buf in list(mod._buffers.items()):
            if buf is not None:
                mod._buffers[key] = buf.to(device)


@dataclass
class TrainResult:
    model: DamModel
    history: list[dict[str, float]]  # per optimizer step of this run: kl, loss
    merge_yaml: Path | None  # on rank 0


def train(cfg: DamConfig, opts: DamOptions) -> TrainResult:
    """Train, then write coefficients and merge.yaml (rank 0)."""
    device, sources, data, pads, rank, world, log = begin(cfg, opts.quiet, "bigmerge dam")

    n = len(cfg.models)
    t = cfg.training
    per_epoch = micro_steps_per_epoch(data, world, t.batch_size)
    total_micro = max(1, math.ceil(per_epoch * t.epochs))
    total_steps = math.ceil(total_micro / t.gradient_accumulation)
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)
    dtype = torch.bfloat16 if t.dtype == "bfloat16" else torch.float32
    fingerprint = run_fingerprint(cfg, sources)

    stored = None
    if cfg.loss.teacher == "dataset":  # before building: a missing or stale data set is known now
        from bigmerge.dam.logits import logits_fingerprint, open_dataset

        ds = open_dataset(cfg.logits_url(), logits_fingerprint(cfg, sources))
        stored = DatasetTeachers(ds, data, rank, world)
    # micro steps per optimizer step: one per source (teachers in the loop) or one for all (data set)
    micro_per_step = t.gradient_accumulation * (1 if stored is not None else n)
    partition = None
    ds_config = None
    gathers = None
    if t.engine == "deepspeed":
        deepspeed = import_deepspeed()
        from bigmerge.dam.gathers import install

        gathers = install()
        ds_config = cfg.deepspeed_config(micro_per_step)
        # dtype comes from the config's bf16 switch: an explicit dtype= is misread on CPUs
        # (DeepSpeed 0.19 evaluates `dtype or fp16 if fp16_supported else bf16`, i.e. bf16 here)
        partition = deepspeed.zero.Init(config_dict_or_path=ds_config) if zero_stage(ds_config) == 3 else None
    t0 = time.perf_counter()
    model = build_dam_model(sources, cfg.coefficients, dtype, t.seed, partition)
    if not model.trainable():
        raise ConfigError("no trainable coefficients: enable coefficients.linear, biases, embeddings or norms")
    if t.activation_checkpointing:
        hf: Any = model.module  # a transformers PreTrainedModel
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers 5's name
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # transformers recomputes only in training mode; dropout stays off, as in eval mode
        hf.train()
        for mod in hf.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
            if isinstance(getattr(mod, "attention_dropout", None), float):
                mod.attention_dropout = 0.0
    engine: Any
    if t.engine == "deepspeed":
        assert ds_config is not None
        buffers_to(model.module, device)
        engine = DeepSpeedEngine(model, cfg, ds_config)
        assert gathers is not None
        gathers.name_sources(model.module)
    else:
        model.module.to(device)
        engine = TorchEngine(model, t.lr, t.betas, t.weight_decay, micro_per_step)
    log(
        f"{n} models, {describe(model)}; {world} process(es), engine {t.engine}, {device.type}; "
        f"{total_steps} steps of {t.gradient_accumulation} x "
        + (
            f"1 micro batch of {n} x {t.batch_size} (stored teachers)"
            if stored
            else f"{n} micro batches of {t.batch_size}"
        )
        + f" ({time.perf_counter() - t0:.1f} s to build)"
    )

    out = Path(cfg.output)
    start = 0
    found = None if opts.restart else find_checkpoint(out, fingerprint)
    if found is not None:
        start, state = found
        engine.load(state, state, start)
        log(f"resumed from step {start} ({out / 'checkpoints'})")

    teachers: TopkTeachers | DatasetTeachers | None = stored
    if cfg.loss.teacher == "topk":
        t1 = time.perf_counter()
        teachers = TopkTeachers(cfg.loss.top_k)
        teachers.compute(engine, model, data, pads, rank, world, t.batch_size, device)
        log(f"teachers' top-{cfg.loss.top_k} logits computed ({time.perf_counter() - t1:.1f} s)")

    history = []
    train_log = TrainLog(out / "train-log.jsonl", start) if rank == 0 else None
    t_log, tokens = time.perf_counter(), 0
    for step in range(start, total_steps):
        t_step = time.perf_counter()
        gathered0 = gathers.snapshot() if gathers is not None else (0, 0)
        losses = []
        for acc in range(t.gradient_accumulation):
            micro = step * t.gradient_accumulation + acc
            if isinstance(teachers, DatasetTeachers):
                # every source's batch in one forward and one backward: each source gathered once each way
                kd, loss, n_tok = merged_step(engine, model, cfg, data, pads, teachers, micro, rank, world, device)
                losses.append((kd, loss))
                tokens += n_tok
                continue
            for k in range(n):
                ids, mask = batch_of(data[k], micro, rank, world, t.batch_size, pads[k])
                ids, mask = ids.to(device), mask.to(device)
                if teachers is None:
                    with torch.no_grad():
                        model.set_teacher(k)
                        z_k = engine(input_ids=ids, attention_mask=mask, use_cache=False).logits
                    model.set_teacher(None)
                z = engine(input_ids=ids, attention_mask=mask, use_cache=False).logits
                if teachers is None:
                    kd_t = distillation_loss(z_k, z, mask, cfg.loss.temperature)
                else:
                    rows = local_rows(len(data[k]), micro, rank, world, t.batch_size)
                    values, indices = teachers.batch(k, rows, ids.shape[1], device)
                    kd_t = topk_distillation_loss(values, indices, z, mask, cfg.loss.temperature)
                loss_t = kd_t + regulariser(model.take_terms(), cfg.loss)
                engine.backward(loss_t)
                engine.step()
                losses.append((kd_t.item(), loss_t.detach().item()))
                tokens += int(mask.sum())
        kd_mean = sum(x[0] for x in losses) / len(losses)
        loss_mean = sum(x[1] for x in losses) / len(losses)
        entry: dict[str, Any] = {
            "step": step + 1,
            "kl": kd_mean,
            "loss": loss_mean,
            "step_s": round(time.perf_counter() - t_step, 4),
        }
        if gathers is not None:  # what ZeRO-3 gathered in this process during the step
            entry["gathered_bytes"] = gathers.snapshot()[0] - gathered0[0]
            entry["gathers"] = gathers.snapshot()[1] - gathered0[1]
        history.append(entry)
        if train_log is not None:
            train_log.append(entry)
        done = step + 1
        if done % t.log_every == 0 or done == total_steps or done == start + 1:
            now = time.perf_counter()
            rate = tokens * world / max(now - t_log, 1e-9)
            log(f"step {done}/{total_steps}  loss {loss_mean:.5f}  kl {kd_mean:.5f}  {rate:,.0f} tokens/s")
            t_log, tokens = now, 0
        if done % t.checkpoint_every == 0 or done == total_steps:
            save_checkpoint(out, done, engine, model, fingerprint, rank)
    values = engine.full_values(model)  # collective
    merge_yaml = None
    if rank == 0:
        merge_yaml = write_outputs(cfg, sources, model, values)
        log(f"coefficients and {merge_yaml} written")
    if world > 1:
        torch.distributed.barrier()
    return TrainResult(model, history, merge_yaml)


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def run_dam(config_path: str, opts: DamOptions) -> int:
    cfg = load_dam_config(config_path)
    if opts.dry_run:
        from bigmerge.dam.scale import dry_run

        return dry_run(cfg, opts)
    train(cfg, opts)
    if opts.merge_out:
        from bigmerge.engine.comm import SerialComm, get_comm, launched_by_mpi
        from bigmerge.merge import MergeOptions, run_merge

        # under mpirun the same processes merge together; under torchrun / deepspeed rank 0 alone
        if launched_by_mpi():
            comm: Any = get_comm()
        elif dist_env()[0] == 0:
            comm = SerialComm()
        else:
            return 0
        merge_yaml = Path(cfg.output) / "merge.yaml"
        if not opts.overwrite and merged_already(merge_yaml, opts.merge_out):
            if comm.rank == 0 and not opts.quiet:
                print(
                    f"bigmerge dam: {opts.merge_out} already holds this run's finished merge; nothing to do",
                    file=sys.stderr,
                    flush=True,
                )
            return 0
        run_merge(str(merge_yaml), opts.merge_out, comm, MergeOptions(quiet=opts.quiet, overwrite=opts.overwrite))
        if comm.rank == 0:
            record_merge(merge_yaml, opts.merge_out)
    return 0


MERGED_FILE = "merged.json"  # beside merge.yaml: which OUT holds the merge of which merge.yaml


def _merge_record(merge_yaml: Path, out: str) -> dict[str, str] | None:
    """What a finished merge of merge_yaml at out looks like: digests of the config with its
    coefficients and of OUT's manifest."""
    import hashlib

    from bigmerge.output.export import MANIFEST_NAME
    from bigmerge.storage.fs import location

    manifest = location(out).join(MANIFEST_NAME)
    if not manifest.exists():
        return None
    from safetensors import safe_open

    # merge.yaml names the coefficient files; their tensors are what a new training step changes (their
    # bytes are not enough: safetensors writes the metadata's keys in a random order)
    digest = hashlib.sha256(merge_yaml.read_bytes())
    for f in sorted((merge_yaml.parent / "coefficients").glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in sorted(st.keys()):
                digest.update(name.encode() + st.get_tensor(name).numpy().tobytes())
    return {
        "out": location(out).url,
        "merge_sha256": digest.hexdigest(),
        "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
    }


def merged_already(merge_yaml: Path, out: str) -> bool:
    """True when OUT holds the finished merge that this run's merge.yaml (these coefficients) gave."""
    marker = merge_yaml.parent / MERGED_FILE
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == _merge_record(merge_yaml, out)
    except ValueError:
        return False


def record_merge(merge_yaml: Path, out: str) -> None:
    record = _merge_record(merge_yaml, out)
    if record is not None:
        tmp = merge_yaml.parent / (MERGED_FILE + ".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(merge_yaml.parent / MERGED_FILE)


__all__ = ["DamOptions", "TrainResult", "run_dam", "train"]
