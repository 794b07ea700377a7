"""The I/O floor of a merge, run as a child of tools/bench.py so it is timed like the merges.

Usage::

    python tools/bench_floor.py --write OUT_FILE --size BYTES [--fsync] INPUT_FILE...

Reads every byte of every INPUT_FILE once (64 MiB ``readinto`` calls into one reused buffer,
unbuffered, so nothing is decoded or copied beyond the kernel's copy out of the page cache),
then writes BYTES bytes to OUT_FILE, a fresh file (removed first if present), in 64 MiB writes,
and closes it. No fsync unless ``--fsync``: neither bigmerge nor mergekit fsyncs its output,
so by default all three leave dirty pages for the kernel to write back, and bench.py runs
``sync`` (untimed) after each of them. Prints one JSON line: read_s, write_s, read_bytes,
written_bytes.
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", required=True, help="output file to create")
    ap.add_argument("--size", type=int, required=True, help="bytes to write")
    ap.add_argument("--fsync", action="store_true", help="fsync the output before closing it")
    ap.add_argument("inputs", nargs="+")
    args = ap.parse_args()
    buf = bytearray(CHUNK)
    t0 = time.perf_counter()
    nread = read_all(args.inputs, buf)
    t1 = time.perf_counter()
    nwritten = write_fresh(args.write, args.size, buf, fsync=args.fsync)
    t2 = time.perf_counter()
    print(
        json.dumps({"read_s": t1 - t0, "write_s": t2 - t1, "read_bytes": nread, "written_bytes": nwritten}), flush=True
    )


if __name__ == "__main__":
    main()
