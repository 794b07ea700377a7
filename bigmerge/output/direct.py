"""The direct writer: every block written once, at its final offset in the output files.

For an output on a local or shared POSIX file system the whole layout of the checkpoint is
known from the plan (`bigmerge.output.layout`), so there is no need for the intermediate zarr
store and the copy out of it: each rank writes its blocks with `pwrite` into the output's
safetensors files, kept under ``OUT/.bigmerge-partial/`` until the merge is complete. Export
then renames them into place and writes the index, config, tokenizer and, last, the manifest.
The zarr store stays the writer where nothing can be written in place (object storage), or
on request (``--writer zarr``).

The journal: each writing process appends one line per finished block, "tensor block crc32c",
to its own file in the partial directory, after the block's bytes are written. A rerun reads
every journal (a torn last line is ignored), checks each journaled block against its CRC-32C
in the partial file and resumes; a block that fails the check is merged again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import uuid
from typing import Any

import numpy as np
import torch

from bigmerge.engine.comm import Comm
from bigmerge.engine.faults import disk_full_at, disk_full_point, fault_point
from bigmerge.errors import OutputExistsError, StorageError
from bigmerge.output.layout import Layout
from bigmerge.output.outdir import PARTIAL_DIR
from bigmerge.output.zarr_store import STORE_FORMAT, to_storage
from bigmerge.planning.plan import Plan, TensorPlan
from bigmerge.storage.checksum import combine, crc32c, hex32
from bigmerge.storage.fs import Location
from bigmerge.storage.safetensors import PAGE

PLAN_FILE = "bigmerge-plan.json"
JOURNAL_PREFIX = "journal-"
LAYOUT_VERSION = 2  # 2: headers padded so that large tensors start on a page


class DirectStore:
    """Blocks written straight into the output files (a POSIX OUT); implements output.writer.Writer."""

    kind = "direct"

    def __init__(self, out: Location, plan: Plan, shard_bytes: int, direct_io: bool = True) -> None:
        if not out.is_local:
            raise ValueError("the direct writer needs a POSIX path")  # merge.py picks zarr for the rest
        self.out = out
        self.loc = out.join(PARTIAL_DIR)
        self.plan = plan
        self.shard_bytes = shard_bytes
        self.layout = Layout.of(plan, shard_bytes)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._journal: Any = None
        # Direct I/O (O_DIRECT) for the blocks that start and end on pages of their file: the
        # bytes go from the writer's buffer to the device, with no copy into the page cache
        # (a copy that costs a CPU core about 1 s per GB on a VM whose free memory the host has
        # reclaimed) and no output left to pollute the cache. The other blocks, and any file
        # system that refuses O_DIRECT, are written through the cache; no page is ever written
        # both ways, since a page-aligned block owns its pages.
        self.direct_io = direct_io and hasattr(os, "O_DIRECT")
        self._dfds: dict[str, int] = {}
        self._aligned = {t.index for t in plan.tensors if self.layout.page_aligned(t)} if self.direct_io else set()
        self.direct_bytes = 0  # written with direct I/O (for tests and the summary)

    def _fingerprint(self) -> str:
        return f"{self.plan.fingerprint()}:{STORE_FORMAT}:direct:{LAYOUT_VERSION}:{self.shard_bytes}"

    # -- set-up (rank 0) ------------------------------------------------------------------

    def prepare(self, plan: Plan, overwrite: bool) -> None:
        """Create the partial output files (headers written, data to come), or check that the
        ones there were made for the same plan and resume them."""
        plan_loc = self.loc.join(PLAN_FILE)
        if plan_loc.exists():
            try:
                old = json.loads(plan_loc.read_bytes())
            except ValueError:
                old = {}
            same = old.get("fingerprint") == self._fingerprint()
            if same:
                self._unpublish()
            if same and self._files_whole():
                return  # resume
            # the same plan without its files (they had been moved into place when the run
            # stopped, before its manifest): start again; another plan: only with --overwrite
            if not same and not overwrite:
                raise OutputExistsError(
                    f"{self.loc.url}: holds a partial merge of a different config or different sources; "
                    "rerun with --overwrite to discard it"
                )
        self.loc.remove(recursive=True)

        def create() -> None:
            os.makedirs(self.loc.path, exist_ok=True)
            for i, name in enumerate(self.layout.names):
                with open(os.path.join(self.loc.path, name), "wb") as f:
                    f.write(self.layout.headers[i])
                    f.truncate(self.layout.file_size(i))  # sparse until the blocks arrive

        self.loc.call("creation of the partial output files", create)
        # Written last: a directory without it is not resumable and is rebuilt.
        plan_loc.write_bytes(json.dumps({"fingerprint": self._fingerprint(), "writer": self.kind}).encode())

    def _unpublish(self) -> None:
        """Files a stopped export had already moved into OUT go back into the partial directory
        (the record of OUT says they are this merge's; every journaled block is checked against
        its CRC before it counts): a failure between the move and the manifest reruns only the
        export, not the merge."""
        for i, name in enumerate(self.layout.names):
            src, dst = os.path.join(self.out.path, name), os.path.join(self.loc.path, name)
            if not os.path.exists(dst) and os.path.isfile(src) and os.path.getsize(src) == self.layout.file_size(i):
                self.loc.call(f"moving {name} back", lambda src=src, dst=dst: os.replace(src, dst))

    def _files_whole(self) -> bool:
        """Every partial file there at its full size (not so once a crash came after publish)."""
        for i, name in enumerate(self.layout.names):
            path = os.path.join(self.loc.path, name)
            if not os.path.isfile(path) or os.path.getsize(path) != self.layout.file_size(i):
                return False
        return True

    # -- blocks ---------------------------------------------------------------------------

    def _fd(self, name: str) -> int:
        with self._lock:
            fd = self._fds.get(name)
            if fd is None:
                fd = self._fds[name] = os.open(os.path.join(self.loc.path, name), os.O_WRONLY)
            return fd

    def _direct_fd(self, name: str) -> int | None:
        """The file opened for direct I/O, or None where the file system refuses it."""
        with self._lock:
            fd = self._dfds.get(name)
            if fd is None and self.direct_io:
                try:
                    fd = self._dfds[name] = os.open(os.path.join(self.loc.path, name), os.O_WRONLY | os.O_DIRECT)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self.direct_io = False  # tmpfs and some FUSE file systems: the page cache it is
            return fd

    def _append_journal(self, line: str) -> None:
        def append() -> None:
            with self._lock:
                if self._journal is None:
                    name = f"{JOURNAL_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.txt"
                    self._journal = open(os.path.join(self.loc.path, name), "a", buffering=1)  # noqa: SIM115
                disk_full_at("journal")
                self._journal.write(line)  # line-buffered: a full disk shows here

        # a failed append is one error line (the block is merged again by a rerun)
        self.loc.call("appending to the journal", append)

    def write_block(self, t: TensorPlan, b: int, x: torch.Tensor) -> None:
        """Write block b of t at its place in its output file, then journal it."""
        data = memoryview(to_storage(x, t.out_dtype).reshape(-1)).cast("B")
        crc = crc32c(data)
        place = self.layout.places[t.index]
        pos = self.layout.block_offset(t, b)

        direct = self.direct_io and t.index in self._aligned and x.data_ptr() % PAGE == 0 and data.nbytes % PAGE == 0

        def write() -> None:
            fd = self._direct_fd(place.file) if direct else None
            disk_full_point()
            done = 0
            while done < data.nbytes:
                if fd is not None:
                    try:
                        n = os.pwrite(fd, data[done:], pos + done)
                        done += n
                        with self._lock:
                            self.direct_bytes += n
                        continue
                    except OSError as exc:
                        if exc.errno != errno.EINVAL:
                            raise
                        fd = None  # refused (alignment the device wants, or a short write's rest)
                done += os.pwrite(self._fd(place.file), data[done:], pos + done)

        self.loc.join(place.file).call(f"writing block {b} of tensor {t.name!r}", write)
        self._append_journal(f"{t.index} {b} {crc}\n")

    def close(self) -> None:
        with self._lock:
            for fd in [*self._fds.values(), *self._dfds.values()]:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds.clear()
            self._dfds.clear()
            if self._journal is not None:
                self._journal.close()
                self._journal = None

    # -- the journal ----------------------------------------------------------------------

    def journaled(self) -> dict[tuple[int, int], int]:
        """(tensor, block) -> CRC-32C of every block some process journaled."""
        out: dict[tuple[int, int], int] = {}
        if not os.path.isdir(self.loc.path):
            return out
        for name in sorted(os.listdir(self.loc.path)):
            if not name.startswith(JOURNAL_PREFIX):
                continue
            with open(os.path.join(self.loc.path, name)) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) != 3 or not line.endswith("\n") or not all(p.isdigit() for p in parts):
                        continue  # a torn last line: that block is merged again
                    out[(int(parts[0]), int(parts[1]))] = int(parts[2])
        return out

    def done_blocks(self) -> set[tuple[int, int]]:
        """Journaled blocks whose bytes in the partial files still match their CRC-32C."""
        if not self.loc.join(PLAN_FILE).exists():
            return set()
        done: set[tuple[int, int]] = set()
        by_index = {t.index: t for t in self.plan.tensors}
        for (ti, b), crc in self.journaled().items():
            t = by_index.get(ti)
            if t is None or b >= t.n_blocks:
                continue
            if self._read_crc(t, b) == crc:
                done.add((ti, b))
        return done

    def _read_crc(self, t: TensorPlan, b: int) -> int:
        buf = np.empty(t.block_out_bytes(b), dtype=np.uint8)
        self.loc.join(self.layout.places[t.index].file).read_into(self.layout.block_offset(t, b), memoryview(buf))
        return crc32c(buf)

    # -- export (rank 0, every block written) -------------------------------------------------

    def tensor_checksums(self) -> dict[str, str]:
        """Each tensor's CRC-32C, combined from its blocks' (every block must be journaled)."""
        crcs = self.journaled()
        sums: dict[str, str] = {}
        for t in self.plan.tensors:
            crc = 0
            for b in range(t.n_blocks):
                got = crcs.get((t.index, b))
                if got is None:
                    raise StorageError(f"{self.loc.url}: block {b} of tensor {t.name!r} was never written")
                crc = got if b == 0 else combine(crc, got, t.block_out_bytes(b))
            sums[t.name] = hex32(crc)
        return sums

    def publish(self) -> None:
        """Move the finished files into the output directory (the manifest comes after)."""
        for name in self.layout.names:
            src, dst = os.path.join(self.loc.path, name), os.path.join(self.out.path, name)
            self.loc.call(f"renaming {name} into place", lambda src=src, dst=dst: os.replace(src, dst))

    def finish_files(self, plan: Plan, comm: Comm, out: Location, shard_bytes: int) -> tuple[Layout, dict[str, str]]:
        """The blocks are in place already: the files only move into the output directory.
        Rank 0 gets every tensor's checksum (from the journal's block CRCs)."""
        self.close()
        fault_point(comm.rank, "export")
        comm.barrier()  # every rank's blocks and journal lines are written
        hashes: dict[str, str] = {}
        if comm.rank == 0:
            hashes = self.tensor_checksums()
            self.publish()
        return self.layout, hashes
