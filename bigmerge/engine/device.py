"""Which device a rank computes on: its node-local GPU when asked for and present, else the CPU.

Only the operators' arithmetic moves: reads, statistics reductions and writes stay on the
host. The numba kernels are CPU code; on a GPU the torch statement of each operator runs.
"""

from __future__ import annotations

import os

import torch

from bigmerge.errors import ConfigError

_LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE", "LOCAL_WORLD_SIZE")
_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK")


def local_rank() -> int:
    """This process's rank among the ranks of its node, from the launcher's environment."""
    for var in _LOCAL_RANK_VARS:
        value = os.environ.get(var)
        if value is not None and value.isdigit():
            return int(value)
    return 0


def pick_device(choice: str) -> torch.device:
    """'cpu', 'cuda' (an error without a GPU) or 'auto' (the local GPU if there is one)."""
    if choice not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"--device must be cpu, cuda or auto, got {choice!r}")
    if choice == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if choice == "cuda":
            raise ConfigError(
                "--device cuda: no CUDA device is visible to this process (torch.cuda.is_available() is False)"
            )
        return torch.device("cpu")
    return torch.device("cuda", local_rank() % torch.cuda.device_count())


def share_cores() -> int:
    """Give each rank its share of the node's cores for compute threads (torch and numba).

    Every rank would otherwise start as many threads as the node has cores, and N ranks on
    a node would run N times too many. Returns the threads per rank.
    """
    local = 1
    for var in _LOCAL_SIZE_VARS:
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            local = int(value)
            break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = max(cores, os.cpu_count() or 1) if local > 1 else cores  # a rank may be pinned; share the node
    threads = max(1, cores // local)
    if local > 1:
        torch.set_num_threads(threads)
        try:
            import numba

            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        except ImportError:
            pass
    return threads
