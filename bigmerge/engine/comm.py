"""The communicator. This is the only module that imports mpi4py.

`get_comm()` returns an MPI communicator when the process was started by an MPI launcher
(mpirun, srun with PMI) and a one-rank stand-in otherwise, so `bigmerge merge` runs the
same with and without `mpirun`.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Protocol, TypeVar

import numpy as np

T = TypeVar("T")

_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "HYDRA_CONTROL_FD")


class Comm(Protocol):
    rank: int
    size: int

    def bcast(self, obj: T) -> T: ...
    def send_progress(self, value: int, final: bool = False) -> None: ...
    def poll_progress(self) -> dict[int, int]: ...
    def drain_progress(self) -> dict[int, int]: ...
    def allreduce_sum(self, arr: np.ndarray) -> np.ndarray: ...
    def allgather(self, obj: T) -> list[T]: ...
    def barrier(self) -> None: ...
    def abort(self, code: int) -> None: ...


class SerialComm:
    rank = 0
    size = 1

    def send_progress(self, value: int, final: bool = False) -> None:
        pass

    def poll_progress(self) -> dict[int, int]:
        return {}

    def drain_progress(self) -> dict[int, int]:
        return {}

    def bcast(self, obj: T) -> T:
        return obj

    def allreduce_sum(self, arr: np.ndarray) -> np.ndarray:
        return arr

    def allgather(self, obj: T) -> list[T]:
        return [obj]

    def barrier(self) -> None:
        pass

    def abort(self, code: int) -> None:
        sys.exit(code)


PROGRESS_TAG = 7707


class MPIComm:
    def __init__(self) -> None:
        from mpi4py import MPI

        self._mpi = MPI
        self._comm = MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        self._sends: list[Any] = []
        self._finals: set[int] = set()
        self._latest: dict[int, int] = {}

    # Progress: ranks > 0 send their cumulative bytes to rank 0 now and then (non-blocking,
    # a few small messages per second at most), and a final one at the end, which rank 0
    # drains so that no message is left in flight.

    def send_progress(self, value: int, final: bool = False) -> None:
        if self.rank == 0:
            return
        self._sends.append(self._comm.isend((value, final), dest=0, tag=PROGRESS_TAG))
        self._sends = [r for r in self._sends if not r.Test()]
        if final:
            self._mpi.Request.Waitall(self._sends)
            self._sends = []

    def _receive_one(self) -> None:
        status = self._mpi.Status()
        value, final = self._comm.recv(source=self._mpi.ANY_SOURCE, tag=PROGRESS_TAG, status=status)
        src = status.Get_source()
        self._latest[src] = value
        if final:
            self._finals.add(src)

    def poll_progress(self) -> dict[int, int]:
        while self._comm.iprobe(source=self._mpi.ANY_SOURCE, tag=PROGRESS_TAG):
            self._receive_one()
        return dict(self._latest)

    def drain_progress(self) -> dict[int, int]:
        if self.rank == 0:
            while len(self._finals) < self.size - 1:
                self._receive_one()
        return dict(self._latest)

    def bcast(self, obj: T) -> T:
        return self._comm.bcast(obj, root=0)

    def allreduce_sum(self, arr: np.ndarray) -> np.ndarray:
        # Integers sum exactly; float statistics arrive as per-block rows with zeros elsewhere,
        # so adding them is exact too (x + 0 == x), whatever the reduction order.
        arr = np.ascontiguousarray(arr)
        out = np.empty_like(arr)
        self._comm.Allreduce(arr, out, op=self._mpi.SUM)
        return out

    def allgather(self, obj: T) -> list[T]:
        return self._comm.allgather(obj)

    def barrier(self) -> None:
        self._comm.Barrier()

    def abort(self, code: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self._comm.Abort(code)


def launched_by_mpi() -> bool:
    return any(v in os.environ for v in _LAUNCHER_VARS)


_COMM: Comm | None = None


def get_comm() -> Comm:
    global _COMM
    if _COMM is None:
        if launched_by_mpi() and os.environ.get("BIGMERGE_NO_MPI") != "1":
            _COMM = MPIComm()
        else:
            _COMM = SerialComm()
    return _COMM


PER_BLOCK = "pb_"  # float statistics under keys with this prefix come back per block, unsummed


def reduce_stats(comm: Comm, partial: dict[int, dict[str, Any]], n_blocks: int) -> dict[str, np.ndarray]:
    """Exact reduction of per-block statistics (see ops/base.py for the rules).

    `partial` maps block index -> stats dict from this rank. Integer arrays are summed;
    float arrays become [n_blocks, ...] arrays with this rank's rows filled, reduced, then
    summed over blocks in block order, so the result is the same on any world size (keys
    starting with "pb_" keep the per-block rows).
    """
    keys: list[str] = sorted({k for d in partial.values() for k in d})
    # Every rank must agree on the keys, even ranks that own no block of this tensor.
    keys = sorted({k for ks in comm.allgather(keys) for k in ks})
    specs = comm.allgather({k: (d[k].dtype.str, d[k].shape) for d in partial.values() for k in d})
    spec: dict[str, tuple[str, tuple[int, ...]]] = {}
    for s in specs:
        spec.update(s)
    out: dict[str, np.ndarray] = {}
    for k in keys:
        dtype, shape = np.dtype(spec[k][0]), spec[k][1]
        if np.issubdtype(dtype, np.integer):
            acc = np.zeros(shape, dtype=np.int64)
            for d in partial.values():
                if k in d:
                    acc += d[k]
            out[k] = comm.allreduce_sum(acc)
        else:
            rows = np.zeros((n_blocks, *shape), dtype=np.float64)
            for b, d in partial.items():
                if k in d:
                    rows[b] = d[k]
            rows = comm.allreduce_sum(rows)
            out[k] = rows if k.startswith(PER_BLOCK) else _ordered_sum(rows)
    return out


def _ordered_sum(rows: np.ndarray) -> np.ndarray:
    acc = np.zeros(rows.shape[1:], dtype=np.float64)
    for r in rows:  # left to right: the same order on every world size
        acc = acc + r
    return acc


def reduce_one_block(index: int, stats: dict[str, Any]) -> dict[str, np.ndarray]:
    """reduce_stats over a tensor's only block, on this rank alone: what the executor gives
    operators as Block.reduce for the statistics they compute inside apply."""
    return reduce_stats(SerialComm(), {index: stats}, 1)
