"""Fault injection, for the failure tests only (a lost node, a crash at a chosen moment).

BIGMERGE_FAULT_INJECT="RANK:WHEN:KIND": rank RANK fails when WHEN is reached, where WHEN is
a number of blocks written by that rank, or "export" (its output files written, before
the index and the manifest). KIND is "error" (an exception, as a bug would raise) or
"kill" (SIGKILL, as the kernel's OOM killer or a lost node would do).
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "BIGMERGE_FAULT_INJECT"


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
    raise RuntimeError(f"injected fault on rank {rank} {where}")


def fault_point(rank: int, when: str) -> None:
    """Fail here if the injected fault names this moment."""
    spec = fault_spec(rank)
    if spec is not None and spec[0] == when:
        fail_now(rank, spec[1], f"at {when}")
