"""Fused CPU kernels for the task-vector family (numba), one pass over a block.

The torch code in task_vector/ states the arithmetic; these kernels do exactly the
same float32 operations in the same order, element by element (numba does not contract
a*b+c into FMA unless fastmath is on), in one pass instead of a dozen: the same bits,
several times faster. A test pins kernels and torch code to identical output. Without
numba, or for other compute dtypes, the torch code runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import math
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

try:  # numba is a dependency, but keep the torch path usable without it
    import numba
    from numba import prange

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba is a dependency; use_numba() is the switch tests use
    HAVE_NUMBA = False
    prange = range  # type: ignore[misc]  # numba's prange is a type

COMPILE_LOCK = "bigmerge-compile.lock"
_held = threading.local()  # this thread's depth of nested compilations under the lock


@contextlib.contextmanager
def compile_lock(directory: str | None) -> Iterator[None]:
    """Hold the cross-process lock of a numba cache directory (fcntl.flock on a file there;
    reentrant within a thread, as compiling one kernel compiles the kernels it calls).

    Every process that compiles a cached kernel first takes the lock, and numba looks in the
    cache again once it holds it: of 64 ranks starting at once on one shared cache, the first
    compiles and saves each kernel, the others wait and load it; nobody compiles twice and no
    two processes write one cache entry at a time. No directory, or one that cannot hold the
    lock file (read-only): no lock (numba then caches nothing there either).
    """
    depth = getattr(_held, "depth", 0)
    fd = -1
    if depth == 0 and directory:
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(os.path.join(directory, COMPILE_LOCK), os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            if fd >= 0:
                os.close(fd)
            fd = -1
    _held.depth = depth + 1
    try:
        yield
    finally:
        _held.depth = depth
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def cache_dir(dispatcher: Any) -> str | None:
    """Where numba caches this kernel (NUMBA_CACHE_DIR, the package's __pycache__, or the
    user-wide cache numba falls back to), or None when it does not cache it."""
    cache = getattr(dispatcher, "_cache", None)
    path = getattr(cache, "_cache_path", None)
    return str(path) if path else None


_CACHED_KERNELS: list[Any] = []  # every cached kernel's dispatcher (cached() looks at their index files)


def uncached_fraction() -> float:
    """The fraction of the cached kernels imported so far that numba's on-disk cache has no index
    for: 1.0 on a fresh install (or after a kernel changed), about 0 once tools/warm_kernels.py
    or earlier merges have filled it. 0 without numba (nothing to compile)."""
    if not HAVE_NUMBA or not _CACHED_KERNELS:
        return 0.0
    missing = 0
    for dispatcher in _CACHED_KERNELS:
        cache = getattr(dispatcher, "_cache", None)
        index = getattr(getattr(cache, "_cache_file", None), "_index_path", None)
        missing += index is not None and not os.path.exists(index)
    return missing / len(_CACHED_KERNELS)


def in_cache(dispatcher: Any, sig: Any) -> bool:
    """Does numba's on-disk cache hold this kernel for this signature? (Its index, which numba
    replaces atomically: no lock needed to read it.) False when unsure: then the caller compiles
    under the lock, which loads the entry if it is there after all.

    A process that only loads cached kernels must not wait on the lock: the quickstart's first
    merge waited behind the background warm-up (at nice 19) while it compiled other kernels, and
    took 16.4 s against 4.3 s once the warm-up was over."""
    try:
        cache = dispatcher._cache
        key = cache._index_key(sig, dispatcher.targetctx.codegen())
        return key in cache._cache_file._load_index()
    except Exception:  # noqa: BLE001 - numba's internals moved, or no cache: take the lock
        return False


def njit(*args: Any, **kwargs: Any) -> Any:
    """numba.njit, and for cached kernels a compilation under the cache's compile_lock."""
    if not HAVE_NUMBA:
        return (lambda f: f) if not (args and callable(args[0])) else args[0]
    if args and callable(args[0]):
        return njit(**kwargs)(args[0])

    def wrap(fn: Any) -> Any:
        dispatcher = numba.njit(*args, **kwargs)(fn)
        if kwargs.get("cache"):
            compile_now = dispatcher.compile
            directory = cache_dir(dispatcher)

            def compile_locked(sig: Any) -> Any:
                if in_cache(dispatcher, sig):  # loading takes no lock: a compiling process may hold it long
                    return compile_now(sig)
                with compile_lock(directory):
                    return compile_now(sig)  # loads from the cache if another process saved it meanwhile

            dispatcher.compile = compile_locked
            _CACHED_KERNELS.append(dispatcher)
        return dispatcher

    return wrap


NO_NUMBA_ENV = "BIGMERGE_NO_NUMBA"


def use_numba() -> bool:
    """The one switch between the numba kernels and the torch code they are pinned to, read at
    every call: numba is installed and BIGMERGE_NO_NUMBA is not "1". Every operator, the sums and
    the reader's NaN/Inf scan ask it; tests force the torch path by setting the variable."""
    return HAVE_NUMBA and os.environ.get(NO_NUMBA_ENV) != "1"


def threads() -> int:
    """Parts to split a block into: a few per numba thread, for balance."""
    if not use_numba():
        return 1
    from numba import get_num_threads

    return int(get_num_threads())


SOURCE_SLOTS = 8  # the kernels' tuple of sources has this many entries (or a multiple): see slots


def slots(xs: Any) -> tuple[Any, ...]:
    """The sources as a tuple of SOURCE_SLOTS entries (the next multiple beyond 8 models), the
    unused ones repeating the first source (never read: the kernels index the models they are
    given). numba compiles a kernel for each tuple length, so this one compiled kernel serves
    every merge of 1 to 8 models: a new number of models compiles nothing."""
    n = len(xs)
    size = max(SOURCE_SLOTS, -(-n // SOURCE_SLOTS) * SOURCE_SLOTS)
    return tuple(xs) + (xs[0],) * (size - n)


def sources_in_slots(kernel: Any) -> Any:
    """A kernel whose first argument is the tuple of sources, called with them in slots."""

    @functools.wraps(kernel.py_func if hasattr(kernel, "py_func") else kernel)
    def call(xs: Any, *args: Any) -> Any:
        return kernel(slots(xs), *args)

    call.kernel = kernel  # type: ignore[attr-defined]  # the dispatcher itself (its caches, its signatures)
    return call


HI_BINS = 1 << 15
LO_BINS = 1 << 16
_CHUNK = 1 << 16
_LANES = 8  # chunks summed side by side (l1_of_bits)
CHUNK = _CHUNK  # fixed chunks of the per-chunk float sums (l1_kept, drop_keep)


@njit(cache=True)
def _round(v: np.float32, bf16: bool) -> np.float32:
    """v itself, or v rounded to bfloat16 (to nearest, ties to even) as torch rounds every
    bfloat16 operation's float32 result: with bf16 the kernels do bfloat16 arithmetic."""
    if not bf16:
        return v
    b = np.float32(v).view(np.int32)
    b = (b + np.int32(0x7FFF) + ((b >> 16) & np.int32(1))) & np.int32(-65536)
    return np.int32(b).view(np.float32)


@njit(cache=True)
def bf16_bits(u: np.uint32) -> np.uint16:
    """The bfloat16 bits of the float32 with bits u, rounded to nearest even as torch rounds
    (a NaN stays a NaN, 0x7FC0): what the kernels that store bfloat16 themselves write."""
    r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.uint16(0x7FC0) if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else np.uint16(r)


_SUB = 1024  # elements per inner step of the block kernels: their buffers stay in L1
NONE = np.int64(-1)  # a selection's threshold bits meaning "keep every element"
NOTHING = np.int64(0x7FFFFFFF)  # with cutoff 0: a selection that keeps nothing


def _f32(v: Any) -> np.float32:  # pragma: no cover - replaced by the overload below in numba code
    return np.float32(v)


if HAVE_NUMBA:
    from numba.core import types as _types
    from numba.extending import overload

    @overload(_f32)
    def _f32_overload(v: Any) -> Any:
        """A source element as float32: bfloat16 bit patterns (uint16) widen exactly (bits << 16)."""
        if isinstance(v, _types.Integer):

            def widen(v: Any) -> np.float32:
                return np.int32(np.int32(v) << 16).view(np.float32)

            return widen

        def as_is(v: Any) -> np.float32:
            return np.float32(v)

        return as_is


@njit(cache=True)
def _parts(m: int, nparts: int) -> tuple[int, int]:
    """(parts, elements per part) of a block of m elements, as every statistics kernel splits it."""
    nparts = max(1, min(nparts, (m + _CHUNK - 1) // _CHUNK))
    return nparts, (m + nparts - 1) // nparts


def parts(m: int, nparts: int) -> tuple[int, int]:
    nparts = max(1, min(nparts, (m + _CHUNK - 1) // _CHUNK))
    return nparts, (m + nparts - 1) // nparts


# The loops below index slices with their own 0-based counter (a[c0:c1][q], not a[c0 + q]):
# numba then drops the negative-index wraparound test and LLVM vectorizes them (5x here).


@njit(cache=True)
def _mag_bits_into(a: Any, bb: np.ndarray, c0: int, n: int, bits: np.ndarray, bf16: bool) -> None:
    """bits[q] = bit pattern of |a[c0 + q] - base[q]| (monotonic for non-negative floats)."""
    src = a[c0 : c0 + n]
    for q in range(n):
        bits[q] = np.float32(np.abs(_round(np.float32(_f32(src[q]) - bb[q]), bf16))).view(np.int32)


@njit(cache=True)
def _base_into(base: Any, c0: int, n: int, bb: np.ndarray) -> None:
    src = base[c0 : c0 + n]
    for q in range(n):
        bb[q] = _f32(src[q])


def magnitude_hists(
    xs: Any, base_row: int, rows: np.ndarray, params: np.ndarray, mode: int, nparts: int, bf16: bool
) -> np.ndarray:
    """Counts over |xs[r] - xs[base]| for each r in rows, per part of the block (see _parts).

    mode 0: histogram of the high 16 bits of the bit patterns (32768 bins; hists_and_windows
    without windows);
    mode 1: histogram of the low 16 bits of values whose high bits equal params[k];
    mode 2: how many values equal the float32 whose bit pattern is params[k] (1 bin).
    xs: the flat sources, all bfloat16 bits (uint16) or all float32. Returns int64
    [parts, len(rows), bins]; each part is counted by one thread; counts are exact.
    """
    if mode == 0:
        none = np.zeros(0, dtype=np.int64)
        return hists_and_windows(xs, base_row, rows, none, none, 1, nparts, bf16, True)[0]  # type: ignore[no-any-return]
    return _in_bin_counts(xs, base_row, rows, params, mode, nparts, bf16)  # type: ignore[no-any-return]


@sources_in_slots
@njit(cache=True, parallel=True)
def _in_bin_counts(
    xs: Any, base_row: int, rows: np.ndarray, params: np.ndarray, mode: int, nparts: int, bf16: bool
) -> np.ndarray:
    """magnitude_hists' modes 1 and 2."""
    m = xs[0].shape[0]
    nbins = LO_BINS if mode == 1 else 1
    nparts, step = _parts(m, nparts)
    local = np.zeros((nparts, rows.shape[0], nbins), dtype=np.int64)
    base = xs[base_row]
    for p in prange(nparts):
        j0 = p * step
        j1 = min(m, j0 + step)
        bb = np.empty(_SUB, dtype=np.float32)
        bits = np.empty(_SUB, dtype=np.int32)
        for c0 in range(j0, j1, _SUB):
            n = min(j1, c0 + _SUB) - c0
            _base_into(base, c0, n, bb)
            for k in range(rows.shape[0]):
                _mag_bits_into(xs[rows[k]], bb, c0, n, bits, bf16)
                h = local[p, k]
                want = params[k]
                if mode == 1:
                    for q in range(n):
                        b = bits[q]
                        if (b >> 16) == want:
                            h[np.uint32(b) & np.uint32(0xFFFF)] += 1
                else:
                    c = 0
                    for q in range(n):
                        c += bits[q] == want
                    h[0] += c
    return local


@sources_in_slots
@njit(cache=True, parallel=True)
def hi_bin_records(
    xs: Any,
    base_row: int,
    rows: np.ndarray,
    hi_bins: np.ndarray,
    offsets: np.ndarray,
    nparts: int,
    bf16: bool,
    pos: np.ndarray,
    low: np.ndarray,
) -> None:
    """The low-bits round of a block that is a whole tensor, keeping what it sees: for each k,
    the flat index (pos[k]) and low 16 bits (low[k]) of every |delta| of xs[rows[k]] whose high
    bits equal hi_bins[k], in index order. Part p writes from offsets[p, k] on: the counts of
    that bin per part, from magnitude_hists (mode 0) with the same nparts."""
    m = xs[0].shape[0]
    nparts, step = _parts(m, nparts)
    base = xs[base_row]
    for p in prange(nparts):
        j0 = p * step
        j1 = min(m, j0 + step)
        bb = np.empty(_SUB, dtype=np.float32)
        bits = np.empty(_SUB, dtype=np.int32)
        at = offsets[p].copy()
        found = np.empty(_SUB + 1, dtype=np.int64)  # this step's matches, written without branches
        for c0 in range(j0, j1, _SUB):
            n = min(j1, c0 + _SUB) - c0
            _base_into(base, c0, n, bb)
            for k in range(rows.shape[0]):
                _mag_bits_into(xs[rows[k]], bb, c0, n, bits, bf16)
                want = np.uint32(hi_bins[k])
                c = np.uint64(0)
                for q in range(n):
                    found[c] = q
                    c += np.uint64((np.uint32(bits[q]) >> np.uint32(16)) == want)
                w = at[k]
                pk = pos[k, w : w + c]
                lk = low[k, w : w + c]
                for t in range(c):
                    q = found[t]
                    pk[t] = c0 + q
                    lk[t] = bits[q] & 0xFFFF
                at[k] = w + c


@sources_in_slots
@njit(cache=True, parallel=True)
def hists_and_windows(
    xs: Any,
    base_row: int,
    rows: np.ndarray,
    win_rows: np.ndarray,
    win_first: np.ndarray,
    nbins: int,
    nparts: int,
    bf16: bool,
    count_hist: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """magnitude_hists mode 0 over |xs[r] - xs[base]| for r in rows, and in the same pass, for
    each window w, the low-16-bits histogram of every magnitude of xs[rows[win_rows[w]]] whose
    high bits are win_first[w] + j, j < nbins: what a later round needs of the block to count
    the low bits of whichever bin of the window holds the threshold, without reading it again.
    count_hist False: the windows only (the high-bits histograms come back zero). Returns (int64 [parts, len(rows), HI_BINS], int64 [len(win_rows), nbins, LO_BINS])."""
    m = xs[0].shape[0]
    nparts, step = _parts(m, nparts)
    nwin = win_rows.shape[0]
    local = np.zeros((nparts, rows.shape[0], HI_BINS), dtype=np.int64)
    # a window table has one row more: every magnitude outside the window is counted there, by
    # its high bits, so the loop has no branch (a bin holding a fifth of a block mispredicted
    # most of the time) and no collisions (the low bits of a bfloat16 model's deltas repeat)
    tables = np.zeros((nparts, nwin, nbins + 1, LO_BINS), dtype=np.int32)
    base = xs[base_row]
    width = np.uint32(nbins)
    # a source with a window is counted once, into the window's table, whose counts give its
    # high-bits histogram afterwards: one increment per value instead of two (-23 %)
    from_table = np.full(rows.shape[0], -1, dtype=np.int64)
    for v in range(nwin):
        if from_table[win_rows[v]] < 0:
            from_table[win_rows[v]] = v
    for p in prange(nparts):
        j0 = p * step
        j1 = min(m, j0 + step)
        bb = np.empty(_SUB, dtype=np.float32)
        bits = np.empty(_SUB, dtype=np.int32)
        # one source at a time into one int32 histogram (128 KB: it stays in L2, where three
        # int64 ones interleaved did not; 3x faster), and its window tables
        h32 = np.zeros(HI_BINS, dtype=np.int32)
        for k in range(rows.shape[0]):
            h = local[p, k]
            for c0 in range(j0, j1, _SUB):
                n = min(j1, c0 + _SUB) - c0
                _base_into(base, c0, n, bb)
                _mag_bits_into(xs[rows[k]], bb, c0, n, bits, bf16)
                if count_hist and from_table[k] < 0:
                    for q in range(n):
                        h32[np.uint32(bits[q]) >> np.uint32(16)] += 1
                for v in range(nwin):
                    if win_rows[v] != k:
                        continue
                    flat = tables[p, v].reshape(-1)
                    lo = np.uint32(win_first[v])
                    for q in range(n):
                        u = np.uint32(bits[q])
                        hi = u >> np.uint32(16)
                        d = hi - lo
                        flat[
                            (d << np.uint32(16)) | (u & np.uint32(0xFFFF))
                            if d < width
                            else (width << np.uint32(16)) | hi
                        ] += 1
            if count_hist and from_table[k] >= 0:  # every value of the part is in one entry
                table = tables[p, from_table[k]]
                lo = win_first[from_table[k]]
                for t in range(HI_BINS):
                    if 0 <= t - lo < nbins:
                        c = 0
                        for q in range(LO_BINS):
                            c += table[t - lo, q]
                        h[t] += c
                    else:
                        h[t] += table[nbins, t]
                continue
            for t in range(HI_BINS):  # a part holds < 2^31 elements: int32 counts are exact
                h[t] += h32[t]
            h32[:] = 0
    out = np.zeros((nwin, nbins, LO_BINS), dtype=np.int64)
    for v in prange(nwin):
        for p in range(nparts):
            for j in range(nbins):
                for t in range(LO_BINS):
                    out[v, j, t] += tables[p, v, j, t]
    return local, out


@sources_in_slots
@njit(cache=True, parallel=True)
def tie_cutoffs(
    xs: Any, base_row: int, rows: np.ndarray, thr_bits: np.ndarray, quotas: np.ndarray, bf16: bool
) -> np.ndarray:
    """For each k: one past the flat index of the quotas[k]-th element (in index order) of this
    block whose |delta| of xs[rows[k]] has the bit pattern thr_bits[k]; 0 for a quota of 0, the
    block's size when it has fewer such elements. Ties counted per chunk in parallel, then only
    the chunk holding the cutoff is scanned."""
    m = xs[0].shape[0]
    nk = rows.shape[0]
    nchunks = (m + _CHUNK - 1) // _CHUNK
    counts = np.zeros((nchunks, nk), dtype=np.int64)
    base = xs[base_row]
    for c in prange(nchunks):
        bb = np.empty(_SUB, dtype=np.float32)
        bits = np.empty(_SUB, dtype=np.int32)
        for c0 in range(c * _CHUNK, min(m, (c + 1) * _CHUNK), _SUB):
            n = min(m, c0 + _SUB) - c0
            _base_into(base, c0, n, bb)
            for k in range(nk):
                if quotas[k] <= 0:
                    continue
                _mag_bits_into(xs[rows[k]], bb, c0, n, bits, bf16)
                want = thr_bits[k]
                t = 0
                for q in range(n):
                    t += bits[q] == want
                counts[c, k] += t
    out = np.full(nk, m, dtype=np.int64)
    bb = np.empty(_SUB, dtype=np.float32)
    bits = np.empty(_SUB, dtype=np.int32)
    for k in range(nk):
        left = quotas[k]
        if left <= 0:
            out[k] = 0
            continue
        for c in range(nchunks):
            if counts[c, k] < left:
                left -= counts[c, k]
                continue
            done = False
            for c0 in range(c * _CHUNK, min(m, (c + 1) * _CHUNK), _SUB):
                n = min(m, c0 + _SUB) - c0
                _base_into(base, c0, n, bb)
                _mag_bits_into(xs[rows[k]], bb, c0, n, bits, bf16)
                for q in range(n):
                    if bits[q] == thr_bits[k]:
                        left -= 1
                        if left == 0:
                            out[k] = c0 + q + 1
                            done = True
                            break
                if done:
                    break
            break
    return out


@njit(inline="always")
def _merge_part(
    xs: Any,
    base: Any,
    others: np.ndarray,
    weights: np.ndarray,
    sel: np.ndarray,
    masks: np.ndarray,
    use_mask: np.ndarray,
    scale: np.ndarray,
    consensus: bool,
    normalize: bool,
    plain_divisor: np.float32,
    lam: np.float32,
    out: np.ndarray,
    outb: np.ndarray,
    bad: np.ndarray,
    j0: int,
    j1: int,
    bf16: bool,
) -> None:
    """task_vector_merge on elements [j0, j1); inlined where bf16 is a constant, so the float32
    code has no bfloat16 branches in its loops (they cost it about a quarter of its speed)."""
    bf16_out = outb.shape[0] > 0
    n = others.shape[0]
    bb = np.empty(_SUB, dtype=np.float32)
    d = np.empty((n, _SUB), dtype=np.float32)
    mixed = np.empty(_SUB, dtype=np.float32)
    div = np.empty(_SUB, dtype=np.float32)
    pos = np.empty(_SUB, dtype=np.bool_)
    for c0 in range(j0, j1, _SUB):
        L = min(j1, c0 + _SUB) - c0
        _base_into(base, c0, L, bb)
        for r in range(n):
            a = xs[others[r]][c0 : c0 + L]
            dr = d[r]
            w = weights[r]
            s = scale[r]
            has_scale = not math.isnan(s)
            if use_mask[r]:
                mk = masks[r][c0 : c0 + L]
                for q in range(L):
                    v = _round(np.float32(_f32(a[q]) - bb[q]), bf16)
                    v = np.float32(v * (np.float32(1.0) if mk[q] != 0 else np.float32(0.0)))
                    if has_scale:
                        v = _round(np.float32(v * s), bf16)
                    dr[q] = _round(np.float32(v * w), bf16)
            elif sel[r, 0] < 0:
                for q in range(L):
                    v = _round(np.float32(_f32(a[q]) - bb[q]), bf16)
                    if has_scale:
                        v = _round(np.float32(v * s), bf16)
                    dr[q] = _round(np.float32(v * w), bf16)
            else:
                # element q of this step with |delta| bits b is in (t, c) when b > t, or b == t and
                # c0 + q < c: when its key (b, 2^32 - 1 - q) is at least (t, 2^32 - (c - c0)), one
                # uint64 comparison (c - c0 clamped to [-1, L + 1], which decides the same). Kept:
                # in A and not in B, ka <= key < kb. Two comparisons where the four of the rule
                # itself kept LLVM from vectorising the loop: 27 -> 17 ms per 16M float32 block.
                ra = max(-1, min(sel[r, 1] - c0, L + 1))
                rb = max(-1, min(sel[r, 3] - c0, L + 1))
                ka = (np.uint64(sel[r, 0]) << np.uint64(32)) + np.uint64((1 << 32) - ra)
                kb = (np.uint64(sel[r, 2]) << np.uint64(32)) + np.uint64((1 << 32) - rb)
                for q in range(L):
                    v = _round(np.float32(_f32(a[q]) - bb[q]), bf16)
                    b = np.float32(np.abs(v)).view(np.int32)
                    key = (np.uint64(b) << np.uint64(32)) | np.uint64(np.uint32(0xFFFFFFFF) - np.uint32(q))
                    v = np.float32(v * (np.float32(1.0) if (key >= ka) & (key < kb) else np.float32(0.0)))
                    if has_scale:
                        v = _round(np.float32(v * s), bf16)
                    dr[q] = _round(np.float32(v * w), bf16)
        # rows summed in float32, rounded once (task_vector.common.sum_rows_in_order)
        for q in range(L):
            mixed[q] = d[0, q]
        for r in range(1, n):
            dr = d[r]
            for q in range(L):
                mixed[q] = np.float32(mixed[q] + dr[q])
        if bf16:
            for q in range(L):
                mixed[q] = _round(mixed[q], True)
        if consensus:
            for q in range(L):
                pos[q] = mixed[q] >= 0  # the majority sign; NaN votes negative
            for r in range(n):
                dr = d[r]
                w = weights[r]
                for q in range(L):
                    v = dr[q]
                    # sign(v) equals the majority: (v > 0) for +1, (v < 0) for -1; never for 0 or NaN
                    agree = (v > 0) if pos[q] else (v < 0)
                    a1 = np.float32(1.0) if agree else np.float32(0.0)
                    mv = np.float32(v * a1)
                    wv = np.float32(a1 * w)
                    if r == 0:
                        mixed[q] = mv
                        div[q] = wv
                    else:
                        mixed[q] = np.float32(mixed[q] + mv)
                        div[q] = np.float32(div[q] + wv)
            for q in range(L):
                mixed[q] = _round(mixed[q], bf16)
                dv = _round(div[q], bf16)
                div[q] = np.float32(1.0) if dv == 0 else dv
        else:
            for q in range(L):
                div[q] = plain_divisor
        if normalize:
            for q in range(L):
                mixed[q] = _round(np.float32(mixed[q] / div[q]), bf16)
        if lam != 1:
            for q in range(L):
                mixed[q] = _round(np.float32(mixed[q] * lam), bf16)
        for q in range(L):
            mixed[q] = _round(np.float32(bb[q] + mixed[q]), bf16)
        bits = mixed.view(np.uint32)
        nf = 0
        for q in range(L):
            nf += (bits[q] & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
        bad[0] += nf
        if bf16_out:  # stored as bfloat16: rounded to nearest even here, as torch's cast rounds
            ob = outb[c0 : c0 + L]
            for q in range(L):
                ob[q] = bf16_bits(bits[q])
        else:
            o = out[c0 : c0 + L]
            for q in range(L):
                o[q] = mixed[q]


@sources_in_slots
@njit(cache=True, parallel=True)
def task_vector_merge(
    xs: Any,
    base_row: int,
    others: np.ndarray,
    weights: np.ndarray,
    sel: np.ndarray,
    masks: np.ndarray,
    use_mask: np.ndarray,
    scale: np.ndarray,
    consensus: bool,
    normalize: bool,
    plain_divisor: np.float32,
    lam: np.float32,
    out: np.ndarray,
    outb: np.ndarray,
    bad: np.ndarray,
    bf16: bool = False,
) -> None:
    """mergekit's generalized task arithmetic for one block, fused.

    Per element: delta_r = x_r - base; the keep mask; optional L1 rescale; times weight; then
    either the TIES sign election (majority of the weighted sum, agreeing deltas summed,
    divided by agreeing weights) or a plain sum divided by the sum of weights; times lambda;
    plus base.

    The keep mask of row r is masks[r] where use_mask[r], else from sel[r] = (tA, cA, tB, cB):
    every element when tA < 0, else "in A and not in B", where element j with |delta| bit
    pattern b is in (t, c) when b > t, or b == t and j < c (the ties up to the cutoff c: exact
    top-k with ties split by index order, no mask needed). NaN counts as large.

    xs: the flat sources, all bfloat16 bits (uint16) or all float32. The work goes through
    per-part buffers of _SUB elements in simple loops (no calls, few branches) that LLVM
    vectorizes; the float32 operations and their order are the torch code's. The result goes
    to out (float32), or with outb non-empty to outb as bfloat16 bits (out then unused).
    bad[p]: the non-finite results of part p (len(bad) parts).
    """
    m = max(out.shape[0], outb.shape[0])
    nparts = bad.shape[0]
    step = (m + nparts - 1) // nparts
    base = xs[base_row]
    for p in prange(nparts):
        j0 = p * step
        j1 = min(m, j0 + step)
        if bf16:
            _merge_part(
                xs,
                base,
                others,
                weights,
                sel,
                masks,
                use_mask,
                scale,
                consensus,
                normalize,
                plain_divisor,
                lam,
                out,
                outb,
                bad[p : p + 1],
                j0,
                j1,
                True,
            )
        else:
            _merge_part(
                xs,
                base,
                others,
                weights,
                sel,
                masks,
                use_mask,
                scale,
                consensus,
                normalize,
                plain_divisor,
                lam,
                out,
                outb,
                bad[p : p + 1],
                j0,
                j1,
                False,
            )


@njit(cache=True, parallel=True)
def rank_keep(
    bits: np.ndarray,
    outer: int,
    flen: int,
    inner: int,
    u: np.ndarray,
    lo: float,
    eps: float,
    density: float,
    out: np.ndarray,
    nparts: int,
) -> None:
    """DELLA's keep mask: within each fiber (element (a, b, c) of a [outer, flen, inner] view, fibers
    along b), rank |delta| from the smallest (ties by index, as a stable sort), and keep
    element j where u[j] < lo + (rank / (flen - 1)) * 2 * eps (density itself for a fiber of one).

    The ranks come from a stable LSD radix sort of the bit patterns (11 + 11 + 10 bits): exact
    ranks are what the method defines, and a radix pass per digit is O(flen) per fiber. Each
    key travels with its index in one uint64 (key << 32 | index), and one pass over the fiber
    counts all three digits (1.2-1.7x faster than a count pass per digit and two arrays).
    """
    nfib = outer * inner
    nparts = max(1, min(nparts, nfib))
    step = (nfib + nparts - 1) // nparts
    probs = np.empty(flen, dtype=np.float64)
    for r in range(flen):
        probs[r] = density if flen == 1 else lo + (r / (flen - 1)) * 2.0 * eps
    for p in prange(nparts):
        v = np.empty(flen, dtype=np.uint64)
        v2 = np.empty(flen, dtype=np.uint64)
        count = np.empty((3, 2048), dtype=np.int32)
        for f in range(p * step, min(nfib, (p + 1) * step)):
            a = f // inner
            c = f - a * inner
            start = a * flen * inner + c
            fiber = bits[start : start + (flen - 1) * inner + 1]
            count[:] = 0
            for b in range(flen):
                k = np.uint32(fiber[b * inner])
                v[b] = (np.uint64(k) << np.uint64(32)) | np.uint64(b)
                count[0, k & np.uint32(2047)] += 1
                count[1, (k >> np.uint32(11)) & np.uint32(2047)] += 1
                count[2, k >> np.uint32(22)] += 1
            for dg in range(3):
                sh = np.uint64(32 + 11 * dg)
                first = (v[0] >> sh) & np.uint64(2047)
                cd = count[dg]
                if cd[first] == flen:
                    continue
                total = 0
                for d in range(2048):
                    n_d = cd[d]
                    cd[d] = total
                    total += n_d
                for b in range(flen):
                    x = v[b]
                    d = (x >> sh) & np.uint64(2047)
                    pos = cd[d]
                    cd[d] = pos + 1
                    v2[pos] = x
                v, v2 = v2, v
            uf = u[start : start + (flen - 1) * inner + 1]
            of = out[start : start + (flen - 1) * inner + 1]
            for r in range(flen):
                j = (v[r] & np.uint64(0xFFFFFFFF)) * np.uint64(inner)
                of[j] = uf[j] < probs[r]


@njit(cache=True, parallel=True)
def l1_kept(x: np.ndarray, base_row: int, row: int, keep: np.ndarray, out: np.ndarray, bf16: bool) -> None:
    """sum |x[row] - x[base]| and the same over the kept elements, in float64, per chunk of
    _CHUNK elements (out: [n_chunks, 2]; the caller adds the chunks in order). Fixed chunks, not
    per-thread parts, so the sums do not depend on the number of threads."""
    m = x.shape[1]
    for c in prange(out.shape[0]):
        before = 0.0
        after = 0.0
        for j in range(c * _CHUNK, min(m, (c + 1) * _CHUNK)):
            a = np.float64(np.abs(_round(np.float32(x[row, j] - x[base_row, j]), bf16)))
            before += a
            after += a if keep[j] else 0.0  # + 0.0 leaves a sum of magnitudes as it is
        out[c, 0] = before
        out[c, 1] = after


@sources_in_slots
@njit(cache=True, parallel=True)
def magnitude_bits(xs: Any, base_row: int, row: int, out: np.ndarray, bf16: bool) -> None:
    """out = the bit patterns of |xs[row] - xs[base]| (what select.magnitude_bits gives of the
    torch delta), in one pass over the two sources."""
    m = out.shape[0]
    nchunks = (m + _CHUNK - 1) // _CHUNK
    base = xs[base_row]
    src = xs[row]
    for c in prange(nchunks):
        bb = np.empty(_SUB, dtype=np.float32)
        for c0 in range(c * _CHUNK, min(m, (c + 1) * _CHUNK), _SUB):
            n = min(m, c0 + _SUB) - c0
            _base_into(base, c0, n, bb)
            _mag_bits_into(src, bb, c0, n, out[c0 : c0 + n], bf16)


@njit(cache=True, parallel=True)
def l1_of_bits(bits: np.ndarray, keep: np.ndarray, out: np.ndarray) -> None:
    """l1_kept's sums from magnitudes given as bit patterns: per chunk, in float64, in order.

    Each chunk's sum is one chain of dependent additions; _LANES whole chunks are summed side
    by side, one chain per vector lane, so the additions and their order (and the bits) are
    those of one chunk at a time (0.74 -> 0.44 ns per element on 2 threads)."""
    m = bits.shape[0]
    mag = bits.view(np.float32)
    nch = out.shape[0]
    for g in prange((nch + _LANES - 1) // _LANES):
        c0 = g * _LANES
        if c0 + _LANES <= nch and (c0 + _LANES) * _CHUNK <= m:
            before = np.zeros(_LANES)
            after = np.zeros(_LANES)
            for j in range(_CHUNK):
                for v in range(_LANES):
                    k = (c0 + v) * _CHUNK + j
                    a = np.float64(mag[k])
                    before[v] += a
                    after[v] += a if keep[k] else 0.0  # + 0.0 leaves a sum of magnitudes as it is
            for v in range(_LANES):
                out[c0 + v, 0] = before[v]
                out[c0 + v, 1] = after[v]
            continue
        for c in range(c0, min(nch, c0 + _LANES)):
            b = 0.0
            kept = 0.0
            for j in range(c * _CHUNK, min(m, (c + 1) * _CHUNK)):
                a = np.float64(mag[j])
                b += a
                if keep[j]:
                    kept += a
            out[c, 0] = b
            out[c, 1] = kept


def ordered_sum(parts: np.ndarray) -> float:
    """Python floats added left to right: how l1_before_after adds its chunks."""
    total = 0.0
    for v in parts:
        total += float(v)
    return total


def l1_before_after(
    x: np.ndarray, base_row: int, row: int, keep: np.ndarray, bf16: bool = False
) -> tuple[float, float]:
    """(L1 of a delta, L1 of its kept elements), each summed chunk by chunk in index order."""
    out = np.zeros(((x.shape[1] + _CHUNK - 1) // _CHUNK, 2), dtype=np.float64)
    l1_kept(x, base_row, row, keep, out, bf16)
    before = after = 0.0
    for c in range(out.shape[0]):
        before += float(out[c, 0])
        after += float(out[c, 1])
    return before, after


# splitmix64 (Steele, Lea & Flood): a counter-based generator, u = f(key, element index), so draws
# are the same whatever the blocks, threads or ranks, and cost one hash per element.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_TO_UNIT = np.float32(2.0**-24)


@njit(cache=True, parallel=True)
def _uniform_kernel(key: np.uint64, start: np.uint64, out: np.ndarray, nparts: int) -> None:
    n = out.shape[0]
    step = (n + nparts - 1) // nparts
    for p in prange(nparts):
        # 0-based slices and a signed conversion (the value has 24 bits: exact either way) let
        # LLVM vectorize the loop: 0.52 -> 0.16 ns per draw on 2 threads, the same draws
        j0 = p * step
        j1 = min(n, j0 + step)
        o = out[j0:j1]
        first = key + (start + np.uint64(j0) + np.uint64(1)) * _GOLDEN
        for q in range(j1 - j0):
            z = first + np.uint64(q) * _GOLDEN
            z = (z ^ (z >> np.uint64(30))) * _MIX1
            z = (z ^ (z >> np.uint64(27))) * _MIX2
            z = z ^ (z >> np.uint64(31))
            o[q] = np.float32(np.int64(z >> np.uint64(40))) * _TO_UNIT


def uniform(key: int, start: int, out: np.ndarray) -> np.ndarray:
    """U[0, 1) float32 draws number start, start + 1, ... of the stream `key` (24-bit, exact),
    into out: the numba kernel, or the same integer arithmetic in numpy."""
    if use_numba():
        _uniform_kernel(np.uint64(key), np.uint64(start), out, max(1, min(4 * threads(), out.shape[0] // _CHUNK)))
        return out
    z = np.arange(start + 1, start + 1 + out.shape[0], dtype=np.uint64) * _GOLDEN + np.uint64(key)
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z ^= z >> np.uint64(31)
    np.multiply((z >> np.uint64(40)).astype(np.float32), _TO_UNIT, out=out)
    return out


@sources_in_slots
@njit(cache=True, parallel=True)
def drop_keep(
    xs: Any,
    base_row: int,
    row: int,
    key: np.uint64,
    start: np.uint64,
    density: np.float32,
    keep: np.ndarray,
    l1: np.ndarray,
    with_l1: bool,
    bf16: bool,
) -> None:
    """DARE's keep mask of one source on a block, keep[j] = u(start + j) < density (uint8; u as
    uniform() draws it, compared in float32 as torch compares), and with_l1: l1_kept's sums of
    |delta| and of its kept elements per chunk into l1 [n_chunks, 2], in the same order. One
    pass: no float32 draws, no stack, no bool mask to convert."""
    m = keep.shape[0]
    nchunks = (m + _CHUNK - 1) // _CHUNK
    base = xs[base_row]
    src = xs[row]
    for c in prange(nchunks):
        bb = np.empty(_SUB, dtype=np.float32)
        bits = np.empty(_SUB, dtype=np.int32)
        mag = bits.view(np.float32)
        before = 0.0
        after = 0.0
        for c0 in range(c * _CHUNK, min(m, (c + 1) * _CHUNK), _SUB):
            n = min(m, c0 + _SUB) - c0
            kk = keep[c0 : c0 + n]
            first = start + np.uint64(c0) + np.uint64(1)
            for q in range(n):
                z = key + (first + np.uint64(q)) * _GOLDEN
                z = (z ^ (z >> np.uint64(30))) * _MIX1
                z = (z ^ (z >> np.uint64(27))) * _MIX2
                z = z ^ (z >> np.uint64(31))
                kk[q] = np.float32(z >> np.uint64(40)) * _TO_UNIT < density
            if with_l1:
                _base_into(base, c0, n, bb)
                _mag_bits_into(src, bb, c0, n, bits, bf16)
                for q in range(n):
                    a = np.float64(mag[q])
                    before += a
                    after += a if kk[q] else 0.0  # no branch on a coin flip; + 0.0 leaves a sum of magnitudes as it is
        if with_l1:
            l1[c, 0] = before
            l1[c, 1] = after
