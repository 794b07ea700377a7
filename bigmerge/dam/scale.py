"""`bigmerge dam CONFIG --dry-run`: memory per GPU, bytes gathered per step and a step time, before launching.

Reads the sources' headers and config.json only (or, with `--arch`, a known architecture: for a
cluster whose models are not on this machine). The model of a step under ZeRO-3 with parameters
offloaded to the CPU:

- every process holds 1/W of the N frozen sources in host memory; before a module's forward, and
  again before its backward, each process copies its partition to the GPU (host-to-device) and
  all-gathers the rest, so a gather of B bytes moves B/W over PCIe and B(W-1)/W over the GPU links;
- the merged model's forward and backward gather every source of every layer (2 N model-sized
  gathers per micro step, 3 N with activation checkpointing's recomputation); online teachers add,
  per source, a teacher forward that gathers all N sources of every layer and run the merged model
  once per source: 3 N^2 model-sized gathers per micro step group, the cost this code removes by
  reading the teachers' logits from `bigmerge dam logits`' data set (`loss.teacher: dataset`);
- compute: 6 flops per parameter and token for the merged model (forward, input gradient, and the
  weight gradient the coefficients need), 2 more with recomputation, 2 per teacher forward; each
  merged weight is formed as sum_i W_i a_i (2 N flops per weight element, 3 times per micro step);
- the step time is compute at `mfu` of the GPU's peak plus the two transfers, without overlap (an
  upper bound; DeepSpeed's prefetch overlaps part of it), and the overlapped bound beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigmerge.dam.config import DamConfig
from bigmerge.errors import ConfigError

# config.json fields of architectures one may plan for without their weights
ARCHS: dict[str, dict[str, Any]] = {
    "llama-3-70b": {
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
    "llama-3-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
    "mistral-7b": {
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
}


def llama_tensors(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The checkpoint tensors of a Llama/Mistral-style config.json (names as transformers writes them)."""
    h, i, layers = int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    hd = int(cfg.get("head_dim") or h // heads)
    v = int(cfg["vocab_size"])
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for n in range(layers):
        p = f"model.layers.{n}."
        out.update(
            {
                p + "self_attn.q_proj.weight": (heads * hd, h),
                p + "self_attn.k_proj.weight": (kv * hd, h),
                p + "self_attn.v_proj.weight": (kv * hd, h),
                p + "self_attn.o_proj.weight": (h, heads * hd),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    if not cfg.get("tie_word_embeddings"):
        out["lm_head.weight"] = (v, h)
    return out


@dataclass(frozen=True)
class Cluster:
    """The machines planned for; the rates are assumptions, printed with the estimate."""

    gpus: int = 1  # processes, one per GPU
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    gpu_tflops: float = 989.0  # dense bf16 peak (H100 SXM)
    mfu: float = 0.4  # fraction of the peak a step reaches
    h2d_gb_s: float = 20.0  # host-to-device per GPU (PCIe gen5 x16, pinned; ~half without pinning)
    link_gb_s: float = 150.0  # all-gather bus bandwidth per GPU inside a node (NVLink)
    net_gb_s: float = 25.0  # per GPU between nodes (a 200 Gb/s NIC per GPU)


@dataclass
class StepEstimate:
    memory: list[tuple[str, float]]  # (what, bytes) per GPU
    host: list[tuple[str, float]]  # (what, bytes) per process in host memory
    gathered: float  # bytes gathered per optimizer step, per process
    gathered_online: float  # the same with teachers in the loop
    flops: float  # per process per optimizer step
    h2d: float  # bytes host-to-device per process per step
    link: float  # bytes received over GPU links per process per step
    seconds: float  # no overlap
    seconds_overlapped: float  # compute and transfers fully overlapped
    dataset_bytes: float
    logits_seconds: float  # `bigmerge dam logits` on this cluster


def estimate(
    tensors: dict[str, tuple[int, ...]], arch: dict[str, Any], n: int, cfg: DamConfig, cluster: Cluster
) -> StepEstimate:
    t = cfg.training
    w = max(1, cluster.gpus)
    b = 2 if t.dtype == "bfloat16" else 4
    numel = {k: math.prod(s) for k, s in tensors.items()}
    params = sum(numel.values())
    hidden, inter = int(arch.get("hidden_size", 0)), int(arch.get("intermediate_size", 0))
    layers, vocab = int(arch.get("num_hidden_layers", 0)), int(arch.get("vocab_size", 0))
    layer = max((sum(v for k, v in numel.items() if f".{i}." in k) for i in range(layers)), default=0)
    biggest = max(numel.values())
    coefs = n * sum(s[-1] if len(s) > 1 else 1 for s in tensors.values())
    seq = cfg.data.max_length
    stored = cfg.loss.teacher == "dataset"
    # tokens in one forward: the N sources' batches side by side (stored teachers), or one source's
    tokens = t.batch_size * seq * (n if stored else 1)
    ckpt = t.activation_checkpointing
    if ckpt:
        activations = tokens * layers * hidden * b + tokens * (6 * hidden + 3 * inter) * b
    else:
        activations = tokens * layers * (6 * hidden + 3 * inter) * b
    logits = tokens * vocab * (b + 12) + (0 if stored or cfg.loss.teacher == "topk" else tokens * vocab * 8)
    memory = [
        ("gathered weights: a layer of N sources, and the next one prefetched", 2 * n * max(layer, biggest) * b),
        ("a merged weight and its gradient (largest tensor, with temporaries)", 4 * biggest * b),
        ("saved activations" + (" (checkpointed at each layer)" if ckpt else ""), activations),
        ("logits and their log-softmax, fp32" + ("" if stored else " (teacher's too)"), logits),
        ("coefficients, gathered while in use", coefs * 4 / max(1, layers)),
    ]
    host = [
        ("frozen weights, this process's partition", n * params * b / w),
        ("coefficients: fp32 master, AdamW moments, gradients", coefs * 16 / w),
        ("while building: one tensor of every source", n * biggest * 4),
    ]
    model_bytes = params * b
    passes = 3 if ckpt else 2  # forward, (recompute,) backward: each gathers every source
    micro = t.gradient_accumulation
    gathered = micro * passes * n * model_bytes
    gathered_online = micro * n * (passes + 1) * n * model_bytes  # per source: teacher, merged, (recompute,) backward
    online = not stored and cfg.loss.teacher == "online"
    per_step_gather = gathered if stored else (gathered_online if online else micro * n * passes * n * model_bytes)
    token_flops = (6 + (2 if ckpt else 0)) * params
    step_tokens = micro * t.batch_size * seq * n
    flops = step_tokens * token_flops + micro * (1 if stored else n) * 3 * 2 * n * params
    if online:
        flops += step_tokens * 2 * params
    h2d = per_step_gather / w
    inside = min(w, cluster.gpus_per_node)
    link_bw = cluster.link_gb_s if w <= cluster.gpus_per_node else cluster.net_gb_s
    link = per_step_gather * (w - 1) / w
    compute_s = flops / (cluster.gpu_tflops * 1e12 * cluster.mfu)
    h2d_s = h2d / (cluster.h2d_gb_s * 1e9)
    link_s = link / (link_bw * 1e9) if inside > 1 or w > 1 else 0.0
    from bigmerge.dam.logits import dataset_bytes

    examples = cfg.data.max_examples or 0
    ds_bytes = dataset_bytes([examples] * n, seq, cfg.loss.top_k) if examples else 0.0
    # logits: each source alone, forwards only: 2 flops per parameter and token, its weights gathered
    # once per forward of a micro batch of every process
    logit_tokens = n * examples * seq
    logits_s = logit_tokens * 2 * params / w / (cluster.gpu_tflops * 1e12 * cluster.mfu)
    logits_s += math.ceil(examples / max(1, w * t.batch_size)) * n * model_bytes * (1 / w / (cluster.h2d_gb_s * 1e9))
    return StepEstimate(
        memory,
        host,
        per_step_gather,
        gathered_online,
        flops,
        h2d,
        link,
        compute_s + h2d_s + link_s,
        max(compute_s, h2d_s, link_s),
        ds_bytes,
        logits_s,
    )


def _gb(x: float) -> str:
    return f"{x / 1e9:10.2f} GB" if x >= 1e8 else f"{x / 1e6:10.2f} MB"


def dry_run(cfg: DamConfig, opts: Any) -> int:
    """Check the config; print memory per GPU and per process, gathers and time per step."""
    from bigmerge.dam.model import open_sources

    arch_name = getattr(opts, "arch", None)
    if arch_name:
        if arch_name not in ARCHS:
            raise ConfigError(f"--arch {arch_name!r}: unknown; known: {', '.join(sorted(ARCHS))}")
        arch = ARCHS[arch_name]
        tensors = llama_tensors(arch)
        what = arch_name
    else:
        sources = open_sources([m.model for m in cfg.models])
        for m in cfg.models:
            if not Path(m.data).is_file():
                raise ConfigError(f"{m.data}: data file of model {m.model} not found")
        arch, tensors = sources.config, dict(sources.tensors)
        what = str(arch.get("model_type", "model"))
    from bigmerge.dam.train import dist_env

    gpus = getattr(opts, "gpus", None) or getattr(opts, "world_size", None) or dist_env()[1]
    cluster = Cluster(gpus=gpus, gpu_memory_gb=getattr(opts, "gpu_memory", None) or Cluster.gpu_memory_gb)
    n = len(cfg.models)
    t = cfg.training
    est = estimate(tensors, arch, n, cfg, cluster)
    params = sum(math.prod(s) for s in tensors.values())
    print(
        f"{n} x {what} of {params / 1e9:.2f} B parameters ({len(tensors)} tensors), {cluster.gpus} process(es), "
        f"micro batch {t.batch_size} x {cfg.data.max_length} tokens per source, {t.gradient_accumulation} micro "
        f"step(s) per step, {t.dtype}, teacher {cfg.loss.teacher}"
        + (", activation checkpointing" if t.activation_checkpointing else "")
    )
    print("per GPU (or per process, without one):")
    gpu = 0.0
    for label, x in est.memory:
        print(f"  {label:<72} {_gb(x)}")
        gpu += x
    fits = "fits" if gpu <= cluster.gpu_memory_gb * 1e9 * 0.9 else "does NOT fit"
    print(f"  {'per process: GPU':<72} {_gb(gpu)}  ({fits} in {cluster.gpu_memory_gb:g} GB with 10% spare)")
    print("host memory per process:")
    host = 0.0
    for label, x in est.host:
        print(f"  {label:<72} {_gb(x)}")
        host += x
    node = host * min(cluster.gpus, cluster.gpus_per_node)
    print(f"  {'per process: CPU':<72} {_gb(host)}  ({_gb(node).strip()} per node of {cluster.gpus_per_node})")
    print("per optimizer step, per process:")
    print(f"  {'bytes gathered (ZeRO-3 all-gathers of frozen sources)':<72} {_gb(est.gathered)}")
    if cfg.loss.teacher != "online":
        print(f"  {'  the same with online teachers (3 N^2 model-sized gathers)':<72} {_gb(est.gathered_online)}")
    print(f"  {'host-to-device (own partition)':<72} {_gb(est.h2d)}")
    print(f"  {'received over GPU links':<72} {_gb(est.link)}")
    print(f"  {'compute':<72} {est.flops / 1e12:10.1f} TFLOP")
    print(
        f"  {'estimated step time':<72} {est.seconds:10.1f} s  (overlapped: {est.seconds_overlapped:.1f} s; "
        f"assumed {cluster.gpu_tflops:g} TFLOP/s at {cluster.mfu:g} MFU, PCIe {cluster.h2d_gb_s:g} GB/s, "
        f"links {cluster.link_gb_s:g} GB/s per GPU)"
    )
    if cfg.loss.teacher != "online":
        online_cfg = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"teacher": "online"})})
        on = estimate(tensors, arch, n, online_cfg, cluster)
        print(
            f"  {'  with online teachers: step time (GPU memory)':<72} {on.seconds:10.1f} s  "
            f"(overlapped: {on.seconds_overlapped:.1f} s; {sum(x for _, x in on.memory) / 1e9:.2f} GB)"
        )
    if est.dataset_bytes:
        print(
            f"teacher logits (`bigmerge dam logits`, top-{cfg.loss.top_k}): {_gb(est.dataset_bytes).strip()}, "
            f"about {est.logits_seconds / 60:.1f} min on this cluster"
        )
    return 0
