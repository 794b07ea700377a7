"""Small helpers shared by the tests: write synthetic checkpoints, run the CLI, read outputs."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]


def write_checkpoint(
    path: Path, tensors: dict[str, torch.Tensor], *, shards: int = 1, config: dict[str, Any] | None = None
) -> Path:
    """A minimal HF-style checkpoint: safetensors (sharded with an index if shards > 1) and config.json."""
    path.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"), metadata={"format": "pt"}
        )
    else:
        weight_map = {}
        for s in range(shards):
            part = names[s::shards]
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: tensors[k].contiguous() for k in part}, str(path / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = {"model_type": "llama", "num_hidden_layers": 2}
    cfg.update(config or {})
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def synthetic_family(
    root: Path, *, n: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0, shards: int = 1, rows: int = 24
) -> dict[str, Path]:
    """A base and n fine-tunes with a few layer tensors, as plain tensors (no transformers needed)."""
    g = torch.Generator().manual_seed(seed)
    base = {
        "model.embed_tokens.weight": torch.randn(rows, 8, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 8, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(rows, 8, generator=g),
        "model.layers.1.self_attn.q_proj.weight": torch.randn(16, 8, generator=g),
        "model.layers.1.mlp.up_proj.weight": torch.randn(rows, 8, generator=g),
        "model.norm.weight": torch.ones(8),
    }
    out = {"base": write_checkpoint(root / "base", {k: v.to(dtype) for k, v in base.items()}, shards=shards)}
    for i in range(1, n + 1):
        ft = {k: (v + 0.1 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
        out[f"ft{i}"] = write_checkpoint(root / f"ft{i}", ft, shards=shards)
    return out


def write_config(path: Path, text: str, **paths: Path) -> Path:
    path.write_text(text.format(**{k: str(v) for k, v in paths.items()}))
    return path


def bigmerge(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300, check: bool = False
) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ)
    for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"):
        e.pop(v, None)
    e.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "bigmerge", *args], capture_output=True, text=True, env=e, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"bigmerge {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def merge_tensors(cfg_text: str, out: Path, **opts: Any) -> dict[str, torch.Tensor]:
    """Merge a config given as text, in this process on one rank, into out; the output's tensors.

    The config is written beside out (OUT.yaml); opts are MergeOptions fields, quiet by default."""
    from bigmerge.engine.comm import SerialComm
    from bigmerge.merge import MergeOptions, run_merge

    cfg = out.parent / f"{out.name}.yaml"
    cfg.write_text(cfg_text)
    opts.setdefault("quiet", True)
    run_merge(str(cfg), str(out), SerialComm(), MergeOptions(**opts))
    return load_output(out)


def load_output(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(str(path / "*.safetensors"))):
        out.update(load_file(f))
    return out


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8)), f"{k} differs"
