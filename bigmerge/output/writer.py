"""The writer protocol: what merge and export ask of a writer. The direct writer (direct.py) and
the zarr store (zarr_store.py) implement it; nobody tells them apart by their type."""

from __future__ import annotations

from typing import Protocol

from bigmerge.engine.comm import Comm
from bigmerge.engine.writer import BlockWriter
from bigmerge.output.layout import Layout
from bigmerge.planning.plan import Plan
from bigmerge.storage.fs import Location


class Writer(BlockWriter, Protocol):
    loc: Location  # what the writer keeps besides the output files (removed after export)

    def prepare(self, plan: Plan, overwrite: bool) -> None:
        """Rank 0, before any block: create the store, or check a partial one is this plan's."""
        ...

    def done_blocks(self) -> set[tuple[int, int]]:
        """(tensor index, block) of every block a rerun need not compute again."""
        ...

    def finish_files(self, plan: Plan, comm: Comm, out: Location, shard_bytes: int) -> tuple[Layout, dict[str, str]]:
        """Every rank, after the executor: put the blocks into the output safetensors files.
        Returns the files' layout and, on rank 0, every tensor's CRC-32C (hex)."""
        ...
