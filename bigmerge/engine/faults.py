"""Fault injection, for the failure tests only (a lost node, a crash at a chosen moment).

BIGMERGE_FAULT_INJECT="RANK:WHEN:KIND": rank RANK fails when WHEN is reached, where WHEN is
a number of blocks written by that rank, or "export" (its output files written, before
the index and the manifest). KIND is "error" (an exception, as a bug would raise) or
"kill" (SIGKILL, as the kernel's OOM killer or a lost node would do).

WHEN may also name a moment of the export on rank 0: "config", "index" or "manifest" (just
before that file is written), and KIND "enospc" raises the error a full disk gives.

BIGMERGE_FAULT_DISK_FULL=N: after N block writes to local disk, every further write of this
process fails with ENOSPC, as a full disk does.

BIGMERGE_FAULT_DISK_FULL_AT=NAME[,NAME...]: the write named NAME fails with ENOSPC in every
process: "journal" (the direct writer's journal append), "record" (OUT's record of what bigmerge
wrote), or a metadata file: "config", "index", "manifest", "tokenizer".
"""

from __future__ import annotations

import errno
import os
import signal
import threading

FAULT_ENV = "BIGMERGE_FAULT_INJECT"
DISK_FULL_ENV = "BIGMERGE_FAULT_DISK_FULL"
DISK_FULL_AT_ENV = "BIGMERGE_FAULT_DISK_FULL_AT"
_writes = 0
_writes_lock = threading.Lock()


def fault_spec(rank: int) -> tuple[str, str] | None:
    """(WHEN, KIND) if a fault is injected into this rank, else None."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    r, when, kind = spec.split(":")
    return (when, kind) if int(r) == rank else None


def fail_now(rank: int, kind: str, where: str) -> None:
    """Fail this rank the way KIND says; never returns."""
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    raise RuntimeError(f"injected fault on rank {rank} {where}")


def fault_point(rank: int, when: str) -> None:
    """Fail here if the injected fault names this moment."""
    spec = fault_spec(rank)
    if spec is not None and spec[0] == when:
        fail_now(rank, spec[1], f"at {when}")


def disk_full_point() -> None:
    """Raise ENOSPC here once this process has written BIGMERGE_FAULT_DISK_FULL blocks."""
    global _writes
    limit = os.environ.get(DISK_FULL_ENV)
    if not limit:
        return
    with _writes_lock:
        _writes += 1
        full = _writes > int(limit)
    if full:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def disk_full_at(name: str) -> None:
    """Raise ENOSPC here if BIGMERGE_FAULT_DISK_FULL_AT names this write."""
    if name in os.environ.get(DISK_FULL_AT_ENV, "").split(","):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
