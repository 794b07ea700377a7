"""The DAM model: a Hugging Face causal LM whose layers hold every source's frozen weights
and learn how much of each source every input column takes.

For a linear layer with source weights W_1..W_N ([out, in]) and coefficient vectors
c_1..c_N ([in]), the merged weight is W = sum_i W_i diag(f(c_i)); a bias gets one scalar per
source; embeddings ([vocab, hidden]) take per-hidden-dimension coefficients the same way and
RMSNorm weights per-dimension ones, both frozen by default. A tied LM head shares the
embedding's weights and coefficients. With `teacher = k` every layer runs source k alone, so
the teachers' logits come from the same frozen weights (no second copy of any model).

The skeleton (module tree, rotary embedding) comes from transformers' own classes
(`AutoModelForCausalLM.from_config`, on the meta device); the weights are read tensor by tensor
from each source's safetensors, so at most one layer of N sources is ever whole in memory
before DeepSpeed's `zero.Init` partitions it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bigmerge.errors import ConfigError, SourceError

ACTIVATIONS = ("identity", "tanh", "sigmoid", "relu")
# config.json keys that decide the architecture: sources must agree on them
ARCH_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
    "rms_norm_eps",
)


def activate(c: torch.Tensor, name: str) -> torch.Tensor:
    """f(c). `identity` returns a copy: regularisers must not hold the (partitioned) parameter itself."""
    if name == "identity":
        return c * 1.0
    if name == "tanh":
        return torch.tanh(c)
    if name == "sigmoid":
        return torch.sigmoid(c)
    if name == "relu":
        return torch.relu(c)
    raise ConfigError(f"unknown coefficient activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")


def inverse_activation(a: torch.Tensor, name: str) -> torch.Tensor:
    """c with f(c) = a: coefficients start at f(c) = 1/N whatever f is."""
    if name in ("identity", "relu"):
        return a.clone()
    if name == "tanh":
        return torch.atanh(a)
    return torch.logit(a)  # sigmoid


class DamModule(nn.Module):
    """Common state of the DAM layers: N sources, f, teacher mode, regularisation terms."""

    def __init__(self, n: int, activation: str) -> None:
        super().__init__()
        self.n = n
        self.activation = activation
        self.teacher: int | None = None  # run source k alone (teacher logits)
        self.owns_coefficients = True  # False for a tied LM head (its coefficients are the embedding's)
        self.terms: dict[str, torch.Tensor] = {}  # regularisation terms of the latest forward

    def source(self, k: int) -> nn.Parameter:
        return getattr(self, f"weight_{k}")

    def _record_terms(self, a: torch.Tensor, coef: nn.Parameter) -> None:
        """Unweighted regulariser terms of one coefficient set a = f(c), [N, dim], computed here in the
        forward (where ZeRO-3 has the parameter gathered) and summed by the trainer."""
        if not (coef.requires_grad and self.owns_coefficients and torch.is_grad_enabled()):
            return
        pairs = [(i, j) for i in range(self.n) for j in range(i + 1, self.n)]
        a32 = a.float()
        if a32.shape[1] > 1:
            cos = torch.stack([F.cosine_similarity(a32[i], a32[j], dim=0) for i, j in pairs])
            self.terms["similarity"] = cos.mean()
        self.terms["l1"] = self.terms.get("l1", 0) + a32.abs().sum()
        self.terms["l2"] = self.terms.get("l2", 0) + a32.pow(2).sum()
        p = torch.softmax(a32, dim=0)
        self.terms["entropy"] = -(p * torch.log(p.clamp_min(1e-12))).sum(0).mean()
        mins = torch.stack([torch.minimum(a32[i].abs(), a32[j].abs()).mean() for i, j in pairs])
        self.terms["overlap"] = mins.mean()


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def combine(weights: list[torch.Tensor] | tuple[torch.Tensor, ...], a: torch.Tensor) -> torch.Tensor:
    """sum_i W_i diag(a_i), left to right (the `dam` operator's order)."""
    w = weights[0] * a[0]
    for i in range(1, len(weights)):
        w = w + weights[i] * a[i]
    return w


class MergedLinear(torch.autograd.Function):
    """y = x (sum_i W_i diag(a_i))^T that keeps x, a and the W_i for backward, not the merged weight.

    Plain autograd would hold every layer's merged [out, in] weight until backward: a whole merged
    model on each process (140 GB for a 70B in bf16), outside ZeRO-3's partitions. Here backward
    recomputes it from the W_i, which ZeRO-3 gathers again for the module's backward, as it does
    for its own linear function: one layer at a time.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, a, *weights)
        return F.linear(x, combine(weights, a))

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> Any:
        x, a, *weights = ctx.saved_tensors
        gx = ga = None
        if ctx.needs_input_grad[0]:
            gx = gy @ combine(weights, a)
        if ctx.needs_input_grad[1]:
            gw = gy.reshape(-1, gy.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # [out, in]
            ga = torch.stack([(gw * w).sum(0) for w in weights])
        return (gx, ga, *([None] * len(weights)))


class DamLinear(DamModule):
    """y = x (sum_i W_i diag(f(c_i)))^T + sum_i s_i b_i."""

    def __init__(
        self,
        weights: list[torch.Tensor],
        biases: list[torch.Tensor] | None,
        coef: torch.Tensor,
        bias_coef: torch.Tensor | None,
        activation: str,
        train: bool,
        train_bias: bool,
    ) -> None:
        super().__init__(len(weights), activation)
        for i, w in enumerate(weights):
            setattr(self, f"weight_{i}", _frozen(w))
        self.coef = nn.Parameter(coef, requires_grad=train)  # [N, in]
        self.has_bias = biases is not None
        if biases is not None:
            assert bias_coef is not None
            for i, b in enumerate(biases):
                setattr(self, f"bias_{i}", _frozen(b))
            self.bias_coef = nn.Parameter(bias_coef, requires_grad=train_bias)  # [N]

    def sources(self) -> list[torch.Tensor]:
        return [self.source(i) for i in range(self.n)]

    def merged_bias(self) -> torch.Tensor | None:
        if not self.has_bias:
            return None
        s = activate(self.bias_coef, self.activation)
        return combine([getattr(self, f"bias_{i}") for i in range(self.n)], s)

    def merged(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The merged weight and bias (for inspection and tests; forward does not keep the weight)."""
        return combine(self.sources(), activate(self.coef, self.activation)), self.merged_bias()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.teacher is not None:
            k = self.teacher
            return F.linear(x, self.source(k), getattr(self, f"bias_{k}") if self.has_bias else None)
        a = activate(self.coef, self.activation)
        self._record_terms(a, self.coef)
        y = MergedLinear.apply(x, a, *self.sources())
        b = self.merged_bias()
        return y if b is None else y + b


class TiedHead(DamLinear):
    """An LM head tied to the embeddings: the embedding's weights and coefficients, registered here too."""

    def __init__(self, embedding: DamEmbedding) -> None:  # noqa: D107 - shares, creates nothing
        DamModule.__init__(self, embedding.n, embedding.activation)
        for i in range(embedding.n):
            setattr(self, f"weight_{i}", embedding.source(i))
        self.coef = embedding.coef
        self.has_bias = False
        self.owns_coefficients = False


class DamEmbedding(DamModule):
    """Rows of sum_i W_i diag(f(c_i)), gathered per source first (the same arithmetic per element)."""

    def __init__(
        self, weights: list[torch.Tensor], coef: torch.Tensor, activation: str, train: bool, padding_idx: int | None
    ) -> None:
        super().__init__(len(weights), activation)
        for i, w in enumerate(weights):
            setattr(self, f"weight_{i}", _frozen(w))
        self.coef = nn.Parameter(coef, requires_grad=train)  # [N, hidden]
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.teacher is not None:
            return F.embedding(ids, self.source(self.teacher), self.padding_idx)
        a = activate(self.coef, self.activation)
        self._record_terms(a, self.coef)
        out = F.embedding(ids, self.weight_0, self.padding_idx) * a[0]
        for i in range(1, self.n):
            out = out + F.embedding(ids, self.source(i), self.padding_idx) * a[i]
        return out


class DamRMSNorm(DamModule):
    """LlamaRMSNorm's arithmetic with the weight sum_i f(c_i) * w_i."""

    def __init__(self, weights: list[torch.Tensor], coef: torch.Tensor, activation: str, train: bool, eps: float):
        super().__init__(len(weights), activation)
        for i, w in enumerate(weights):
            setattr(self, f"weight_{i}", _frozen(w))
        self.coef = nn.Parameter(coef, requires_grad=train)  # [N, hidden]
        self.variance_epsilon = eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.teacher is not None:
            w = self.source(self.teacher)
        else:
            a = activate(self.coef, self.activation)
            self._record_terms(a, self.coef)
            w = self.weight_0 * a[0]
            for i in range(1, self.n):
                w = w + self.source(i) * a[i]
        dtype = h.dtype
        h32 = h.to(torch.float32)
        h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return w * h32.to(dtype)


@dataclass
class Sources:
    """The source checkpoints, checked against each other: names, shapes, architecture."""

    refs: list[str]
    config: dict[str, Any]
    tensors: dict[str, tuple[int, ...]]  # name -> shape (the same in every source)
    files: list[dict[str, str]]  # per source: tensor name -> local file path

    def read(self, i: int, name: str, dtype: torch.dtype) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.files[i][name], framework="pt") as f:
            return f.get_tensor(name).to(dtype)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for i, ref in enumerate(self.refs):
            h.update(ref.encode())
            for name in sorted(self.files[i]):
                p = Path(self.files[i][name])
                h.update(f"{name}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode())
        return h.hexdigest()[:16]


def open_sources(refs: list[str]) -> Sources:
    from bigmerge.planning.catalog import catalog_model

    configs, tensors, files = [], [], []
    for ref in refs:
        if "://" in ref and not ref.startswith("file://"):
            raise ConfigError(f"{ref}: `bigmerge dam` trains on models from a local path; copy it locally first")
        path = ref.removeprefix("file://")
        if not Path(path).is_dir():
            raise SourceError(f"{ref}: model not found (no such directory)")
        cat = catalog_model(path)
        if cat.config is None:
            raise SourceError(f"{ref}: no config.json in the model directory")
        configs.append(cat.config)
        tensors.append({n: tuple(info.shape) for n, info in cat.tensors.items()})
        files.append({n: info.file.removeprefix("file://") for n, info in cat.tensors.items()})
    for i in range(1, len(refs)):
        for key in ARCH_KEYS:
            if configs[i].get(key) != configs[0].get(key):
                raise SourceError(
                    f"{refs[i]}: config.json {key} = {configs[i].get(key)!r}, but {refs[0]} has "
                    f"{configs[0].get(key)!r}: DAM merges models of one architecture"
                )
        for name, shape in tensors[0].items():
            if name not in tensors[i]:
                raise SourceError(f"{refs[i]}: tensor {name!r} is missing (present in {refs[0]})")
            if tensors[i][name] != shape:
                raise SourceError(
                    f"{refs[i]}: tensor {name!r} has shape {list(tensors[i][name])}, expected {list(shape)} as in {refs[0]}"
                )
        extra = sorted(set(tensors[i]) - set(tensors[0]))
        if extra:
            raise SourceError(f"{refs[i]}: tensor {extra[0]!r} is not in {refs[0]}")
    return Sources(list(refs), configs[0], tensors[0], files)


def _init_coefficients(
    shape: tuple[int, int], name: str, init: str, std: float, activation: str, seed: int
) -> torch.Tensor:
    n = shape[0]
    a = torch.full(shape, 1.0 / n, dtype=torch.float32)
    if init == "random":
        key = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(key, "little") & ((1 << 63) - 1))
        a = a + std * torch.randn(shape, generator=gen)
        if activation == "sigmoid":
            a = a.clamp(1e-4, 1 - 1e-4)
        elif activation == "tanh":
            a = a.clamp(-1 + 1e-4, 1 - 1e-4)
    return inverse_activation(a, activation)


@dataclass
class DamModel:
    """The HF model with DAM layers, and where its coefficients go in the checkpoint."""

    module: nn.Module
    layers: dict[str, DamModule]  # by module name
    n: int
    # checkpoint tensor name -> (module name, "coef" | "bias_coef") for the coefficient files
    coefficient_of: dict[str, tuple[str, str]]

    def set_teacher(self, k: int | None) -> None:
        for m in self.layers.values():
            m.teacher = k

    def take_terms(self) -> dict[str, list[torch.Tensor]]:
        out: dict[str, list[torch.Tensor]] = {}
        for m in self.layers.values():
            for k, v in m.terms.items():
                out.setdefault(k, []).append(v)
            m.terms = {}
        return out

    def coefficient_params(self) -> dict[str, nn.Parameter]:
        """Every coefficient parameter by its module-qualified name (tied heads excluded)."""
        out: dict[str, nn.Parameter] = {}
        for name, m in self.layers.items():
            if not m.owns_coefficients:
                continue
            out[f"{name}.coef"] = m.coef
            if isinstance(m, DamLinear) and m.has_bias:
                out[f"{name}.bias_coef"] = m.bias_coef
        return out

    def trainable(self) -> dict[str, nn.Parameter]:
        return {k: p for k, p in self.coefficient_params().items() if p.requires_grad}


def build_dam_model(
    sources: Sources,
    coefficients: Any,  # bigmerge.dam.config.Coefficients
    dtype: torch.dtype,
    seed: int,
    partition: Any = None,  # a context that partitions parameters at construction (deepspeed.zero.Init)
) -> DamModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    n = len(sources.refs)
    act = coefficients.activation
    hf_config = AutoConfig.from_pretrained(sources.refs[0].removeprefix("file://"))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    layers: dict[str, DamModule] = {}
    coefficient_of: dict[str, tuple[str, str]] = {}
    used: set[str] = set()
    head_name: str | None = None
    embedding_name: str | None = None

    def read_all(name: str) -> list[torch.Tensor]:
        if name not in sources.tensors:
            raise SourceError(f"{sources.refs[0]}: no tensor {name!r}, which the model's architecture has")
        used.add(name)
        return [sources.read(i, name, dtype) for i in range(n)]

    def coef(name: str, dim: int) -> torch.Tensor:
        return _init_coefficients((n, dim), name, coefficients.init, coefficients.init_std, act, seed)

    ctx = partition if partition is not None else contextlib.nullcontext()
    output_embeddings = skeleton.get_output_embeddings()
    with ctx:
        for name, mod in list(skeleton.named_modules()):
            w_name = f"{name}.weight"
            new: DamModule | None = None
            if isinstance(mod, nn.Linear):
                if mod is output_embeddings and tied and w_name not in sources.tensors:
                    head_name = name  # shares the embedding's parameters, below
                    continue
                biases = read_all(f"{name}.bias") if mod.bias is not None else None
                new = DamLinear(
                    read_all(w_name),
                    biases,
                    coef(w_name, mod.in_features),
                    coef(f"{name}.bias", 1)[:, 0].contiguous() if biases is not None else None,
                    act,
                    coefficients.linear,
                    coefficients.biases,
                )
                coefficient_of[w_name] = (name, "coef")
                if biases is not None:
                    coefficient_of[f"{name}.bias"] = (name, "bias_coef")
                if mod is output_embeddings and tied:
                    head_name = None  # stored untied in the checkpoint: its own coefficients
            elif isinstance(mod, nn.Embedding):
                new = DamEmbedding(
                    read_all(w_name), coef(w_name, mod.embedding_dim), act, coefficients.embeddings, mod.padding_idx
                )
                coefficient_of[w_name] = (name, "coef")
                embedding_name = name
            elif type(mod).__name__.endswith("RMSNorm") and hasattr(mod, "variance_epsilon"):
                dim = int(mod.weight.shape[0])
                new = DamRMSNorm(read_all(w_name), coef(w_name, dim), act, coefficients.norms, mod.variance_epsilon)
                coefficient_of[w_name] = (name, "coef")
            elif any(True for _ in mod.parameters(recurse=False)):
                raise SourceError(
                    f"{sources.refs[0]}: module {name!r} ({type(mod).__name__}) has parameters that DAM does not "
                    "know how to merge (supported: Linear, Embedding, RMSNorm: Llama, Mistral, Qwen2-style models)"
                )
            if new is not None:
                _replace(skeleton, name, new)
                layers[name] = new
    if head_name is not None:
        if embedding_name is None:
            raise SourceError(f"{sources.refs[0]}: a tied LM head but no embedding")
        head = TiedHead(layers[embedding_name])  # type: ignore[arg-type]
        _replace(skeleton, head_name, head)
        layers[head_name] = head
    # buffers made on the meta device (rotary frequencies): rebuild those modules for real
    for name, mod in list(skeleton.named_modules()):
        if any(b.is_meta for b in mod.buffers(recurse=False)):
            try:
                fresh = type(mod)(config=hf_config)
            except TypeError:
                raise SourceError(
                    f"module {name!r} ({type(mod).__name__}) cannot be rebuilt off the meta device"
                ) from None
            _replace(skeleton, name, fresh)
    missing = sorted(set(sources.tensors) - used)
    if missing:
        raise SourceError(f"{sources.refs[0]}: tensor {missing[0]!r} belongs to no layer DAM knows how to merge")
    skeleton.eval()  # no dropout: teachers and the merged model are compared as they are
    return DamModel(skeleton, layers, n, coefficient_of)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def distillation_loss(
    teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 KL(softmax(z_k/T) || softmax(z/T)), averaged over the non-padding tokens."""
    t = torch.log_softmax(teacher.float() / temperature, dim=-1)
    s = torch.log_softmax(student.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)  # per token
    m = mask.to(kl.dtype)
    return temperature**2 * (kl * m).sum() / m.sum().clamp_min(1)


def topk_distillation_loss(
    values: torch.Tensor, indices: torch.Tensor, student: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The same loss from the teacher's top-k logits ([B, T, k] values and vocabulary indices): the
    teacher's distribution renormalised over its k, the student's log-probabilities at those k."""
    t = torch.log_softmax(values.float() / temperature, dim=-1)
    s = torch.log_softmax(student.float() / temperature, dim=-1).gather(-1, indices)
    kl = (t.exp() * (t - s)).sum(-1)
    m = mask.to(kl.dtype)
    return temperature**2 * (kl * m).sum() / m.sum().clamp_min(1)


def regulariser(terms: dict[str, list[torch.Tensor]], loss: Any) -> torch.Tensor | float:
    """lambda_sim mean cos + lambda_1 sum|a| + lambda_2 sum a^2 + lambda_H mean H + lambda_o mean overlap."""
    total: torch.Tensor | float = 0.0
    for key, weight, how in (
        ("similarity", loss.similarity, "mean"),
        ("l1", loss.l1, "sum"),
        ("l2", loss.l2, "sum"),
        ("entropy", loss.entropy, "mean"),
        ("overlap", loss.overlap, "mean"),
    ):
        vals = terms.get(key)
        if weight and vals:
            s = torch.stack([v if torch.is_tensor(v) else torch.tensor(float(v)) for v in vals]).sum()
            total = total + weight * (s / len(vals) if how == "mean" else s)
    return total


def coefficient_tensors(model: DamModel, values: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Per source, checkpoint tensor name -> its effective multipliers f(c_i), float32: [in] for a
    linear or embedding weight, [hidden] for a norm, [1] for a bias. `values`: coefficient_params()
    names -> full raw values."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(model.n)]
    for tensor, (mod, attr) in model.coefficient_of.items():
        raw = values[f"{mod}.{attr}"].float()
        a = activate(raw, model.layers[mod].activation).detach()
        for i in range(model.n):
            out[i][tensor] = (a[i].reshape(1) if attr == "bias_coef" else a[i]).contiguous().clone()
    return out


def describe(model: DamModel) -> str:
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.trainable().values())
    return f"{len(model.layers)} DAM layers, {len(model.trainable())} trainable coefficient sets, {total} coefficients"


def memory_estimate(sources: Sources, world: int, tokens: int, dtype_bytes: int) -> list[tuple[str, float]]:
    """Rough bytes per process under ZeRO-3 with parameters and optimizer offloaded to the CPU;
    `tokens` = batch size x sequence length of one micro batch."""
    n = len(sources.refs)
    numel = {k: math.prod(s) for k, s in sources.tensors.items()}
    cfg = sources.config
    vocab, hidden = int(cfg.get("vocab_size", 0)), int(cfg.get("hidden_size", 0))
    layers, inter = int(cfg.get("num_hidden_layers", 0)), int(cfg.get("intermediate_size", 0))
    coefs = n * sum(s[-1] if len(s) > 1 else 1 for s in sources.tensors.values())
    biggest = max(numel.values())
    layer = max(
        (sum(v for k, v in numel.items() if f".{i}." in k) for i in range(layers)), default=biggest
    )  # one decoder layer's tensors
    return [
        ("CPU: frozen weights (this process's partition)", n * sum(numel.values()) * dtype_bytes / world),
        ("CPU: coefficients, fp32 master, AdamW moments, gradients", coefs * (dtype_bytes + 16) / world),
        ("CPU: while building, one tensor of every source", n * biggest * 4),
        ("GPU: gathered weights (a layer of N sources, and one prefetched)", 2 * n * max(layer, biggest) * dtype_bytes),
        ("GPU: saved activations", tokens * layers * (6 * hidden + 3 * inter) * dtype_bytes),
        ("GPU: logits (teacher, merged, log-softmaxes; fp32)", tokens * vocab * 4 * 4),
    ]
