"""The executor loop, run by every rank over its own blocks.

For each tensor: if the operator needs whole-tensor statistics, every rank computes them
over its blocks and they are reduced exactly across ranks (one collective per round);
then each rank applies the operator to its unfinished blocks and writes them. Ranks that
own no block of a tensor still join its reductions, in the same tensor order.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from bigmerge.engine.comm import Comm, reduce_one_block, reduce_stats
from bigmerge.engine.faults import FAULT_ENV, fail_now, fault_spec  # noqa: F401 - FAULT_ENV re-exported
from bigmerge.engine.reader import BlockReader
from bigmerge.engine.spill import Spill
from bigmerge.engine.writer import BlockWriter
from bigmerge.ops import get_op
from bigmerge.ops.base import Block, Scratch
from bigmerge.planning.plan import Plan, TensorPlan
from bigmerge.storage.safetensors import DTYPES, PAGE

DEFAULT_CACHE_BYTES = 512 * 1024 * 1024
WRITERS = 3  # concurrent block writes: hides object-store latency, bounded memory


def _fault(rank: int) -> tuple[int, str] | None:
    """(blocks, kind) when a fault is injected after this rank has written that many blocks."""
    spec = fault_spec(rank)
    return (int(spec[0]), spec[1]) if spec is not None and spec[0].isdigit() else None


@dataclass
class ExecStats:
    blocks_done: int = 0
    blocks_skipped: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    bytes_spilled: int = 0  # input bytes written to local scratch (tensors too large for the cache)


def execute(
    plan: Plan,
    comm: Comm,
    store: BlockWriter,
    reader: BlockReader,
    done: set[tuple[int, int]],
    *,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    on_block: Callable[[int], None] | None = None,
    device: torch.device | None = None,
    spill_dir: str | None = None,
) -> ExecStats:
    op = get_op(plan.merge_method)
    rank = comm.rank
    stats = ExecStats()
    work: list[tuple[TensorPlan, list[int], int]] = []  # tensor, blocks read first, rounds
    for t in plan.tensors:
        if all((t.index, b) in done for b in range(t.n_blocks)):
            stats.blocks_skipped += sum(1 for o in t.owners if o == rank)
            continue
        rounds = op.rounds(plan.task(t))
        mine = [b for b in range(t.n_blocks) if t.owners[b] == rank]
        first = mine if rounds else [b for b in mine if (t.index, b) not in done]
        stats.blocks_skipped += len(mine) - len([b for b in mine if (t.index, b) not in done])
        work.append((t, first, rounds))

    stream = reader.stream((t, b) for t, first, _ in work for b in first)
    writes: deque[Future[None]] = deque()
    writer = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="bigmerge-write")

    fault = _fault(rank)
    scratch = Scratch(device or "cpu")  # operator work buffers live where the arithmetic runs
    # output buffers, page-aligned for direct I/O; at most WRITERS + 1 in flight
    ring = [Scratch(align=PAGE) for _ in range(WRITERS + 2)]
    n_written = 0
    # Tensors whose operator checks its inputs for NaN/Inf in its own kernels: the reader does
    # not scan them, and a block the operator did not mark checked is scanned before it is written.
    trusted = set() if reader.allow_nonfinite else {t.index for t, _, _ in work if op.checks_finite(plan.task(t))}
    reader.trust(trusted)
    checked: set[int] = set()  # blocks of the current tensor its operator checked
    spills = _LazySpill(spill_dir, reader)

    def dest(t: TensorPlan, inputs: list[torch.Tensor]) -> torch.Tensor | None:
        """The ring buffer the next write() converts into, offered to the operator (Block.dest)."""
        if scratch.device.type != "cpu" or not inputs or t.vocab is not None:
            return None
        return ring[n_written % len(ring)].get("out", inputs[0].shape, DTYPES[t.out_dtype][0])

    def block(t: TensorPlan, b: int, inputs: list[torch.Tensor], out: bool) -> Block:
        blk = _block(t, b, inputs, scratch, reader)
        blk.scan = lambda: reader.scan(t, b, inputs)
        if out:
            blk.dest = dest(t, inputs)
        return blk

    def note(blk: Block) -> None:
        if blk.finite:
            checked.add(blk.index)

    def write(t: TensorPlan, b: int, out: torch.Tensor, inputs: list[torch.Tensor]) -> None:
        nonlocal n_written
        if t.index in trusted and b not in checked:
            reader.scan(t, b, inputs)  # the operator did not check this block: nothing bad is written
        # Convert to the stored dtype here, into a buffer the writer owns until it is done,
        # so the operator's scratch can be reused for the next block at once (an operator
        # that computed into this buffer, Block.dest, has already put it there).
        dtype = DTYPES[t.out_dtype][0]
        dst = ring[n_written % len(ring)].get("out", out.shape, dtype)
        if not (out.dtype == dtype and out.data_ptr() == dst.data_ptr() and out.shape == dst.shape):
            dst.copy_(out)
        n_written += 1
        writes.append(writer.submit(store.write_block, t, b, dst))
        while len(writes) > WRITERS:
            writes.popleft().result()  # re-raises a failed write here
        stats.blocks_done += 1
        if fault is not None and stats.blocks_done >= fault[0]:
            while writes:
                writes.popleft().result()
            fail_now(rank, fault[1], f"after {stats.blocks_done} blocks")
        stats.bytes_written += t.out_bytes() // max(1, t.n_blocks)

    try:
        for t, first, rounds in work:
            task = plan.task(t)
            todo = [b for b in range(t.n_blocks) if t.owners[b] == rank and (t.index, b) not in done]
            checked.clear()
            if not rounds:
                for b in first:
                    _, _, inputs = next(stream)
                    blk = block(t, b, inputs, True)
                    out = op.apply(task, blk, None)
                    note(blk)
                    write(t, b, out, inputs)
                    if on_block:
                        on_block(sum(x.numel() * x.element_size() for x in inputs))
                    reader.release(inputs)
                continue
            local_bytes = len(first) * (t.in_bytes() // max(1, t.n_blocks))
            cache: dict[int, list[torch.Tensor]] = {}
            keep = local_bytes <= cache_bytes
            # Blocks too many to keep in memory are spilled to local scratch as the first pass
            # reads them, and read back from there: every source byte is read once (spill.py).
            spill = None if keep or not first else spills.get()
            if spill is not None:
                spill.reset()

            # t, cache and spill bound now, not looked up when called: each closure belongs to this tensor
            def inputs_of(
                b: int, t: TensorPlan = t, cache: dict[int, list[torch.Tensor]] = cache, spill: Spill | None = spill
            ) -> list[torch.Tensor]:
                if b in cache:
                    return cache[b]
                if spill is not None and spill.has(b):
                    return spill.get(b)
                return reader.read(t, b)

            def done_with(b: int, inputs: list[torch.Tensor], cache: dict[int, list[torch.Tensor]] = cache) -> None:
                if b not in cache:
                    reader.release(inputs)  # read from the sources or the spill: the pool's buffers

            prev: Any = None
            for rnd in range(rounds):
                partial: dict[int, dict[str, Any]] = {}
                if spill is not None and rnd > 0:
                    spill.expect(first)
                for b in first:
                    if rnd == 0:
                        _, _, inputs = next(stream)
                        if keep:
                            cache[b] = inputs
                        if on_block:
                            on_block(sum(x.numel() * x.element_size() for x in inputs))
                    else:
                        inputs = inputs_of(b)
                    blk = block(t, b, inputs, False)
                    partial[b] = op.stats(rnd, task, blk, prev)
                    note(blk)
                    if rnd == 0 and spill is not None:
                        spill.put(b, inputs)  # after stats: the read-ahead of the stream overlaps it
                    done_with(b, inputs)
                reduced = reduce_stats(comm, partial, t.n_blocks)
                prev = op.finish(rnd, task, reduced, prev)
            if spill is not None:
                spill.expect(todo)
            for b in todo:
                inputs = inputs_of(b)
                blk = block(t, b, inputs, True)
                out = op.apply(task, blk, prev)
                note(blk)
                write(t, b, out, inputs)
                done_with(b, inputs)
            for inputs in cache.values():
                reader.release(inputs)
            cache.clear()
            if spill is not None:
                spill.reset()
        while writes:
            writes.popleft().result()
    finally:
        writer.shutdown(wait=True, cancel_futures=True)
        spills.close()
    stats.bytes_read = reader.bytes_read
    stats.bytes_spilled = spills.bytes_written
    return stats


class _LazySpill:
    """The executor's one Spill, made when a tensor first needs it (most merges never do)."""

    def __init__(self, directory: str | None, reader: BlockReader) -> None:
        self.directory = directory
        self.reader = reader  # the spill reads back into the reader's pooled buffers
        self.spill: Spill | None = None
        self.bytes_written = 0  # by every spill, for ExecStats

    def get(self) -> Spill:
        if self.spill is None:
            self.spill = Spill(self.directory, self.reader.buffer, self.reader.release)
        return self.spill

    def close(self) -> None:
        if self.spill is not None:
            self.bytes_written = self.spill.bytes_written
            self.spill.close()
            self.spill = None


def _block(t: TensorPlan, b: int, inputs: list[torch.Tensor], scratch: Scratch, reader: BlockReader) -> Block:
    r0, r1 = t.block_range(b)
    aux = reader.take_aux(t, b)  # stays on the host: an operator moves what it needs (and may memoise it)
    if scratch.device.type != "cpu":  # a GPU rank: the block's inputs go to its device
        inputs = [x.to(scratch.device, non_blocking=True) for x in inputs]
    return Block(b, r0, r1, inputs, scratch, aux=aux, reduce=functools.partial(reduce_one_block, b))
