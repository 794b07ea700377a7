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
from bigmerge.engine.spill import SPILL_DIR_ENV, Spill, spill_dir
from bigmerge.engine.writer import BlockWriter
from bigmerge.log import warn
from bigmerge.ops import get_op
from bigmerge.ops.base import Block, Scratch
from bigmerge.planning.plan import SPILL_POLICIES, Plan, TensorPlan, spills
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
    spill: str = "auto",
) -> ExecStats:
    """Merge this rank's unfinished blocks of every tensor into `store`, in plan order.

    A tensor whose blocks exceed cache_bytes between statistics passes is spilled to local
    scratch or read from its sources again as planning.plan.spills decides for `spill`."""
    if spill not in SPILL_POLICIES:
        raise ValueError(f"spill must be one of {', '.join(SPILL_POLICIES)}, not {spill!r}")
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
    # Tensors whose operator checks its inputs for NaN/Inf in its own kernels: the reader does
    # not scan them, and a block the operator did not mark checked is scanned before it is written.
    trusted = set() if reader.allow_nonfinite else {t.index for t, _, _ in work if op.checks_finite(plan.task(t))}
    reader.trust(trusted)
    # operator work buffers live where the arithmetic runs
    sink = BlockSink(store, reader, Scratch(device or "cpu"), stats, rank, trusted)
    spill_file = _LazySpill(spill_dir, reader)

    def report(inputs: list[torch.Tensor]) -> None:
        if on_block:
            on_block(sum(x.numel() * x.element_size() for x in inputs))

    try:
        for t, first, rounds in work:
            task = plan.task(t)
            todo = [b for b in range(t.n_blocks) if t.owners[b] == rank and (t.index, b) not in done]
            sink.start_tensor()
            if not rounds:  # one pass: read, apply, write
                for b in first:
                    _, _, inputs = next(stream)
                    blk = sink.block(t, b, inputs, out=True)
                    out = op.apply(task, blk, None)
                    sink.note(blk)
                    sink.write(t, b, out, inputs)
                    report(inputs)
                    reader.release(inputs)
                continue
            # Statistics first (rounds of op.stats over this rank's blocks, each reduced over every
            # rank), then apply. The blocks are kept between passes (TensorInputs).
            keep = len(first) * (t.in_bytes() // max(1, t.n_blocks)) <= cache_bytes
            spilled = not keep and bool(first) and spills(spill, t, reader.is_far)
            held = TensorInputs(t, reader, keep, spill_file.get() if spilled else None)
            prev: Any = None
            local: dict[str, Any] = {"blocks": len(first)}  # the operator's state for this tensor on this rank
            for rnd in range(rounds):
                partial: dict[int, dict[str, Any]] = {}
                reads = first if rnd == 0 else [b for b in first if op.reads(rnd, task, b, prev, local)]
                if rnd > 0:
                    held.expect(reads)
                reading = set(reads)
                for b in first:
                    if rnd == 0:
                        _, _, inputs = next(stream)
                        held.keep(b, inputs)
                        report(inputs)
                    elif b in reading:
                        inputs = held.get(b)
                    else:  # the operator kept what this round needs of the block: no inputs
                        partial[b] = op.stats(rnd, task, _block_without_inputs(t, b, sink.scratch, local), prev)
                        continue
                    blk = sink.block(t, b, inputs, out=False, local=local)
                    partial[b] = op.stats(rnd, task, blk, prev)
                    sink.note(blk)
                    if rnd == 0:
                        held.spill(b, inputs)  # after stats: the read-ahead of the stream overlaps it
                    held.done(b, inputs)
                reduced = reduce_stats(comm, partial, t.n_blocks)
                prev = op.finish(rnd, task, reduced, prev)
            held.expect(todo)
            for b in todo:
                inputs = held.get(b)
                blk = sink.block(t, b, inputs, out=True)
                out = op.apply(task, blk, prev)
                sink.note(blk)
                sink.write(t, b, out, inputs)
                held.done(b, inputs)
            held.close()
        sink.flush()
    finally:
        sink.close()
        spill_file.close()
    stats.bytes_read = reader.bytes_read
    stats.bytes_spilled = spill_file.bytes_written
    return stats


class BlockSink:
    """Where merged blocks go: checked for NaN/Inf when their operator did not, converted to the
    stored dtype into a ring of page-aligned buffers (so the operator's scratch is free at once),
    and written by WRITERS threads; a failed write re-raises at the next one. Counts what it
    writes, and stops the rank where a fault is injected."""

    def __init__(
        self, store: BlockWriter, reader: BlockReader, scratch: Scratch, stats: ExecStats, rank: int, trusted: set[int]
    ) -> None:
        self.store = store
        self.reader = reader
        self.scratch = scratch
        self.stats = stats
        self.rank = rank
        self.trusted = trusted
        self.checked: set[int] = set()  # blocks of the current tensor its operator checked
        self.fault = _fault(rank)
        # output buffers, page-aligned for direct I/O; at most WRITERS + 1 in flight
        self.ring = [Scratch(align=PAGE) for _ in range(WRITERS + 2)]
        self.n_written = 0
        self.writes: deque[Future[None]] = deque()
        self.pool = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="bigmerge-write")

    def start_tensor(self) -> None:
        self.checked.clear()

    def block(
        self, t: TensorPlan, b: int, inputs: list[torch.Tensor], *, out: bool, local: dict[str, Any] | None = None
    ) -> Block:
        """The operator's view of block b; with out, the ring buffer it may compute into (Block.dest)."""
        blk = _block(t, b, inputs, self.scratch, self.reader)
        if local is not None:
            blk.local = local
        blk.scan = lambda: self.reader.scan(t, b, inputs)
        if out:
            blk.dest = self._dest(t, inputs)
        return blk

    def _dest(self, t: TensorPlan, inputs: list[torch.Tensor]) -> torch.Tensor | None:
        """The ring buffer the next write() converts into."""
        if self.scratch.device.type != "cpu" or not inputs or t.vocab is not None:
            return None
        return self.ring[self.n_written % len(self.ring)].get("out", inputs[0].shape, DTYPES[t.out_dtype][0])

    def note(self, blk: Block) -> None:
        if blk.finite:
            self.checked.add(blk.index)

    def write(self, t: TensorPlan, b: int, out: torch.Tensor, inputs: list[torch.Tensor]) -> None:
        if t.index in self.trusted and b not in self.checked:
            self.reader.scan(t, b, inputs)  # the operator did not check this block: nothing bad is written
        # Convert to the stored dtype here, into a buffer the writer owns until it is done
        # (an operator that computed into this buffer, Block.dest, has already put it there).
        dtype = DTYPES[t.out_dtype][0]
        dst = self.ring[self.n_written % len(self.ring)].get("out", out.shape, dtype)
        if not (out.dtype == dtype and out.data_ptr() == dst.data_ptr() and out.shape == dst.shape):
            dst.copy_(out)
        self.n_written += 1
        self.writes.append(self.pool.submit(self.store.write_block, t, b, dst))
        while len(self.writes) > WRITERS:
            self.writes.popleft().result()  # re-raises a failed write here
        self.stats.blocks_done += 1
        if self.fault is not None and self.stats.blocks_done >= self.fault[0]:
            self.flush()
            fail_now(self.rank, self.fault[1], f"after {self.stats.blocks_done} blocks")
        self.stats.bytes_written += t.out_bytes() // max(1, t.n_blocks)

    def flush(self) -> None:
        """Wait for every write in flight (re-raising the first that failed)."""
        while self.writes:
            self.writes.popleft().result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class TensorInputs:
    """A statistics tensor's blocks between its passes: kept in memory when they fit the cache,
    else spilled to local scratch as the first pass reads them and read back from there (every
    source byte is read once; spill.py), else (local sources, or a failed spill write) read
    again, one block ahead of the caller as the spill is read back."""

    def __init__(self, t: TensorPlan, reader: BlockReader, keep: bool, spill: Spill | None) -> None:
        self.t = t
        self.reader = reader
        self.cache: dict[int, list[torch.Tensor]] | None = {} if keep else None
        self.spilled = spill
        self._next: dict[int, int] = {}  # the block the pass reads from the sources after each
        self._ahead: tuple[int, list[Future[torch.Tensor]]] | None = None
        if spill is not None:
            spill.reset()

    def keep(self, b: int, inputs: list[torch.Tensor]) -> None:
        """The first pass read block b: keep it in memory if the tensor fits."""
        if self.cache is not None:
            self.cache[b] = inputs

    def spill(self, b: int, inputs: list[torch.Tensor]) -> None:
        if self.spilled is not None:
            self.spilled.put(b, inputs)

    def expect(self, blocks: list[int]) -> None:
        """The blocks the next pass reads, in order (each is read, or read back from the
        spill, while the caller works on the one before)."""
        self._drop_ahead()
        order = [b for b in blocks if self._from_sources(b)]
        self._next = dict(zip(order, order[1:]))
        if self.spilled is not None:
            self.spilled.expect(blocks)

    def _from_sources(self, b: int) -> bool:
        return not (self.cache is not None and b in self.cache) and not (
            self.spilled is not None and self.spilled.has(b)
        )

    def get(self, b: int) -> list[torch.Tensor]:
        if self.cache is not None and b in self.cache:
            return self.cache[b]
        if self.spilled is not None and self.spilled.has(b):
            return self.spilled.get(b)
        if self._ahead is not None and self._ahead[0] == b:
            futures = self._ahead[1]
            self._ahead = None
        else:
            self._drop_ahead()  # asked out of order
            futures = self.reader.read_ahead(self.t, b)
        nxt = self._next.get(b)
        if nxt is not None:
            self._ahead = (nxt, self.reader.read_ahead(self.t, nxt))
        return [f.result() for f in futures]

    def _drop_ahead(self) -> None:
        """Wait for a read-ahead nobody will ask for, and give its buffers back (a read that
        failed is not reported: the block is read again where it is needed)."""
        if self._ahead is None:
            return
        futures = self._ahead[1]
        self._ahead = None
        got = []
        for f in futures:
            try:
                got.append(f.result())
            except Exception:  # noqa: BLE001, S112 - nobody asked for this block
                continue
        self.reader.release(got)

    def done(self, b: int, inputs: list[torch.Tensor]) -> None:
        if self.cache is None or b not in self.cache:
            self.reader.release(inputs)  # read from the sources or the spill: the pool's buffers

    def close(self) -> None:
        self._drop_ahead()
        for inputs in (self.cache or {}).values():
            self.reader.release(inputs)
        if self.cache is not None:
            self.cache.clear()
        if self.spilled is not None:
            self.spilled.reset()


class _LazySpill:
    """The executor's one Spill, made when a tensor first needs it (most merges never do)."""

    def __init__(self, directory: str | None, reader: BlockReader) -> None:
        self.directory = directory
        self.reader = reader  # the spill reads back into the reader's pooled buffers
        self.spill: Spill | None = None
        self.unusable = False  # its file could not be made: tensors are read again, as without it
        self.bytes_written = 0  # by every spill, for ExecStats

    def get(self) -> Spill | None:
        if self.spill is None and not self.unusable:
            try:
                self.spill = Spill(self.directory, self.reader.buffer, self.reader.release)
            except OSError as exc:  # a missing or read-only directory: the merge goes on without it
                self.unusable = True
                warn(
                    f"cannot spill to {self.directory or spill_dir()} ({exc.strerror or exc}): tensors over "
                    f"--cache-size are read from their sources again (set {SPILL_DIR_ENV} to a writable local directory)"
                )
        return self.spill

    def close(self) -> None:
        if self.spill is not None:
            self.bytes_written = self.spill.bytes_written
            self.spill.close()
            self.spill = None


def _block_without_inputs(t: TensorPlan, b: int, scratch: Scratch, local: dict[str, Any]) -> Block:
    """Block b in a statistics round that needs none of its inputs (MergeOp.reads)."""
    r0, r1 = t.block_range(b)
    return Block(b, r0, r1, [], scratch, local=local, reduce=functools.partial(reduce_one_block, b))


def _block(t: TensorPlan, b: int, inputs: list[torch.Tensor], scratch: Scratch, reader: BlockReader) -> Block:
    r0, r1 = t.block_range(b)
    aux = reader.take_aux(t, b)  # stays on the host: an operator moves what it needs (and may memoise it)
    if scratch.device.type != "cpu":  # a GPU rank: the block's inputs go to its device
        inputs = [x.to(scratch.device, non_blocking=True) for x in inputs]
    return Block(b, r0, r1, inputs, scratch, aux=aux, reduce=functools.partial(reduce_one_block, b))
