"""The I/O floor of a merge, run as a child of tools/bench.py so it is timed like the merges.

Usage::

    python tools/bench_floor.py --write OUT_FILE --size BYTES [--fsync] INPUT_FILE...

Reads every byte of every INPUT_FILE once (64 MiB ``readinto`` calls into one reused buffer,
unbuffered, so nothing is decoded or copied beyond the kernel's copy out of the page cache),
then writes BYTES bytes to OUT_FILE, a fresh file (removed first if present), in 64 MiB writes,
and closes it: buffered, or with ``--direct`` by O_DIRECT as bigmerge's direct writer writes
(on a VM whose host reclaims free guest memory a buffered write costs a core about 1 s per
GB of copying into fresh page-cache pages; a direct write costs the guest almost nothing). No fsync unless ``--fsync``: neither bigmerge nor mergekit fsyncs its output,
so by default all three leave dirty pages for the kernel to write back, and bench.py runs
``sync`` (untimed) after each of them. Prints one JSON line: read_s, write_s, read_bytes,
written_bytes.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import time

CHUNK = 64 << 20


def read_all(paths: list[str], buf: bytearray) -> int:
    view = memoryview(buf)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return total


def write_fresh(path: str, size: int, buf: bytearray, *, fsync: bool) -> int:
    if os.path.exists(path):
        os.unlink(path)
    view = memoryview(buf)
    left = size
    with open(path, "wb", buffering=0) as f:
        while left > 0:
            n = f.write(view[: min(left, len(view))])
            left -= n
        if fsync:
            os.fsync(f.fileno())
    return size


def write_direct(path: str, size: int) -> bool:
    """Write `size` bytes with O_DIRECT from a page-aligned buffer (the tail, less than a page,
    through the page cache), as bigmerge's direct writer does; False where the file system
    refuses O_DIRECT (nothing written then)."""
    if os.path.exists(path):
        os.unlink(path)
    buf = mmap.mmap(-1, CHUNK)  # page-aligned
    buf.write(b"\1" * CHUNK)
    view = memoryview(buf)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except (OSError, AttributeError):
        return False
    try:
        body = size - size % 4096
        done = 0
        while done < body:
            done += os.pwrite(fd, view[: min(body - done, CHUNK)], done)
    finally:
        os.close(fd)
    with open(path, "r+b", buffering=0) as f:
        f.seek(body)
        f.write(view[: size - body])
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", required=True, help="output file to create")
    ap.add_argument("--size", type=int, required=True, help="bytes to write")
    ap.add_argument("--fsync", action="store_true", help="fsync the output before closing it")
    ap.add_argument(
        "--direct", action="store_true", help="write with O_DIRECT (as bigmerge's direct writer); else buffered"
    )
    ap.add_argument("inputs", nargs="+")
    args = ap.parse_args()
    buf = bytearray(CHUNK)
    t0 = time.perf_counter()
    nread = read_all(args.inputs, buf)
    t1 = time.perf_counter()
    direct = args.direct and write_direct(args.write, args.size)
    if not direct:
        write_fresh(args.write, args.size, buf, fsync=args.fsync)
    t2 = time.perf_counter()
    out = {"read_s": t1 - t0, "write_s": t2 - t1, "read_bytes": nread, "written_bytes": args.size, "direct": direct}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
