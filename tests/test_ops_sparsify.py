"""The sparsifying task-vector operators (breadcrumbs, DARE, DELLA, SCE): identities, exactness
of their selections, and the statistics of the random ones.

mergekit's own outputs are compared in test_vs_mergekit.py for the deterministic operators;
random operators cannot match mergekit's whole-tensor draws bit for bit (their draws are
seeded per block), so they are checked here in distribution: kept fraction, rescale factor,
mean over seeds. Most tests run the operators in process through the executor's protocol
(stats rounds, exact reduction, apply per block) on tensors cut into blocks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_bit_identical, load_output, synthetic_family

from bigmerge.cli import main as cli_main
from bigmerge.engine.comm import SerialComm, reduce_one_block, reduce_stats
from bigmerge.merge import MergeOptions, run_merge
from bigmerge.ops import get_op
from bigmerge.ops.base import Block, Scratch, TensorTask

RANDOM = ["dare_linear", "dare_ties", "della", "della_linear"]
DETERMINISTIC = ["breadcrumbs", "breadcrumbs_ties", "sce"]


def run_op(
    method: str,
    inputs: list[torch.Tensor],
    *,
    block_rows: int | None = None,
    seed: int = 0,
    shared: dict[str, Any] | None = None,
    compute: torch.dtype = torch.float32,
    reads: list[int] | None = None,
    **per_model: Any,
) -> torch.Tensor:
    """Merge one tensor as the executor does: inputs[0] is the base; per_model values are lists
    over the non-base inputs (or one value for all of them). Statistics rounds after the first
    get a block without inputs where op.reads says so; `reads` collects how many blocks each
    round read."""
    op = get_op(method)
    shape = tuple(inputs[0].shape)
    rows = shape[0] if shape else 1
    block_rows = block_rows or rows
    n_blocks = math.ceil(rows / block_rows)
    sh = {p.name: p.default for p in op.params if p.scope == "shared"} | (shared or {})
    models: list[dict[str, Any]] = [{}]
    for j in range(1, len(inputs)):
        m = {p.name: p.default for p in op.params if p.scope != "shared"}
        m.update({k: (v[j - 1] if isinstance(v, list) else v) for k, v in per_model.items()})
        models.append(m)
    task = TensorTask("t", shape, inputs[0].numel(), n_blocks, 0, sh, models, compute, seed=seed)
    op.check(task)
    scratch = Scratch()

    def block(b: int) -> Block:
        r0, r1 = b * block_rows, min(rows, (b + 1) * block_rows)
        rows_b = [x[r0:r1] if x.dim() else x for x in inputs]
        return Block(b, r0, r1, rows_b, scratch, reduce=lambda s: reduce_one_block(b, s))

    prev = None
    local: dict[str, Any] = {"blocks": n_blocks}
    for rnd in range(op.rounds(task)):
        partial = {}
        read = 0
        for b in range(n_blocks):
            if rnd == 0 or op.reads(rnd, task, b, prev, local):
                blk = block(b)
                read += 1
            else:
                r0, r1 = b * block_rows, min(rows, (b + 1) * block_rows)
                blk = Block(b, r0, r1, [], scratch, reduce=lambda s, b=b: reduce_one_block(b, s))
            blk.local = local
            partial[b] = op.stats(rnd, task, blk, prev)
        prev = op.finish(rnd, task, reduce_stats(SerialComm(), partial, n_blocks), prev)
        if reads is not None:
            reads.append(read)
    return torch.cat([op.apply(task, block(b), prev).clone().reshape(-1) for b in range(n_blocks)]).view(shape)


def family(n: int, shape: tuple[int, ...] = (64, 96), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base] + [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]


# -- identities ------------------------------------------------------------------------


@pytest.mark.slow  # the heaviest property tests: CI runs them, --fast does not
@pytest.mark.parametrize(
    "method, counterpart",
    [
        ("dare_linear", "task_arithmetic"),
        ("della_linear", "task_arithmetic"),
        ("breadcrumbs", "task_arithmetic"),
        ("dare_ties", "ties"),
        ("della", "ties"),
        ("breadcrumbs_ties", "ties"),
    ],
)
def test_density_one_is_the_dense_counterpart(method: str, counterpart: str) -> None:
    x = family(3)
    shared = {"normalize": True, "lambda": 0.8}
    ours = run_op(method, x, block_rows=7, shared=shared, weight=[0.5, 0.3, 0.9], density=1.0)
    ref = run_op(counterpart, x, block_rows=7, shared=shared, weight=[0.5, 0.3, 0.9], density=1.0)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("method", RANDOM + DETERMINISTIC)
def test_fine_tunes_equal_to_the_base_give_the_base(method: str) -> None:
    base = family(1)[0]
    params = {} if method == "sce" else {"weight": 0.7, "density": 0.4}
    shared = {"select_topk": 0.5} if method == "sce" else {}
    out = run_op(method, [base, base.clone(), base.clone()], block_rows=9, shared=shared, **params)
    assert torch.equal(out, base)


def test_sce_of_two_equal_fine_tunes_is_that_fine_tune() -> None:
    base, ft = family(1)
    out = run_op("sce", [base, ft, ft.clone()], block_rows=10)
    assert torch.allclose(out, ft, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", DETERMINISTIC + RANDOM)
@pytest.mark.parametrize("shape", [(30, 24), (37,), (6, 5, 4)])
def test_results_never_depend_on_block_size(method: str, shape: tuple[int, ...]) -> None:
    """The same bits for any cut into blocks: exact statistics, and random draws indexed by
    the element's position in the tensor (DELLA's ranks per row, or across blocks in 1-D)."""
    x = family(2, shape, seed=3)
    params: dict[str, Any] = {} if method == "sce" else {"weight": [0.6, 0.5], "density": [0.5, 0.3]}
    params.update({"gamma": 0.1} if method.startswith("breadcrumbs") else {"epsilon": 0.2} if "della" in method else {})
    shared = {"select_topk": 0.4} if method == "sce" else {"rescale": True}
    ref = run_op(method, x, shared=shared, **params)
    for rows in (2, 7):
        assert torch.equal(run_op(method, x, block_rows=rows, shared=shared, **params), ref), rows


# -- breadcrumbs: an exact window of ranks -------------------------------------------


def test_breadcrumbs_keeps_the_window_below_the_outliers() -> None:
    base = torch.zeros(40, 25)
    delta = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).float().view(40, 25) + 1
    delta[::2] *= -1
    out = run_op("breadcrumbs", [base, delta], block_rows=3, weight=1.0, density=0.3, gamma=0.05)
    mag = delta.abs()
    # ranks from the largest: 50 outliers dropped, the next 300 kept, the rest dropped
    expected = torch.where((mag <= 950) & (mag > 650), delta, torch.zeros(()))
    assert torch.equal(out, expected)


def test_breadcrumbs_ties_at_both_ends_keep_exactly_the_window() -> None:
    base = torch.zeros(30, 10)
    delta = torch.ones(30, 10)  # every magnitude tied: the window is taken in index order
    out = run_op("breadcrumbs", [base, delta], block_rows=4, weight=1.0, density=0.5, gamma=0.1)
    flat = out.reshape(-1)
    assert int((flat != 0).sum()) == 150
    assert torch.equal(flat[30:180], torch.ones(150))


def tied_family(n: int, shape: tuple[int, ...], levels: int, dtype: torch.dtype, seed: int = 11) -> list[torch.Tensor]:
    """A base and n fine-tunes whose deltas take few values (levels / 1024 steps), exactly in
    bfloat16 too: the k-th largest magnitude is tied many times over, across the whole tensor."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-64, 64, shape, generator=g).float() / 1024  # sums exact in bfloat16
    deltas = [torch.randint(-levels, levels + 1, shape, generator=g).float() / 1024 for _ in range(n)]
    return [base.to(dtype)] + [(base + d).to(dtype) for d in deltas]


@pytest.mark.slow  # the heaviest property tests: CI runs them, --fast does not
@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("sources", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("levels", [3, 40])
def test_ties_at_the_kth_value_split_by_index_across_chunks_and_blocks(
    method: str, sources: torch.dtype, levels: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ties of the k-th largest magnitude straddle it in every chunk of the kernels (65536
    elements) and every block: the fused kernels keep the same first ties in index order as
    the torch code, for one block (two passes, the ties found from the high-bits bin's records;
    with 3 levels the bin is too full to record and the rounds run) and for several blocks
    (the TIES round, then each block's cutoff found in parallel)."""
    x = tied_family(3, (300, 1000), levels, sources)
    params: dict[str, Any] = {"weight": [0.6, 0.5, 0.9], "density": [0.5, 0.3, 0.71]}
    if method.startswith("breadcrumbs"):
        params["gamma"] = [0.1, 0.05, 0.2]
    ref = None
    for rows in (None, 150, 37):
        out = run_op(method, x, block_rows=rows, **params)
        ref = out if ref is None else ref
        assert torch.equal(out, ref), rows
    monkeypatch.setenv("BIGMERGE_NO_NUMBA", "1")
    assert torch.equal(run_op(method, x, **params), ref)
    assert torch.equal(run_op(method, x, block_rows=150, **params), ref)
    # the premise: the k-th largest magnitude is tied on both sides of k
    mag = (x[1].float() - x[0].float()).abs().reshape(-1)
    k = int(0.5 * mag.numel())
    thr = mag.kthvalue(mag.numel() - k + 1).values
    assert int((mag > thr).sum()) < k < int((mag >= thr).sum())


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_only_the_block_where_the_kept_ties_run_out_is_searched(
    compute: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ties of the threshold in every block: the blocks before the one where a selection's quota
    of ties runs out keep all of theirs, those after keep none, and only that one block is
    searched for its cutoff (kernels.tie_cutoffs), once per selection; the same bits as the
    torch code."""
    from bigmerge.ops import kernels

    x = tied_family(3, (300, 1000), 40, torch.bfloat16)
    params: dict[str, Any] = {"weight": [0.6, 0.5, 0.9], "density": [0.5, 0.3, 0.71]}
    searched: list[list[int]] = []
    real = kernels.tie_cutoffs
    monkeypatch.setattr(
        kernels, "tie_cutoffs", lambda xs, b, rows, *a: searched.append(list(rows)) or real(xs, b, rows, *a)
    )
    out = run_op("ties", x, block_rows=20, compute=compute, **params)
    assert searched and sorted(r for rows in searched for r in rows) == [1, 2, 3], searched
    monkeypatch.setenv("BIGMERGE_NO_NUMBA", "1")
    assert torch.equal(run_op("ties", x, block_rows=20, compute=compute, **params), out)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("levels", [3, 40, 0])
def test_low_bits_and_ties_rounds_count_from_what_each_block_kept(
    method: str, compute: torch.dtype, levels: int
) -> None:
    """A tensor of many blocks reads its sources twice (high-bits round, then apply): the
    low-bits and ties rounds count from the windows each block kept (ops/task_vector/kept.py),
    with the same bits as one block (whose rounds run on the block itself)."""
    shape = (240, 2000)  # blocks of 48000 elements: enough for each to guess the threshold's bin
    x = tied_family(3, shape, levels, torch.bfloat16) if levels else family(3, shape, seed=5)
    params: dict[str, Any] = {"weight": [0.6, 0.5, 0.9], "density": [0.5, 0.3, 0.71]}
    if method.startswith("breadcrumbs"):
        params["gamma"] = [0.1, 0.05, 0.2]
    ref = run_op(method, x, compute=compute, **params)
    reads: list[int] = []
    assert torch.equal(run_op(method, x, block_rows=24, compute=compute, reads=reads, **params), ref)
    assert reads[0] == 10 and reads[1:] == [0] * (len(reads) - 1), reads


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_a_threshold_bin_too_full_to_record_is_counted_in_one_pass(
    compute: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-block tensor whose threshold's high-bits bin holds a third of it (3 levels of
    delta): its low bits are counted in one pass (float32) or read off the histogram (bfloat16:
    all 0), the kept ties found by apply; the same bits as the torch code."""
    from bigmerge.ops.task_vector.task_arithmetic import TaskArithmeticOp

    calls: list[int] = []
    real = TaskArithmeticOp._local_low_bits
    monkeypatch.setattr(TaskArithmeticOp, "_local_low_bits", lambda *a: calls.append(1) or real(*a))
    x = tied_family(3, (300, 1000), 3, torch.bfloat16)
    params: dict[str, Any] = {"weight": [0.6, 0.5, 0.9], "density": [0.5, 0.3, 0.71]}
    out = run_op("ties", x, compute=compute, **params)
    assert calls == [1]
    monkeypatch.setenv("BIGMERGE_NO_NUMBA", "1")
    assert torch.equal(run_op("ties", x, compute=compute, **params), out)


@pytest.mark.parametrize("compute, growth", [(torch.float32, 1.05), (torch.bfloat16, 3.0)])
def test_a_block_whose_window_misses_the_threshold_is_read_again(compute: torch.dtype, growth: float) -> None:
    """Deltas that grow down the rows: the first blocks guess the threshold's bin too low, so
    their windows (2 bins each side for float32, 32 for bfloat16) miss it and the low-bits
    round reads them again; the later ones hold it. The bits are the same either way."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(120, 500, generator=g)
    scale = torch.linspace(1, growth, 120).unsqueeze(1)
    x = [base] + [base + 0.01 * scale * torch.randn(120, 500, generator=g) for _ in range(2)]
    params: dict[str, Any] = {"weight": [0.6, 0.5], "density": [0.2, 0.4]}
    ref = run_op("ties", x, compute=compute, **params)
    reads: list[int] = []
    assert torch.equal(run_op("ties", x, block_rows=12, compute=compute, reads=reads, **params), ref)
    assert 0 < reads[1] < 10, reads  # the first blocks missed, the later ones held it


def test_records_over_their_budget_fall_back_to_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 magnitudes keep low-bits histograms within KEPT_BYTES per rank and tensor; with no budget
    every block is read again in the low-bits round, with the same bits."""
    from bigmerge.ops.task_vector import kept

    x = family(2, (120, 500), seed=9)
    params: dict[str, Any] = {"weight": [0.6, 0.5], "density": [0.3, 0.5]}
    ref = run_op("ties", x, **params)
    monkeypatch.setattr(kept, "KEPT_BYTES", 0)
    reads: list[int] = []
    assert torch.equal(run_op("ties", x, block_rows=12, reads=reads, **params), ref)
    assert reads[1] == 10, reads


# -- random operators -------------------------------------------------------------------


@pytest.mark.parametrize("method", RANDOM)
def test_same_seed_same_bits_other_seed_other_bits(method: str) -> None:
    x = family(2)
    a = run_op(method, x, block_rows=16, seed=5, weight=0.5, density=0.4)
    b = run_op(method, x, block_rows=16, seed=5, weight=0.5, density=0.4)
    c = run_op(method, x, block_rows=16, seed=6, weight=0.5, density=0.4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("method", RANDOM)
@pytest.mark.parametrize("block_rows", [10, None])  # None: one block, its mask drawn once for stats and apply
@pytest.mark.parametrize("rescale", [True, False])
def test_fused_kernels_match_the_torch_code(
    method: str, block_rows: int | None, rescale: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = family(3, (48, 40))
    params = {"weight": [0.6, 0.5, 0.3], "density": [0.4, 0.7, 1.0]}  # 0.7: float32(0.7) < 0.7
    shared = {"rescale": rescale}
    fused = run_op(method, x, block_rows=block_rows, seed=2, shared=shared, **params)
    monkeypatch.setenv("BIGMERGE_NO_NUMBA", "1")
    plain = run_op(method, x, block_rows=block_rows, seed=2, shared=shared, **params)
    assert torch.equal(fused, plain)


@pytest.mark.parametrize(
    "method, shared",
    [
        ("task_arithmetic", {"lambda": 0.7, "normalize": True}),
        ("ties", {"rescale": True}),
        ("ties", {"lambda": 0.6}),
        ("breadcrumbs_ties", {"rescale": True}),
        ("breadcrumbs", {}),
        ("dare_ties", {}),
        ("della", {"lambda": 1.3}),
    ],
)
@pytest.mark.parametrize("sources", [torch.bfloat16, torch.float32])
def test_fused_kernels_do_bfloat16_arithmetic_as_torch(
    method: str, shared: dict[str, Any], sources: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a bfloat16 compute dtype the kernels round every operation as torch does."""
    x = [t.to(sources) for t in family(3, (40, 36), seed=7)]
    params = {"weight": [0.6, 0.5, 0.3], "density": [0.4, 0.6, 0.3]}
    fused = run_op(method, x, block_rows=9, seed=2, shared=shared, compute=torch.bfloat16, **params)
    monkeypatch.setenv("BIGMERGE_NO_NUMBA", "1")
    plain = run_op(method, x, block_rows=9, seed=2, shared=shared, compute=torch.bfloat16, **params)
    assert torch.equal(fused.float(), plain.float())


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_kept_fraction_and_rescale(method: str) -> None:
    base = torch.zeros(256, 256)  # out = the rescaled kept delta itself, no rounding by a base
    delta = family(1, (256, 256))[1]
    density = 0.3
    out = run_op(method, [base, delta], block_rows=32, seed=1, weight=1.0, density=density, epsilon=0.2)
    kept = out != 0
    frac = float(kept.float().mean())
    sigma = math.sqrt(density * (1 - density) / delta.numel())
    assert abs(frac - density) < 5 * sigma, frac
    # the kept deltas are scaled by one factor: L1 before / L1 after, about 1 / density for DARE
    factor = out[kept] / delta[kept]
    assert float(factor.max() - factor.min()) < 1e-4 * float(factor.mean())
    expected = float(delta.abs().sum() / delta[kept].abs().sum())
    assert float(factor.mean()) == pytest.approx(expected, rel=1e-5)
    if method == "dare_linear":
        assert float(factor.mean()) == pytest.approx(1 / density, rel=0.03)


def test_della_keep_probability_rises_with_magnitude_rank() -> None:
    """Within each row, rank r of n (from the smallest) is kept with probability
    density - epsilon + 2 * epsilon * r / (n - 1), as mergekit's della_magprune."""
    rows, n, density, eps = 512, 64, 0.5, 0.3
    base = torch.zeros(rows, n)
    # every row holds the magnitudes 1..n in a different order
    g = torch.Generator().manual_seed(0)
    delta = torch.stack([torch.randperm(n, generator=g) for _ in range(rows)]).float() + 1
    out = run_op("della_linear", [base, delta], block_rows=50, seed=3, weight=1.0, density=density, epsilon=eps)
    kept = (out != 0).float()
    by_rank = torch.zeros(n)
    by_rank.index_add_(0, (delta - 1).long().reshape(-1), kept.reshape(-1))
    observed = by_rank / rows
    expected = density - eps + 2 * eps * torch.arange(n) / (n - 1)
    sigma = torch.sqrt(expected * (1 - expected) / rows)
    assert bool(((observed - expected).abs() < 5 * sigma + 1e-9).all())
    assert abs(float(kept.mean()) - density) < 0.02


def test_della_ranks_one_row_across_blocks() -> None:
    """A 1-D tensor is one row of mergekit's ranking, however many blocks hold it."""
    n, density, eps = 4000, 0.5, 0.45
    base = torch.zeros(n)
    delta = torch.arange(1, n + 1, dtype=torch.float32)  # rank = index
    out = run_op("della_linear", [base, delta], block_rows=300, seed=4, weight=1.0, density=density, epsilon=eps)
    kept = (out != 0).float()
    assert float(kept[: n // 4].mean()) < 0.2 < 0.8 < float(kept[-n // 4 :].mean())


@pytest.mark.parametrize("method, counterpart", [("dare_linear", "task_arithmetic"), ("dare_ties", "ties")])
def test_mean_over_seeds_is_the_deterministic_counterpart(method: str, counterpart: str) -> None:
    """DARE is unbiased up to the L1 rescale (about 1 / density): averaged over seeds it gives
    the dense merge. One fine-tune, so that the sign election is linear in expectation."""
    x = family(1, (32, 32))
    seeds = 120
    mean = sum(run_op(method, x, block_rows=16, seed=s, weight=0.8, density=0.5) for s in range(seeds)) / seeds
    ref = run_op(counterpart, x, weight=0.8, density=1.0, shared={"normalize": False})
    delta = ref - x[0]
    rel = float((mean - ref).norm() / delta.norm())
    assert rel < 3 * math.sqrt((1 / 0.5 - 1) / seeds), rel


def test_della_mean_over_seeds_is_its_expectation() -> None:
    """DELLA's rescale is mergekit's L1 norm matching, not 1 / p per element: the mean over
    seeds is delta * p(rank) * sum|delta| / sum(p * |delta|)."""
    base, ft = family(1, (16, 48))
    delta = ft - base
    density, eps, seeds = 0.5, 0.3, 120
    runs = [
        run_op("della_linear", [base, ft], block_rows=8, seed=s, weight=1.0, density=density, epsilon=eps)
        for s in range(seeds)
    ]
    mean = sum(runs) / seeds - base
    ranks = delta.abs().argsort(dim=1).argsort(dim=1).float()
    p = density - eps + 2 * eps * ranks / (delta.shape[1] - 1)
    expected = delta * p * (delta.abs().sum() / (p * delta.abs()).sum())
    rel = float((mean - expected).norm() / expected.norm())
    assert rel < 0.1, rel


# -- end to end -------------------------------------------------------------------------


def test_seed_on_the_command_line_changes_the_output(tmp_path: Path) -> None:
    f = synthetic_family(tmp_path / "m", n=2, rows=24)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"merge_method: dare_ties\nbase_model: {f['base']}\nmodels:\n"
        f"  - model: {f['ft1']}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
        f"  - model: {f['ft2']}\n    parameters: {{weight: 0.5, density: 0.5}}\nseed: 3\n"
    )
    outs = {}
    for name, extra in (("config", []), ("other", ["--seed", "4"])):
        assert cli_main(["merge", str(cfg), str(tmp_path / name), "--quiet", *extra]) == 0
        outs[name] = load_output(tmp_path / name)
    again = run_merge(str(cfg), str(tmp_path / "again"), SerialComm(), MergeOptions(quiet=True, seed=3))
    assert again is not None
    assert_bit_identical(outs["config"], load_output(tmp_path / "again"))
    k = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(outs["config"][k], outs["other"][k])


def test_edge_cases_as_mergekit() -> None:
    base, ft = family(1, (10, 10))
    # breadcrumbs with int(density * numel) = 0 keeps nothing
    assert torch.equal(run_op("breadcrumbs", [base, ft], weight=1.0, density=0.005, gamma=0.0), base)
    # SCE of one fine-tune with select_topk < 1: no variance, nothing selected, the base
    assert torch.equal(run_op("sce", [base, ft], shared={"select_topk": 0.5}), base)
    # DARE without rescale: kept deltas are the deltas, weighted
    out = run_op("dare_linear", [torch.zeros(10, 10), ft], shared={"rescale": False}, weight=0.5, density=0.5)
    kept = out != 0
    assert torch.equal(out[kept], ft[kept] * 0.5)
    # DELLA on rows of one element keeps with probability density (mergekit cannot rank them)
    col = run_op("della_linear", [torch.zeros(4000, 1), torch.ones(4000, 1)], weight=1.0, density=0.3, epsilon=0.1)
    assert abs(float((col != 0).float().mean()) - 0.3) < 0.04
