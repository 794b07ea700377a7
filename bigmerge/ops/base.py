"""What a merge operator is: declared parameters, optional whole-tensor statistics, and apply.

The executor calls, for every tensor:

    for r in range(op.rounds(tensor)):          # 0 rounds: no statistics, no reduction
        partial = op.stats(r, tensor, block, prev) for each local block
                  (without its inputs where r > 0 and not op.reads(r, tensor, block, prev, local))
        prev = op.finish(r, tensor, reduced)    # reduced exactly across blocks and ranks
    out = op.apply(tensor, block, prev)         # per block

Statistics are dicts of numpy arrays. Integer arrays are summed (exact in any order);
float arrays are kept per block and summed in block order, so the result does not depend
on how blocks are spread over ranks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from bigmerge.errors import ConfigError

Scope = Literal["shared", "input", "non_base"]
BasePolicy = Literal["required", "optional", "ignored"]
Stats = dict[str, np.ndarray]


@dataclass(frozen=True)
class Param:
    """One parameter an operator reads: its name, type, scope and default (None = required)."""

    name: str
    type: type
    scope: Scope
    default: Any = None
    required: bool = False
    doc: str = ""


@dataclass
class TensorTask:
    """What an operator knows about the tensor it merges (a view of the plan's TensorPlan)."""

    name: str
    shape: tuple[int, ...]
    numel: int
    n_blocks: int
    base_index: int | None
    shared: dict[str, Any]
    per_model: list[dict[str, Any]]
    compute_dtype: torch.dtype
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    out_dtype: torch.dtype | None = None  # what the writer stores; an operator may return it directly
    source_dtypes: tuple[torch.dtype, ...] = ()  # the dtypes of the block inputs, in model order

    @property
    def non_base(self) -> list[int]:
        return [i for i in range(len(self.per_model)) if i != self.base_index]


class Scratch:
    """Reusable work buffers, by name: a fresh 64 MiB tensor per block costs page faults
    that take longer than the arithmetic, so operators borrow these instead."""

    def __init__(self, device: torch.device | str = "cpu", align: int = 1) -> None:
        self.device = torch.device(device)
        self.align = align  # byte alignment of every buffer's start (direct I/O wants pages)
        self._flat: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        flat = self._flat.get((name, dtype))
        if flat is None or flat.numel() < n:
            size = torch.empty(0, dtype=dtype).element_size()
            extra = -(-self.align // size) if self.align > 1 else 0
            flat = torch.empty(max(n, 1) + extra, dtype=dtype, device=self.device)
            skip = (-flat.data_ptr() % self.align) // size if self.align > 1 else 0
            flat = flat[skip : skip + max(n, 1)]
            self._flat[(name, dtype)] = flat
        return flat[:n].view(tuple(shape))

    def clear(self) -> None:
        self._flat.clear()


@dataclass
class Block:
    """One row range of one tensor, with the inputs from every source in model order."""

    index: int
    row0: int
    row1: int
    inputs: list[torch.Tensor]  # storage dtype, shape (rows, *shape[1:])
    scratch: Scratch = field(default_factory=Scratch)
    # derived views an operator may keep while it works on this same block object
    memo: dict[str, Any] = field(default_factory=dict)
    # auxiliary inputs per source (see MergeOp.aux_inputs), on the host: aux[i][key]; the
    # rows of this block when the aux tensor has the tensor's shape, else the whole aux tensor
    aux: list[dict[str, torch.Tensor]] = field(default_factory=list)
    # where the stored result may go: a buffer of the output dtype and the inputs' shape that
    # the writer owns next; an operator that computes into it spares the executor a copy
    dest: torch.Tensor | None = None
    # set by an operator whose kernel saw every input value of this block finite (a NaN or
    # Inf shows in its sums or its output); the executor scans the blocks nobody checked
    finite: bool = False
    # scan the inputs for NaN/Inf and raise the reader's error naming the first one (when
    # NaN/Inf are not allowed): what an operator calls when its kernel saw a non-finite value
    scan: Callable[[], None] | None = None
    # the exact reduction of this block's statistics when it is its tensor's only block (the
    # engine's reduce_stats over one block), given by the executor: operators reduce with the
    # function they are given and never import the engine
    reduce: Callable[[Stats], Stats] | None = None
    # this rank's state for the block's tensor, kept across its statistics rounds (the same dict
    # for every block of the tensor on this rank; "blocks": how many of them this rank holds):
    # where an operator keeps what a later round needs, so that round need not read (MergeOp.reads)
    local: dict[str, Any] = field(default_factory=dict)

    def checked(self, bad: int) -> None:
        """Record an operator's kernel's count of non-finite values it met. None: the block is
        checked. Some: raise the error naming the source value (the reader's scan), unless the
        sources are finite (an overflow of finite values) or NaN/Inf are allowed."""
        if bad and self.scan is not None:
            self.scan()
        self.finite = True

    def reduce_alone(self, stats: Stats) -> Stats:
        """This block's statistics reduced as its whole tensor's (a one-block tensor)."""
        if self.reduce is None:
            raise RuntimeError("Block.reduce is not set: the executor gives it to every block")
        return self.reduce(stats)

    def output(self, name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """Where an operator puts its result: the writer's buffer (dest) when it has this shape
        and dtype, else the scratch buffer `name`."""
        if self.dest is not None and self.dest.dtype == dtype and self.dest.shape == shape:
            return self.dest
        return self.scratch.get(name, shape, dtype)


@dataclass(frozen=True)
class AuxInput:
    """An extra tensor an operator reads beside one source: `tensor` in the safetensors `file`.

    `rows`: read row-blocked with the block (its shape must be the merged tensor's: a Fisher
    value per weight); else read whole (a Gram matrix, even a square layer's, whose shape is
    the weight's own). `optional`: when it is absent from every source's file the key is simply
    missing from `block.aux[i]`; present in some files but not others is an error.
    """

    file: str  # local path or fsspec URL of a safetensors file
    tensor: str
    shape: tuple[int, ...]
    optional: bool = False
    rows: bool = False


class MergeOp:
    """Base of every operator. Subclasses declare `name`, `params`, `base`, and `apply`.

    The class docstring's first line is the one-line summary `bigmerge methods` prints.
    """

    name: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    base: ClassVar[BasePolicy] = "ignored"
    min_models: ClassVar[int] = 1
    random: ClassVar[bool] = False
    # Peak working memory of apply, in compute-dtype copies of one source block per source.
    workspace_per_source: ClassVar[float] = 1.0
    # mergekit's arithmetic promotes a 16-bit compute dtype's result to float32 (a float32
    # factor in it), and mergekit then writes float32 unless out_dtype is set: so does bigmerge.
    float32_result: ClassVar[bool] = False

    def aux_inputs(self, task: TensorTask, sources: list[tuple[str, str]]) -> list[dict[str, AuxInput]]:
        """Extra tensors to read per source, by key; `sources[i]` is (model ref, tensor name in it).

        Resolved and checked at plan time (files, names, shapes); [] = none (the default).
        """
        return []

    def check(self, task: TensorTask) -> None:
        """Reject bad resolved parameters for one tensor; the message names the key."""

    def rounds(self, task: TensorTask) -> int:
        return 0

    def checks_finite(self, task: TensorTask) -> bool:
        """True when this operator's kernels usually see every input value of a block in a sum
        or an output whose finiteness they report (Block.checked): the reader then skips its
        NaN/Inf scan of this tensor, and the executor scans whichever block was not checked."""
        return False

    def reads(self, rnd: int, task: TensorTask, block_index: int, prev: Any, local: dict[str, Any]) -> bool:
        """Whether statistics round rnd (> 0) needs block block_index's inputs. False: stats gets
        the block without inputs (Block.inputs empty) and computes from what earlier rounds kept
        in Block.local, so the sources are not read again for this round."""
        return True

    def later_reads(self, task: TensorTask) -> int:
        """How many passes after the first statistics round read a block's inputs (the later
        rounds that read, then apply), as planned: what a tensor too large to keep in memory
        costs in reads again or reads back from its spill (planning/estimate.py)."""
        return self.rounds(task)

    def stats(self, rnd: int, task: TensorTask, block: Block, prev: Any) -> Stats:
        raise NotImplementedError

    def finish(self, rnd: int, task: TensorTask, reduced: Stats, prev: Any) -> Any:
        return reduced

    def apply(self, task: TensorTask, block: Block, stats: Any) -> torch.Tensor:
        raise NotImplementedError


def block_generator(task: TensorTask, block_index: int, stream: str = "") -> torch.Generator:
    """A CPU generator seeded by (seed, tensor name, block index[, stream]) and nothing else,
    so random operators draw the same numbers whatever the world size or the block order."""
    key = f"{task.seed}\0{task.name}\0{block_index}\0{stream}".encode()
    seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


def require_base(op: MergeOp, task: TensorTask) -> int:
    if task.base_index is None:
        raise ConfigError(f"merge_method {op.name!r} needs a base_model")
    return task.base_index


def as_compute(
    x: torch.Tensor, compute: torch.dtype, scratch: Scratch | None = None, name: str = "cast"
) -> torch.Tensor:
    """`x` in the compute dtype, cast into a reused scratch buffer when one is given.

    `copy_` rounds exactly as `.to()` does; a dense cast followed by a same-dtype kernel
    is also about 2.5x faster here than torch's mixed-dtype kernels.
    """
    if x.dtype == compute:
        return x
    if scratch is None:
        return x.to(compute)
    return scratch.get(name, x.shape, compute).copy_(x)


def task_vectors(op: MergeOp, task: TensorTask, block: Block, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, [fine-tune - base for each non-base model]) of the block, flat, in the compute dtype,
    in scratch buffers named after `name`."""
    dt = task.compute_dtype
    sc = block.scratch
    base = as_compute(block.inputs[require_base(op, task)], dt, sc, f"{name}_base").reshape(-1)
    tv = sc.get(f"{name}_tv", (len(task.non_base), base.numel()), dt)
    for r, i in enumerate(task.non_base):
        torch.sub(as_compute(block.inputs[i], dt, sc).reshape(-1), base, out=tv[r])
    return base, tv


class StatsOp(MergeOp):
    """An operator with whole-tensor statistics; a one-block tensor computes them in apply,
    with the same stats/finish code (a reduction over one block is that block)."""

    def stat_rounds(self, task: TensorTask) -> int:
        return 0

    def rounds(self, task: TensorTask) -> int:
        return self.stat_rounds(task) if task.n_blocks > 1 else 0

    def stats_or_local(self, task: TensorTask, block: Block, stats: Any) -> Any:
        if stats is not None or task.n_blocks > 1:
            return stats
        prev: Any = None
        for rnd in range(self.stat_rounds(task)):
            reduced = block.reduce_alone(self.stats(rnd, task, block, prev))
            prev = self.finish(rnd, task, reduced, prev)
        return prev
