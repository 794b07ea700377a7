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
        return int(_first_nonfinite(bits, utype(mask)))
    bad = ~torch.isfinite(flat)
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else -1
