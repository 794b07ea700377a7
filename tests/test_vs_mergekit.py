"""Same tensors as mergekit 0.1.5, against golden outputs made by tools/make_golden.py.

Linear and task arithmetic: every element within 1 ulp of the output dtype. TIES: the
same, except where a source's |delta| ties exactly with that tensor's top-k threshold:
mergekit keeps an arbitrary subset of such ties (its argsort is not stable), bigmerge
keeps all of them; no O(n) selection can reproduce an unstable sort's choice. Breadcrumbs
and SCE likewise, at both ends of breadcrumbs' window and at SCE's variance threshold.
DARE and DELLA draw differently from mergekit by design: compared in distribution.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import load_output, merge_tensors
from safetensors.torch import load_file
from toy_models import family_files, make_family, sha256_file

pytestmark = pytest.mark.slow  # every golden config merged and compared with mergekit's output

GOLDEN = Path(__file__).parent / "golden"
MANIFEST = json.loads((GOLDEN / "MANIFEST.json").read_text())
# Random operators draw differently from mergekit (per element position, not torch's global
# generator): their goldens are compared in distribution (test_random_ops_agree_in_distribution).
RANDOM = ("dare_", "della")
CONFIGS = sorted(n for n in MANIFEST["configs"] if not n.startswith(RANDOM))
RANDOM_CONFIGS = sorted(n for n in MANIFEST["configs"] if n.startswith(RANDOM))
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    out = {}
    for name, fam in MANIFEST["families"].items():
        args = {k: v for k, v in fam["args"].items()}
        out[name] = make_family(tmp_path_factory.mktemp(f"family{name}"), **args)
    return out


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place, for finite values of one float dtype."""
    iv = INT_VIEW[a.dtype]
    ia = a.contiguous().view(iv).to(torch.int64)
    ib = b.contiguous().view(iv).to(torch.int64)
    # map sign-magnitude bit patterns onto a monotonic integer line
    top = 1 << (torch.iinfo(iv).bits - 1)
    ia = torch.where(ia < 0, -(ia + top), ia)
    ib = torch.where(ib < 0, -(ib + top), ib)
    return (ia - ib).abs()


def _tie_positions(name: str, fam: dict[str, Path], resolved: dict, shape: torch.Size) -> torch.Tensor:
    """Where some source's |delta| equals its top-k threshold in mergekit's compute dtype (of
    shape `shape`, the output's). Vocabulary tensors whose sources differ in rows (a union or
    padded vocabulary): the rows all sources share are compared as they are, the others (added
    tokens, padding: a few rows) count as ties, the tensors mergekit ranked not being at hand."""
    info = resolved[name]
    dt = getattr(torch, info["compute_dtype"])
    srcs = {k: load_output(fam[k])[name] for k in info["inputs"]}
    rows = min(t.shape[0] for t in srcs.values()) if srcs else 0
    base = srcs[info["base"]].to(dt)[:rows]
    ties = torch.zeros(shape, dtype=torch.bool)
    ties[rows:] = True
    for model, tk in (info.get("topk") or {}).items():
        if tk is None:  # density 1: nothing dropped, no boundary
            continue
        delta = (srcs[model].to(dt)[:rows] - base).abs().float()
        ties[:rows] |= delta == tk["threshold"]
    return ties


# Methods whose selection boundaries the golden probe does not record: recomputed here.
SELECTING = ("breadcrumbs", "sce")


@functools.lru_cache(maxsize=8)
def _source(path: Path) -> dict[str, torch.Tensor]:
    return load_output(path)


def _selection_ties(info: dict, fam: dict[str, Path], tname: str) -> torch.Tensor:
    """Where a selection boundary of breadcrumbs (|delta| at either end of the kept window) or
    SCE (variance at its top-k threshold) has tied values, ranked as mergekit ranks them; which
    of the tied elements an unstable sort keeps is not reproducible (see the TIES note)."""
    dt = getattr(torch, info["compute_dtype"])
    srcs = {k: _source(fam[k])[tname] for k in info["inputs"]}
    base = srcs[info["base"]].to(dt)
    others = [m for m in info["inputs"] if m != info["base"]]
    params = info["params"]
    ties = torch.zeros(base.shape, dtype=torch.bool)
    if "select_topk" in params:
        tvs = torch.stack([srcs[m].to(dt) - base for m in others])
        var = torch.var(tvs, dim=0, unbiased=False).float()
        k = int(torch.count_nonzero(var) * params["select_topk"])
        if 0 < k and params["select_topk"] < 1:
            ties |= var == torch.topk(var.reshape(-1), k).values[-1]
        return ties
    for m in others:
        density, gamma = params["density"][m], params["gamma"][m]
        if density >= 1:
            continue
        w = (srcs[m].to(dt) - base).abs().float()
        n = w.numel()
        target = int(density * n)
        n_bot = max(0, n - target - int(gamma * n))
        ranked = torch.sort(w.reshape(-1)).values
        for edge in (n_bot, n_bot + target - 1):  # the smallest and the largest kept
            if 0 <= edge < n and ranked[edge] > 0:
                ties |= w == ranked[edge]
    return ties


def _check_selecting(
    tname: str, a: torch.Tensor, b: torch.Tensor, ulps: torch.Tensor, fam: dict[str, Path], info: dict
) -> int:
    """Breadcrumbs and SCE: within 1 ulp off the boundary ties. Where the result also depends
    on a whole-tensor float sum (the L1 rescale; SCE's mean squares, which mergekit takes in
    float32 over the whole tensor and bigmerge exactly in float64), within that sum's rounding:
    1e-6 of the value plus 1e-6 of the tensor's largest value. Returns the elements that
    differ at ties."""
    ties = _selection_ties(info, fam, tname)
    off = ~ties
    if info["params"].get("rescale") or "select_topk" in info["params"]:
        diff = (a.float() - b.float()).abs()
        tol = 1e-6 * b.float().abs() + 1e-6 * float(b.float().abs().max())
        bad = off & (ulps > 1) & (diff > tol)
        assert not bad.any(), f"{tname}: {int(bad.sum())} elements off the ties beyond the float-sum tolerance"
    elif off.any():
        assert int(ulps[off].max()) <= 1, f"{tname}: {int(ulps[off].max())} ulps away from mergekit off the ties"
    return int((ulps[ties] > 1).sum())


# Methods with whole-tensor float statistics (norms, dot products, cosines): mergekit sums
# float32 products in float32, in an order torch picks; bigmerge sums them exactly (float64,
# block order: the same on any world size) and rounds once. Their coefficients then differ in
# the last bits, and an element by a few ulps of the tensor's largest input (many ulps of a
# small result where terms cancel), more where the method amplifies a coefficient: model_stock's
# t = k cos / (1 + (k - 1) cos) near cos = -1 / (k - 1), as in rows of the filter-wise fixture
# (64 random values, cos down to -0.97: x60). Bound: this many ulps of the output dtype times
# the largest |value| among the tensor's sources (longest matching name prefix).
STATISTICS_ULPS = {
    "slerp": 4,
    "nuslerp": 4,
    "multislerp": 4,
    "karcher": 4,
    "model_stock": 4,
    "model_stock_filter_wise": 128,
}


# Methods whose every operation bigmerge does as mergekit does, in the same dtypes (RAM's
# integer counts, arcee_fusion's exact quartiles and mergekit's torch code per vector): the
# same bits. (arcee_fusion's quartiles differ only above 1,000,000 elements, where mergekit
# samples; none of these fixtures is that large.)
EXACT = ("arcee_fusion", "ram")


def _statistics_ulps(name: str) -> int | None:
    hits = [k for k in STATISTICS_ULPS if name.startswith(k)]
    return STATISTICS_ULPS[max(hits, key=len)] if hits else None


@functools.cache
def _source(path: Path) -> dict[str, torch.Tensor]:
    return load_output(path)


# With a 16-bit compute dtype mergekit rounds every norm and dot product to it (and rounds
# element-wise products before summing them where it writes `(a * b).sum()`); bigmerge rounds
# at the same places, from exact sums of the same rounded values, so the only difference left
# is where mergekit's float32 accumulation and the exact sum round to different 16-bit values
# (a sum within a float32 rounding of a 16-bit rounding boundary). On these fixtures that
# happens once: in nuslerp_cols_bf16_native the norm of column 1 of embed_tokens is
# 0.837890735 (exact), 1.1e-7 above the midpoint of two bf16 values, and mergekit's float32
# sum over the 260 rows lands below it (216 elements of that column then differ, within the
# float32-compute bound above); those cases keep that bound, every other 16-bit case is held
# to bit equality.
SIXTEEN_BIT = ("bfloat16", "float16")
SIXTEEN_BIT_RESIDUAL = ("nuslerp_cols_bf16_native",)


def _check_statistics(name: str, tname: str, a: torch.Tensor, b: torch.Tensor, srcs: list[Path], compute: str) -> None:
    if compute in SIXTEEN_BIT and not name.startswith(("slerp", *SIXTEEN_BIT_RESIDUAL)):  # slerp: float32 scalars
        assert torch.equal(a, b), f"{tname}: {int((a != b).sum())} elements differ from mergekit (16-bit compute)"
        return
    scale = max(float(_source(s)[tname].float().abs().max()) for s in srcs)
    bound = _statistics_ulps(name) * torch.finfo(b.dtype).eps * scale  # type: ignore[operator]
    diff = float((a.double() - b.double()).abs().max())
    assert diff <= bound, f"{tname}: {diff:.3g} away from mergekit, more than {bound:.3g}"


# Configs whose vocabulary is padded to a multiple (`tokenizer.pad_to_multiple_of`), with the
# output vocabulary's size before padding: mergekit fills each source's padding rows with its mean
# row, torch.mean over the whole tensor on the CPU; bigmerge reproduces torch's summation order
# as the blocks stream (engine/colmean.py), so those rows are mergekit's bit for bit.
PADDED_VOCAB = {"tokenizer_tokens_pad": 263, "tokenizer_base_pad": 260}


def _check_padding(tname: str, a: torch.Tensor, b: torch.Tensor, vocab: int) -> torch.Tensor:
    """The padding rows of a vocabulary tensor checked, bit for bit; the rows before them are
    returned masked in."""
    differ = int((a[vocab:] != b[vocab:]).sum())
    assert differ == 0, f"{tname}: {differ} elements of the padding rows differ from mergekit"
    keep = torch.zeros(a.shape, dtype=torch.bool)
    keep[:vocab] = True
    return keep


def compare_with_mergekit(
    rule: str,
    ours: dict[str, torch.Tensor],
    theirs: dict[str, torch.Tensor],
    resolved: dict,
    fam: dict[str, Path],
    models: list[str],
    padded_vocab: int | None = None,
) -> None:
    """bigmerge's output against mergekit's, tensor by tensor, within what each kind of method
    allows (see the module docstring). `rule` picks the allowance: a golden case's name here, a
    merge_method in the corpus test (the same prefixes: ties, breadcrumbs, sce, slerp, ...);
    `padded_vocab`: the vocabulary's size before `tokenizer.pad_to_multiple_of` padding."""
    name = rule
    assert sorted(ours) == sorted(theirs)
    total = differing_at_ties = 0
    for tname in theirs:
        a, b = ours[tname], theirs[tname]
        assert a.dtype == b.dtype and a.shape == b.shape, tname
        ulps = _ulps(a, b)
        total += a.numel()
        if name.startswith(SELECTING):
            differing_at_ties += _check_selecting(tname, a, b, ulps, fam, resolved[tname])
        elif "ties" in name and resolved[tname].get("topk"):
            ties = _tie_positions(tname, fam, resolved, a.shape)
            off = ~ties
            if resolved[tname]["params"].get("rescale"):
                # The L1 rescale factor: bigmerge sums |delta| exactly (float64, block by block),
                # mergekit in float32 over the whole tensor; the factors differ in the last bits.
                scale = float(b.abs().max())
                assert torch.allclose(a[off].float(), b[off].float(), rtol=1e-6, atol=1e-6 * scale), tname
            elif off.any():
                assert int(ulps[off].max()) <= 1, (
                    f"{tname}: {int(ulps[off].max())} ulps away from mergekit off the ties"
                )
            differing_at_ties += int((ulps[ties] > 1).sum())
        elif name.startswith(EXACT):
            assert torch.equal(a, b), f"{tname}: {int((a != b).sum())} elements differ from mergekit"
        elif _statistics_ulps(name) is not None:
            _check_statistics(name, tname, a, b, [fam[m] for m in models], resolved[tname]["compute_dtype"])
        elif padded_vocab is not None and a.dim() == 2 and a.shape[0] > padded_vocab:
            kept = _check_padding(tname, a, b, padded_vocab)
            assert int(ulps[kept].max()) <= 1, f"{tname}: {int(ulps[kept].max())} ulps away from mergekit"
        else:
            assert int(ulps.max()) <= 1, f"{tname}: {int(ulps.max())} ulps away from mergekit"
    # Differences sit only on exact ties at the threshold (asserted above). Their share is
    # large on these bf16 toys, whose deltas take few distinct values; it is reported here.
    if differing_at_ties:
        print(f"{name}: {differing_at_ties} of {total} elements differ, all at top-k ties")


@pytest.mark.parametrize("name", CONFIGS)
def test_same_tensors_as_mergekit(name: str, families: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    cfg = MANIFEST["configs"][name]
    fam = families[cfg["family"]]
    actual = {rel: sha256_file(p) for rel, p in family_files(fam)}
    stale = [k for k, v in cfg["fixture_sha256"].items() if actual.get(k) != v]
    assert not stale, f"fixtures changed since the golden files were made ({stale[:3]}): rerun tools/make_golden.py"

    text = (GOLDEN / cfg["config"]).read_text().format(**{k: str(v) for k, v in fam.items()})
    ours = merge_tensors(text, tmp_path / "out", block_bytes=4096)
    theirs = load_file(str(GOLDEN / f"{name}.safetensors"))
    resolved = json.loads((GOLDEN / "resolved" / f"{name}.json").read_text())
    compare_with_mergekit(name, ours, theirs, resolved, fam, cfg["models"], PADDED_VOCAB.get(name))
    # config.json and tokenizer come along, with the output dtype recorded
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg.get("dtype", out_cfg.get("torch_dtype")) == str(next(iter(ours.values())).dtype).replace(
        "torch.", ""
    )
    assert (tmp_path / "out" / "tokenizer.json").exists()


def _kept_stats(
    out: torch.Tensor, base: torch.Tensor, delta: torch.Tensor, factor: float, keep_p: torch.Tensor
) -> tuple[int, int, float, list[tuple[int, int, float]], int]:
    """One fine-tune's output read back as base + mask * delta * factor * L1 ratio: (kept,
    nonzero deltas, expected kept, per quarter of keep probability (kept, n, expected),
    kept elements whose scale is not factor * L1 ratio)."""
    moved = out.to(base.dtype) - base
    nz = delta != 0  # a zero delta reads as dropped either way
    kept = (moved != 0) & nz
    ratio = float(delta.abs().sum() / delta[kept].abs().sum()) if kept.any() else 1.0
    expected = delta[kept] * (factor * ratio)
    slack = 1e-4 * expected.abs() + 4 * torch.finfo(torch.float32).eps * base[kept].abs()  # out = base + ...
    off = int(((moved[kept] - expected).abs() > slack).sum())
    quarters = []
    lo, hi = float(keep_p.min()), float(keep_p.max())
    if hi > lo:
        edges = torch.linspace(lo, hi, 5)
        for q in range(4):
            sel = (keep_p >= edges[q]) & ((keep_p < edges[q + 1]) if q < 3 else (keep_p <= hi)) & nz
            quarters.append((int(kept[sel].sum()), int(sel.sum()), float(keep_p[sel].sum())))
    return int(kept.sum()), int(nz.sum()), float(keep_p[nz].sum()), quarters, off


def _keep_probability(delta: torch.Tensor, density: float, epsilon: float | None) -> torch.Tensor:
    """Each element's keep probability: density (DARE), or DELLA's by magnitude rank along dim 1."""
    if epsilon is None:
        return torch.full(delta.shape, density)
    rows = delta.abs().float().reshape(delta.shape[0], -1) if delta.dim() > 1 else delta.abs().float()[None]
    n = rows.shape[1]
    rank_norm = rows.argsort(dim=1).argsort(dim=1).float() / max(1, n - 1)
    return (density - epsilon + 2 * epsilon * rank_norm).reshape(delta.shape)


@pytest.mark.parametrize("name", RANDOM_CONFIGS)
def test_random_ops_agree_in_distribution(name: str, families: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    """DARE and DELLA against mergekit's own output (one fine-tune per config): both keep
    `density` of each task vector (DELLA: density - eps + 2 eps rank_norm, checked per quarter
    of that probability),
    both scale the kept deltas by one factor, weight x L1 ratio, and the two kept fractions
    agree within sampling error."""
    cfg = MANIFEST["configs"][name]
    fam = families[cfg["family"]]
    text = (GOLDEN / cfg["config"]).read_text().format(**{k: str(v) for k, v in fam.items()})
    ours = merge_tensors(text, tmp_path / "out", block_bytes=4096)
    theirs = load_file(str(GOLDEN / f"{name}.safetensors"))
    resolved = json.loads((GOLDEN / "resolved" / f"{name}.json").read_text())
    totals = {"ours": [0, 0, 0.0], "theirs": [0, 0, 0.0]}  # kept, n, expected kept
    by_quarter = {who: [[0, 0, 0.0] for _ in range(4)] for who in totals}
    for tname, info in resolved.items():
        dt = getattr(torch, info["compute_dtype"])
        (model,) = [m for m in info["inputs"] if m != info["base"]]
        base = _source(fam[info["base"]])[tname].to(dt)
        delta = _source(fam[model])[tname].to(dt) - base
        p = info["params"]
        factor = (1.0 if p["normalize"] else p["weight"][model]) * p["lambda"]
        keep_p = _keep_probability(delta, p["density"][model], p["epsilon"][model] if "epsilon" in p else None)
        for who, out in (("ours", ours[tname]), ("theirs", theirs[tname])):
            kept, n, expected, quarters, off = _kept_stats(out, base, delta, factor, keep_p)
            assert off == 0, f"{who} {tname}: {off} kept elements not scaled by weight x L1 ratio"
            for acc, add in zip([totals[who], *by_quarter[who]], [(kept, n, expected), *quarters]):
                for k in range(3):
                    acc[k] += add[k]
    fracs = {}
    for who in totals:
        for kept, n, expected in [totals[who], *by_quarter[who]]:
            if n:
                d = expected / n
                assert abs(kept / n - d) < 5 * math.sqrt(d * (1 - d) / n) + 1e-3, (
                    f"{who}: kept {kept / n:.4f} of {n}, expected {d:.4f}"
                )
        fracs[who] = totals[who][0] / totals[who][1]
    assert abs(fracs["ours"] - fracs["theirs"]) < 5 * math.sqrt(2 * 0.25 / totals["ours"][1])
