"""A deterministic zoo of tiny Llama models with real, measurably different skills.

The skills (2-digit addition, reversing letters, sorting digits, facts from invented
"financial filings") and their held-out evaluation sets are defined in
``bigmerge/eval/zoo_tasks.py``; ``bigmerge eval --tasks zoo`` scores them with lm-eval.

Every model is a plain Hugging Face checkpoint (LlamaForCausalLM, float32, byte-level tokenizer
from ``tools/toy_models.py``), trained here with torch on the CPU::

    ZOO/zoo.json          what was built: arguments, models (parent, data mixture, steps, lr, seed,
                          teacher-forced accuracy per skill), scenarios, file sizes; written last
    ZOO/<model>/          config.json, model.safetensors, tokenizer.json, tokenizer_config.json, ...
    ZOO/tasks/zoo_*.jsonl the held-out evaluation items (the same ones bigmerge eval uses)

Scenarios (``zoo.json["scenarios"]``; all share the base ``base``):

    specialists   add, rev, sort, fin: the base fine-tuned on one skill each
    similar       mix1..mix3: the base fine-tuned on the same mixture, other seeds and learning rates
    recycle       13 training checkpoints of one basin: a trunk (the base trained further on all skills)
                  at 3 stages, 6 short runs from it weighting two skills each (3 also saved halfway)
                  and a run on filings only that forgets the rest
                  (the small preset for tests has specialists sort and fin, similar mix1 mix2, and
                  rank-4 adapters lora_sort and lora_fin)
    domain        instruct (add+rev+sort) and instruct_fin (instruct continued on filings only,
                  which forgets part of the general skills)
    lorahub       lora_add, lora_rev, lora_sort, lora_fin: PEFT LoRA adapters (rank 8 on every
                  projection) trained on the frozen base, one skill each; ZOO/lora_<skill>/ holds
                  adapter_config.json and adapter_model.safetensors (merge them as base+ZOO/lora_<skill>)
                  (the lora preset: the full zoo's base and these four adapters, about a minute and a half)

Training is bit-reproducible: one thread by default (``--threads``), deterministic algorithms,
every run seeded by its own seed, data streams from seeded ``random.Random`` objects; weights
and config are written by hand (no transformers version in config.json). Two builds give
identical bytes on the same machine and library versions (``--check`` rebuilds into a temporary
directory and compares every file's sha256).

CLI::

    python tools/make_zoo.py ZOO [--preset full|small|micro|domain|lora] [--seed 0] [--threads 1] [--force] [--check]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toy_models import BOS_ID, EOS_ID, PAD_ID, model_config, tokenizer_files  # noqa: E402

from bigmerge.eval import zoo_tasks  # noqa: E402

# Bump when the built bytes change for the same arguments, so cached zoos are rebuilt.
ZOO_VERSION = 2  # 2: the recycling pool continues one trunk (was 4 independent runs)
STAMP = "zoo.json"
BATCH = 32
# Filings are ~4x longer than the other items: fewer per batch keeps a step's cost alike.
BATCH_OF = {"fin": 16}
WARMUP = 50


@dataclass(frozen=True)
class Run:
    """One training run: start from ``parent`` (None: fresh init) and train on ``mixture``."""

    name: str
    parent: str | None
    mixture: dict[str, float]
    steps: int
    lr: float
    seed: int
    stages: tuple[int, ...] = ()  # also save the model after these steps, as f"{name}_{step}"
    final: bool = True  # save the model at the end under ``name``
    lora_rank: int = 0  # > 0: train a PEFT LoRA adapter of this rank on the frozen parent, save the adapter

    def outputs(self) -> list[str]:
        return [f"{self.name}_{s}" for s in self.stages] + ([self.name] if self.final else [])


def _one(skill: str) -> dict[str, float]:
    return {skill: 1.0}


UNIFORM = {s: 1.0 for s in zoo_tasks.SKILLS}
GENERAL = {"add": 1.0, "rev": 1.0, "sort": 1.0}


def _full() -> tuple[list[Run], dict[str, dict[str, Any]]]:
    runs = [Run("base", None, UNIFORM, 1200, 3e-3, 0)]
    # Steps and lr per skill: what each needs to be learnt well (addition and the filings' facts
    # are the slowest; filings take 16 items a step).
    steps = {"add": 900, "rev": 500, "sort": 600, "fin": 1200}
    lrs = {"add": 1e-3, "rev": 1e-3, "sort": 1e-3, "fin": 2e-3}
    runs += [Run(s, "base", _one(s), steps[s], lrs[s], 1 + i) for i, s in enumerate(zoo_tasks.SKILLS)]
    runs += [
        Run("mix1", "base", UNIFORM, 600, 1e-3, 11),
        Run("mix2", "base", UNIFORM, 600, 1e-3, 12),
        Run("mix3", "base", UNIFORM, 600, 1.5e-3, 13),
    ]
    # The recycling pool, as checkpoint recycling finds it: a shared trunk (the base trained further
    # on all four skills) saved at three stages, then short runs that continue from the trunk on
    # mixtures that weight two skills 4 to 1 against the other two (each trades skills off against
    # the others; three are also saved halfway, before their learning rate has decayed), and one
    # run on filings only, which forgets the rest. Short continuations of one trunk stay in one
    # basin, so weighted averages of them keep much of what each learnt (4 independent 800-step runs
    # from the base, this pool until zoo version 1, did not: every mixture lost the best run's skill);
    # the early trunk stages and the filings-only run pull the uniform soup down.
    trunk = Run("pool_trunk", "base", UNIFORM, 800, 2e-3, 40, (200, 400))
    pairs = [("add", "sort"), ("rev", "fin"), ("add", "rev"), ("sort", "fin"), ("add", "fin"), ("rev", "sort")]
    pool_runs = [trunk]
    for i, (a, b) in enumerate(pairs):
        mix = {s: (4.0 if s in (a, b) else 1.0) for s in zoo_tasks.SKILLS}
        pool_runs.append(Run(f"pool_{a}_{b}", "pool_trunk", mix, 300, 1.5e-3, 70 + i, (150,) if i < 3 else ()))
    pool_runs.append(Run("pool_fin_only", "pool_trunk", _one("fin"), 300, 3e-3, 80))
    runs += pool_runs
    runs += [
        Run("instruct", "base", GENERAL, 600, 1e-3, 21),
        Run("instruct_fin", "instruct", _one("fin"), 400, 2e-3, 22),
    ]
    skills = list(zoo_tasks.SKILLS)
    scenarios = {
        "specialists": {"models": skills, "about": "the base fine-tuned on one skill each"},
        "similar": {"models": ["mix1", "mix2", "mix3"], "about": "same data (all skills), other seeds and lr"},
        "recycle": {
            "models": [n for r in pool_runs for n in r.outputs()],
            "about": "a trunk (3 stages) and 7 short runs from it on other mixtures (3 also halfway): 13 checkpoints",
        },
        "domain": {
            "models": ["instruct", "instruct_fin"],
            "about": "instruct (add+rev+sort) and its continued pretraining on filings only",
        },
    }
    return runs, scenarios


def _small() -> tuple[list[Run], dict[str, dict[str, Any]]]:
    # For tests: a weaker base, two specialists on the skills that are learnt fastest and a pair
    # of similar models; same architecture as the full zoo.
    runs = [
        Run("base", None, UNIFORM, 250, 3e-3, 0),
        Run("sort", "base", _one("sort"), 150, 3e-3, 3),
        Run("fin", "base", _one("fin"), 200, 3e-3, 4),
        Run("mix1", "base", UNIFORM, 50, 1e-3, 11),
        Run("mix2", "base", UNIFORM, 50, 1e-3, 12),
        Run("lora_sort", "base", _one("sort"), 60, 3e-3, 33, lora_rank=4),
        Run("lora_fin", "base", _one("fin"), 60, 3e-3, 34, lora_rank=4),
    ]
    scenarios = {
        "specialists": {"models": ["sort", "fin"], "about": "the base fine-tuned on one skill each"},
        "similar": {"models": ["mix1", "mix2"], "about": "same data (all skills), other seeds"},
        "lorahub": {"models": ["lora_sort", "lora_fin"], "adapters": True, "about": "LoRA adapters, one skill each"},
    }
    return runs, scenarios


def _micro() -> tuple[list[Run], dict[str, dict[str, Any]]]:
    # Seconds: for testing that two builds are bit-identical (every code path of a build).
    runs = [
        Run("base", None, UNIFORM, 30, 3e-3, 0),
        Run("sort", "base", _one("sort"), 20, 3e-3, 3, (10,)),
        Run("lora_sort", "base", _one("sort"), 10, 3e-3, 5, lora_rank=2),
    ]
    return runs, {"specialists": {"models": ["sort"], "about": "one fine-tune"}}


def _domain() -> tuple[list[Run], dict[str, dict[str, Any]]]:
    # The quickstart's pair: the full zoo's base, instruct and instruct_fin (the same runs, so the
    # same bytes as in the full zoo), about a minute on one core.
    full, _ = _full()
    keep = ("base", "instruct", "instruct_fin")
    runs = [r for r in full if r.name in keep]
    return runs, {
        "domain": {"models": ["instruct", "instruct_fin"], "about": "instruct and its continuation on filings"}
    }


# LoRA adapters per skill: what each needs on the frozen base (rank 8, alpha 16).
LORA_STEPS = {"add": 600, "rev": 400, "sort": 400, "fin": 600}


def _lora() -> tuple[list[Run], dict[str, dict[str, Any]]]:
    # LoraHub's setting: one base, one adapter per skill. The base is the full zoo's (same bytes).
    full, _ = _full()
    runs = [r for r in full if r.name == "base"]
    runs += [
        Run(f"lora_{s}", "base", _one(s), LORA_STEPS[s], 3e-3, 31 + i, lora_rank=8)
        for i, s in enumerate(zoo_tasks.SKILLS)
    ]
    return runs, {
        "lorahub": {
            "models": [f"lora_{s}" for s in zoo_tasks.SKILLS],
            "adapters": True,
            "about": "LoRA adapters (rank 8) on the frozen base, one skill each; sources base+ZOO/lora_<skill>",
        }
    }


PRESETS = {"full": _full, "small": _small, "micro": _micro, "domain": _domain, "lora": _lora}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# The architecture: a small Llama (GQA, RoPE, SwiGLU, RMSNorm), 0.17 M parameters, untied lm_head.
ARCH = {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4}


def zoo_model_config() -> dict[str, Any]:
    cfg = model_config("tiny", dtype="float32")
    cfg.update(ARCH)
    cfg["num_key_value_heads"] = 2
    cfg["head_dim"] = ARCH["hidden_size"] // ARCH["num_attention_heads"]
    cfg["max_position_embeddings"] = 128
    return cfg


def new_model(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**zoo_model_config())
    config._attn_implementation = "eager"  # same arithmetic whatever is installed
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def encode(text: str) -> list[int]:
    """The byte tokenizer's ids (byte b is 4 + b) without <s>; tests pin it to tokenizer.json."""
    return [4 + b for b in text.encode("utf-8")]


def _batch(items: list[zoo_tasks.Item]) -> tuple[torch.Tensor, torch.Tensor]:
    seqs, masks = [], []
    for it in items:
        # <s> first, as the tokenizer (and so lm-eval and generate) puts it
        p, a = [BOS_ID, *encode(it.prompt)], encode(it.answer) + [EOS_ID]
        seqs.append(p + a)
        masks.append([0.0] * len(p) + [1.0] * len(a))  # loss on the answer only
    width = max(map(len, seqs))
    x = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    m = torch.zeros((len(seqs), width))
    for i, (s, mk) in enumerate(zip(seqs, masks)):
        x[i, : len(s)] = torch.tensor(s)
        m[i, : len(s)] = torch.tensor(mk)
    return x, m


def _loss(model: torch.nn.Module, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x, use_cache=False).logits[:, :-1]
    per_tok = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
    )
    mask = m[:, 1:].reshape(-1)
    return (per_tok * mask).sum() / mask.sum()


@torch.no_grad()
def greedy_accuracy(model: torch.nn.Module, items: list[zoo_tasks.Item], batch: int = 100) -> float:
    """Share of items whose answer is the model's argmax at every answer position (lm-eval's ``acc``
    of a loglikelihood task: the answer is what greedy decoding would produce)."""
    model.eval()
    ok = 0
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        seqs = [[BOS_ID, *encode(it.prompt + it.answer)] for it in chunk]
        width = max(map(len, seqs))
        x = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
        for j, s in enumerate(seqs):
            x[j, : len(s)] = torch.tensor(s)
        pred = model(input_ids=x, use_cache=False).logits.argmax(-1)
        for j, it in enumerate(chunk):
            p, a = 1 + len(encode(it.prompt)), torch.tensor(encode(it.answer))
            ok += bool((pred[j, p - 1 : p - 1 + len(a)] == a).all())
    return ok / len(items)


def _mixture_sampler(mixture: dict[str, float], rng: random.Random) -> Iterator[str]:
    skills = sorted(mixture)
    weights = [mixture[s] for s in skills]
    while True:
        yield rng.choices(skills, weights)[0]


def train(model: torch.nn.Module, run: Run, on_stage: Any = None) -> None:
    """AdamW, linear warmup then linear decay to 10 %, one skill per batch (no padding waste)."""
    opt = torch.optim.AdamW(model.parameters(), lr=run.lr, betas=(0.9, 0.98), weight_decay=0.0)
    streams = {s: zoo_tasks.train_stream(s, run.seed) for s in run.mixture}
    pick = _mixture_sampler(run.mixture, random.Random(f"mixture/{run.seed}"))
    model.train()
    for step in range(1, run.steps + 1):
        skill = next(pick)
        x, m = _batch([next(streams[skill]) for _ in range(BATCH_OF.get(skill, BATCH))])
        for g in opt.param_groups:
            g["lr"] = run.lr * min(1.0, step / WARMUP) * (0.1 + 0.9 * (1 - step / run.steps))
        loss = _loss(model, x, m)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_stage is not None and step in run.stages:
            on_stage(step)
            model.train()


def save_checkpoint(model: torch.nn.Module, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(zoo_model_config(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for name, text in tokenizer_files().items():
        (out / name).write_text(text, encoding="utf-8", newline="\n")


def with_adapter(model: torch.nn.Module, rank: int, seed: int) -> torch.nn.Module:
    """The model frozen under a fresh PEFT LoRA adapter (A drawn from `seed`, B zero, as PEFT inits)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, lora_dropout=0.0, bias="none")
    return get_peft_model(model, cfg)


def save_adapter(model: torch.nn.Module, out: Path) -> None:
    """adapter_config.json and adapter_model.safetensors (PEFT's own format), nothing else."""
    import tempfile as _tf

    with _tf.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # type: ignore[operator]
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / "adapter_model.safetensors", out / "adapter_model.safetensors")
        # PEFT writes target_modules from a set: in hash order, which changes from run to run
        cfg = json.loads((Path(tmp) / "adapter_config.json").read_text())
        if isinstance(cfg.get("target_modules"), list):
            cfg["target_modules"] = sorted(cfg["target_modules"])
        (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_checkpoint(path: Path) -> torch.nn.Module:
    model = new_model(0)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def zoo_files(out: Path) -> dict[str, str]:
    """{relative path: sha256} of every file of a built zoo."""
    return {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}


def _stamp_args(preset: str, seed: int, threads: int) -> dict[str, Any]:
    import transformers

    return {
        "preset": preset,
        "seed": seed,
        "threads": threads,
        "zoo_version": ZOO_VERSION,
        # any change to the code that trains or makes data invalidates cached zoos
        "code_sha256": hashlib.sha256(Path(__file__).read_bytes() + Path(zoo_tasks.__file__).read_bytes()).hexdigest(),
        "data_version": zoo_tasks.DATA_VERSION,
        # the held-out items' digest: a change of the task generator invalidates cached zoos
        "data_sha256": hashlib.sha256(
            "".join(json.dumps(it.to_json()) for s in zoo_tasks.SKILLS for it in zoo_tasks.eval_items(s)).encode()
        ).hexdigest(),
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
    }


def _cached(out: Path, args: dict[str, Any]) -> dict[str, Any] | None:
    try:
        stamp = json.loads((out / STAMP).read_text())
    except (OSError, ValueError):
        return None
    if stamp.get("args") != args:
        return None
    for rel, size in stamp.get("files", {}).items():
        f = out / rel
        if not f.is_file() or f.stat().st_size != size:
            return None
    return stamp


def make_zoo(
    out_dir: str | Path,
    *,
    preset: str = "full",
    seed: int = 0,
    threads: int = 1,
    force: bool = False,
    log: Any = None,
) -> dict[str, Any]:
    """Build (or reuse) the zoo in ``out_dir``; returns the contents of zoo.json."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    out = Path(out_dir)
    args = _stamp_args(preset, seed, threads)
    if not force and (stamp := _cached(out, args)) is not None:
        return stamp
    say = log or (lambda msg: None)
    out.mkdir(parents=True, exist_ok=True)
    (out / STAMP).unlink(missing_ok=True)  # incomplete until the stamp is back

    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        runs, scenarios = PRESETS[preset]()
        tasks = zoo_tasks.write_eval_files(out / "tasks")
        evals = {s: zoo_tasks.eval_items(s) for s in zoo_tasks.SKILLS}
        models: dict[str, dict[str, Any]] = {}

        def save(model: torch.nn.Module, name: str, run: Run, steps: int, t0: float) -> None:
            (save_adapter if run.lora_rank else save_checkpoint)(model, out / name)
            acc = {s: round(greedy_accuracy(model, items), 4) for s, items in evals.items()}
            info = asdict(run)
            info.update(name=name, steps=steps, accuracy=acc)
            for k in ("stages", "final") + (() if run.lora_rank else ("lora_rank",)):
                info.pop(k)
            models[name] = info
            say(f"{name:<18} {' '.join(f'{s}={a:.2f}' for s, a in acc.items())}  ({time.perf_counter() - t0:.0f} s)")

        for run in runs:
            t0 = time.perf_counter()
            model = new_model(seed * 1000 + run.seed) if run.parent is None else load_checkpoint(out / run.parent)
            if run.lora_rank:
                model = with_adapter(model, run.lora_rank, seed * 1000 + run.seed)
            # Each run's data and order depend on (zoo seed, run seed) only, not on other runs.
            r = Run(**{**asdict(run), "seed": seed * 1000 + run.seed, "stages": run.stages})
            train(model, r, on_stage=lambda step, m=model, rr=run, t=t0: save(m, f"{rr.name}_{step}", rr, step, t))
            if run.final:
                save(model, run.name, run, run.steps, t0)
        for sc in scenarios.values():
            sc.setdefault("base", "base")
            sc.setdefault("skills", list(zoo_tasks.SKILLS))
        stamp = {
            "args": args,
            "skills": list(zoo_tasks.SKILLS),
            "tasks": {s: str(p.relative_to(out)) for s, p in tasks.items()},
            "models": models,
            "scenarios": scenarios,
        }
        stamp["files"] = {
            str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file() and p.name != STAMP
        }
        (out / STAMP).write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        return stamp
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--seed", type=int, default=0, help="changes initialisation and data order, not the tasks")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (part of the cache key: results depend on it)"
    )
    ap.add_argument("--force", action="store_true", help="rebuild even if a matching zoo is cached")
    ap.add_argument("--check", action="store_true", help="then build again in a temp dir and compare every file")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    say = None if a.quiet else (lambda msg: print(msg, flush=True))
    t0 = time.perf_counter()
    make_zoo(a.out_dir, preset=a.preset, seed=a.seed, threads=a.threads, force=a.force, log=say)
    print(f"zoo in {a.out_dir}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if a.check:
        tmp = Path(tempfile.mkdtemp(prefix="zoo-check-"))
        try:
            t1 = time.perf_counter()
            make_zoo(tmp, preset=a.preset, seed=a.seed, threads=a.threads, force=True)
            first, second = zoo_files(Path(a.out_dir)), zoo_files(tmp)
            diff = sorted(k for k in first.keys() | second.keys() if first.get(k) != second.get(k))
            print(
                f"rebuilt in {time.perf_counter() - t1:.1f} s: {len(first)} files, {len(diff)} differ", file=sys.stderr
            )
            if diff:
                print("differ: " + ", ".join(diff[:10]), file=sys.stderr)
                return 1
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
