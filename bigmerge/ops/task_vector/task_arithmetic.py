"""Task vectors: task arithmetic and TIES (magnitude top-k per tensor, then sign election).

Arithmetic follows mergekit 0.1.5 operation by operation, so the same config gives the
same bits; the top-k threshold is exact over the whole tensor but found by a radix
select (select.py), never by sorting the tensor.

The sparsifying variants (breadcrumbs, DARE, DELLA, SCE) subclass TaskArithmeticOp: they
change which elements of each task vector are kept (`_selections` / `_keep`) and the
statistics rounds; the arithmetic after the mask is this module's, and what the family
shares (TopK, keep masks, the sources as the kernels read them) is common.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from bigmerge.errors import ConfigError
from bigmerge.ops import kernels
from bigmerge.ops.base import Block, MergeOp, Param, Stats, TensorTask, as_compute, require_base
from bigmerge.ops.task_vector import kept, select
from bigmerge.ops.task_vector.common import (
    AFTER,
    HI,
    LO,
    LO_BINS,
    TIES,
    Selection,
    Sources,
    TopK,
    as_float,
    flat_sources,
    fused_masks,
    keep_mask,
    l1_scale,
    mag_bits,
    sign_agreement,
    sum_rows_in_order,
    threshold_bits,
    use_fused,
    with_defaults,
)

NONFINITE_BIN = 0x7F80  # the high bits of a float32 whose exponent is all ones: Inf, NaN


class TaskArithmeticOp(MergeOp):
    """base + lambda * sum of weighted task vectors (model - base)."""

    name = "task_arithmetic"
    params: ClassVar[tuple[Param, ...]] = (
        Param("weight", float, "non_base", required=True, doc="weight of this model's task vector"),
        Param("normalize", bool, "shared", default=False, doc="divide by the sum of the weights"),
        Param("lambda", float, "shared", default=1.0, doc="scale of the merged task vector"),
        Param("int8_mask", bool, "shared", default=False, doc="accepted for mergekit configs; no effect on values"),
        Param("rescale", bool, "shared", default=False, doc="rescale sparsified deltas to their L1 norm before"),
        Param("density", float, "non_base", default=1.0, doc="fraction of each task vector kept (by magnitude)"),
    )
    base = "required"
    sign_consensus = False
    sparsify = False
    # True: selections rank |delta| of a model (the fused histogram kernel applies)
    select_deltas = True
    workspace_per_source = 2.0

    def checks_finite(self, task: TensorTask) -> bool:
        """Plain task arithmetic (no selection, no sign election, no statistics): every source
        value enters the fused kernel's sum, so a NaN or Inf shows in its result. A selection
        of every model's |delta|: the high-bits histograms see every source value."""
        if not (use_fused(task) and len(set(task.source_dtypes)) == 1):
            return False
        plain = not self.sign_consensus and not self._sparse_models(task) and not self._stat_rounds(task)
        return plain or self._hi_sees_every_source(task)

    def _hi_sees_every_source(self, task: TensorTask) -> bool:
        """The first statistics round counts |delta| of every non-base model on the fused kernels:
        a NaN or Inf in any source (the base too) lands in the histograms' top bins."""
        sels = set(self._selections(task).values())
        return self.select_deltas and bool(sels) and sels == set(task.non_base) and self._phases(task)[:1] == [HI]

    def _note_nonfinite(self, task: TensorTask, block: Block, hists: np.ndarray) -> None:
        """Report the non-finite magnitudes the high-bits histograms counted (Block.checked)."""
        if self._hi_sees_every_source(task):
            block.checked(int(hists[..., NONFINITE_BIN:].sum()))

    # -- what is kept ------------------------------------------------------------------

    def check(self, task: TensorTask) -> None:
        for i in task.non_base:
            d = task.per_model[i]["density"]
            if not 0.0 < d <= 1.0:
                raise ConfigError(f"parameter 'density' must be in (0, 1], got {d} for tensor {task.name!r}")

    def _sparse_models(self, task: TensorTask) -> list[int]:
        if not self.sparsify or task.numel == 0:
            return []
        return [i for i in task.non_base if task.per_model[i]["density"] < 1.0]

    def _selections(self, task: TensorTask) -> dict[str, int]:
        """Exact top-k selections this operator needs: key -> source (model index)."""
        return {str(i): i for i in self._sparse_models(task)}

    def _k(self, task: TensorTask, key: str, reduced: Stats) -> int:
        # mergekit keeps k = max(1, int(density * numel)) elements
        return max(1, int(task.per_model[int(key)]["density"] * task.numel))

    def _keep(self, task: TensorTask, block: Block, stats: Any, i: int, delta: torch.Tensor) -> torch.Tensor | None:
        """Model i's keep mask on this block (bool, flat), or None to keep every element."""
        if not isinstance(stats, TopK) or str(i) not in stats.k:
            return None
        return keep_mask(mag_bits(delta, block.scratch), stats, str(i), block.index, block.scratch)

    def _scale(self, stats: Any, i: int) -> float | None:
        return stats.scale.get(i) if isinstance(stats, TopK) else None

    # -- statistics: exact magnitude thresholds (only operators that sparsify) --------

    def rounds(self, task: TensorTask) -> int:
        # A tensor that is one block needs no reduction: apply computes its statistics itself.
        return self._stat_rounds(task) if task.n_blocks > 1 else 0

    def _phases(self, task: TensorTask) -> list[str]:
        out = [HI, LO, TIES] if self._selections(task) else []
        return out + ([AFTER] if self._needs_after(task) else [])

    def _needs_after(self, task: TensorTask) -> bool:
        return bool(task.shared.get("rescale")) and bool(self._sparse_models(task))

    def _stat_rounds(self, task: TensorTask) -> int:
        return len(self._phases(task))

    def _local_stats(self, task: TensorTask, block: Block) -> Any:
        """The statistics rounds on a tensor's only block: the same stats/finish code, the
        reduction of one block being the block itself, so the result cannot differ."""
        prev: Any = None
        start = 0
        if self.select_deltas and use_fused(task, block) and self._phases(task)[:3] == [HI, LO, TIES]:
            prev, start = self._local_selections(task, block)
        for rnd in range(start, self._stat_rounds(task)):
            reduced = block.reduce_alone(self.stats(rnd, task, block, prev))
            prev = self.finish(rnd, task, reduced, prev)
        return prev

    def _local_selections(self, task: TensorTask, block: Block) -> tuple[TopK, int]:
        """The HI, LO and TIES rounds of a one-block tensor in two passes over the block.

        HI as the stats round (its per-part histograms kept); then one pass records the index
        and low bits of every magnitude in each selection's high-bits bin (a few percent of the
        block; HI counted them per part, so each part writes its own range, in index order).
        That gives the LO histogram, the ties of the threshold, and where the kept ties end
        (block.memo["cutoffs"]), without a TIES pass. A bin too full to record has its low bits
        counted instead (_local_low_bits). Returns (statistics, rounds done).
        """
        sc = block.scratch
        b = require_base(self, task)
        bf16 = task.compute_dtype == torch.bfloat16
        xs = flat_sources(block, sc, task.compute_dtype)
        m = xs[0].shape[0]
        sels = self._selections(task)
        srcs = sorted(set(sels.values()))
        nparts = kernels.threads()
        hists = kernels.magnitude_hists(
            xs, b, np.array(srcs, dtype=np.int64), np.zeros(len(srcs), dtype=np.int64), 0, nparts, bf16
        )
        self._note_nonfinite(task, block, hists)
        out: Stats = {f"hi{src}": hists[:, r].sum(axis=0) for r, src in enumerate(srcs)}
        block.memo["hi_totals"] = {src: out[f"hi{src}"] for src in srcs}
        self._first_stats(task, block, out)
        topk = self.finish(0, task, block.reduce_alone(out), None)
        keys = [key for key in sels if key in topk.hi_bin]
        if not keys:
            return topk, 1
        per_part = np.stack([hists[:, srcs.index(sels[key]), topk.hi_bin[key]] for key in keys], axis=1)
        totals = per_part.sum(axis=0)
        cap = int(totals.max())
        if cap > max(m // 8, 1 << 16):  # records would take more memory than counting their low bits
            return self._local_low_bits(task, block, xs, topk, {key: sels[key] for key in keys}, srcs), 3
        pos = sc.get("hi_bin_pos", (len(keys), cap), torch.int64).numpy()
        low = sc.get("hi_bin_low", (len(keys), cap), torch.int32).numpy()
        kernels.hi_bin_records(
            xs,
            b,
            np.array([sels[key] for key in keys], dtype=np.int64),
            np.array([topk.hi_bin[key] for key in keys], dtype=np.int64),
            np.ascontiguousarray(np.cumsum(per_part, axis=0) - per_part),
            nparts,
            bf16,
            pos,
            low,
        )
        lows = {key: low[k, : totals[k]] for k, key in enumerate(keys)}
        out = {f"lo{key}": np.bincount(lows[key], minlength=LO_BINS).astype(np.int64) for key in keys}
        topk = self.finish(1, task, block.reduce_alone(out), topk)
        out, cutoffs = {}, {}
        for k, key in enumerate(keys):
            if key in topk.tie_quota:
                ties = pos[k, : totals[k]][lows[key] == (threshold_bits(topk.threshold[key]) & 0xFFFF)]
                out[f"pb_ties{key}"] = np.array([float(len(ties))])
                quota = min(len(ties), topk.tie_quota[key][0])
                cutoffs[key] = int(ties[quota - 1]) + 1 if quota > 0 else 0
        topk = self.finish(2, task, block.reduce_alone(out), topk)
        block.memo["cutoffs"] = cutoffs
        return topk, 3

    def _local_low_bits(
        self, task: TensorTask, block: Block, xs: Sources, topk: TopK, sels: dict[str, int], srcs: list[int]
    ) -> TopK:
        """The LO and TIES rounds of a one-block tensor whose threshold bins are too full to
        record: one branch-free pass counts each bin's low bits (kernels.hists_and_windows, a
        window of that one bin), which gives the threshold and its ties; where the kept ties
        end is found by apply (tie_cutoffs). bfloat16 magnitudes' low bits are all 0: no pass."""
        keys = list(sels)
        if task.compute_dtype == torch.bfloat16:
            lows = np.zeros((len(keys), LO_BINS), dtype=np.int64)
            hi = block.memo["hi_totals"]
            lows[:, 0] = [hi[sels[key]][topk.hi_bin[key]] for key in keys]
        else:
            lows = kernels.hists_and_windows(
                xs,
                require_base(self, task),
                np.array(srcs, dtype=np.int64),
                np.array([srcs.index(sels[key]) for key in keys], dtype=np.int64),
                np.array([topk.hi_bin[key] for key in keys], dtype=np.int64),
                1,
                kernels.threads(),
                False,
                False,  # the high bits were counted: the windows only
            )[1][:, 0]
        topk = self.finish(1, task, block.reduce_alone({f"lo{key}": lows[j] for j, key in enumerate(keys)}), topk)
        ties = {
            f"pb_ties{key}": np.array([float(lows[j, threshold_bits(topk.threshold[key]) & 0xFFFF])])
            for j, key in enumerate(keys)
            if key in topk.tie_quota
        }
        return self.finish(2, task, block.reduce_alone(ties), topk)  # type: ignore[no-any-return]

    def _delta(self, task: TensorTask, block: Block, i: int, base: torch.Tensor) -> torch.Tensor:
        out = block.scratch.get("stats_delta", base.shape, task.compute_dtype)
        return torch.sub(as_compute(block.inputs[i], task.compute_dtype, block.scratch, "cast_x"), base, out=out)

    def _deltas(self, task: TensorTask, block: Block, models: list[int]) -> Any:
        """(i, delta of model i) for each model, flat, in the compute dtype, one scratch buffer."""
        sc = block.scratch
        b = require_base(self, task)
        if "stack" in block.memo and task.compute_dtype == torch.float32:  # the fused kernels' stack: no second cast
            x = torch.from_numpy(block.memo["stack"])
            for i in models:
                yield i, torch.sub(x[i], x[b], out=sc.get("stats_delta", x[b].shape, torch.float32))
            return
        base = as_compute(block.inputs[b], task.compute_dtype, sc, "cast_base")
        for i in models:
            yield i, self._delta(task, block, i, base).reshape(-1)

    def _values(self, task: TensorTask, block: Block, src: int) -> torch.Tensor:
        """The magnitudes a selection ranks, as int32 bit patterns (flat): |delta| of model src."""
        _, delta = next(self._deltas(task, block, [src]))
        return mag_bits(delta, block.scratch)

    def _first_stats(self, task: TensorTask, block: Block, out: Stats) -> None:
        """Statistics of the first round besides the histograms: |delta| summed for rescale."""
        if task.shared.get("rescale"):
            for i, delta in self._deltas(task, block, self._sparse_models(task)):
                out[f"l1_{i}"] = np.array([delta.abs().sum(dtype=torch.float64).item()])

    def _after_stats(self, task: TensorTask, block: Block, prev: Any, out: Stats) -> None:
        """Statistics over the kept elements: their |delta| summed for rescale."""
        for i, delta in self._deltas(task, block, self._sparse_models(task)):
            keep = self._keep(task, block, prev, i, delta)
            kept = delta if keep is None else delta * keep.to(delta.dtype)
            out[f"l1k_{i}"] = np.array([kept.abs().sum(dtype=torch.float64).item()])

    def _finish_after(self, task: TensorTask, reduced: Stats, topk: TopK) -> None:
        for i in self._sparse_models(task):
            scale = l1_scale(topk.l1_before[i], float(reduced[f"l1k_{i}"].sum()), task.compute_dtype)
            if scale is not None:
                topk.scale[i] = scale

    def stats(self, rnd: int, task: TensorTask, block: Block, prev: Any) -> Stats:
        out: Stats = {}
        phase = self._phases(task)[rnd]
        if phase == AFTER:
            self._after_stats(task, block, prev, out)
            return out
        sels = self._selections(task)
        if phase == LO:
            sels = {key: src for key, src in sels.items() if key in prev.hi_bin}
        elif phase == TIES:
            sels = {key: src for key, src in sels.items() if key in prev.tie_quota}
            if not sels:
                return out  # no ties straddle the k-th element: nothing to count
        if not block.inputs:  # counted from what the block kept (reads() said so)
            return self._kept_stats(phase, block, sels, prev)
        sc = block.scratch
        if self.select_deltas and use_fused(task, block):
            xs = flat_sources(block, sc, task.compute_dtype)
            if phase == HI:
                rows, params, keys = sorted(set(sels.values())), [0] * len(set(sels.values())), None
            else:
                keys = list(sels)
                rows = [sels[key] for key in keys]
                params = [prev.hi_bin[key] if phase == LO else threshold_bits(prev.threshold[key]) for key in keys]
            mode = {HI: 0, LO: 1, TIES: 2}[phase]
            bf16 = task.compute_dtype == torch.bfloat16
            b = require_base(self, task)
            windows = phase == HI and "blocks" in block.local  # a tensor of many blocks: keep windows for LO, TIES
            if windows:
                per_part, guess, tables = self._hists_and_windows(task, block, xs, rows, sels)
            else:
                per_part = kernels.magnitude_hists(
                    xs,
                    b,
                    np.array(rows, dtype=np.int64),
                    np.array(params, dtype=np.int64),
                    mode,
                    kernels.threads(),
                    bf16,
                )
            hists = per_part.sum(axis=0)
            if phase == HI:
                self._note_nonfinite(task, block, hists)
            for r in range(len(rows)):
                if phase == HI:
                    out[f"hi{rows[r]}"] = hists[r]
                elif phase == LO:
                    out[f"lo{keys[r]}"] = hists[r]
                else:
                    out[f"pb_ties{keys[r]}"] = np.array([float(hists[r, 0])])
            if windows:
                kept.keep_windows(block.local, block.index, hists, rows, sels, guess, tables)
            elif phase == LO and "blocks" in block.local:
                kept_lo = {k: hists[r].astype(np.int32) for r, k in enumerate(keys or [])}  # for TIES
                block.local.setdefault(f"lo{block.index}", {}).update(kept_lo)
        elif phase == HI:
            for src in sorted(set(sels.values())):
                bits = self._values(task, block, src)
                out[f"hi{src}"] = select.hist_high(bits, sc.get("hi", bits.shape, torch.int32))
        else:
            for key, src in sels.items():
                bits = self._values(task, block, src)
                if phase == LO:
                    out[f"lo{key}"] = select.hist_low(bits, prev.hi_bin[key])
                else:  # per-block counts, kept per block ("pb_")
                    ties = int(torch.eq(bits, threshold_bits(prev.threshold[key])).sum())
                    out[f"pb_ties{key}"] = np.array([float(ties)])
        if phase == HI:
            self._first_stats(task, block, out)
        return out

    def reads(self, rnd: int, task: TensorTask, block_index: int, prev: Any, local: dict[str, Any]) -> bool:
        """LO and TIES count from the windows the HI round kept (kept.py) where they hold the
        threshold's bin; a block whose window missed it is read again."""
        phase = self._phases(task)[rnd]
        if phase == LO:
            return not all(kept.window(local, block_index, key, b) for key, b in prev.hi_bin.items())
        if phase == TIES:
            return any(
                kept.ties_kept(local, block_index, key, threshold_bits(prev.threshold[key])) is None
                for key in prev.tie_quota
            )
        return True

    def later_reads(self, task: TensorTask) -> int:
        """LO and TIES usually read nothing on the fused kernels (their windows hold the bin)."""
        rounds = self.rounds(task)
        if not rounds or not (self.select_deltas and use_fused(task)):
            return rounds
        return sum(1 for phase in self._phases(task)[1:] if phase not in (LO, TIES)) + 1

    def _hists_and_windows(
        self, task: TensorTask, block: Block, xs: Sources, srcs: list[int], sels: dict[str, int]
    ) -> tuple[np.ndarray, dict[str, int], np.ndarray | None]:
        """The HI round's histograms of a block, with each selection's window counted in the same
        pass (kept.py): (per-part histograms, guessed bins, float32 windows' tables or None)."""
        b = require_base(self, task)
        bf16 = task.compute_dtype == torch.bfloat16
        src_rows = np.array(srcs, dtype=np.int64)
        ks = {key: self._k(task, key, {}) for key in sels}
        zeros = np.zeros(len(srcs), np.int64)
        if bf16:  # the windows are counts of the histograms themselves
            per_part = kernels.magnitude_hists(xs, b, src_rows, zeros, 0, kernels.threads(), bf16)
            sample = {src: per_part[:, r].sum(axis=0) for r, src in enumerate(srcs)}
            return per_part, kept.guesses(block.local, sels, ks, task.numel, sample), None
        sample = {}
        if "run" not in block.local:  # this rank's first block of the tensor: guess from a part of it
            part = tuple(x[: max(x.shape[0] // 8, 1 << 20)] for x in xs)  # an eighth, at least 2^20 values
            h = kernels.magnitude_hists(part, b, src_rows, zeros, 0, kernels.threads(), bf16)
            sample = {src: h[:, r].sum(axis=0) for r, src in enumerate(srcs)}
        guess = kept.guesses(block.local, sels, ks, task.numel, sample)
        firsts = kept.window_firsts(guess)
        per_part, tables = kernels.hists_and_windows(
            xs,
            b,
            src_rows,
            np.array([srcs.index(sels[key]) for key in sels], dtype=np.int64),
            np.array([firsts[key] for key in sels], dtype=np.int64),
            kept.LOW_WIDTH,
            kernels.threads(),
            bf16,
            True,
        )
        return per_part, guess, tables

    def _kept_stats(self, phase: str, block: Block, sels: dict[str, int], prev: Any) -> Stats:
        """The LO or TIES statistics of a block from what it kept (reads() checked they are there)."""
        out: Stats = {}
        for key in sels:
            if phase == LO:
                w = kept.window(block.local, block.index, key, prev.hi_bin[key])
                assert w is not None
                out[f"lo{key}"] = w.low_hist(prev.hi_bin[key])
            elif phase == TIES:
                n = kept.ties_kept(block.local, block.index, key, threshold_bits(prev.threshold[key]))
                assert n is not None
                out[f"pb_ties{key}"] = np.array([float(n)])
            else:
                raise AssertionError(f"round {phase} reads its blocks")
        return out

    def finish(self, rnd: int, task: TensorTask, reduced: Stats, prev: Any) -> Any:
        phase = self._phases(task)[rnd]
        topk = prev if isinstance(prev, TopK) else TopK()
        sels = self._selections(task)
        if phase == HI:
            for key, src in sels.items():
                k = topk.k[key] = self._k(task, key, reduced)
                if k > 0:
                    topk.hi_bin[key], topk.rank_in_bin[key] = select.find_bin(reduced[f"hi{src}"], k)
            for i in self._sparse_models(task):
                if f"l1_{i}" in reduced:
                    topk.l1_before[i] = float(reduced[f"l1_{i}"].sum())
        elif phase == LO:
            for key in topk.hi_bin:
                lo_hist = reduced[f"lo{key}"]
                lo, rank = select.find_bin(lo_hist, topk.rank_in_bin[key])
                topk.threshold[key] = select.threshold_value(topk.hi_bin[key], lo)
                if int(lo_hist[lo]) > rank:
                    topk.tie_quota[key] = [rank]  # how many ties to keep; spread per block next round
        elif phase == TIES:
            for key, quota in topk.tie_quota.items():
                left = quota[0]
                per_block, counts = [], []
                for count in reduced[f"pb_ties{key}"].reshape(-1):
                    take = min(int(count), left)
                    per_block.append(take)
                    counts.append(int(count))
                    left -= take
                topk.tie_quota[key] = per_block
                topk.tie_count[key] = counts
        else:
            self._finish_after(task, reduced, topk)
        return topk

    # -- apply: the arithmetic of mergekit's generalized task arithmetic ---------------

    def _fused_keep(
        self, task: TensorTask, block: Block, stats: Any, i: int, xs: Sources, mask_row: Callable[[], np.ndarray]
    ) -> Selection | np.ndarray | None:
        """Model i's mask for the fused kernel: a selection (tA, cA, tB, cB), see
        kernels.task_vector_merge; a uint8 mask (from `mask_row()`); or None to keep every element."""
        key = str(i)
        if not isinstance(stats, TopK) or key not in stats.k:
            return None
        return (*self._fused_sel(task, block, stats, key), int(kernels.NOTHING), 0)

    def _fused_sel(self, task: TensorTask, block: Block, stats: TopK, key: str) -> tuple[int, int]:
        """One exact top-k selection on this block as (threshold bits, cutoff): the magnitudes
        above the threshold and, of those equal to it, the ones before index `cutoff` (this
        block's first tie_quota ties in index order)."""
        if key not in stats.threshold:  # k = 0
            return int(kernels.NOTHING), 0
        thr = threshold_bits(stats.threshold[key])
        m = block.inputs[0].numel()
        if key not in stats.tie_quota:
            return thr, m  # every tie kept
        quota = stats.tie_quota[key][block.index]
        if not _splits_ties(stats, key, block.index):  # only the block where the quota runs out is searched
            return thr, (m if quota else 0)  # all of this block's ties, or none
        cutoffs = block.memo.setdefault("cutoffs", {})
        if key not in cutoffs:  # every selection of this block that splits ties, in one pass
            sels = {
                k: src
                for k, src in self._selections(task).items()
                if k in stats.tie_quota and k not in cutoffs and _splits_ties(stats, k, block.index)
            }
            found = kernels.tie_cutoffs(
                flat_sources(block, block.scratch, task.compute_dtype),
                require_base(self, task),
                np.array(list(sels.values()), dtype=np.int64),
                np.array([threshold_bits(stats.threshold[k]) for k in sels], dtype=np.int64),
                np.array([stats.tie_quota[k][block.index] for k in sels], dtype=np.int64),
                task.compute_dtype == torch.bfloat16,
            )
            cutoffs.update({k: int(c) for k, c in zip(sels, found)})
        return thr, cutoffs[key]

    def _fused_keep_from_torch(
        self, task: TensorTask, block: Block, stats: Any, i: int, xs: Sources, mask_row: Callable[[], np.ndarray]
    ) -> np.ndarray | None:
        """`_fused_keep` for rules other than one threshold: `_keep`'s mask, as bytes."""
        _, delta = next(self._deltas(task, block, [i]))
        keep = self._keep(task, block, stats, i, delta)
        if keep is None:
            return None
        row = mask_row()
        torch.from_numpy(row).copy_(keep)
        return row

    def _apply_fused(self, task: TensorTask, block: Block, stats: Any, shape: torch.Size) -> torch.Tensor:
        """The same arithmetic as the torch code below, in one pass (kernels.task_vector_merge)."""
        sc = block.scratch
        others = task.non_base
        b = require_base(self, task)
        dt = task.compute_dtype
        xs = flat_sources(block, sc, dt)
        m = xs[0].shape[0]
        n = len(others)
        sel = np.empty((n, 4), dtype=np.int64)
        sel[:] = (kernels.NONE, 0, kernels.NOTHING, 0)
        scale = np.full(n, np.nan, dtype=np.float32)
        use_mask = np.zeros(n, dtype=np.bool_)
        masks = [np.zeros((n, 1), dtype=np.uint8)]

        for r, i in enumerate(others):

            def mask_row(r: int = r) -> np.ndarray:
                if masks[0].shape[1] == 1:
                    masks[0] = fused_masks(block, n, m)
                return masks[0][r]

            keep = self._fused_keep(task, block, stats, i, xs, mask_row)
            if isinstance(keep, np.ndarray):
                use_mask[r] = True
            elif keep is not None:
                sel[r] = keep
            s = self._scale(stats, i)
            if s is not None:
                scale[r] = np.float32(torch.tensor(s, dtype=dt).item())
        # weights and their sum in the compute dtype, as the torch code has them
        weights = torch.tensor([task.per_model[i]["weight"] for i in others], dtype=dt)
        plain = weights.sum(dim=0, keepdim=True)
        plain[plain.abs() < 1e-8] = 1
        weights = weights.float()
        # a bfloat16 result is rounded in the kernel, into the writer's buffer when it offers one
        bf16_out = task.out_dtype == torch.bfloat16
        kind = torch.bfloat16 if bf16_out else torch.float32
        out = block.output("fused_out", shape, kind)
        flat = out.reshape(-1).view(torch.int16 if bf16_out else torch.float32).numpy()
        empty_f, empty_b = np.empty(0, np.float32), np.empty(0, np.int16)
        bad = np.zeros(4 * kernels.threads(), dtype=np.int64)
        kernels.task_vector_merge(
            xs,
            b,
            np.array(others, dtype=np.int64),
            weights.numpy(),
            sel,
            masks[0],
            use_mask,
            scale,
            self.sign_consensus,
            bool(task.shared["normalize"]),
            np.float32(plain.item()),
            np.float32(task.shared["lambda"]),
            empty_f if bf16_out else flat,
            flat if bf16_out else empty_b,
            bad,
            dt == torch.bfloat16,
        )
        if self.checks_finite(task):
            block.checked(int(bad.sum()))
        return out

    def apply(self, task: TensorTask, block: Block, stats: Any) -> torch.Tensor:
        dt = task.compute_dtype
        sc = block.scratch
        src = block.inputs[require_base(self, task)]
        others = task.non_base
        if not others:
            return sc.get("base", src.shape, dt).copy_(src)
        shape = src.shape
        n = len(others)
        if stats is None and task.n_blocks == 1 and self._stat_rounds(task):
            stats = self._local_stats(task, block)
        if use_fused(task, block):
            return self._apply_fused(task, block, stats, shape)
        base = sc.get("base", src.shape, dt).copy_(src)  # after the stats rounds: they share the scratch
        deltas = sc.get("deltas", (n, *shape), dt)
        for row, i in enumerate(others):
            delta = deltas[row]
            torch.sub(as_compute(block.inputs[i], dt, sc), base, out=delta)
            keep = self._keep(task, block, stats, i, delta.reshape(-1))
            if keep is not None:
                # delta * mask as mergekit computes it, with the mask as floats: torch's
                # float-times-bool kernel is several times slower than float-times-float.
                delta.mul_(as_float(keep, dt, sc).view(shape))
            s = self._scale(stats, i)
            if s is not None:
                delta.mul_(torch.tensor(s, dtype=dt))
        weights = torch.tensor([task.per_model[i]["weight"] for i in others], dtype=dt, device=sc.device)
        for row in range(n):
            deltas[row].mul_(weights[row])
        mixed = sc.get("mixed", shape, dt)
        divisor = sc.get("divisor", shape, dt)
        if self.sign_consensus:
            # majority sign from the weighted sum; a delta counts where its sign agrees
            agree = sign_agreement(deltas, sc)
            masked = sc.get("masked", (n, *shape), dt)
            wmask = sc.get("wmask", (n, *shape), dt)
            for row in range(n):
                agree_f = as_float(agree[row], dt, sc, "agree_f")
                torch.mul(deltas[row], agree_f, out=masked[row])
                torch.mul(agree_f, weights[row], out=wmask[row])
            sum_rows_in_order(masked, mixed, sc)
            sum_rows_in_order(wmask, divisor, sc)
            divisor[divisor == 0] = 1
        else:
            sum_rows_in_order(deltas, mixed, sc)
            divisor = weights.sum(dim=0, keepdim=True)
            divisor[divisor.abs() < 1e-8] = 1
        if task.shared["normalize"]:
            mixed /= divisor
        lam = task.shared["lambda"]
        if lam != 1:
            mixed *= lam
        return base.add_(mixed)


class TiesOp(TaskArithmeticOp):
    """TIES: top-k magnitude per task vector, sign election, disjoint mean (Yadav et al.)."""

    name = "ties"
    params = with_defaults(TaskArithmeticOp.params, normalize=True)
    sign_consensus = True
    sparsify = True


def _splits_ties(stats: TopK, key: str, block: int) -> bool:
    """Whether this block keeps some of its ties of the threshold but not all: the one block
    per selection whose cutoff must be searched for (tie_cutoffs)."""
    quota = stats.tie_quota[key][block]
    counts = stats.tie_count.get(key)
    return quota > 0 and (counts is None or quota < counts[block])
