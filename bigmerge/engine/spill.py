"""A tensor's block inputs kept on local scratch between statistics passes.

An operator with whole-tensor statistics passes over a tensor's blocks several times (the
statistics rounds, then apply). A tensor whose blocks fit the executor's cache is kept in
memory; a larger one (a 70B model's embedding: 2 GB per source) used to be read from every
source again on every pass, 3-4 times the input bytes from object storage. Instead its
inputs are written here, once, as the first pass reads them, and the later passes read them
back from local disk (usually still in the page cache), one block ahead of the caller.

The file is unlinked as soon as it is created: nothing is left behind by a crash, and its
space is returned when it is closed. A write that fails (a full disk) turns the spill off
for the rest of the tensor; the executor then reads the sources again, as before.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from bigmerge.log import warn

SPILL_DIR_ENV = "BIGMERGE_SPILL_DIR"


def spill_dir() -> str:
    """Where spills go: $BIGMERGE_SPILL_DIR, else the system's temporary directory ($TMPDIR)."""
    return os.environ.get(SPILL_DIR_ENV) or tempfile.gettempdir()


class Spill:
    """The raw input bytes of one tensor's blocks, written once and read back per pass.

    `put(b, inputs)` appends block b's inputs; `get(b)` returns them (the same dtypes and
    shapes) in buffers from `alloc` (the reader's pool: the caller gives them back with the
    reader's release, as any block's inputs, so the spill holds no memory of its own; fresh
    tensors without it). `expect(order)` names the blocks the next pass will ask for, in
    order: get() reads the next one ahead while the caller works on this one.
    """

    def __init__(
        self,
        directory: str | None = None,
        alloc: Callable[[int], torch.Tensor] | None = None,
        release: Callable[[list[torch.Tensor]], None] | None = None,
    ) -> None:
        fd, path = tempfile.mkstemp(prefix="bigmerge-spill-", dir=directory or spill_dir())
        os.unlink(path)  # gone with the process, whatever happens
        self._fd: int | None = fd
        self._end = 0
        self.bytes_written = 0
        self.bytes_read = 0
        self.failed: OSError | None = None
        self._where: dict[int, list[tuple[int, int, torch.dtype, tuple[int, ...]]]] = {}
        self._alloc = alloc or (lambda n: torch.empty(n, dtype=torch.uint8))
        self._release = release or (lambda inputs: None)
        self._order: list[int] = []
        self._ahead: tuple[int, Future[list[torch.Tensor]]] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bigmerge-spill")

    def has(self, b: int) -> bool:
        return b in self._where

    def put(self, b: int, inputs: list[torch.Tensor]) -> bool:
        """Append block b's inputs; False (and the spill off) when the write fails."""
        if self._fd is None or self.failed is not None:
            return False
        entries = []
        try:
            for x in inputs:
                raw = x.detach().contiguous().reshape(-1).view(torch.uint8)
                view = memoryview(raw.numpy()).cast("B")  # type: ignore[arg-type]
                done = 0
                while done < len(view):
                    done += os.pwrite(self._fd, view[done:], self._end + done)
                entries.append((self._end, len(view), x.dtype, tuple(x.shape)))
                self._end += len(view)
        except OSError as exc:
            self.failed = exc
            self._where.clear()
            warn(
                f"spilling to local scratch failed ({exc.strerror or exc}): this tensor's later passes read its "
                f"sources again ({SPILL_DIR_ENV} names where spills go)"
            )
            return False
        self.bytes_written += sum(n for _, n, _, _ in entries)
        self._where[b] = entries
        return True

    def expect(self, order: list[int]) -> None:
        """The blocks the next pass reads, in order (get() then reads one ahead)."""
        self._order = [b for b in order if b in self._where]

    def get(self, b: int) -> list[torch.Tensor]:
        if self._ahead is not None and self._ahead[0] == b:
            out = self._ahead[1].result()
            self._ahead = None
        else:
            if self._ahead is not None:  # asked out of order: drop the read-ahead
                self._drop_ahead()
            out = self._read(b)
        nxt = self._following(b)
        if nxt is not None:
            self._ahead = (nxt, self._pool.submit(self._read, nxt))
        return out

    def _following(self, b: int) -> int | None:
        try:
            i = self._order.index(b)
        except ValueError:
            return None
        return self._order[i + 1] if i + 1 < len(self._order) else None

    def _read(self, b: int) -> list[torch.Tensor]:
        assert self._fd is not None
        out = []
        for off, n, dtype, shape in self._where[b]:
            buf = self._alloc(n)
            view = memoryview(buf.numpy()).cast("B")  # type: ignore[arg-type]
            done = 0
            while done < n:
                got = os.preadv(self._fd, [view[done:]], off + done)
                if got <= 0:
                    raise OSError(f"spill file ended early (block {b}): {done} of {n} bytes")
                done += got
            self.bytes_read += n
            out.append(buf.view(dtype).reshape(shape))
        return out

    def _drop_ahead(self) -> None:
        """Wait for a read-ahead nobody will ask for, and give its buffers back."""
        if self._ahead is not None:
            future = self._ahead[1]
            self._ahead = None
            try:
                self._release(future.result())
            except OSError:
                pass

    def reset(self) -> None:
        """Forget every block and give the file's space back (the next tensor starts empty)."""
        self._drop_ahead()
        self._where.clear()
        self._order = []
        self._end = 0
        self.failed = None
        if self._fd is not None:
            os.ftruncate(self._fd, 0)

    def close(self) -> None:
        self._drop_ahead()
        self._pool.shutdown(wait=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._where.clear()
