"""Is every value of a source block finite? One pass over the raw bits, no allocation.

A NaN or Inf in a source silently poisons a merge (and every top-k threshold computed
over it), so the reader checks each block it reads unless the user allows them. A float is
not finite exactly when its exponent bits are all ones; the check reads the integer view of
the block (numba, GIL released) and gives the first bad element, or -1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bigmerge.ops.kernels import njit, use_numba


@njit(nogil=True, cache=True)
def _first_nonfinite(bits: np.ndarray, mask: Any) -> int:
    # Pieces of 4096: a branch-free count that vectorises, then a search only in a piece
    # that has a bad value. One thread: the reader threads that call it run side by side
    # (a parallel loop here competed with them and with the merge kernels: 2 GB/s, now 7).
    n = bits.size
    step = 4096
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        bad = np.int32(0)
        for k in range(lo, hi):
            bad += np.int32((bits[k] & mask) == mask)
        if bad:
            for k in range(lo, hi):
                if (bits[k] & mask) == mask:
                    return k
    return -1


@njit(nogil=True, cache=True)
def _first_bad_word(words: np.ndarray, mask: np.uint64, low: np.uint64, high: np.uint64) -> int:
    # Several values per 64-bit word (SWAR): y = (word & mask) ^ mask has a lane of zeros
    # exactly where a value's exponent bits are all ones; y's lanes are below their top bit, so
    # (y - low) sets a lane's top bit only where that lane was zero (a borrow out of a zero
    # lane leaves the next, non-zero, lane below its top bit). 15 GB/s here, against 2 for
    # one value at a time. Returns the first piece of 1024 words with a bad value, or -1.
    n = words.size
    step = 1024
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        acc = np.uint64(0)
        for k in range(lo, hi):
            acc |= (((words[k] & mask) ^ mask) - low) & high
        if acc:
            return lo
    return -1


def _lanes(mask: int, size: int) -> tuple[np.uint64, np.uint64, np.uint64]:
    """(mask, ones, top bits) repeated over the 64-bit word's lanes of `size` bytes."""
    per = 8 // size
    rep = sum(1 << (8 * size * j) for j in range(per))
    return np.uint64(mask * rep), np.uint64(rep), np.uint64((1 << (8 * size - 1)) * rep)


# exponent masks by item size: float16, bfloat16 share 2 bytes but not the mask
_MASKS = {
    torch.float16: (torch.int16, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float32: (torch.int32, 0x7F800000),
    torch.float64: (torch.int64, 0x7FF0000000000000),
}


def first_nonfinite(x: torch.Tensor) -> int:
    """Flat index of the first NaN or Inf in x, or -1 when every value is finite."""
    if x.numel() == 0 or x.dtype not in _MASKS:
        return -1
    flat = x.reshape(-1)
    if use_numba() and x.device.type == "cpu":
        itype, mask = _MASKS[x.dtype]
        utype = {2: np.uint16, 4: np.uint32, 8: np.uint64}[x.element_size()]
        bits = flat.view(itype).numpy().view(utype)
        size = x.element_size()
        whole = bits.size - bits.size % (8 // size)
        if whole and bits.ctypes.data % 8 == 0:
            piece = _first_bad_word(bits[:whole].view(np.uint64), *_lanes(mask, size))
            if piece < 0:  # every whole word is finite: only the tail is left
                k = int(_first_nonfinite(bits[whole:], utype(mask)))
                return whole + k if k >= 0 else -1
            start = piece * (8 // size)  # the exact first bad value, from that piece on
            return start + int(_first_nonfinite(bits[start:], utype(mask)))
        return int(_first_nonfinite(bits, utype(mask)))
    bad = ~torch.isfinite(flat)
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else -1
