"""What an exact top-k selection keeps of a block between its statistics rounds, so that the
low-bits (LO) and ties (TIES) rounds of a tensor of many blocks need not read it again.

The high-bits round (HI) of a block counts its magnitudes' high 16 bits; the threshold's bin
is known only once every block is counted. So each block also keeps a *window* of bins around
a guess of that bin: this rank's blocks so far (their histograms summed), ranked at the
fraction of k they hold. For a bfloat16 compute dtype every magnitude's low 16 bits are 0, so
the window's counts say everything; for float32 the block keeps each magnitude in the window
as (bin - first bin) << 16 | low bits (kernels.window_records), within a memory budget per
rank and tensor. A later round then counts from what was kept when the threshold's bin lies in
the block's window, and reads the block again only when it does not (MergeOp.reads): the
result is the same counts either way, so the output bits do not depend on the guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bigmerge.ops.task_vector import select

# Records kept per rank and tensor, at most, for every selection and block together (float32
# compute; 4 bytes per magnitude in a window); a block whose share is too small keeps nothing
# and is read again. bfloat16 windows keep counts only (a few hundred bytes).
RECORD_BYTES = 64 * 1024 * 1024
HALF_WIDTH = 32  # bins each side of the guess, at most (a quarter of a power of two)


@dataclass
class Window:
    """Bins first..last of one selection's magnitudes in one block: counts (bfloat16) or records."""

    first: int
    last: int
    counts: np.ndarray | None = None  # int64 [last - first + 1]: the block's histogram there
    records: np.ndarray | None = None  # uint32: (bin - first) << 16 | low 16 bits, index order

    def holds(self, hi_bin: int) -> bool:
        return self.first <= hi_bin <= self.last

    def low_hist(self, hi_bin: int) -> np.ndarray:
        """The low-bits histogram of bin hi_bin (which the window holds)."""
        out = np.zeros(select.LO_BINS, dtype=np.int64)
        if self.counts is not None:
            out[0] = self.counts[hi_bin - self.first]  # bfloat16 magnitudes: low bits all 0
            return out
        assert self.records is not None
        rec = self.records
        lows = rec[(rec >> np.uint32(16)) == np.uint32(hi_bin - self.first)] & np.uint32(0xFFFF)
        return np.bincount(lows.astype(np.int64), minlength=select.LO_BINS).astype(np.int64)

    def equal(self, bits: int) -> int:
        """How many magnitudes of the block have the float32 bit pattern `bits` (its bin in the window)."""
        hi, lo = bits >> 16, bits & 0xFFFF
        if self.counts is not None:
            return int(self.counts[hi - self.first]) if lo == 0 else 0
        assert self.records is not None
        return int(np.count_nonzero(self.records == np.uint32(((hi - self.first) << 16) | lo)))


def keep_windows(
    local: dict[str, Any],
    block_index: int,
    numel: int,
    per_part: np.ndarray,
    srcs: list[int],
    sels: dict[str, int],
    ks: dict[str, int],
    bf16: bool,
    record: Any,
) -> None:
    """Keep each selection's window of block `block_index` in `local` (Block.local).

    per_part: the block's high-bits histograms per part and source (magnitude_hists mode 0,
    [parts, len(srcs), bins]); ks: each selection's k over the whole tensor; record(keys,
    firsts, lasts, offsets, out): kernels.window_records on this block with the same parts.
    """
    hist = per_part.sum(axis=0)
    run = local.setdefault("run", {})
    for r, src in enumerate(srcs):
        run[src] = run[src] + hist[r] if src in run else hist[r].copy()
    seen = int(hist[0].sum()) + local.get("seen", 0)
    local["seen"] = seen
    budget = RECORD_BYTES // 4 // max(1, local.get("blocks", 1)) // max(1, len(sels))
    kept: dict[str, Window] = {}
    rec_keys: list[str] = []
    for key, src in sels.items():
        h = hist[srcs.index(src)]
        guess, _ = select.find_bin(run[src], min(seen, max(1, round(ks[key] * seen / max(1, numel)))))
        first = last = guess
        if bf16:
            first, last = max(0, guess - HALF_WIDTH), min(len(h) - 1, guess + HALF_WIDTH)
            kept[key] = Window(first, last, counts=h[first : last + 1].copy())
            continue
        count = int(h[guess])
        if count > budget:
            continue  # this block is read again in the low-bits round
        while last - first < 2 * HALF_WIDTH:  # widen by whichever side fits, alternating
            grew = False
            for side in (-1, 1):
                b = first - 1 if side < 0 else last + 1
                if 0 <= b < len(h) and count + int(h[b]) <= budget:
                    count += int(h[b])
                    first, last = (b, last) if side < 0 else (first, b)
                    grew = True
            if not grew:
                break
        kept[key] = Window(first, last)
        rec_keys.append(key)
    if rec_keys:
        firsts = np.array([kept[k].first for k in rec_keys], dtype=np.int64)
        lasts = np.array([kept[k].last for k in rec_keys], dtype=np.int64)
        rows = [srcs.index(sels[k]) for k in rec_keys]
        in_window = np.stack(
            [per_part[:, r, f : last + 1].sum(axis=1) for r, f, last in zip(rows, firsts, lasts)], axis=1
        )  # [parts, keys]
        offsets = np.ascontiguousarray(np.cumsum(in_window, axis=0) - in_window)
        totals = in_window.sum(axis=0)
        out = np.empty((len(rec_keys), int(totals.max())), dtype=np.uint32)
        record(np.array([sels[k] for k in rec_keys], dtype=np.int64), firsts, lasts, offsets, out)
        for j, key in enumerate(rec_keys):
            kept[key].records = out[j, : totals[j]]
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
