"""Progress on rank 0: a bar with bytes and GB/s on a terminal, a line every few seconds in logs."""

from __future__ import annotations

import os
import sys
import time
from typing import Any


class Progress:
    def __init__(self, total: int, *, enabled: bool, desc: str, interval: float | None = None, ranks: int = 1) -> None:
        self._bar: Any | None = None
        self._enabled = enabled and total > 0
        self._total = total
        self._desc = desc
        self._done = 0
        self._t0 = time.perf_counter()
        self._last = self._t0
        # seconds between log lines when stderr is not a terminal (BIGMERGE_PROGRESS_INTERVAL)
        self._interval = interval if interval is not None else float(os.environ.get("BIGMERGE_PROGRESS_INTERVAL", "10"))
        self._where = "all ranks" if ranks > 1 else "1 rank"
        if self._enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=desc,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=0.5,
            )

    def update(self, n: int) -> None:
        self.set(self._done + n)

    def set(self, done: int) -> None:
        """The bytes done so far (rank 0 passes the sum over all ranks)."""
        if not self._enabled:
            return
        n = done - self._done
        self._done = done
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last >= self._interval:
            self._last = now
            rate = self._done / max(now - self._t0, 1e-9) / 1e9
            pct = 100.0 * self._done / self._total
            print(
                f"bigmerge: {self._desc} {pct:5.1f}% ({self._done / 1e9:.2f}/{self._total / 1e9:.2f} GB read on {self._where}, {rate:.2f} GB/s)",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
