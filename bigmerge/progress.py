"""A progress bar on rank 0 with bytes and GB/s; silent with --quiet or when not enabled."""

from __future__ import annotations

import sys
from typing import Any, Optional


class Progress:
    def __init__(self, total: int, *, enabled: bool, desc: str) -> None:
        self._bar: Optional[Any] = None
        if enabled and total > 0:
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
                disable=None,  # no bar when stderr is not a terminal
            )

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
