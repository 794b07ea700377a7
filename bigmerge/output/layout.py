"""Where every tensor lands in the output: its file, and its bytes' offset in that file.

The plan fixes names, dtypes and shapes, so the safetensors files (which tensors go in which
file, each file's header, each tensor's offset) are known before a single block is merged:
the export writes them, and the direct writer writes every block at its final place.
"""

from __future__ import annotations

from dataclasses import dataclass

from bigmerge.planning.plan import Plan, TensorPlan
from bigmerge.storage.safetensors import DTYPES, PAGE, build_header

S3_MIN_PART = 5 * 2**20  # S3's smallest multipart part (all but the last)


def layout_files(plan: Plan, shard_bytes: int) -> list[list[TensorPlan]]:
    """Tensors per output file, in plan order up to `shard_bytes` a file; within a file the
    small tensors come first, so that on object storage the header and the small tensors make
    one part and every large block can be copied by the server as a part of its own."""
    files: list[list[TensorPlan]] = [[]]
    size = 0
    for t in plan.tensors:
        n = t.out_bytes()
        if files[-1] and size + n > shard_bytes:
            files.append([])
            size = 0
        files[-1].append(t)
        size += n
    return [
        [t for t in f if t.out_bytes() < S3_MIN_PART] + [t for t in f if t.out_bytes() >= S3_MIN_PART] for f in files
    ]


def file_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def file_header(tensors: list[TensorPlan]) -> bytes:
    """The file's header, padded so that its first large tensor starts on a page: the large
    tensors' blocks can then be written with direct I/O (bigmerge.output.direct)."""
    small = sum(t.out_bytes() for t in tensors if t.out_bytes() < S3_MIN_PART)
    return build_header(
        [(t.name, t.out_dtype, tuple(t.shape), t.out_bytes()) for t in tensors], {"format": "pt"}, align_at=small
    )


@dataclass(frozen=True)
class Place:
    file: str  # the output file's name
    offset: int  # of the tensor's first byte in that file


@dataclass
class Layout:
    files: list[list[TensorPlan]]
    names: list[str]
    headers: list[bytes]
    places: dict[int, Place]  # by tensor index

    @classmethod
    def of(cls, plan: Plan, shard_bytes: int) -> Layout:
        files = layout_files(plan, shard_bytes)
        names = [file_name(i, len(files)) for i in range(len(files))]
        headers = [file_header(tensors) for tensors in files]
        places: dict[int, Place] = {}
        for name, header, tensors in zip(names, headers, files):
            pos = len(header)
            for t in tensors:
                places[t.index] = Place(name, pos)
                pos += t.out_bytes()
        return cls(files, names, headers, places)

    def file_size(self, i: int) -> int:
        return len(self.headers[i]) + sum(t.out_bytes() for t in self.files[i])

    def page_aligned(self, t: TensorPlan) -> bool:
        """Every block of t starts and ends on a page of its file (direct I/O can write it)."""
        size = DTYPES[t.out_dtype][1]
        if self.places[t.index].offset % PAGE or t.out_bytes() % PAGE:
            return False
        return all(t.block_range(b)[0] * t.row_elems * size % PAGE == 0 for b in range(t.n_blocks))

    def block_offset(self, t: TensorPlan, b: int) -> int:
        """Offset of block b of t in its file."""
        r0, _ = t.block_range(b)
        return self.places[t.index].offset + r0 * t.row_elems * DTYPES[t.out_dtype][1]
