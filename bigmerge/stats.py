"""`bigmerge stats`: the data statistics of the data-informed operators, per source model.

Each model (a local Hugging Face checkpoint, loaded with transformers' AutoModelForCausalLM)
runs on a small jsonl data set (one JSON object per line with a `text` field):

- `--kind fisher`: the diagonal empirical Fisher information, per parameter the mean over
  examples of the squared gradient of the example's log-likelihood (the sum of its tokens'
  log-probabilities), float32, under the checkpoint's own tensor names and shapes
  (-> DIR/<model-name>/fisher.safetensors). A checkpoint tensor that is not a parameter
  (a buffer) gets zeros: the merge averages it.
- `--kind regmean`: per linear layer the Gram matrix of its inputs, XᵀX / N over the N
  tokens of the data, float32 [in, in], under the linear weight's name, e.g.
  `model.layers.0.mlp.down_proj.weight` (-> DIR/<model-name>/gram.safetensors).

<model-name> is the last component of the model's path, which is where the operators look
(`statistics_dir: DIR`). The whole model runs in one process: this is for models that fit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigmerge.errors import ConfigError, SourceError
from bigmerge.log import Log
from bigmerge.ops.data_informed import FISHER_FILE, GRAM_FILE, model_dir_name
from bigmerge.planning.config import read_jsonl
from bigmerge.planning.lora import split_ref

KINDS = {"fisher": FISHER_FILE, "regmean": GRAM_FILE}


@dataclass
class StatsOptions:
    max_examples: int = 256
    max_length: int = 512
    device: str = "cpu"
    quiet: bool = False


def read_texts(path: str, limit: int) -> list[str]:
    """The `text` fields of a jsonl file, at most `limit` of them; errors name the file and line."""
    p = Path(path)
    texts: list[str] = []
    for n, obj in read_jsonl(p):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ConfigError(f"{p}:{n}: expected an object with a string 'text' field")
        texts.append(obj["text"])
        if len(texts) >= limit:
            break
    if not texts:
        raise ConfigError(f"{p}: no examples (one JSON object with a 'text' field per line)")
    return texts


def resolve_models(args: list[str]) -> list[str]:
    """Model paths from the command line: one YAML config (its models, base included) or paths."""
    if len(args) == 1 and args[0].endswith((".yaml", ".yml")) and Path(args[0]).is_file():
        from bigmerge.planning.config import load_config

        return load_config(args[0]).model_refs()
    return list(args)


def compute_statistics(
    models: list[str], kind: str, data: list[str], out: str, opts: StatsOptions | None = None
) -> list[Path]:
    """Write DIR/<model-name>/<file> for every model; returns the files written."""
    opts = opts or StatsOptions()
    if kind not in KINDS:
        raise ConfigError(f"unknown statistics kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not models:
        raise ConfigError("no models given")
    if len(data) not in (1, len(models)):
        raise ConfigError(f"--data: give one file for every model or one per model ({len(models)}), got {len(data)}")
    names = [model_dir_name(m) for m in models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(
            f"two models would write statistics to {out}/{dup[0]}: run `bigmerge stats` once per model "
            "with different --out directories and give each model its own `statistics` parameter"
        )
    for m in models:
        if split_ref(m)[1] is not None:
            raise ConfigError(
                f"{m}: `bigmerge stats` runs a checkpoint, not a BASE+ADAPTER source; statistics of an adapted "
                "model need the adapter folded first (PEFT's merge_and_unload)"
            )
        if "://" in m and not m.startswith("file://"):
            raise ConfigError(f"{m}: `bigmerge stats` runs models from a local path; copy it locally first")
        if not Path(m.removeprefix("file://")).is_dir():
            raise SourceError(f"{m}: model not found (no such directory)")
    texts = [read_texts(d, opts.max_examples) for d in data]
    written = []
    log = Log(quiet=opts.quiet)
    for i, (model, name) in enumerate(zip(models, names)):
        path = Path(out) / name / KINDS[kind]
        t0 = time.perf_counter()
        tensors, meta = _run_model(model.removeprefix("file://"), kind, texts[i if len(texts) > 1 else 0], opts)
        meta["data"] = data[i if len(data) > 1 else 0]
        path.parent.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in meta.items()})
        tmp.replace(path)  # a file that exists is whole
        written.append(path)
        log(
            f"{kind} statistics of {model}: {len(tensors)} tensors, {meta['examples']} examples, "
            f"{meta['tokens']} tokens, {time.perf_counter() - t0:.1f} s -> {path}"
        )
    return written


def _run_model(path: str, kind: str, texts: list[str], opts: StatsOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bigmerge.planning.catalog import catalog_model

    shapes = {n: tuple(info.shape) for n, info in catalog_model(path).tensors.items()}
    device = torch.device(
        "cuda" if opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    model.eval()  # no dropout: the statistics of the model as it is
    batches = []
    for text in texts:
        ids = tok(text, truncation=True, max_length=opts.max_length, return_tensors="pt")["input_ids"]
        if ids.shape[1] >= 2:
            batches.append(ids.to(device))
    if not batches:
        raise ConfigError(f"{path}: no example has two tokens or more after tokenization")
    step = _fisher if kind == "fisher" else _gram
    tensors, tokens = step(model, batches, shapes)
    meta = {"kind": kind, "model": path, "examples": len(batches), "tokens": tokens, "format": "pt"}
    return tensors, meta


def _fisher(model: Any, batches: list[Any], shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, Any], int]:
    import torch

    params = dict(model.named_parameters(remove_duplicate=False))
    for name, shape in shapes.items():
        if name in params and tuple(params[name].shape) != shape:
            raise SourceError(
                f"{name}: parameter shape {list(params[name].shape)} differs from the checkpoint's {list(shape)}"
            )
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items() if n in shapes and p.requires_grad}
    tokens = 0
    for ids in batches:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits[:, :-1].float()
        # the example's log-likelihood: the sum of its tokens' log-probabilities
        loglik = -torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        loglik.backward()
        tokens += int(ids.shape[1])
        for n, a in acc.items():
            g = params[n].grad
            if g is not None:
                a.addcmul_(g, g)
    out = {}
    for name, shape in shapes.items():
        out[name] = (acc[name] / len(batches)).cpu().contiguous() if name in acc else torch.zeros(shape)
    return out, tokens


def _gram(model: Any, batches: list[Any], shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, Any], int]:
    import torch

    grams: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name: str) -> Callable[..., None]:
        def record(module: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            g = grams.get(name)
            grams[name] = x.T @ x if g is None else g.add_(x.T @ x)

        return record

    for mod_name, module in model.named_modules():
        weight = f"{mod_name}.weight"
        if isinstance(module, torch.nn.Linear) and weight in shapes:
            hooks.append(module.register_forward_pre_hook(hook(weight)))
    if not hooks:
        raise SourceError("no linear layer of the model matches a tensor of its checkpoint")
    tokens = 0
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids)
                tokens += int(ids.shape[1])
    finally:
        for h in hooks:
            h.remove()
    return {n: (g / tokens).to(torch.float32).cpu().contiguous() for n, g in grams.items()}, tokens
