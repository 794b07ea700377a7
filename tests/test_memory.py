"""Peak memory is bounded by blocks times sources, not by the model's size."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import bigmerge, synthetic_family, write_checkpoint

pytestmark = pytest.mark.slow  # peak memory of merges of large tensors


def _big_family(root: Path, mb_per_model: int) -> dict[str, Path]:
    g = torch.Generator().manual_seed(1)
    rows = 1024
    cols = 2048  # 8 MiB per fp32 tensor
    n = max(1, mb_per_model // 8)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(rows, cols, generator=g) for i in range(n)}
    f = {"base": write_checkpoint(root / "base", base, shards=2, config={"num_hidden_layers": n})}
    for j in (1, 2):
        ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        f[f"ft{j}"] = write_checkpoint(root / f"ft{j}", ft, shards=2, config={"num_hidden_layers": n})
        del ft
    return f


def _peak_mib(cfg: Path, out: Path, *extra: str) -> float:
    proc = bigmerge("merge", str(cfg), str(out), "--block-size", "1M", "--cache-size", "2M", *extra, check=True)
    m = re.search(r"peak RSS (\d+) MiB/rank", proc.stderr)
    assert m, proc.stderr
    return float(m.group(1))


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_peak_memory_does_not_grow_with_the_model(tmp_path: Path, method: str) -> None:
    small = synthetic_family(tmp_path / "small", n=2)
    big = _big_family(tmp_path / "big", 192)  # 3 x 192 MiB of sources, 8 MiB tensors, 1 MiB blocks
    text = {
        "linear": "merge_method: linear\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.5}}\n  - model: {ft2}\n    parameters: {{weight: 0.5}}\n",
        "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.5, density: 0.3}}\n  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.6}}\nparameters: {{rescale: true}}\n",
    }[method]
    c_small = tmp_path / "small.yaml"
    c_small.write_text(text.format(**{k: str(v) for k, v in small.items()}))
    c_big = tmp_path / "big.yaml"
    c_big.write_text(text.format(**{k: str(v) for k, v in big.items()}))
    baseline = _peak_mib(c_small, tmp_path / "o_small")
    peak = _peak_mib(c_big, tmp_path / "o_big")
    model_mib = 3 * 192
    # The merge reads 576 MiB of sources; a rank holds a few 1 MiB blocks per source.
    assert peak - baseline < 64, (baseline, peak)
    assert peak - baseline < model_mib / 8


@pytest.mark.parametrize("reads", ["single", "coalesced"])
def test_the_reader_reuses_its_buffers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reads: str) -> None:
    """Hundreds of blocks, plain and coalesced, read and released: the reader allocates no more
    buffers than the reads in flight hold (a pool that never got its buffers back allocated one
    per source per block, and peak memory then grew with the model)."""
    from bigmerge.engine import reader as reader_module
    from bigmerge.engine.reader import BlockReader
    from bigmerge.merge import MergeOptions, plan_merge
    from bigmerge.planning.config import load_config

    # the fixture's blocks are small: every one read alone, or a few to a coalesced read
    monkeypatch.setattr(reader_module, "COALESCE_MAX_ITEM", 0 if reads == "single" else 1 << 20)
    monkeypatch.setattr(reader_module, "COALESCE_MAX_GROUP", 2048)

    f = synthetic_family(tmp_path / "m", n=2, rows=600)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"merge_method: linear\nmodels:\n  - model: {f['ft1']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {f['ft2']}\n    parameters: {{weight: 0.5}}\n"
    )
    plan = plan_merge(load_config(str(cfg)), 1, MergeOptions(block_bytes=256))[0]
    reader = BlockReader(plan, prefetch=2)
    seen = 0
    try:
        for _, _, inputs in reader.stream(plan.blocks_of(0)):
            assert all(bool(torch.isfinite(x.float()).all()) for x in inputs)
            reader.release(inputs)
            seen += 1
    finally:
        reader.close()
    assert seen > 100
    assert reader.allocations <= len(plan.models) * (reader.prefetch + 2), (reader.allocations, seen)
