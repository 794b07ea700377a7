"""What bigmerge tells its user while it works: `bigmerge: ...` lines on stderr, from rank 0.

One module for every command (merge, stats, search, dam, eval) and for the library code below
them (vocab), so that every line looks the same and `--quiet` and the rank rule hold everywhere:

    log = Log(rank=comm.rank, quiet=opts.quiet)
    log("merging 291 tensors ...")        # bigmerge: merging 291 tensors ...
    log.warning("a filter matched no tensor")  # bigmerge: warning: a filter matched no tensor

Code that has no `Log` at hand (planning) warns through `warn()`, which goes to the standard
`logging` logger named "bigmerge"; `Log` gives that logger one handler that prints the same way
(on rank 0, and not at all when quiet).
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

LOGGER = logging.getLogger("bigmerge")


class Log:
    """A callable that prints one `PREFIX: message` line on stderr, on rank 0 unless quiet.

    The stream is bound when the Log is made: lm-eval's quiet scoring swaps sys.stderr while it
    runs, which in search's disk mode happens in a thread beside the one that logs.
    """

    def __init__(self, prefix: str = "bigmerge", *, rank: int = 0, quiet: bool = False) -> None:
        self.prefix = prefix
        self.enabled = rank == 0 and not quiet
        self.stream: TextIO = sys.stderr
        _route_warnings(self)

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"{self.prefix}: {msg}", file=self.stream, flush=True)

    def warning(self, msg: str) -> None:
        self(f"warning: {msg}")


def warn(msg: str) -> None:
    """A warning from code that has no Log (planning): printed by the current command's Log."""
    LOGGER.warning(msg)


class _Handler(logging.Handler):
    def __init__(self, log: Log) -> None:
        super().__init__(logging.WARNING)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        self.log.warning(record.getMessage())


def _route_warnings(log: Log) -> None:
    """The "bigmerge" logger's warnings go to the newest Log (one command runs per process)."""
    for h in list(LOGGER.handlers):
        if isinstance(h, _Handler):
            LOGGER.removeHandler(h)
    LOGGER.addHandler(_Handler(log))
    LOGGER.propagate = False  # not printed a second time by logging's last-resort handler
