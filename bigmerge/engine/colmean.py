"""torch.mean(x, dim=0) of a row-major [n, ...] float tensor on the CPU, bit for bit, fed row block by row block.

mergekit pads a vocabulary (`tokenizer.pad_to_multiple_of`) with `torch.mean(rows, dim=0)` of
each source's permuted rows, on the CPU. torch computes that mean as a float32 sum (16-bit
inputs are first widened to float32), divided by n in float32, rounded to the tensor's dtype.
The sum over the rows is not a plain running sum but torch's cascade, whose order depends only
on n and on the column:

- it runs the rows in chunks of L = 2**max(4, ceil_log2(n) // 4) (16 for any n up to 2**19):
  each chunk is summed in row order from zero, the chunk sums into a second accumulator that is
  carried into a third every L chunks, that into a fourth every L**2 chunks; rows after the last
  whole chunk go into the first accumulator, and the four are added first to last ("seq");
- the columns of a trailing group narrower than torch's vector pass (8 float32 lanes) are
  summed instead as four interleaved sequences, rows 4g + k for k = 0..3, each by the cascade
  above over n // 4 elements; the last n % 4 rows are added to the first, then the other three
  in order ("ilp"). For a row of H elements, the first 32 * (H // 32) columns (4 * (H // 4)
  when H < 8) are "seq", the rest "ilp".

This was checked against torch.mean for float32, bfloat16 and float16 inputs, 1 and 2 threads,
and shapes from 3 x 5 to 70000 x 3 (tests/test_colmean.py). Threads: torch splits the columns
at multiples of 32, which leaves every column's order unchanged, except where the last thread's
share is narrower than 8 columns (H % 32 from 4 to 7, with many threads); the serial order is
the one reproduced. The state is a few rows (4 of H for "seq", 16 of the "ilp" columns), so the
mean costs no second read of the tensor and no copy of it: the rows are fed in order as their
blocks are read.
"""

from __future__ import annotations

import math

import torch

VECTOR = 8  # float32 lanes of torch's vectorised sum kernel on the CPU
LEVELS = 4


def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else (x - 1).bit_length()


def seq_columns(width: int) -> int:
    """How many leading columns of a row `width` wide torch sums in plain row order ("seq")."""
    if width >= VECTOR:
        return 4 * VECTOR * (width // (4 * VECTOR))
    return 4 * (width // 4)


class _Cascade:
    """torch's cascade over `size` elements, each a vector (the columns it sums at once)."""

    def __init__(self, size: int, shape: tuple[int, ...]):
        self.size = size
        self.power = max(4, _ceil_log2(size) // LEVELS)
        self.step = 1 << self.power
        self.acc = [torch.zeros(shape, dtype=torch.float32) for _ in range(LEVELS)]
        self.count = 0

    def _carry(self) -> None:
        mask = self.step - 1
        for j in range(1, LEVELS):
            self.acc[j] += self.acc[j - 1]
            self.acc[j - 1].zero_()
            if self.count & (mask << (j * self.power)):
                break

    def add(self, x: torch.Tensor) -> None:
        """The next element."""
        self.acc[0] += x
        self.count += 1
        if self.count % self.step == 0 and self.count <= self.size:
            self._carry()

    def add_many(self, xs: torch.Tensor) -> None:
        """The next len(xs) elements (xs[k] one element): whole chunks summed at once."""
        k = 0
        n = xs.shape[0]
        if self.count % self.step == 0:
            whole = (n // self.step) * self.step
            if whole:
                chunks = xs[:whole].reshape(whole // self.step, self.step, *xs.shape[1:])
                sums = torch.zeros((chunks.shape[0], *xs.shape[1:]), dtype=torch.float32)
                for r in range(self.step):  # each chunk in row order from zero, all chunks at once
                    sums += chunks[:, r]
                for s in sums:
                    self.acc[0].copy_(s)
                    self.count += self.step
                    self._carry()
                k = whole
        for r in range(k, n):
            self.add(xs[r])

    def total(self) -> torch.Tensor:
        out = self.acc[0].clone()
        for j in range(1, LEVELS):
            out += self.acc[j]
        return out


class ColumnMean:
    """torch.mean(x, dim=0) of an [n, *row_shape] tensor of dtype `dtype` on the CPU, from its
    rows fed in order (`feed`), as `mean()` once all n are in. Holds a few rows of float32."""

    def __init__(self, n: int, row_shape: tuple[int, ...] | list[int], dtype: torch.dtype):
        self.n = n
        self.row_shape = tuple(row_shape)
        self.dtype = dtype
        width = math.prod(self.row_shape)
        self.width = width
        self.split = seq_columns(width)
        self.fed = 0
        self._seq = _Cascade(n, (self.split,))
        ilp = width - self.split
        self._groups = n // 4
        self._ilp = _Cascade(self._groups, (4, ilp)) if ilp else None
        self._tail: list[torch.Tensor] = []  # rows past the last whole group of 4, "ilp" columns
        self._group = torch.zeros((4, ilp), dtype=torch.float32)

    def feed(self, rows: torch.Tensor) -> None:
        """The next len(rows) rows (any float dtype; widened to float32 as torch widens them)."""
        m = rows.shape[0]
        if self.fed + m > self.n:
            raise ValueError(f"ColumnMean: {self.fed + m} rows fed, expected {self.n}")
        x = rows.reshape(m, self.width).to(torch.float32)
        if self.split:
            self._seq.add_many(x[:, : self.split])
        if self._ilp is not None:
            self._feed_ilp(x[:, self.split :])
        self.fed += m

    def _feed_ilp(self, x: torch.Tensor) -> None:
        assert self._ilp is not None
        r = 0
        m = x.shape[0]
        while r < m:
            row = self.fed + r
            if row >= 4 * self._groups:
                self._tail.append(x[r].clone())
                r += 1
                continue
            k = row % 4
            if k == 0 and r + 4 <= m:  # whole groups: the cascade takes them as elements
                n = min((m - r) // 4, self._groups - row // 4)
                self._ilp.add_many(x[r : r + 4 * n].reshape(n, 4, -1))
                r += 4 * n
                continue
            self._group[k] = x[r]
            if k == 3:
                self._ilp.add(self._group)
            r += 1

    def mean(self) -> torch.Tensor:
        """The mean row, in `dtype` and `row_shape`."""
        if self.fed != self.n:
            raise ValueError(f"ColumnMean: {self.fed} rows fed, expected {self.n}")
        parts = []
        if self.split:
            parts.append(self._seq.total())
        if self._ilp is not None:
            p = self._ilp.total() if self._groups else torch.zeros_like(self._group)
            first = p[0].clone()
            for row in self._tail:
                first += row
            for k in range(1, 4):
                first += p[k]
            parts.append(first)
        total = torch.zeros(self.width, dtype=torch.float32)  # torch zero-fills its output, then adds
        total += torch.cat(parts) if parts else total
        return (total / self.n).to(self.dtype).reshape(self.row_shape)
