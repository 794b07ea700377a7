"""Kernel-level equalities: the numba kernels against the plain numpy statement of the same draws."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bigmerge.ops import kernels


@pytest.mark.parametrize("key", [0, 12345, 2**64 - 3])
@pytest.mark.parametrize("start", [0, 777, 2**63 + 5])
@pytest.mark.parametrize("n", [1, 1000, 65537 * 3 + 11])
def test_uniform_draws_are_the_numpy_draws(monkeypatch: pytest.MonkeyPatch, key: int, start: int, n: int) -> None:
    """The vectorised draw kernel gives the counter-based stream's draws bit for bit, for any
    start (uint64 wrap-around included) and any split into parts."""
    fast = kernels.uniform(key, start, np.empty(n, np.float32))
    for nparts in (1, 3, 8):
        parts = np.empty(n, np.float32)
        kernels._uniform_kernel(np.uint64(key), np.uint64(start), parts, nparts)
        assert np.array_equal(parts.view(np.uint32), fast.view(np.uint32))
    monkeypatch.setenv("BIGMERGE_NO_NUMBA", "1")
    slow = kernels.uniform(key, start, np.empty(n, np.float32))
    assert np.array_equal(fast.view(np.uint32), slow.view(np.uint32))
    assert 0.0 <= fast.min() and fast.max() < 1.0


@pytest.mark.parametrize("nparts", [1, 3])
def test_hists_and_windows_gives_the_histograms_of_magnitude_hists(nparts: int) -> None:
    """A source with a window is counted only into the window's table, its high-bits histogram
    read off the table afterwards: the same counts as magnitude_hists' own pass, for a window
    at the top and bottom of the bins, two windows on one source, a source with none, Inf and
    NaN; and each window's table holds the low bits of exactly the values in its bins."""
    rng = np.random.default_rng(3)
    m = 3 * kernels._SUB + 17
    base = rng.standard_normal(m).astype(np.float32)
    xs = [base] + [base + s * rng.standard_normal(m).astype(np.float32) for s in (1e-2, 1e-3, 1.0)]
    xs[2][5], xs[2][9], xs[3][7] = np.nan, np.inf, np.float32(3e38)
    rows = np.array([1, 2, 3], np.int64)
    mags = [np.abs(x - base).view(np.int32).astype(np.int64) for x in xs[1:]]
    med = [int(np.median(b[: m // 2])) >> 16 for b in mags]
    win_rows = np.array([0, 0, 1], np.int64)  # source 3 (row 2) has none
    win_first = np.array([med[0] - 2, 0, int(mags[1].max() >> 16) - 3], np.int64)
    width = 5
    per_part, tables = kernels.hists_and_windows(tuple(xs), 0, rows, win_rows, win_first, width, nparts, False, True)
    plain = kernels.magnitude_hists(tuple(xs), 0, rows, np.zeros(3, np.int64), 0, nparts, False)
    assert per_part.shape == plain.shape
    assert np.array_equal(per_part.sum(axis=0), plain.sum(axis=0))
    for r in range(3):
        assert np.array_equal(plain.sum(axis=0)[r], np.bincount(mags[r] >> 16, minlength=kernels.HI_BINS))
    for v in range(len(win_rows)):
        b = mags[win_rows[v]]
        for j in range(width):
            inside = b[(b >> 16) == win_first[v] + j]
            assert np.array_equal(tables[v, j], np.bincount(inside & 0xFFFF, minlength=kernels.LO_BINS))
    alone, _ = kernels.hists_and_windows(tuple(xs), 0, rows, win_rows[:0], win_first[:0], width, nparts, False, True)
    assert np.array_equal(alone.sum(axis=0), plain.sum(axis=0))


@pytest.mark.parametrize("bf16", [False, True])
def test_a_selection_keeps_what_its_rule_says(bf16: bool) -> None:
    """task_vector_merge's selections (tA, cA, tB, cB), compared as one uint64 key per element,
    keep what the rule says: |delta| bits b in A (b > tA, or b == tA before index cA) and not in
    B; the same output as the same merge given that rule's masks. Cutoffs before, inside and
    past the kernel's steps and parts, thresholds with many ties, NaN (large), Inf, NOTHING."""
    rng = np.random.default_rng(5)
    sub = kernels._SUB
    m = 5 * sub + 123
    base = rng.integers(-64, 64, m).astype(np.float32) / 64  # deltas exact, in bfloat16 too: ties
    levels = rng.integers(-6, 7, size=(3, m)).astype(np.float32) / 64
    a_cut, b_cut = sub + 17, 3 * sub  # inside a step, at a step's edge
    for r, cut, lv in ((0, a_cut, 3), (1, b_cut, 5), (2, 900, 3)):
        levels[r, cut - 2 : cut + 2] = lv / 64  # ties on both sides of every cutoff
    xs = [base] + [base + lv for lv in levels]
    xs[1][[3, 2000]] = np.nan
    xs[2][7] = np.inf
    mags = [np.abs(x - base).view(np.int32).astype(np.int64) for x in xs[1:]]
    t3, t5 = int(np.float32(3 / 64).view(np.int32)), int(np.float32(5 / 64).view(np.int32))
    nothing = int(kernels.NOTHING)
    sels = np.array(
        [
            [t3, a_cut, nothing, 0],  # ties cut inside a step
            [t3, 0, t5, b_cut],  # none of A's ties, B's cut at a step's edge
            [t5, m, t3, 900],  # B below A: keeps nothing
        ],
        dtype=np.int64,
    )
    j = np.arange(m)
    masks = np.zeros((3, m), np.uint8)
    for r in range(3):
        ta, ca, tb, cb = sels[r]
        b = mags[r]
        in_a = (b > ta) | ((b == ta) & (j < ca))
        in_b = (b > tb) | ((b == tb) & (j < cb))
        masks[r] = in_a & ~in_b
    assert masks[0].any() and masks[1].any() and not masks[2].any()
    outs = []
    for use in (False, True):
        for nparts in (1, 3):
            out = np.empty(m, np.float32)
            kernels.task_vector_merge(
                tuple(xs),
                0,
                np.array([1, 2, 3], np.int64),
                np.array([0.6, 0.5, 0.9], np.float32),
                sels,
                masks,
                np.full(3, use),
                np.full(3, np.nan, np.float32),
                True,
                True,
                np.float32(1),
                np.float32(1),
                out,
                np.empty(0, np.int16),  # as the operator passes it: the kernel cached at install
                np.zeros(nparts, np.int64),
                bf16,
            )
            outs.append(out.view(np.uint32))
    for o in outs[1:]:
        assert np.array_equal(o, outs[0])


@pytest.mark.parametrize("n", [5, 65536 * 8, 65536 * 19 + 77])
def test_l1_sums_of_kept_magnitudes_chunk_by_chunk(n: int) -> None:
    """l1_of_bits sums each chunk in order (chunks side by side in vector lanes): the same
    float64 bits as a plain loop, NaN left out of the kept sum when it is not kept."""
    rng = np.random.default_rng(n)
    mag = np.abs(rng.standard_normal(n).astype(np.float32)) * 1e-3
    mag[n // 3] = np.nan
    keep = rng.random(n) < 0.4
    keep[n // 3] = False
    chunk = kernels._CHUNK
    out = np.zeros(((n + chunk - 1) // chunk, 2))
    kernels.l1_of_bits(mag.view(np.int32), keep, out)
    for c in range(out.shape[0]):
        before = after = 0.0
        for a, k in zip(mag[c * chunk : (c + 1) * chunk].astype(np.float64), keep[c * chunk : (c + 1) * chunk]):
            before += a
            if k:
                after += a
        assert out[c, 1] == after and (out[c, 0] == before or (np.isnan(before) and np.isnan(out[c, 0])))


def test_the_nan_scan_honours_the_one_torch_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """BIGMERGE_NO_NUMBA, read at call time, sends the reader's NaN/Inf scan to torch too."""
    from bigmerge.engine import finite

    x = torch.zeros(10_000)
    x[4321] = float("nan")
    assert finite.first_nonfinite(x) == 4321

    def no_numba(*args: object) -> int:
        raise AssertionError("the numba scan ran")

    monkeypatch.setattr(finite, "_first_nonfinite", no_numba)
    monkeypatch.setenv("BIGMERGE_NO_NUMBA", "1")
    assert finite.first_nonfinite(x) == 4321


_LOAD_SCAN_KERNEL = """
import sys, torch
from bigmerge.engine import finite
from bigmerge.ops.kernels import cache_dir
print(finite.first_nonfinite(torch.zeros(64, dtype=torch.bfloat16)), cache_dir(finite._first_nonfinite))
"""


def test_loading_a_cached_kernel_does_not_wait_for_a_process_that_is_compiling(tmp_path: Path) -> None:
    """The compile lock serializes compilations; a process that only loads kernels numba's
    cache already holds must not wait for it (the quickstart's merge waited behind the
    background warm-up, compiling other kernels at nice 19: 16.4 s against 4.3 s cached)."""
    import fcntl
    import subprocess
    import sys

    from bigmerge.ops.kernels import COMPILE_LOCK

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("BIGMERGE_NO_NUMBA", None)
    run = lambda: subprocess.run(  # noqa: E731
        [sys.executable, "-c", _LOAD_SCAN_KERNEL], capture_output=True, text=True, env=env, timeout=120
    )
    first = run()  # compiles the scan kernel into the empty cache
    assert first.returncode == 0, first.stderr
    directory = first.stdout.split()[1]
    with open(os.path.join(directory, COMPILE_LOCK), "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # as a compiling process holds it
        t0 = time.perf_counter()
        second = subprocess.Popen(
            [sys.executable, "-c", _LOAD_SCAN_KERNEL],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            out, err = second.communicate(timeout=60)
        finally:
            second.kill()
        assert second.returncode == 0 and out.split()[0] == "-1", err
        assert time.perf_counter() - t0 < 60
