"""What an exact top-k selection keeps of a block between its statistics rounds, so that the
low-bits (LO) and ties (TIES) rounds of a tensor of many blocks need not read it again.

The high-bits round (HI) of a block counts its magnitudes' high 16 bits; the threshold's bin
is known only once every block is counted. So each block also keeps a *window* of bins around
a guess of that bin: this rank's blocks so far (their histograms summed), ranked at the
fraction of k they hold. For a bfloat16 compute dtype every magnitude's low 16 bits are 0, so
the window's counts say everything; for float32 the block keeps each magnitude in the window
as each bin's low-bits histogram (counted in the same pass as the high bits,
kernels.hists_and_windows; kept sparse), within a memory budget per rank and tensor. A later round then counts from what was kept when the threshold's bin lies in
the block's window, and reads the block again only when it does not (MergeOp.reads): the
result is the same counts either way, so the output bits do not depend on the guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bigmerge.ops.task_vector import select

# What a rank keeps per tensor, at most, for every selection and block together (float32
# compute: 6 bytes per distinct low-bits value of a bin in a window); a block past it keeps
# nothing more and is read again. bfloat16 windows keep counts only (a few hundred bytes).
KEPT_BYTES = 64 * 1024 * 1024
HALF_WIDTH = 32  # bins each side of the guess, at most, for bfloat16 counts
LOW_HALF_WIDTH = 2  # and for float32's low-bits histograms (each a 256 KB table while counted)
LOW_WIDTH = 2 * LOW_HALF_WIDTH + 1  # bins of a float32 window


@dataclass
class Window:
    """Bins first..last of one selection's magnitudes in one block: their counts (bfloat16
    compute, whose magnitudes' low 16 bits are all 0) or each bin's low-bits histogram, sparse
    (float32 compute: lows[j] the values present in bin first + j, counts[j] how many)."""

    first: int
    last: int
    counts: np.ndarray | None = None  # int64 [last - first + 1]
    lows: list[np.ndarray] | None = None  # per bin: uint16 values, increasing
    low_counts: list[np.ndarray] | None = None  # per bin: int32 counts of those values

    def holds(self, hi_bin: int) -> bool:
        return self.first <= hi_bin <= self.last

    def nbytes(self) -> int:
        return sum(a.nbytes + c.nbytes for a, c in zip(self.lows or [], self.low_counts or []))

    def low_hist(self, hi_bin: int) -> np.ndarray:
        """The low-bits histogram of bin hi_bin (which the window holds)."""
        out = np.zeros(select.LO_BINS, dtype=np.int64)
        j = hi_bin - self.first
        if self.counts is not None:
            out[0] = self.counts[j]
        else:
            assert self.lows is not None and self.low_counts is not None
            out[self.lows[j]] = self.low_counts[j]
        return out

    def equal(self, bits: int) -> int:
        """How many magnitudes of the block have the float32 bit pattern `bits` (its bin in the window)."""
        j, lo = (bits >> 16) - self.first, bits & 0xFFFF
        if self.counts is not None:
            return int(self.counts[j]) if lo == 0 else 0
        assert self.lows is not None and self.low_counts is not None
        at = int(np.searchsorted(self.lows[j], lo))
        return int(self.low_counts[j][at]) if at < len(self.lows[j]) and self.lows[j][at] == lo else 0


def guesses(
    local: dict[str, Any], sels: dict[str, int], ks: dict[str, int], numel: int, sample: dict[int, np.ndarray]
) -> dict[str, int]:
    """Each selection's guess of the bin holding its k-th largest magnitude: this rank's blocks
    so far ranked at the share of k they hold, or `sample` (a first block's high-bits
    histograms of a part of it, by source) when there are none yet."""
    run = local.get("run") or sample
    seen = int(next(iter(run.values())).sum()) if run else 0
    out = {}
    for key, src in sels.items():
        out[key], _ = select.find_bin(run[src], min(seen, max(1, round(ks[key] * seen / max(1, numel)))))
    return out


def window_firsts(guess: dict[str, int]) -> dict[str, int]:
    """The first bin of each selection's float32 window (the LOW_WIDTH bins its tables count)."""
    return {k: min(max(0, g - LOW_HALF_WIDTH), select.HI_BINS - LOW_WIDTH) for k, g in guess.items()}


def keep_windows(
    local: dict[str, Any],
    block_index: int,
    hist: np.ndarray,
    srcs: list[int],
    sels: dict[str, int],
    guess: dict[str, int],
    tables: np.ndarray | None,
) -> None:
    """Keep each selection's window of block `block_index` in `local` (Block.local).

    hist: the block's high-bits histograms by source ([len(srcs), bins]); guess: guesses();
    tables: the float32 windows' low-bits histograms, in sels order (hists_and_windows), or
    None for a bfloat16 compute dtype (whose windows are counts of hist).
    """
    run = local.setdefault("run", {})
    for r, src in enumerate(srcs):
        run[src] = run[src] + hist[r] if src in run else hist[r].copy()
    kept: dict[str, Window] = {}
    if tables is None:
        for key, src in sels.items():
            h = hist[srcs.index(src)]
            first, last = max(0, guess[key] - HALF_WIDTH), min(len(h) - 1, guess[key] + HALF_WIDTH)
            kept[key] = Window(first, last, counts=h[first : last + 1].copy())
    else:
        firsts = window_firsts(guess)
        for j, key in enumerate(sels):
            lows = [np.flatnonzero(t).astype(np.uint16) for t in tables[j]]
            counts = [t[v].astype(np.int32) for t, v in zip(tables[j], lows)]
            w = Window(firsts[key], firsts[key] + tables.shape[1] - 1, lows=lows, low_counts=counts)
            size = w.nbytes()
            if local.get("kept_bytes", 0) + size > KEPT_BYTES:
                continue  # this block is read again in the low-bits round
            local["kept_bytes"] = local.get("kept_bytes", 0) + size
            kept[key] = w
    local[f"windows{block_index}"] = kept


def window(local: dict[str, Any], block_index: int, key: str, hi_bin: int) -> Window | None:
    """Block block_index's window of selection `key` when it holds bin hi_bin, else None."""
    w = local.get(f"windows{block_index}", {}).get(key)
    return w if w is not None and w.holds(hi_bin) else None


def low_hist_kept(local: dict[str, Any], block_index: int, key: str) -> np.ndarray | None:
    """The low-bits histogram a block that was read in the LO round counted for `key`."""
    return local.get(f"lo{block_index}", {}).get(key)


def ties_kept(local: dict[str, Any], block_index: int, key: str, bits: int) -> int | None:
    """How many magnitudes of the block equal `bits`, from what was kept; None: not kept."""
    lo = low_hist_kept(local, block_index, key)
    if lo is not None:
        return int(lo[bits & 0xFFFF])
    w = window(local, block_index, key, bits >> 16)
    return None if w is None else w.equal(bits)
