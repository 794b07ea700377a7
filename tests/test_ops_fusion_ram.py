"""Identities of arcee_fusion, ram and ramplus_tl (mergekit 0.1.5's methods added in issue 21).

Their bytes against mergekit are in tests/test_vs_mergekit.py, and on 1/2/3 ranks in
tests/test_mpi.py; these hold what each method means, on any block size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import assert_bit_identical, load_output, merge_tensors, synthetic_family, write_checkpoint


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return synthetic_family(tmp_path_factory.mktemp("fam"), n=2, dtype=torch.float32, rows=40)


def _merge(fam: dict[str, Path], tmp: Path, name: str, text: str, block_bytes: int = 256) -> dict[str, torch.Tensor]:
    return merge_tensors(text.format(**{k: str(v) for k, v in fam.items()}), tmp / name, block_bytes=block_bytes)


TWO = "base_model: {base}\nmodels: [{{model: {ft1}}}, {{model: {ft2}}}]\n"
EPS = 0.05


def test_ram_of_one_model_keeps_its_changes_above_epsilon(fam: dict[str, Path], tmp_path: Path) -> None:
    text = "merge_method: ram\nbase_model: {base}\nmodels: [{{model: {ft1}}}]\nparameters: {{epsilon: 0.05}}\n"
    out = _merge(fam, tmp_path, "ram1", text)
    base, ft = load_output(fam["base"]), load_output(fam["ft1"])
    for k, o in out.items():
        changed = (ft[k] - base[k]).abs() > EPS
        assert torch.equal(o, torch.where(changed, base[k] + (ft[k] - base[k]), base[k])), k


def test_ram_averages_shared_changes_and_keeps_unique_ones(fam: dict[str, Path], tmp_path: Path) -> None:
    out = _merge(fam, tmp_path, "ram2", "merge_method: ram\n" + TWO + "parameters: {{epsilon: 0.05}}\n")
    base, a, b = (load_output(fam[m]) for m in ("base", "ft1", "ft2"))
    both_seen = unique_seen = False
    for k, o in out.items():
        ta, tb = a[k] - base[k], b[k] - base[k]
        ca, cb = ta.abs() > EPS, tb.abs() > EPS
        both, only_a = ca & cb, ca & ~cb
        both_seen |= bool(both.any())
        unique_seen |= bool(only_a.any())
        assert torch.allclose(o[both], base[k][both] + (ta[both] + tb[both]) / 2, atol=1e-6), k
        assert torch.allclose(o[only_a], base[k][only_a] + ta[only_a], atol=1e-6), k
        assert torch.equal(o[~ca & ~cb], base[k][~ca & ~cb]), k
    assert both_seen and unique_seen  # the fixture exercises both cases


def test_ramplus_with_r_zero_is_ram_and_scales_unique_changes_up(fam: dict[str, Path], tmp_path: Path) -> None:
    ram = _merge(fam, tmp_path, "ram", "merge_method: ram\n" + TWO + "parameters: {{epsilon: 0.05}}\n")
    plus0 = _merge(fam, tmp_path, "p0", "merge_method: ramplus_tl\n" + TWO + "parameters: {{epsilon: 0.05, r: 0.0}}\n")
    assert_bit_identical(ram, plus0)
    text = "merge_method: ramplus_tl\n" + TWO + "parameters: {{epsilon: 0.05, r: 1.0, alpha: 1.0}}\n"
    plus = _merge(fam, tmp_path, "p1", text)
    base = load_output(fam["base"])
    moved_more = sum(int(((plus[k] - base[k]).abs() > (ram[k] - base[k]).abs() + 1e-7).sum()) for k in ram)
    assert moved_more > 0  # unique changes scaled by 1 + r * rho, rho > 0


@pytest.mark.parametrize("block_bytes", [64, 1 << 20])
def test_arcee_fusion_takes_each_element_from_base_or_finetune(
    fam: dict[str, Path], tmp_path: Path, block_bytes: int
) -> None:
    text = "merge_method: arcee_fusion\nbase_model: {base}\nmodels: [{{model: {ft1}}}]\n"
    out = _merge(fam, tmp_path, f"af{block_bytes}", text, block_bytes)
    base, ft = load_output(fam["base"]), load_output(fam["ft1"])
    kept = total = 0
    for k, o in out.items():
        from_ft = o == base[k] + (ft[k] - base[k])
        assert bool((from_ft | (o == base[k])).all()), k
        kept += int((from_ft & (ft[k] != base[k])).sum())
        total += o.numel()
    assert 0 < kept < total / 2  # the outliers of importance: a minority, never nothing
    if block_bytes == 64:  # every block size and every path (1-D tensors over blocks) gives the same bytes
        assert_bit_identical(out, _merge(fam, tmp_path, "af_whole", text, 1 << 20))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_arcee_fusion_one_dimensional_tensor_over_blocks(tmp_path: Path, dtype: torch.dtype) -> None:
    """A 1-D tensor is one softmax vector: split over blocks, its maxima, sums of exponentials
    and KL sum take reduction rounds; the bytes are those of the one-block path (mergekit's
    torch code itself)."""
    g = torch.Generator().manual_seed(3)
    base = {
        "model.norm.weight": 1 + 0.5 * torch.randn(300, generator=g),
        "lm_head.weight": torch.randn(4, 8, generator=g),
    }
    ft = {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    paths = {
        "base": write_checkpoint(tmp_path / "base", {k: v.to(dtype) for k, v in base.items()}),
        "ft1": write_checkpoint(tmp_path / "ft1", {k: v.to(dtype) for k, v in ft.items()}),
    }
    text = "merge_method: arcee_fusion\nbase_model: {base}\nmodels: [{{model: {ft1}}}]\n"
    split = _merge(paths, tmp_path, "split", text, 64)  # 1-D: 10-19 blocks
    whole = _merge(paths, tmp_path, "whole", text, 1 << 20)
    assert_bit_identical(split, whole)
    moved = split["model.norm.weight"] != base["model.norm.weight"].to(dtype)
    assert 0 < int(moved.sum()) < 300
