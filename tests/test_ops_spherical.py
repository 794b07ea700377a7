"""Spherical and geometric operators: their identities, and no dependence on the block size.

slerp, nuslerp, multislerp, karcher, model_stock, nearswap (same tensors as mergekit:
test_vs_mergekit.py; the same bytes on 1/2/3 ranks: test_mpi.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_bit_identical, load_output, merge_tensors, synthetic_family

from bigmerge.errors import ConfigError


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    f = synthetic_family(tmp_path_factory.mktemp("sph"), n=3, rows=40)
    f["ft1_copy"] = f["ft1"].parent / "ft1_copy"
    shutil.copytree(f["ft1"], f["ft1_copy"])
    return f


def merge(text: str, tmp: Path, name: str = "out", block_bytes: int = 4096) -> dict[str, torch.Tensor]:
    return merge_tensors(text, tmp / name, block_bytes=block_bytes)


def models(*entries: tuple[Path, str]) -> str:
    out = "models:\n"
    for path, params in entries:
        out += f"  - model: {path}\n" + (f"    parameters: {{{params}}}\n" if params else "")
    return out


def assert_close(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], n: int) -> None:
    """Every element within n ulps of the tensor's largest value (results near zero round coarsely)."""
    assert sorted(ours) == sorted(ref)
    for k in ref:
        bound = n * torch.finfo(ref[k].dtype).eps * float(ref[k].abs().max())
        diff = float((ours[k].double() - ref[k].double()).abs().max())
        assert diff <= bound, f"{k}: {diff:.3g} > {bound:.3g}"


def configs(f: dict[str, Path]) -> dict[str, str]:
    b, m1, m2, m3 = f["base"], f["ft1"], f["ft2"], f["ft3"]
    return {
        "slerp": f"merge_method: slerp\nbase_model: {b}\n"
        + models((b, ""), (m1, ""))
        + "parameters: {t: [0.2, 0.8]}\n",
        "nuslerp": "merge_method: nuslerp\n" + models((m1, "weight: 0.3"), (m2, "weight: 0.7")),
        "nuslerp_row_wise": f"merge_method: nuslerp\nbase_model: {b}\n"
        + models((m1, "weight: 0.3"), (m2, "weight: 0.6"))
        + "parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}\n",
        "nuslerp_rows": f"merge_method: nuslerp\nbase_model: {b}\n"
        + models((m1, "weight: 0.3"), (m2, "weight: 0.6"))
        + "parameters: {nuslerp_flatten: false}\n",
        "multislerp": f"merge_method: multislerp\nbase_model: {b}\n"
        + models((m1, "weight: 0.2"), (m2, "weight: 0.5"), (m3, "weight: 0.3")),
        "karcher": "merge_method: karcher\n" + models((m1, ""), (m2, ""), (m3, "")),
        "model_stock": f"merge_method: model_stock\nbase_model: {b}\n" + models((m1, ""), (m2, ""), (m3, "")),
        "model_stock_filter_wise": f"merge_method: model_stock\nbase_model: {b}\n"
        + models((m1, ""), (m2, ""))
        + "parameters: {filter_wise: true}\n",
        "nearswap": f"merge_method: nearswap\nbase_model: {b}\n"
        + models((b, ""), (m1, ""))
        + "parameters: {t: 0.08}\n",
    }


@pytest.mark.parametrize(
    "method",
    [
        "slerp",
        "nuslerp",
        "nuslerp_row_wise",
        "nuslerp_rows",
        "multislerp",
        "karcher",
        "model_stock",
        "model_stock_filter_wise",
        "nearswap",
    ],
)
def test_output_never_depends_on_block_size(fam: dict[str, Path], tmp_path: Path, method: str) -> None:
    text = configs(fam)[method]
    # 64 bytes: many blocks per tensor (rounds reduced over blocks); 1 MiB: one block each (statistics in apply)
    outs = [merge(text, tmp_path, f"b{b}", block_bytes=b) for b in (64, 1 << 20)]
    assert_bit_identical(outs[0], outs[1])


def test_slerp_ends_are_the_models(fam: dict[str, Path], tmp_path: Path) -> None:
    b, m1 = fam["base"], fam["ft1"]
    head = f"merge_method: slerp\nbase_model: {m1}\n" + models((b, ""), (m1, ""))
    assert_bit_identical(merge(head + "parameters: {t: 0.0}\n", tmp_path, "t0", 200), load_output(m1))
    assert_bit_identical(merge(head + "parameters: {t: 1.0}\n", tmp_path, "t1", 200), load_output(b))


def test_nearswap_t0_is_the_base(fam: dict[str, Path], tmp_path: Path) -> None:
    b, m1 = fam["base"], fam["ft1"]
    text = f"merge_method: nearswap\nbase_model: {b}\n" + models((b, ""), (m1, "")) + "parameters: {t: 0.0}\n"
    assert_bit_identical(merge(text, tmp_path, block_bytes=200), load_output(b))


@pytest.mark.parametrize("method", ["slerp", "nuslerp", "nuslerp_base", "multislerp", "karcher", "nearswap"])
def test_two_equal_models_give_that_model(fam: dict[str, Path], tmp_path: Path, method: str) -> None:
    b, m1, c1 = fam["base"], fam["ft1"], fam["ft1_copy"]
    text = {
        "slerp": f"merge_method: slerp\nbase_model: {m1}\n" + models((m1, ""), (c1, "")) + "parameters: {t: 0.3}\n",
        "nuslerp": "merge_method: nuslerp\n" + models((m1, "weight: 0.4"), (c1, "weight: 0.6")),
        "nuslerp_base": f"merge_method: nuslerp\nbase_model: {b}\n" + models((m1, "weight: 0.4"), (c1, "weight: 0.6")),
        "multislerp": "merge_method: multislerp\n" + models((m1, "weight: 0.4"), (c1, "weight: 0.6")),
        "karcher": "merge_method: karcher\n" + models((m1, ""), (c1, "")),
        "nearswap": f"merge_method: nearswap\nbase_model: {m1}\n"
        + models((m1, ""), (c1, ""))
        + "parameters: {t: 0.3}\n",
    }[method]
    ref = load_output(m1)
    if method == "nuslerp_base":  # base + (model - base), rounded twice
        base = load_output(b)
        ref = {k: base[k] + (v - base[k]) for k, v in ref.items()}
    # (1 - t) * x + t * x and x / |x| * |x| round: equal to the model within an ulp or two, as in mergekit
    assert_close(merge(text, tmp_path, block_bytes=200), ref, 2)


def test_model_stock_with_identical_finetunes_gives_the_finetune(fam: dict[str, Path], tmp_path: Path) -> None:
    b, m1, c1 = fam["base"], fam["ft1"], fam["ft1_copy"]
    for fw in ("false", "true"):
        text = f"merge_method: model_stock\nbase_model: {b}\n" + models((m1, ""), (c1, ""))
        out = merge(text + f"parameters: {{filter_wise: {fw}}}\n", tmp_path, f"fw_{fw}", 200)
        assert_close(out, load_output(m1), 2)


@pytest.mark.parametrize("method", ["karcher", "multislerp"])
def test_one_model_is_that_model(fam: dict[str, Path], tmp_path: Path, method: str) -> None:
    b, m2 = fam["base"], fam["ft2"]
    if method == "karcher":
        text = "merge_method: karcher\n" + models((m2, ""))
    else:  # mergekit returns the one non-base model as is, base or not
        text = f"merge_method: multislerp\nbase_model: {b}\n" + models((m2, "weight: 0.5"))
    assert_bit_identical(merge(text, tmp_path, block_bytes=200), load_output(m2))


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {ft1}}}, {{model: {ft2}}}]\n"
            "parameters: {{t: 0.5}}\n",
            "two models",
        ),
        (
            "merge_method: nearswap\nmodels: [{{model: {ft1}}}, {{model: {ft2}}}]\nparameters: {{t: 0.1}}\n",
            "base_model",
        ),
        ("merge_method: model_stock\nbase_model: {base}\nmodels: [{{model: {ft1}}}]\n", "at least"),
        (
            "merge_method: nuslerp\nmodels: [{{model: {ft1}, parameters: {{weight: 1}}}}, {{model: {ft2}, "
            "parameters: {{weight: 1}}}}, {{model: {ft3}, parameters: {{weight: 1}}}}]\n",
            "exactly two",
        ),
    ],
)
def test_bad_model_counts_are_config_errors(fam: dict[str, Path], tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        merge(text.format(**{k: str(v) for k, v in fam.items()}), tmp_path)


def test_sums_are_the_same_on_one_thread_or_many(monkeypatch: pytest.MonkeyPatch) -> None:
    from bigmerge.ops import sums

    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3 * sums.SEG + 17, generator=g)
    coef = torch.rand(3, generator=g).double().numpy()
    runs = []
    for threshold in (1 << 62, 0):  # one thread, then the parallel kernels
        monkeypatch.setattr(sums, "PARALLEL_MIN", threshold)
        lin = sums.lincomb(x, coef, torch.empty(x.shape[1]))
        runs.append((sums.seg_gram(x, 1000), sums.col_gram(x[:, : 51 * 3855], 51), lin))
    assert (runs[0][0] == runs[1][0]).all() and (runs[0][1] == runs[1][1]).all()
    assert torch.equal(runs[0][2], runs[1][2])


# float32 sources; bf16 sources computed in bf16; bf16 sources computed in float32
FUSED_CASES = [(torch.float32, ""), (torch.bfloat16, ""), (torch.bfloat16, "dtype: float32\n")]


@pytest.mark.parametrize("dtype, extra", FUSED_CASES)
def test_fused_slerp_is_the_torch_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, extra: str
) -> None:

    f = synthetic_family(tmp_path / "fam", n=1, dtype=dtype, rows=40)
    text = f"merge_method: slerp\nbase_model: {f['base']}\n" + models((f["base"], ""), (f["ft1"], ""))
    text += "parameters: {t: [0.3, 0.8]}\n" + extra
    outs = [merge(text, tmp_path, "fused", 200), merge(text, tmp_path, "fused1", 1 << 20)]
    monkeypatch.setenv("BIGMERGE_NO_NUMBA", "1")
    assert_bit_identical(merge(text, tmp_path, "torch", 200), outs[0])
    assert_bit_identical(merge(text, tmp_path, "torch1", 1 << 20), outs[1])


@pytest.mark.parametrize("dtype, extra", FUSED_CASES)
def test_fused_model_stock_is_the_torch_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, extra: str
) -> None:

    f = synthetic_family(tmp_path / "fam", n=3, dtype=dtype, rows=40)
    head = f"merge_method: model_stock\nbase_model: {f['base']}\n{extra}"
    texts = {
        "three": head + models((f["ft1"], ""), (f["ft2"], ""), (f["ft3"], "")),
        "rows": head + models((f["ft1"], ""), (f["ft2"], "")) + "parameters: {filter_wise: true}\n",
    }
    fused = {(k, b): merge(v, tmp_path, f"f{k}{b}", b) for k, v in texts.items() for b in (200, 1 << 20)}
    monkeypatch.setenv("BIGMERGE_NO_NUMBA", "1")
    for (k, b), out in fused.items():
        assert_bit_identical(merge(texts[k], tmp_path, f"t{k}{b}", b), out)
