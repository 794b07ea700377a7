"""The zarr v3 store every rank writes into, the journal of finished blocks, and how its
blocks become the output files (streamed, or copied by the S3 server).

One array per tensor (named by index, never by the tensor's name, so no name can become
a path), the sharding codec with one shard per block, so no two ranks ever write the same
object. bfloat16 is stored as its uint16 bit pattern; the true dtype is in the attributes.
The journal of finished blocks is the set of shards present: a shard appears atomically
(an object store publishes a PUT whole; locally it is written under a temporary name and
renamed), so a listing of the store says exactly which blocks a rerun can skip, with no
extra object per block.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from bigmerge.engine.comm import Comm
from bigmerge.engine.faults import disk_full_point, fault_point
from bigmerge.errors import OutputExistsError, StorageError
from bigmerge.output.layout import S3_MIN_PART, Layout
from bigmerge.planning.plan import Plan, TensorPlan
from bigmerge.storage.checksum import combine, crc32c, hex32
from bigmerge.storage.fs import Location
from bigmerge.storage.safetensors import DTYPES

STORAGE_NP = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "uint16"}
PLAN_FILE = "bigmerge-plan.json"
_ZEROS = bytes(1 << 20)
TMP_MARK = ".tmp-"
SHARD_KEY = re.compile(r"t(\d{6})/c/(\d+)(?:/0)*")


def array_name(t: TensorPlan) -> str:
    return f"t{t.index:06d}"


# bump when the stored layout changes: a store of another format is not resumed
STORE_FORMAT = 3
PREFIX = 4  # a shard starts with the CRC-32C of its block's bytes (no padding); the chunk follows


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    x = x.to(DTYPES[dtype][0]).contiguous()  # no copy when it already is
    if dtype == "BF16":
        return x.view(torch.uint16).numpy()
    return x.numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if dtype == "BF16" else t


class BlockStore:
    def __init__(self, loc: Location) -> None:
        self.loc = loc
        import zarr.storage  # here: the direct writer's merges never pay for importing zarr

        if loc.is_local:
            self._zstore: Any = zarr.storage.LocalStore(loc.path)
        else:
            self._zstore = zarr.storage.FsspecStore(fs=_async_fs(loc), path=loc.path)

    # -- set-up (rank 0) ------------------------------------------------------------------

    def prepare(self, plan: Plan, overwrite: bool) -> None:
        """Create the arrays, or check that an existing store was made by the same plan."""
        plan_loc = self.loc.join(PLAN_FILE)
        fingerprint = f"{plan.fingerprint()}:{STORE_FORMAT}"
        if plan_loc.exists():
            try:
                old = json.loads(plan_loc.read_bytes())
            except ValueError:
                old = {}
            if old.get("fingerprint") == fingerprint:
                return  # resume
            if not overwrite:
                raise OutputExistsError(
                    f"{self.loc.url}: holds a partial merge of a different config or different sources; "
                    "rerun with --overwrite to discard it"
                )
        self.loc.remove(recursive=True)

        def create() -> None:
            # mode="w" starts over, so a retry after a transient error is safe.
            import zarr

            group = zarr.open_group(self._zstore, mode="w", zarr_format=3)
            for t in plan.tensors:
                shape = tuple(t.shape) if t.shape else (1,)
                shard = (t.block_rows, *shape[1:]) if t.n_blocks else shape
                group.create_array(
                    array_name(t),
                    shape=shape,
                    dtype=STORAGE_NP[t.out_dtype],
                    chunks=shard,
                    shards=shard,
                    compressors=(zarr.codecs.Crc32cCodec(),),  # each block's data carries its checksum
                    fill_value=0,
                    attributes={"name": t.name, "dtype": t.out_dtype, "shape": t.shape},
                )

        self.loc.call("creation of the zarr store", create)
        # Written last: a store without it is not resumable and is rebuilt.
        plan_loc.write_bytes(json.dumps({"fingerprint": fingerprint, "merge_method": plan.merge_method}).encode())

    # -- blocks ---------------------------------------------------------------------------

    def shard_loc(self, t: TensorPlan, b: int) -> Location:
        ndim = max(1, len(t.shape))
        return self.loc.join(array_name(t), "c", *([str(b)] + ["0"] * (ndim - 1)))

    def write_block(self, t: TensorPlan, b: int, x: torch.Tensor) -> None:
        """Write block b as one zarr shard, encoded here without copies.

        The layout is the sharding codec's (one inner chunk, `bytes` little-endian, index at
        the end with `bytes` + `crc32c`), so zarr reads it; encoding it ourselves avoids two
        full copies of every block inside zarr's codec pipeline. An edge shard is padded to
        the full shard shape with the fill value (0), as zarr stores edge chunks. Before the
        chunk (the index says where it starts) come 4 bytes: the CRC-32C of the block's own
        bytes, which export needs and which a server-side copy cannot compute.
        """
        data = memoryview(to_storage(x, t.out_dtype).reshape(-1)).cast("B")
        full = _chunk_bytes(t)
        pad = full - data.nbytes
        own = crc32c(data)
        crc = _crc_zeros(pad, own) if pad else own
        head = struct.pack("<I", own)
        index = np.array([PREFIX, full + 4], dtype="<u8").tobytes()
        # the chunk's crc32c (zarr's Crc32cCodec: 4 bytes little-endian after the data), then the index
        trailer = struct.pack("<I", crc) + index + struct.pack("<I", crc32c(index))
        loc = self.shard_loc(t, b)
        if not loc.is_local:
            loc.write_bytes(b"".join((head, data, bytes(pad), trailer)))  # one PUT per shard, retried there
            return

        def write_local() -> None:
            # Stream the block straight from its buffer (no concatenated copy) into a
            # temporary name, then rename: the shard exists whole or not at all.
            os.makedirs(posixpath.dirname(loc.path), exist_ok=True)
            tmp = f"{loc.path}{TMP_MARK}{os.getpid()}"
            try:
                with open(tmp, "wb") as f:
                    f.write(head)
                    f.write(data)
                    disk_full_point()
                    left = pad
                    while left > 0:
                        n = min(left, len(_ZEROS))
                        f.write(_ZEROS[:n])
                        left -= n
                    f.write(trailer)
                os.replace(tmp, loc.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)  # a failed write leaves nothing behind, not even a temporary
                raise

        loc.call(f"writing block {b} of tensor {t.name!r}", write_local)

    def read_block(self, t: TensorPlan, b: int, scratch: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """The stored bytes of block b (without the edge padding), as a flat uint8 array, and
        their CRC-32C, checked against the one stored with the block.

        With `scratch` (a uint8 array large enough), the bytes land there and a view is returned.
        """
        n = t.block_out_bytes(b)
        whole = _chunk_bytes(t) + 4  # data, edge padding, crc32c
        buf = scratch[:whole] if scratch is not None and scratch.size >= whole else np.empty(whole, dtype=np.uint8)
        loc = self.shard_loc(t, b)
        loc.read_into(PREFIX, memoryview(buf))
        want = int.from_bytes(buf[whole - 4 :].tobytes(), "little")
        crc = crc32c(buf[:n])
        if crc32c(buf[n : whole - 4], crc) != want:
            loc.remove()  # the journal forgets it: a rerun recomputes this block
            raise StorageError(
                f"{loc.url}: block {b} of tensor {t.name!r} does not match its checksum in the store; "
                "it was removed: rerun the same command to recompute it"
            )
        return buf[:n], crc

    def done_blocks(self) -> set[tuple[int, int]]:
        """Blocks whose shard is in the store (the journal), from one recursive listing."""
        done: set[tuple[int, int]] = set()
        keys = self.loc.call(
            "listing of the store", lambda: self.loc.fs.find(self.loc.path) if self.loc.exists() else []
        )
        root = self.loc.path.rstrip("/") + "/"
        for key in keys:
            m = SHARD_KEY.fullmatch(key[len(root) :] if key.startswith(root) else key)
            if m:
                done.add((int(m.group(1)), int(m.group(2))))
        return done

    def finish_files(self, plan: Plan, comm: Comm, out: Location, shard_bytes: int) -> tuple[Layout, dict[str, str]]:
        """The output files streamed from the store (or, on S3, copied by the server from its
        shards), spread over the ranks; rank 0 gets every tensor's checksum."""
        layout = Layout.of(plan, shard_bytes)
        files, names = layout.files, layout.names
        mine: dict[str, str] = {}
        by_copy = _copy_possible(self, out)
        for i, tensors in enumerate(files):
            if i % comm.size == comm.rank:
                write = write_file_by_copy if by_copy else write_file
                mine.update(write(self, out, names[i], layout.headers[i], tensors))
        fault_point(comm.rank, "export")
        gathered = comm.allgather(mine)
        hashes: dict[str, str] = {}
        if comm.rank == 0:
            for g in gathered:
                hashes.update(g)
        return layout, hashes


def _crc_zeros(n: int, crc: int) -> int:
    """crc extended over n zero bytes (the edge padding)."""
    while n > 0:
        k = min(n, len(_ZEROS))
        crc = crc32c(memoryview(_ZEROS)[:k], crc)
        n -= k
    return crc


def _chunk_bytes(t: TensorPlan) -> int:
    """Bytes of one stored block's data: a full block (edge blocks are padded), or one element."""
    return t.block_rows * t.row_elems * DTYPES[t.out_dtype][1] if t.shape else DTYPES[t.out_dtype][1]


def _async_fs(loc: Location) -> Any:
    """zarr's FsspecStore wants an async file system; wrap a sync one if needed."""
    fs = loc.fs
    if getattr(fs, "async_impl", False):
        if not getattr(fs, "asynchronous", False):
            import fsspec

            fs = fsspec.filesystem(
                fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0],
                asynchronous=True,
                **loc.storage_options,
            )
        return fs
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

    return AsyncFileSystemWrapper(fs)


def open_store(loc: Location, plan: Plan | None = None) -> BlockStore:
    return BlockStore(loc)


def write_file(
    store: BlockStore, out: Location, name: str, header: bytes, tensors: list[TensorPlan], prefetch: int = 3
) -> dict[str, str]:
    """Stream one output file from the store; reads run ahead on threads.

    Every block is checked against the CRC-32C stored with it, and the tensor's checksum for
    the manifest is combined from its blocks' checksums: the bytes are not hashed again.
    """
    loc = out.join(name)
    sums: dict[str, str] = {}
    biggest = max((t.block_rows * t.row_elems * DTYPES[t.out_dtype][1] for t in tensors), default=0)
    # A small ring of buffers, reused for every block: no page faults per block.
    ring = [np.empty(biggest + 4, dtype=np.uint8) for _ in range(prefetch + 1)]  # + the block's crc32c
    blocks = [(t, b) for t in tensors for b in range(t.n_blocks)]

    def write() -> None:
        # The whole file again on a retry: a streamed upload cannot resume mid-way.
        sums.clear()
        loc.fs.makedirs(out.path, exist_ok=True)
        with (
            ThreadPoolExecutor(max_workers=prefetch, thread_name_prefix="bigmerge-export") as pool,
            loc.fs.open(loc.path, "wb") as f,
        ):
            f.write(header)
            pending: deque[Future[tuple[np.ndarray, int]]] = deque()
            nxt = 0
            crc = 0
            for k, (t, b) in enumerate(blocks):
                # a ring slot is free again once its block is written (the main thread writes in order)
                while nxt < len(blocks) and nxt - k < min(prefetch, len(ring) - 1):
                    tt, bb = blocks[nxt]
                    pending.append(pool.submit(store.read_block, tt, bb, ring[nxt % len(ring)]))
                    nxt += 1
                data, block_crc = pending.popleft().result()
                crc = block_crc if b == 0 else combine(crc, block_crc, data.nbytes)
                f.write(memoryview(data).cast("B"))
                if b == t.n_blocks - 1:
                    sums[t.name] = hex32(crc)
            for t in tensors:
                if t.n_blocks == 0:
                    sums[t.name] = hex32(0)

    loc.call("writing the output file", write)
    return sums


def _copy_possible(store: BlockStore, out: Location) -> bool:
    """Whether the output files can be assembled from the store's shards by the server itself:
    both on S3 (UploadPartCopy), through the same kind of file system."""
    return (
        not out.is_local
        and hasattr(out.fs, "call_s3")
        and type(store.loc.fs) is type(out.fs)
        and os.environ.get("BIGMERGE_NO_SERVER_COPY") != "1"
    )


def write_file_by_copy(
    store: BlockStore, out: Location, name: str, header: bytes, tensors: list[TensorPlan]
) -> dict[str, str]:
    """One output file on S3 made by a multipart upload whose parts the server copies from the
    store's shards (UploadPartCopy): a block of S3_MIN_PART bytes or more never travels through
    this rank. The header, small tensors and small edge blocks are read and sent as parts of
    their own (a part but the last must be S3_MIN_PART or more). Each tensor's checksum is
    combined from the CRC-32C at the start of each of its shards."""
    fs = out.fs
    loc = out.join(name)
    bucket, key = fs.split_path(loc.path)[:2]
    sums: dict[str, str] = {}
    copied = [0, 0]  # blocks, bytes

    def run() -> None:
        sums.clear()
        copied[:] = [0, 0]
        upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
        parts: list[dict[str, Any]] = []
        pending = bytearray(header)

        def put() -> None:
            r = fs.call_s3(
                "upload_part", Bucket=bucket, Key=key, UploadId=upload, PartNumber=len(parts) + 1, Body=bytes(pending)
            )
            parts.append({"PartNumber": len(parts) + 1, "ETag": r["ETag"]})
            pending.clear()

        try:
            for t in tensors:
                crc = 0
                for b in range(t.n_blocks):
                    n = t.block_out_bytes(b)
                    # a large block is copied, unless the part being filled is too small to
                    # stand alone: then the block is read and joins it
                    if n >= S3_MIN_PART and not 0 < len(pending) < S3_MIN_PART:
                        if pending:
                            put()
                        shard = store.shard_loc(t, b)
                        own = int.from_bytes(shard.read_bytes(0, PREFIX), "little")
                        src_bucket, src_key = fs.split_path(shard.path)[:2]
                        r = fs.call_s3(
                            "upload_part_copy",
                            Bucket=bucket,
                            Key=key,
                            UploadId=upload,
                            PartNumber=len(parts) + 1,
                            CopySource={"Bucket": src_bucket, "Key": src_key},
                            CopySourceRange=f"bytes={PREFIX}-{PREFIX + n - 1}",
                        )
                        parts.append({"PartNumber": len(parts) + 1, "ETag": r["CopyPartResult"]["ETag"]})
                        crc = own if b == 0 else combine(crc, own, n)
                        copied[0] += 1
                        copied[1] += n
                        continue
                    data, own = store.read_block(t, b)
                    pending += memoryview(data).cast("B")
                    crc = own if b == 0 else combine(crc, own, n)
                    if len(pending) >= S3_MIN_PART:
                        put()
                sums[t.name] = hex32(crc)
            if pending or not parts:
                put()
            fs.call_s3(
                "complete_multipart_upload",
                Bucket=bucket,
                Key=key,
                UploadId=upload,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            with contextlib.suppress(Exception):
                fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload)
            raise

    loc.call("assembling the output file from the store (server-side copy)", run)
    fs.invalidate_cache(loc.path)
    COPY_STATS["blocks"] += copied[0]
    COPY_STATS["bytes"] += copied[1]
    return sums


COPY_STATS = {"blocks": 0, "bytes": 0}  # blocks (and bytes) the server copied, in this process
