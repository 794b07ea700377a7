"""`bigmerge merge` from top to bottom: plan on rank 0, broadcast, execute, export."""

from __future__ import annotations

import ctypes
import posixpath
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bigmerge import errors
from bigmerge.engine.comm import Comm
from bigmerge.engine.device import pick_device, share_cores
from bigmerge.engine.executor import DEFAULT_CACHE_BYTES, execute
from bigmerge.engine.progress import Progress
from bigmerge.engine.reader import BlockReader
from bigmerge.errors import BigmergeError, ConfigError, SourceError
from bigmerge.output.card import CARD_NAMES
from bigmerge.output.direct import DirectStore
from bigmerge.output.export import (
    DEFAULT_SHARD_BYTES,
    check_tokenizer_source,
    clear_finished_markers,
    export,
)
from bigmerge.output.layout import Layout
from bigmerge.output.outdir import (
    BIN_CACHE,
    META_NAMES,
    OWN_DIRS,
    STORE_DIR,
    OutputDir,
    OutputLock,
    changed_source,
    check_apart,
    check_distinct_sources,
    check_store,
    pin_sources,
    relation,
)
from bigmerge.output.zarr_store import PLAN_FILE, BlockStore
from bigmerge.planning.catalog import ModelCatalog, catalog_models
from bigmerge.planning.config import MergeConfig, load_config
from bigmerge.planning.plan import DEFAULT_BLOCK_BYTES, Plan, build_plan
from bigmerge.planning.vocab import TOKENIZER_FILES
from bigmerge.storage.fs import Location, location, retries_done


@dataclass
class MergeOptions:
    block_bytes: int = DEFAULT_BLOCK_BYTES
    shard_bytes: int = DEFAULT_SHARD_BYTES
    cache_bytes: int = DEFAULT_CACHE_BYTES
    io_threads: int = 4
    prefetch: int = 2
    seed: int | None = None
    store: str | None = None
    writer: str = "auto"  # direct | zarr | auto (direct for a local OUT without --store)
    direct_io: bool = True  # the direct writer's page-aligned blocks with O_DIRECT (--buffered-writes: off)
    overwrite: bool = False
    keep_store: bool = False
    quiet: bool = False
    device: str = "cpu"
    allow_nonfinite: bool = False
    allow_bin: bool = False  # pickle checkpoints, converted under OUT/.bigmerge-bin-cache
    verify_sources: str = "stat"  # stat: size/mtime/inode or ETag/version; hash: also a CRC-32C of every byte


def _collective(comm: Comm, fn: Any) -> Any:
    """Run fn on rank 0 and broadcast its result, or its user error, to every rank."""
    result: Any = None
    error: tuple[str, str] | None = None
    if comm.rank == 0:
        try:
            result = fn()
        except BigmergeError as exc:
            if comm.size == 1:
                raise
            error = (type(exc).__name__, str(exc))
    result, error = comm.bcast((result, error))
    if error is not None:
        # Every rank raises the same error, marked as known to all: nobody needs to abort.
        cls = getattr(errors, error[0], BigmergeError)
        exc = cls(error[1])
        exc.collective = True  # type: ignore[attr-defined]
        raise exc
    return result


def return_freed_memory() -> None:
    """Make glibc give large freed buffers back to the system.

    By default glibc serves a large allocation by mmap, but every time such a buffer is freed
    it raises that threshold to the buffer's size, so later blocks come from the per-thread
    heaps, which fragment and are seldom returned: peak RSS grew with the model (1.9 GB for
    4 x 2.5 GB sources, against 1.0 GB with this). A fixed threshold turns that off; the hot
    buffers are pooled (reader, scratch), so the extra page faults are few.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
        # Setting it also fixes M_TRIM_THRESHOLD at 128 KiB, and the heap then gave its top back
        # after nearly every free: the per-tensor statistics (histograms of 256-512 KiB) and
        # their reductions faulted fresh pages in again each time (ties on 4 x 1 GB: 270k extra
        # page faults). Heap chunks are all under 1 MiB, so keeping 64 MiB of them is bounded.
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc


def writer_kind(opts: MergeOptions, out: Location) -> str:
    """direct (blocks written in place, one write of every byte) wherever OUT is a POSIX path,
    unless OUT holds an interrupted merge of the zarr writer: that one is resumed."""
    if opts.writer == "direct" and not out.is_local:
        raise ConfigError(
            f"{out.url}: --writer direct needs a local or mounted path; object storage takes --writer zarr"
        )
    if opts.writer == "auto":
        if not out.is_local or opts.store or out.join(STORE_DIR, PLAN_FILE).exists():
            return "zarr"
        return "direct"
    return opts.writer


def plan_merge(
    cfg: MergeConfig, world_size: int, opts: MergeOptions, bin_cache: Location | None = None
) -> tuple[Plan, list[ModelCatalog]]:
    catalogs = catalog_models(cfg.model_refs(), cfg.storage_options, bin_cache)
    plan = build_plan(cfg, catalogs, block_bytes=opts.block_bytes, seed=opts.seed, world_size=world_size)
    return plan, catalogs


def config_inputs(cfg: MergeConfig) -> list[tuple[str, str]]:
    """The inputs a config names: its models and a tokenizer_source path."""
    inputs = [("source model", ref) for ref in cfg.model_refs()]
    if cfg.tokenizer_source not in (None, "base", "union"):
        inputs.append(("tokenizer_source", str(cfg.tokenizer_source)))
    return inputs


def aux_inputs(plan: Plan) -> list[tuple[str, str]]:
    """The directories of the statistics and coefficients files the plan reads."""
    files = {a.file for t in plan.tensors for per in t.aux for a in per.values()}
    return [("statistics/coefficients directory", posixpath.dirname(f.rstrip("/"))) for f in sorted(files)]


def source_files(plan: Plan) -> list[str]:
    """Every file whose bytes the merge reads: the sources' safetensors files and the aux files."""
    files = {s.file for t in plan.tensors for s in t.sources}
    files |= {a.file for t in plan.tensors for per in t.aux for a in per.values()}
    return sorted(files)


def check_unchanged(pins: dict[str, dict[str, Any]], storage_options: dict[str, Any] | None) -> None:
    """After the last read of source bytes: every source file still as pinned (size, mtime,
    inode / ETag, version; the content CRC is not read again)."""
    now = pin_sources(list(pins), storage_options, "stat")
    cheap = {url: {k: v for k, v in pin.items() if k in now.get(url, {})} for url, pin in pins.items()}
    changed = changed_source(cheap, now)
    if changed:
        raise SourceError(
            f"{changed}: changed while the merge was reading it; nothing was exported (the output would mix "
            "old and new bytes). Rerun with --overwrite to merge the sources as they are now"
        )


def run_merge(config_path: str, out_url: str, comm: Comm, opts: MergeOptions) -> dict[str, Any]:
    t0 = time.perf_counter()
    retries0 = retries_done()  # the counter is per process; this run's share is the difference
    log = _logger(comm, opts.quiet)
    device = pick_device(opts.device)  # before anything is written: a missing GPU is known now
    share_cores()
    return_freed_memory()
    state: dict[str, Any] = {}
    held: list[OutputLock] = []  # rank 0's lock on OUT, released however the run ends
    try:
        return _run(config_path, out_url, comm, opts, t0, retries0, log, device, state, held)
    finally:
        for lock in held:
            lock.release()


def _run(
    config_path: str,
    out_url: str,
    comm: Comm,
    opts: MergeOptions,
    t0: float,
    retries0: int,
    log: Any,
    device: torch.device,
    state: dict[str, Any],
    held: list[OutputLock],
) -> dict[str, Any]:

    def prepare() -> tuple[str, str, str]:
        cfg = load_config(config_path)
        state["config_text"] = Path(config_path).read_text(encoding="utf-8")  # the recipe, written beside the weights
        opts_s = cfg.storage_options
        out = location(out_url, opts_s)
        store_loc = location(opts.store, opts_s) if opts.store else out.join(STORE_DIR)
        own_store = store_loc if opts.store and relation(store_loc, out) not in ("is", "lies inside") else None
        # nothing is written before OUT and --store are known to be apart from every input
        check_distinct_sources(cfg.model_refs(), opts_s)
        check_apart(out, own_store, config_inputs(cfg), opts_s)
        check_tokenizer_source(cfg.tokenizer_source, opts_s)
        plan, catalogs = plan_merge(cfg, comm.size, opts, out.join(BIN_CACHE) if opts.allow_bin else None)
        check_apart(out, own_store, aux_inputs(plan), opts_s)
        if own_store is not None:
            check_store(own_store, PLAN_FILE)
        lock = OutputLock(out)
        lock.acquire()
        held.append(lock)
        pins = pin_sources(source_files(plan), opts_s, opts.verify_sources, threads=max(1, opts.io_threads))
        outdir = OutputDir(out)
        names = {*Layout.of(plan, opts.shard_bytes).names, *META_NAMES, *TOKENIZER_FILES, *OWN_DIRS, *CARD_NAMES}
        outdir.claim(
            plan=plan.fingerprint(),
            config=plan.config_fingerprint,
            names=names,
            pins=pins,
            pin_mode=opts.verify_sources,
            overwrite=opts.overwrite,
        )
        kind = writer_kind(opts, out)
        store = DirectStore(out, plan, opts.shard_bytes, opts.direct_io) if kind == "direct" else BlockStore(store_loc)
        store.prepare(plan, opts.overwrite)
        clear_finished_markers(out)
        state.update(cfg=cfg, catalogs=catalogs, plan=plan, store=store, out=out, outdir=outdir, pins=pins)
        return plan.to_json(), store_loc.url, kind

    plan_json, store_url, kind = _collective(comm, prepare)
    plan = state.get("plan") or Plan.from_json(plan_json)
    cfg: MergeConfig | None = state.get("cfg")
    storage_options = cfg.storage_options if cfg else None
    storage_options = comm.bcast(storage_options)
    out: Location = state.get("out") or location(out_url, storage_options)
    store: BlockStore | DirectStore = state.get("store") or (
        DirectStore(out, plan, opts.shard_bytes, opts.direct_io)
        if kind == "direct"
        else BlockStore(location(store_url, storage_options))
    )
    for w in plan.warnings:
        log(f"warning: {w}")
    done = _collective(comm, store.done_blocks)
    total_blocks = sum(t.n_blocks for t in plan.tensors)
    log(
        f"merging {len(plan.tensors)} tensors ({total_blocks} blocks, {sum(t.in_bytes() for t in plan.tensors) / 1e9:.2f} GB "
        f"to read) from {len(plan.models)} models with {plan.merge_method} on {comm.size} rank(s)"
        + (f"; resuming: {len(done)} blocks already done" if done else "")
    )
    if device.type != "cpu":
        torch.cuda.set_device(device)
    log(
        f"computing on {device}" + (" (per rank: the node-local GPU)" if device.type != "cpu" and comm.size > 1 else "")
    )
    reader = BlockReader(
        plan, storage_options, threads=opts.io_threads, prefetch=opts.prefetch, allow_nonfinite=opts.allow_nonfinite
    )
    all_bytes = sum(plan.rank_bytes())
    progress = Progress(all_bytes, enabled=(comm.rank == 0 and not opts.quiet), desc="merge", ranks=comm.size)
    mine = {"bytes": 0, "sent": 0.0}

    def on_block(n: int) -> None:
        # rank 0 shows the sum over ranks; the others report to it at most every second
        mine["bytes"] += n
        if comm.rank == 0:
            others = comm.poll_progress()
            progress.set(mine["bytes"] + sum(others.values()))
        elif time.perf_counter() - mine["sent"] >= 1.0:
            mine["sent"] = time.perf_counter()
            comm.send_progress(mine["bytes"])

    t_exec0 = time.perf_counter()
    try:
        stats = execute(plan, comm, store, reader, done, cache_bytes=opts.cache_bytes, on_block=on_block, device=device)
        comm.send_progress(mine["bytes"], final=True)
        comm.drain_progress()
    finally:
        reader.close()
        progress.close()
    t_exec = time.perf_counter() - t_exec0
    t_merge = time.perf_counter() - t0
    # every source byte has been read: a source replaced meanwhile would make a mixed output
    _collective(comm, lambda: check_unchanged(state["pins"], storage_options))
    log("exporting safetensors")
    export(
        plan,
        comm,
        store,
        out,
        state.get("catalogs"),
        shard_bytes=opts.shard_bytes,
        tokenizer_source=cfg.tokenizer_source if cfg else None,
        chat_template=cfg.chat_template if cfg else None,
        outdir=state.get("outdir"),
        pins=state.get("pins"),
        pin_mode=opts.verify_sources,
        config_text=state.get("config_text"),
    )
    if comm.rank == 0 and not opts.keep_store:
        store.loc.remove(recursive=True)
        if opts.allow_bin:
            out.join(BIN_CACHE).remove(recursive=True)
    for lock in held:
        lock.release()  # the last write is done (and the release's storage calls count in the summary)
    wall = time.perf_counter() - t0
    peak = [g for g in comm.allgather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)]
    # the GPU's peak, from torch's allocator (what the operators held there), per rank
    gpu_peak = comm.allgather(torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0)
    blocks = comm.allgather(
        (
            stats.blocks_done,
            stats.blocks_skipped,
            stats.bytes_read,
            retries_done() - retries0,
            t_exec,
            getattr(store, "direct_bytes", 0),
            stats.bytes_spilled,
        )
    )
    summary = {
        "out": out.url,
        "tensors": len(plan.tensors),
        "blocks_computed": sum(b[0] for b in blocks),
        "blocks_resumed": len(done),
        "bytes_read": sum(b[2] for b in blocks),
        "io_retries": sum(b[3] for b in blocks),
        "direct_io_bytes": sum(b[5] for b in blocks),  # written with O_DIRECT (the direct writer)
        # source bytes kept on local scratch between statistics passes (engine/spill.py)
        "bytes_spilled": sum(b[6] for b in blocks),
        "wall_s": round(wall, 3),
        "merge_s": round(t_merge, 3),
        "peak_rss_bytes_per_rank": peak,
        "peak_gpu_bytes_per_rank": gpu_peak,
        "ranks": comm.size,
        "per_rank": [
            {"rank": r, "exec_s": round(b[4], 3), "blocks": b[0], "bytes_read": b[2]} for r, b in enumerate(blocks)
        ],
    }
    if comm.size > 1:
        times = [b[4] for b in blocks]
        mean = sum(times) / len(times)
        slowest = max(range(len(times)), key=times.__getitem__)
        per = ", ".join(f"r{r} {b[4]:.1f}s/{b[0]}blk" for r, b in enumerate(blocks[:16]))
        more = f", ... ({comm.size - 16} more)" if comm.size > 16 else ""
        log(
            f"per rank (merge time/blocks): {per}{more}; slowest rank {slowest}: {times[slowest] / max(mean, 1e-9):.2f}x the mean"
        )
    log(
        f"done: {out.url} ({summary['blocks_computed']} blocks computed, {summary['blocks_resumed']} resumed, "
        f"{summary['bytes_read'] / 1e9:.2f} GB read in {wall:.1f} s, "
        f"{summary['bytes_read'] / 1e9 / max(wall, 1e-9):.2f} GB/s, peak RSS {max(peak) / 2**20:.0f} MiB/rank"
        + (f", peak GPU memory {max(gpu_peak) / 2**20:.0f} MiB/rank" if device.type == "cuda" else "")
        + (f", {summary['direct_io_bytes'] / 1e9:.2f} GB written with O_DIRECT" if summary["direct_io_bytes"] else "")
        + (f", {summary['io_retries']} storage calls retried" if summary["io_retries"] else "")
        + (f", {summary['bytes_spilled'] / 1e9:.2f} GB spilled to local scratch" if summary["bytes_spilled"] else "")
        + ")"
    )
    return summary


def _logger(comm: Comm, quiet: bool) -> Any:
    def log(msg: str) -> None:
        if comm.rank == 0 and not quiet:
            print(f"bigmerge: {msg}", file=sys.stderr, flush=True)

    return log
