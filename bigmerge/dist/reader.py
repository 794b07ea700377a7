"""Ranged reads of blocks from every source, prefetched on background threads.

A block of rows [r0, r1) of a row-major tensor is one contiguous byte range per source,
read straight into a buffer that becomes the torch tensor (no extra copy locally).
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Iterator, Optional

import torch

from bigmerge.plan import Plan, TensorPlan
from bigmerge.storage.fs import Location, location
from bigmerge.storage.safetensors import DTYPES


class BlockReader:
    def __init__(self, plan: Plan, storage_options: Optional[dict[str, Any]] = None, threads: int = 4, prefetch: int = 2):
        self.plan = plan
        self.storage_options = storage_options or {}
        self.prefetch = max(0, prefetch)
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="bigmerge-read")
        self._locs: dict[str, Location] = {}
        self.bytes_read = 0
        # Recycled read buffers: fresh large allocations cost page faults on every block.
        self._free: list[torch.Tensor] = []
        self._free_lock = threading.Lock()
        self._max_free = 4 * max(1, len(plan.models)) * (self.prefetch + 2)

    def _buffer(self, n: int) -> torch.Tensor:
        with self._free_lock:
            best = None
            for i, buf in enumerate(self._free):
                if buf.numel() >= n and (best is None or buf.numel() < self._free[best].numel()):
                    best = i
            if best is not None:
                return self._free.pop(best)[:n]
        return torch.empty(n, dtype=torch.uint8)

    def release(self, inputs: list[torch.Tensor]) -> None:
        """Give a block's input buffers back for reuse; the caller must not touch them again."""
        with self._free_lock:
            for x in inputs:
                base = x._base if x._base is not None else x
                if base.dtype == torch.uint8 and len(self._free) < self._max_free:
                    self._free.append(base)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _loc(self, url: str) -> Location:
        loc = self._locs.get(url)
        if loc is None:
            loc = self._locs[url] = location(url, self.storage_options)
        return loc

    def _read_one(self, t: TensorPlan, b: int, i: int) -> torch.Tensor:
        src = t.sources[i]
        r0, r1 = t.block_range(b)
        itemsize = DTYPES[src.dtype][1]
        row_bytes = t.row_elems * itemsize
        n = (r1 - r0) * row_bytes
        buf = self._buffer(n)
        if n:
            self._loc(src.file).read_into(src.start + r0 * row_bytes, memoryview(buf.numpy()).cast("B"))
        x = buf.view(DTYPES[src.dtype][0])
        self.bytes_read += n
        return x.reshape((r1 - r0, *t.shape[1:]) if t.shape else (1,))

    def _submit(self, t: TensorPlan, b: int) -> list[Future[torch.Tensor]]:
        return [self._pool.submit(self._read_one, t, b, i) for i in range(len(t.sources))]

    def read(self, t: TensorPlan, b: int) -> list[torch.Tensor]:
        return [f.result() for f in self._submit(t, b)]

    def stream(self, items: Iterable[tuple[TensorPlan, int]]) -> Iterator[tuple[TensorPlan, int, list[torch.Tensor]]]:
        """Yield (tensor, block, inputs) in order, keeping `prefetch` blocks in flight ahead."""
        pending: deque[tuple[TensorPlan, int, list[Future[torch.Tensor]]]] = deque()
        it = iter(items)
        exhausted = False
        while True:
            while not exhausted and len(pending) <= self.prefetch:
                nxt = next(it, None)
                if nxt is None:
                    exhausted = True
                    break
                pending.append((nxt[0], nxt[1], self._submit(nxt[0], nxt[1])))
            if not pending:
                return
            t, b, futures = pending.popleft()
            yield t, b, [f.result() for f in futures]
