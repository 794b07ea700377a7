"""Safetensors headers parsed by hand: 8-byte little-endian length, JSON, raw bytes.

Only the header is read here; tensor bytes are read later, block by block, by byte range.
Every check that can fail on a hostile or damaged file fails with a SourceError that
names the file and the tensor.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import torch

from bigmerge.errors import SourceError
from bigmerge.storage.fs import Location
from bigmerge.storage.jsonio import loads_bounded

MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype name -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
TORCH_TO_ST = {v[0]: k for k, v in DTYPES.items()}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: file, absolute byte range, dtype and shape."""

    name: str
    file: str  # URL of the file holding it
    dtype: str  # safetensors spelling, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def parse_header(raw: bytes, file_size: int, url: str) -> tuple[dict[str, TensorInfo], dict[str, Any]]:
    """Parse and check a header whose bytes (from offset 0) are `raw`.

    `raw` must hold at least the 8-byte length and the JSON; returns the tensors and
    the `__metadata__` dict.
    """
    if file_size < 8 or len(raw) < 8:
        raise SourceError(f"{url}: not a safetensors file: {file_size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER_BYTES:
        raise SourceError(f"{url}: safetensors header length {n} is larger than the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > file_size:
        raise SourceError(
            f"{url}: safetensors header length {n} runs past the end of the file ({file_size} bytes): truncated or not safetensors"
        )
    if len(raw) < 8 + n:
        raise ValueError("caller must pass the whole header")
    try:
        header = loads_bounded(raw[8 : 8 + n], url, "safetensors header", object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise SourceError(f"{url}: tensor {exc.args[0]!r} is named more than once in the safetensors header") from None
    if not isinstance(header, dict):
        raise SourceError(f"{url}: safetensors header is a JSON {type(header).__name__}, expected an object")
    data_start = 8 + n
    data_len = file_size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SourceError(f"{url}: safetensors __metadata__ must be an object")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _check_entry(url, name, entry, data_start, data_len)
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise SourceError(f"{url}: tensors {n0!r} and {n1!r} overlap (bytes {s0}..{e0} and from {s1})")
    return tensors, metadata


def _check_entry(url: str, name: str, entry: Any, data_start: int, data_len: int) -> TensorInfo:
    where = f"{url}: tensor {name!r}"
    if not name or "\x00" in name:
        raise SourceError(f"{url}: invalid tensor name {name!r}")
    if not isinstance(entry, dict):
        raise SourceError(f"{where}: header entry must be an object")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SourceError(f"{where}: unsupported dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise SourceError(f"{where}: shape {shape!r} must be a list of non-negative integers")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise SourceError(f"{where}: data_offsets {offsets!r} must be two integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise SourceError(
            f"{where}: data_offsets {offsets} out of range: the data section has {data_len} bytes (file truncated?)"
        )
    numel = 1
    for d in shape:
        numel *= d
    expected = numel * DTYPES[dtype][1]
    if end - begin != expected:
        raise SourceError(f"{where}: {end - begin} bytes for dtype {dtype} and shape {shape}, expected {expected}")
    return TensorInfo(name, url, dtype, tuple(shape), data_start + begin, data_start + end)


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique: json.loads silently keeps the last of duplicates."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def read_header(loc: Location) -> tuple[dict[str, TensorInfo], dict[str, Any], bytes]:
    """Read only the header of one safetensors file; returns tensors, metadata and raw header bytes."""
    size = loc.size()
    if size < 8:
        raise SourceError(f"{loc.url}: not a safetensors file: {size} bytes, shorter than the 8-byte header length")
    # One request usually gets the whole header; a second one only for huge headers.
    first = loc.read_bytes(0, min(size, 1 << 20))
    (n,) = struct.unpack("<Q", first[:8])
    raw = first
    if 8 + n > len(first) and 8 + n <= size and n <= MAX_HEADER_BYTES:
        raw = first + loc.read_bytes(len(first), 8 + n)
    tensors, metadata = parse_header(raw, size, loc.url)
    return tensors, metadata, raw[: 8 + n]


PAGE = 4096  # file offsets that direct I/O can write at


def build_header(
    entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str] | None = None, align_at: int = -1
) -> bytes:
    """Header bytes for tensors laid out in the given order: (name, dtype, shape, nbytes).

    align_at >= 0: pad the header with spaces (which the format allows) so that data byte
    `align_at` lands at a multiple of PAGE in the file, where that keeps the data 8-aligned."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % 8)  # tensor data stays 8-byte aligned
    if align_at >= 0 and align_at % 8 == 0:
        body += b" " * (-(8 + len(body) + align_at) % PAGE)
    return struct.pack("<Q", len(body)) + body
