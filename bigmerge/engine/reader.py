"""Ranged reads of blocks from every source, prefetched on background threads.

A block of rows [r0, r1) of a row-major tensor is one contiguous byte range per source,
read straight into a buffer that becomes the torch tensor (no extra copy locally).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from bigmerge.engine.colmean import ColumnMean
from bigmerge.engine.finite import first_nonfinite
from bigmerge.errors import SourceError
from bigmerge.planning.plan import Plan, SourceSpan, TensorPlan
from bigmerge.storage.fs import Location, location
from bigmerge.storage.safetensors import DTYPES

COALESCE_MAX_ITEM = 1 << 20  # blocks up to 1 MiB per source are read together...
COALESCE_MAX_GROUP = 16 << 20  # ...up to 16 MiB per source per request
COALESCE_SLACK = 64 << 10  # tolerated gap bytes when merging ranges


class BlockReader:
    def __init__(
        self,
        plan: Plan,
        storage_options: dict[str, Any] | None = None,
        threads: int = 4,
        prefetch: int = 2,
        allow_nonfinite: bool = False,
    ):
        self.plan = plan
        self.allow_nonfinite = allow_nonfinite
        self._trusted: set[int] = set()  # tensors whose operator checks NaN/Inf itself (trust)
        # (tensor, block, source) scanned already: a block read again (a later pass over a tensor
        # larger than the cache) is the same bytes, and a source changed meanwhile fails its pin check
        self._scanned: set[tuple[int, int, int]] = set()
        # (tensor, source) -> the padding row's running sum (`tokenizer.pad_to_multiple_of`, PadFold)
        self._pad_folds: dict[tuple[int, int], PadFold] = {}
        self._streamed: dict[int, set[int]] = {}  # padded tensor -> the blocks stream() will read
        self._closing = False
        self.storage_options = storage_options or {}
        self.prefetch = max(0, prefetch)
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="bigmerge-read")
        self._locs: dict[str, Location] = {}
        self.bytes_read = 0
        self.allocations = 0  # read buffers allocated (not taken from the pool)
        # Recycled read buffers: fresh large allocations cost page faults on every block. Every
        # pooled buffer has the capacity of the largest block, so any freed one serves any read
        # (a pool of mixed sizes kept growing with the variety of tensor shapes, and so with the
        # model), and the pool keeps no more than the reads in flight can use.
        self._free: list[torch.Tensor] = []
        # the pool's buffers by their storage's address (every view of a buffer shares it)
        self._pooled: dict[int, torch.Tensor] = {}
        self._shared: dict[int, int] = {}  # pooled buffers several blocks view (coalesced reads): views left
        self._free_lock = threading.Lock()
        blocks = [t.block_rows * t.row_elems * DTYPES[s.dtype][1] for t in plan.tensors for s in t.sources]
        self._cap = max(blocks, default=0)
        if any(n <= COALESCE_MAX_ITEM for n in blocks):  # a coalesced read's buffer fits too
            self._cap = max(self._cap, 2 * COALESCE_MAX_GROUP + COALESCE_SLACK)
        self._max_free = max(1, len(plan.models)) * (self.prefetch + 2)
        self._aux_pending: dict[tuple[int, int], Future[list[dict[str, torch.Tensor]]]] = {}
        # whole aux inputs of the latest two tensors; a future, so concurrent prefetches read each once
        self._aux_whole: dict[tuple[str, int], Future[torch.Tensor]] = {}
        # LoRA factors read whole (A; both for an embedding), kept while a tensor's blocks come
        self._lora_whole: dict[tuple[str, int], Future[torch.Tensor]] = {}
        self._lora_keep = 4 * max(1, len(plan.models))

    def _buffer(self, n: int) -> torch.Tensor:
        with self._free_lock:
            if self._free and n <= self._cap:
                return self._free.pop()[:n]
        buf = torch.empty(max(n, self._cap), dtype=torch.uint8)
        with self._free_lock:
            self._pooled[_storage_ptr(buf)] = buf
            self.allocations += 1
        return buf[:n]

    def buffer(self, n: int) -> torch.Tensor:
        """A uint8 buffer of n bytes from the read pool (what the spill reads back into): give it
        back with release(), as a block's inputs."""
        return self._buffer(n)

    def _count(self, n: int) -> None:
        # called from the reader threads: `+=` on an attribute is not atomic
        with self._free_lock:
            self.bytes_read += n

    def release(self, inputs: list[torch.Tensor]) -> None:
        """Give a block's input buffers back for reuse; the caller must not touch them again."""
        with self._free_lock:
            for x in inputs:
                ptr = _storage_ptr(x)
                base = self._pooled.get(ptr)
                if base is None:
                    continue  # not the pool's (a vocabulary block, an aux input)
                left = self._shared.get(ptr)
                if left is not None:  # a coalesced read: free once the last of its blocks is done
                    if left > 1:
                        self._shared[ptr] = left - 1
                        continue
                    del self._shared[ptr]
                if len(self._free) < self._max_free and base.numel() >= self._cap:
                    self._free.append(base)
                else:
                    del self._pooled[ptr]  # freed now; its address may be reused

    def read_aux(self, t: TensorPlan, b: int) -> list[dict[str, torch.Tensor]]:
        """Block b's auxiliary inputs per source: its rows of the row-blocked ones, the others whole.

        Whole ones (e.g. Gram matrices) are read once and kept while the next tensors come, so
        the blocks of one tensor share them; they are fresh tensors, never pooled buffers.
        """
        r0, r1 = t.block_range(b)
        out: list[dict[str, torch.Tensor]] = []
        for per in t.aux:
            got: dict[str, torch.Tensor] = {}
            for key, span in per.items():
                dtype, size = DTYPES[span.dtype]
                if span.rows:
                    row_bytes = t.row_elems * size
                    buf = torch.empty((r1 - r0) * row_bytes, dtype=torch.uint8)
                    if r1 > r0:
                        self._loc(span.file).read_into(span.start + r0 * row_bytes, memoryview(buf.numpy()).cast("B"))
                    self._count(buf.numel())
                    got[key] = buf.view(dtype).reshape((r1 - r0, *t.shape[1:]) if t.shape else (1,))
                    continue
                k = (span.file, span.start)
                with self._free_lock:
                    whole = self._aux_whole.get(k)
                    mine = whole is None
                    if whole is None:
                        whole = self._aux_whole[k] = Future()
                        while len(self._aux_whole) > 2 * sum(len(p) for p in t.aux):
                            del self._aux_whole[next(iter(self._aux_whole))]
                if mine:
                    try:
                        buf = torch.empty(span.end - span.start, dtype=torch.uint8)
                        if span.end > span.start:
                            self._loc(span.file).read_into(span.start, memoryview(buf.numpy()).cast("B"))
                        self._count(buf.numel())
                        whole.set_result(buf.view(dtype).reshape(span.shape))
                    except BaseException as exc:
                        whole.set_exception(exc)
                        with self._free_lock:
                            self._aux_whole.pop(k, None)
                        raise
                got[key] = whole.result()
            out.append(got)
        return out

    def take_aux(self, t: TensorPlan, b: int) -> list[dict[str, torch.Tensor]]:
        """The aux inputs of a block the stream prefetched, else read now; [] when t has none."""
        if not t.aux:
            return []
        future = self._aux_pending.pop((t.index, b), None)
        return future.result() if future is not None else self.read_aux(t, b)

    def close(self) -> None:
        self._closing = True  # a block waiting for its turn in a padding row's sum gives up
        for fold in list(self._pad_folds.values()):
            fold.wake()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def is_far(self, url: str) -> bool:
        """Does reading this source again cross a network (Location.is_far)?"""
        return self._loc(url).is_far

    def _loc(self, url: str) -> Location:
        loc = self._locs.get(url)
        if loc is None:
            loc = self._locs[url] = location(url, self.storage_options)
        return loc

    def _span(self, t: TensorPlan, b: int, i: int) -> tuple[int, int]:
        """Absolute byte range of block b of tensor t in source i's file."""
        src = t.sources[i]
        r0, r1 = t.block_range(b)
        row_bytes = t.row_elems * DTYPES[src.dtype][1]
        return src.start + r0 * row_bytes, src.start + r1 * row_bytes

    def _view(self, buf: torch.Tensor, t: TensorPlan, b: int, i: int) -> torch.Tensor:
        r0, r1 = t.block_range(b)
        return buf.view(DTYPES[t.sources[i].dtype][0]).reshape((r1 - r0, *t.shape[1:]) if t.shape else (1,))

    def _read_one(self, t: TensorPlan, b: int, i: int) -> torch.Tensor:
        if t.vocab is not None:
            return self._checked(self._read_vocab(t, b, i), t, b, i)
        start, end = self._span(t, b, i)
        buf = self._buffer(end - start)
        if end > start:
            self._loc(t.sources[i].file).read_into(start, memoryview(buf.numpy()).cast("B"))
        self._count(end - start)
        return self._checked(self._adapted(self._view(buf, t, b, i), t.sources[i], t.block_range(b)[0]), t, b, i)

    def trust(self, tensors: set[int]) -> None:
        """Skip the NaN/Inf scan of these tensors' blocks: the operator checks them itself
        (MergeOp.checks_finite), and `scan` is called for any block it did not check."""
        self._trusted = set(tensors)

    def scan(self, t: TensorPlan, b: int, inputs: list[torch.Tensor]) -> None:
        """Raise the error naming the first NaN or Inf in block b's inputs (unless allowed)."""
        if not self.allow_nonfinite:
            for i, x in enumerate(inputs):
                self._scan(x, t, b, i)

    def _checked(self, x: torch.Tensor, t: TensorPlan, b: int, i: int) -> torch.Tensor:
        """x, after making sure it holds no NaN or Inf (unless the user allows them or the
        operator checks them itself)."""
        if self.allow_nonfinite or t.index in self._trusted or (t.index, b, i) in self._scanned:
            return x
        self._scan(x, t, b, i)
        self._scanned.add((t.index, b, i))
        return x

    def _scan(self, x: torch.Tensor, t: TensorPlan, b: int, i: int) -> None:
        k = first_nonfinite(x)
        if k >= 0:
            src = t.sources[i]
            row = t.block_range(b)[0] + k // max(1, t.row_elems)
            raise SourceError(
                f"{src.file}: tensor {src.tensor or t.name!r} holds {float(x.reshape(-1)[k])} at row {row}; "
                "a NaN or Inf would poison the merge (pass --allow-nonfinite to merge it anyway)"
            )

    def _source_rows(self, t: TensorPlan, j: int, row: int, n: int) -> torch.Tensor:
        """Rows [row, row + n) of source j's own tensor (its row numbering, its dtype)."""
        src = t.sources[j]
        dtype, size = DTYPES[src.dtype]
        row_bytes = t.row_elems * size
        buf = torch.empty(n * row_bytes, dtype=torch.uint8)
        if n:
            self._loc(src.file).read_into(src.start + row * row_bytes, memoryview(buf.numpy()).cast("B"))
        self._count(buf.numel())
        return self._adapted(buf.view(dtype).reshape(n, *t.shape[1:]), src, row)

    # -- LoRA adapters (bigmerge.planning.lora) ---------------------------------------------

    def _adapted(self, x: torch.Tensor, src: SourceSpan, row: int) -> torch.Tensor:
        """x (rows [row, row + len(x)) of src's tensor) with the adapter's update added in place,
        as PEFT's merge_and_unload adds it: a linear layer's `weight += delta` (the sum in the
        wider dtype, rounded once to the weight's), an embedding's `weight += delta.to(weight.dtype)`
        (the delta rounded first)."""
        if src.lora is not None and x.numel():
            delta = self._lora_delta(src.lora, row, x.shape[0], x.dtype)
            x.add_(delta.to(x.dtype) if src.lora["embedding"] else delta)
        return x

    def _lora_delta(self, term: dict[str, Any], row: int, n: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [row, row + n) of scale * B @ A, in PEFT's order (the product, then the scale)
        and dtype (factors of a 16-bit or float32 model in float32, as PEFT loads them)."""
        ft = torch.float64 if dtype == torch.float64 else torch.float32
        a = self._lora_factor(term["a"], ft)
        if term["embedding"]:  # delta = (B @ A).T: its rows are A's columns
            b = self._lora_factor(term["b"], ft)
            return (b @ a[:, row : row + n]).T * term["scale"]
        file, start, _end, st_dtype, (_out, r) = term["b"]
        raw_dtype, size = DTYPES[st_dtype]
        buf = torch.empty(n * r * size, dtype=torch.uint8)
        self._loc(file).read_into(start + row * r * size, memoryview(buf.numpy()).cast("B"))
        self._count(buf.numel())
        b_rows = buf.view(raw_dtype).reshape(n, r).to(ft)
        return (b_rows @ a) * term["scale"]

    def _lora_factor(self, spec: list[Any], ft: torch.dtype) -> torch.Tensor:
        """A factor read whole once and kept for the next blocks (a future: concurrent reads share it)."""
        file, start, end, st_dtype, shape = spec
        k = (file, start)
        with self._free_lock:
            whole = self._lora_whole.get(k)
            mine = whole is None
            if whole is None:
                whole = self._lora_whole[k] = Future()
                while len(self._lora_whole) > self._lora_keep:
                    del self._lora_whole[next(iter(self._lora_whole))]
        if mine:
            try:
                buf = torch.empty(end - start, dtype=torch.uint8)
                if end > start:
                    self._loc(file).read_into(start, memoryview(buf.numpy()).cast("B"))
                self._count(buf.numel())
                whole.set_result(buf.view(DTYPES[st_dtype][0]).reshape(shape).to(ft))
            except BaseException as exc:
                whole.set_exception(exc)
                with self._free_lock:
                    self._lora_whole.pop(k, None)
                raise
        return whole.result().to(ft)

    def _read_vocab(self, t: TensorPlan, b: int, i: int) -> torch.Tensor:
        """Block b of source i permuted onto the output vocabulary (bigmerge.planning.vocab), in the
        tensor's compute dtype: one ranged read per run of consecutive rows, then the rows
        this source lacks, filled as mergekit fills them, then any padding rows."""
        assert t.vocab is not None
        r0, r1 = t.block_range(b)
        n_vocab = int(t.vocab.get("vocab", t.vocab["rows"]))
        if "vocab" not in t.vocab:
            return self._permuted_rows(t, i, r0, min(r1, n_vocab))
        fold = self._pad_fold(t, i)
        try:
            out = self._permuted_rows(t, i, r0, min(r1, n_vocab))
        except BaseException as exc:
            fold.fail(exc)  # the blocks after it, waiting for these rows, fail too
            raise
        if r0 < n_vocab:
            fold.fold(r0, out)
        if r1 > n_vocab:
            pad = fold.mean().expand(r1 - max(r0, n_vocab), *t.shape[1:])
            out = torch.cat([out, pad]) if r0 < n_vocab else pad.clone()
        return out

    def _permuted_rows(self, t: TensorPlan, i: int, r0: int, r1: int) -> torch.Tensor:
        assert t.vocab is not None
        dt = DTYPES[t.compute_dtype or self.plan.compute_dtype][0]
        out = torch.zeros((max(0, r1 - r0), *t.shape[1:]), dtype=dt)
        present = torch.zeros(max(0, r1 - r0), dtype=torch.bool)
        for new, old, n in t.vocab["runs"][i]:
            a, e = max(new, r0), min(new + n, r1)
            if a < e:
                out[a - r0 : e - r0] = self._source_rows(t, i, old + a - new, e - a)
                present[a - r0 : e - r0] = True
        for new, kind, donors, *force in t.vocab["fills"]:
            if not r0 <= new < r1 or (present[new - r0] and not force):
                continue
            if kind == "zero":
                out[new - r0] = 0
            elif kind == "copy":
                j, row = donors[0]
                out[new - r0] = self._source_rows(t, j, row, 1)[0]
            else:  # the mean of the sources that have it, summed in model order as mergekit does
                acc = torch.zeros(t.shape[1:], dtype=dt)
                for j, row in donors:
                    acc = acc + self._source_rows(t, j, row, 1)[0].to(dt)
                out[new - r0] = acc / len(donors)
        return out

    def _pad_fold(self, t: TensorPlan, i: int) -> PadFold:
        key = (t.index, i)
        with self._free_lock:
            fold = self._pad_folds.get(key)
            if fold is None:
                assert t.vocab is not None
                dt = DTYPES[t.compute_dtype or self.plan.compute_dtype][0]
                fold = self._pad_folds[key] = PadFold(
                    int(t.vocab["vocab"]),
                    t,
                    dt,
                    self._streamed.setdefault(t.index, set()),
                    lambda a, e: self._permuted_rows(t, i, a, e),
                    lambda: self._closing,
                )
            return fold

    def _read_group(self, group: list[tuple[TensorPlan, int]], i: int) -> list[torch.Tensor]:
        """Source i's bytes for several small blocks, in as few requests as their layout allows.

        Small tensors (norms, biases, whole small matrices) sit next to each other in a file;
        one ranged read of the covering range replaces a request per tensor, which is what
        costs on object storage. The covering buffer comes from the pool and goes back to it
        when the last of its blocks is released.
        """
        spans = [self._span(t, b, i) for t, b in group]
        files = {t.sources[i].file for t, _ in group}
        lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
        useful = sum(e - s for s, e in spans)
        if len(files) != 1 or hi - lo > 2 * useful + COALESCE_SLACK:
            return [self._read_one(t, b, i) for t, b in group]
        cover = self._buffer(hi - lo)
        with self._free_lock:
            self._shared[cover.data_ptr()] = len(group)
        if hi > lo:
            self._loc(next(iter(files))).read_into(lo, memoryview(cover.numpy()).cast("B"))
        self._count(useful)
        return [
            self._checked(self._view(cover[s - lo : e - lo], t, b, i), t, b, i) for (t, b), (s, e) in zip(group, spans)
        ]

    def _submit(self, t: TensorPlan, b: int) -> list[Future[torch.Tensor]]:
        return [self._pool.submit(self._read_one, t, b, i) for i in range(len(t.sources))]

    def read(self, t: TensorPlan, b: int) -> list[torch.Tensor]:
        return [f.result() for f in self._submit(t, b)]

    def read_ahead(self, t: TensorPlan, b: int) -> list[Future[torch.Tensor]]:
        """`read`, started now on the pool's threads: the caller takes the results when it needs them."""
        return self._submit(t, b)

    def _groups(self, items: Iterable[tuple[TensorPlan, int]]) -> Iterator[list[tuple[TensorPlan, int]]]:
        group: list[tuple[TensorPlan, int]] = []
        size = 0
        for t, b in items:
            nbytes = max(e - s for s, e in (self._span(t, b, i) for i in range(len(t.sources))))
            # an adapted block is changed in place after its read: it must own its buffer (slices may
            # read one range twice), so it is never part of a coalesced read
            if nbytes > COALESCE_MAX_ITEM or t.vocab is not None or any(s.lora for s in t.sources):
                if group:
                    yield group
                    group, size = [], 0
                yield [(t, b)]
                continue
            if group and (size + nbytes > COALESCE_MAX_GROUP or len(t.sources) != len(group[0][0].sources)):
                yield group
                group, size = [], 0
            group.append((t, b))
            size += nbytes
        if group:
            yield group

    def stream(self, items: Iterable[tuple[TensorPlan, int]]) -> Iterator[tuple[TensorPlan, int, list[torch.Tensor]]]:
        """Yield (tensor, block, inputs) in order, keeping `prefetch` reads in flight ahead."""
        pending: deque[tuple[list[tuple[TensorPlan, int]], list[Future[list[torch.Tensor]]]]] = deque()
        items = list(items)
        for t, b in items:  # a padded vocabulary's blocks feed its padding row as they come, in order
            if t.vocab is not None and "vocab" in t.vocab:
                self._streamed.setdefault(t.index, set()).add(t.block_range(b)[0])
        groups = self._groups(items)
        exhausted = False
        while True:
            while not exhausted and len(pending) <= self.prefetch:
                group = next(groups, None)
                if group is None:
                    exhausted = True
                    break
                if len(group) == 1:
                    t, b = group[0]
                    futures = [
                        self._pool.submit(lambda t=t, b=b, i=i: [self._read_one(t, b, i)])
                        for i in range(len(t.sources))
                    ]
                else:
                    futures = [self._pool.submit(self._read_group, group, i) for i in range(len(group[0][0].sources))]
                pending.append((group, futures))
                for t, b in group:
                    if t.aux:
                        self._aux_pending[(t.index, b)] = self._pool.submit(self.read_aux, t, b)
            if not pending:
                return
            group, futures = pending.popleft()
            per_source = [f.result() for f in futures]
            for k, (t, b) in enumerate(group):
                yield t, b, [per_source[i][k] for i in range(len(per_source))]


def _storage_ptr(x: torch.Tensor) -> int:
    return int(x.untyped_storage().data_ptr())


class PadFold:
    """The padding row of one source of a padded vocabulary tensor (`tokenizer.pad_to_multiple_of`):
    mergekit's `torch.mean` of the source's permuted rows, bit for bit (engine/colmean.py), summed
    from the blocks as they are read, so no byte is read twice.

    The sum must see the rows in order, and the blocks are read on several threads: a block
    waits until the rows before it are in. Blocks this process will not read through the
    stream (a resumed merge's finished blocks) are read here when their turn comes: the one
    place a block reads rows beyond its own. The plan gives one rank every block of such a
    tensor (Plan.assign), so a merge reads each row once on any world size."""

    def __init__(
        self,
        n_vocab: int,
        t: TensorPlan,
        dtype: torch.dtype,
        streamed: set[int],
        rows: Callable[[int, int], torch.Tensor],
        closing: Callable[[], bool],
    ):
        self.n_vocab = n_vocab
        self.t = t
        self.streamed = streamed
        self.rows = rows
        self.closing = closing
        self.sum = ColumnMean(n_vocab, t.shape[1:], dtype)
        self.next = 0  # rows folded in so far
        self.cond = threading.Condition()
        self.failed: BaseException | None = None
        self.row: torch.Tensor | None = None

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self.cond:
            self.failed = self.failed or exc
            self.cond.notify_all()

    def fold(self, r0: int, rows: torch.Tensor) -> None:
        """Rows [r0, r0 + len(rows)) of the permuted source, when their turn comes."""
        with self.cond:
            self._wait_for(r0)
            if self.next == r0:  # else already in (read again by a pass that does not keep blocks)
                self._feed(rows)

    def mean(self) -> torch.Tensor:
        with self.cond:
            self._wait_for(self.n_vocab)  # releases the lock while it waits: test row after it
            if self.row is None:
                self.row = self.sum.mean()
                self.sum = ColumnMean(0, (0,), self.row.dtype)  # the state is no longer needed
            return self.row

    def _feed(self, rows: torch.Tensor) -> None:
        try:
            self.sum.feed(rows)
        except BaseException as exc:
            self.failed = self.failed or exc
            self.cond.notify_all()
            raise
        self.next += rows.shape[0]
        self.cond.notify_all()

    def _wait_for(self, r: int) -> None:
        """Until rows [0, r) are in (the lock held): the blocks before read them, or this thread."""
        while self.next < r:
            if self.failed is not None:
                raise SourceError(f"{self.t.name}: the padding row's sum stopped ({self.failed})")
            if self.closing():
                raise SourceError(f"{self.t.name}: the merge stopped before the padding row was summed")
            b0 = self.next // self.t.block_rows * self.t.block_rows
            if b0 == self.next and b0 in self.streamed:
                self.cond.wait(0.05)  # its block is being read; it folds itself in
                continue
            # not a block this process streams (or a part of one already folded): read it here
            end = min(self.n_vocab, b0 + self.t.block_rows, r)
            self._feed(self.rows(self.next, end))
