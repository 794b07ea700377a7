"""`bigmerge merge` from top to bottom: plan on rank 0, broadcast, execute, export."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import posixpath
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from bigmerge import errors
from bigmerge.engine.comm import Comm
from bigmerge.engine.device import pick_device, share_cores
from bigmerge.engine.executor import DEFAULT_CACHE_BYTES, execute
from bigmerge.engine.progress import Progress
from bigmerge.engine.reader import BlockReader
from bigmerge.errors import BigmergeError, ConfigError, SourceError
from bigmerge.log import Log
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
    remove_output,
)
from bigmerge.output.zarr_store import PLAN_FILE, BlockStore
from bigmerge.planning.catalog import ModelCatalog, catalog_models
from bigmerge.planning.config import MergeConfig, load_config_and_text, parse_config, read_yaml_documents
from bigmerge.planning.lora import split_ref, term_files
from bigmerge.planning.plan import DEFAULT_BLOCK_BYTES, Plan, build_plan
from bigmerge.planning.stages import Stage, plan_stages, scratch_dir, skipped_stages
from bigmerge.planning.vocab import TOKENIZER_FILES
from bigmerge.storage.fs import Location, location, retries_done
from bigmerge.storage.safetensors import DTYPES


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
    intermediate_dir: str | None = None  # multi-document configs: where named merges are kept (else scratch)
    verify_sources: str = "stat"  # stat: size/mtime/inode or ETag/version; hash: also a CRC-32C of every byte
    # mergekit's --out-shard-size: parameters per output file (shard_bytes = that times the output dtype's bytes)
    shard_params: int | None = None
    copy_tokenizer: bool = True  # mergekit's --no-copy-tokenizer: False
    write_card: bool = True  # mergekit's --no-write-model-card: False (the config is still written)
    # tensors over cache_bytes between statistics passes: auto spills those with a far source
    # (object storage, a network file system) and reads local ones again; always | never
    spill: str = "auto"


def shard_bytes_of(opts: MergeOptions, plan: Plan) -> int:
    """The largest output file in bytes: --shard-size, or mergekit's parameter count times the
    widest output dtype."""
    if opts.shard_params is None:
        return opts.shard_bytes
    return opts.shard_params * max((DTYPES[t.out_dtype][1] for t in plan.tensors), default=2)


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
    inputs: list[tuple[str, str]] = []
    for ref in cfg.model_refs():
        base, adapter = split_ref(ref)
        inputs.append(("source model", base))
        if adapter is not None:
            inputs.append(("LoRA adapter", adapter))
    source = cfg.vocabulary_source()
    if source not in (None, "base", "union"):
        inputs.append(("tokenizer_source", str(source)))
    return inputs


def aux_inputs(plan: Plan) -> list[tuple[str, str]]:
    """The directories of the statistics and coefficients files the plan reads."""
    files = {a.file for t in plan.tensors for per in t.aux for a in per.values()}
    return [("statistics/coefficients directory", posixpath.dirname(f.rstrip("/"))) for f in sorted(files)]


def source_files(plan: Plan) -> list[str]:
    """Every file whose bytes the merge reads: the sources' safetensors files and the aux files."""
    files = {s.file for t in plan.tensors for s in t.sources}
    files |= {f for t in plan.tensors for s in t.sources if s.lora for f in term_files(s.lora)}
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


@dataclass
class Shared:
    """What rank 0 works out and broadcasts to every rank: the plan, the writer and how to reach storage."""

    plan_json: str
    store_url: str
    writer: str  # direct | zarr
    storage_options: dict[str, Any] | None


@dataclass
class Prepared:
    """Rank 0's own side of the preparation, which export needs (the other ranks have none)."""

    cfg: MergeConfig
    config_text: str  # the config as given, written beside the weights as the recipe
    catalogs: list[ModelCatalog]
    plan: Plan
    store: BlockStore | DirectStore
    out: Location
    outdir: OutputDir
    pins: dict[str, dict[str, Any]]


@dataclass
class RankReport:
    """What each rank did, gathered for the summary."""

    blocks_done: int
    blocks_skipped: int
    bytes_read: int
    retries: int  # storage calls retried by this process during the run
    exec_s: float
    direct_bytes: int  # written with O_DIRECT (the direct writer)
    bytes_spilled: int  # source bytes kept on local scratch between statistics passes (engine/spill.py)
    peak_rss: int
    peak_gpu: int  # the GPU's peak from torch's allocator (what the operators held there)


def run_merge(config_path: str, out_url: str, comm: Comm, opts: MergeOptions) -> dict[str, Any]:
    """Merge the config at config_path into out_url; a multi-document config (mergekit-multi)
    runs its merges in order, each one a whole merge with OUT's rules (bigmerge.planning.stages)."""
    planned = _collective(comm, lambda: _stages(config_path, out_url, opts))
    if planned is None:
        return _run_merge(config_path, None, out_url, comm, opts)
    stages, skipped = planned
    log = Log(rank=comm.rank, quiet=opts.quiet)
    if skipped:
        log.warning(
            f"the final merge does not need {', '.join(map(repr, skipped))}: not merged (--intermediate-dir keeps every merge)"
        )
    summary: dict[str, Any] = {}
    for k, stage in enumerate(stages):
        log(f"{stage.label} ({k + 1} of {len(stages)}) -> {stage.out}")
        if not stage.final and _collective(comm, functools.partial(_finished_stage, config_path, stage)):
            log(f"{stage.label}: {stage.out} already holds it (same config, sources unchanged); reused")
            continue
        # an intermediate merge keeps its store under its own OUT (one --store cannot serve two merges)
        stage_opts = opts if stage.final else dataclasses.replace(opts, store=None)
        summary = _run_merge(config_path, stage, stage.out, comm, stage_opts)
    if opts.intermediate_dir is None:
        _collective(comm, lambda: _remove_scratch(stages, out_url, opts))
    summary["stages"] = [s.name for s in stages]
    return summary


def _stages(config_path: str, out_url: str, opts: MergeOptions) -> tuple[list[Stage], list[str]] | None:
    """The merges of a multi-document config in order, and those left out; None for a plain
    (one-document) config."""
    docs = read_yaml_documents(config_path)
    if len(docs) <= 1:
        return None
    stages = plan_stages(docs, config_path, out_url, opts.intermediate_dir)
    # Every merge's OUT apart from every input of every merge, before the first one writes: a
    # model that only a later merge reads must not receive an earlier merge's output either.
    outs = {s.out for s in stages}
    inputs: list[tuple[str, str]] = []
    for s in stages:
        cfg = _stage_config(config_path, s)
        inputs += [(kind, ref) for kind, ref in config_inputs(cfg) if ref not in outs]
        check_distinct_sources(cfg.model_refs(), cfg.storage_options)
    final_opts = _stage_config(config_path, stages[-1]).storage_options  # the final merge runs last
    for s in stages:
        check_apart(location(s.out, final_opts), None, inputs, final_opts)
    return stages, skipped_stages(docs, stages)


def _stage_config(config_path: str, stage: Stage) -> MergeConfig:
    return parse_config(stage.config, f"{config_path} ({stage.label})")


def _finished_stage(config_path: str, stage: Stage) -> bool:
    """An intermediate merge already finished in its OUT from this very config and unchanged
    sources (mergekit-multi's lazy reuse; a rerun after a failure in a later merge)."""
    cfg = _stage_config(config_path, stage)
    outdir = OutputDir(location(stage.out, cfg.storage_options))
    if not outdir.out.exists() or not outdir.finished():
        return False
    rec = outdir.read_record()
    if rec is None or rec.get("config") != cfg.fingerprint():
        return False
    pins = rec.get("sources") or {}
    return changed_source(pins, pin_sources(list(pins), cfg.storage_options, "stat")) is None


def _remove_scratch(stages: list[Stage], out_url: str, opts: MergeOptions) -> None:
    """The intermediate merges in scratch, once the final one is done: only what bigmerge wrote."""
    storage_options = None
    for stage in stages:
        if stage.final:
            storage_options = parse_config(stage.config, "config").storage_options
    for stage in stages:
        if not stage.final:
            remove_output(location(stage.out, storage_options))
    scratch = location(scratch_dir(out_url), storage_options)
    if scratch.exists() and not scratch.listdir():
        scratch.remove(recursive=True)


def _run_merge(config_path: str, stage: Stage | None, out_url: str, comm: Comm, opts: MergeOptions) -> dict[str, Any]:
    """One merge: plan on rank 0, broadcast, execute on every rank, check the sources, export; the summary."""
    t0 = time.perf_counter()
    retries0 = retries_done()  # the counter is per process; this run's share is the difference
    log = Log(rank=comm.rank, quiet=opts.quiet)
    device = pick_device(opts.device)  # before anything is written: a missing GPU is known now
    share_cores()
    return_freed_memory()
    held: list[OutputLock] = []  # rank 0's lock on OUT, released however the run ends
    try:
        prep, shared = _collective_pair(comm, lambda: prepare(config_path, stage, out_url, comm.size, opts, held))
        plan = prep.plan if prep else Plan.from_json(shared.plan_json)
        out = prep.out if prep else location(out_url, shared.storage_options)
        store = prep.store if prep else open_store(shared, out, plan, opts)
        for w in plan.warnings:
            log.warning(w)
        done = _collective(comm, store.done_blocks)
        t_exec, stats = _execute(plan, comm, store, done, shared.storage_options, opts, device, log)
        t_merge = time.perf_counter() - t0
        # every source byte has been read: a source replaced meanwhile would make a mixed output
        _collective(comm, lambda: check_unchanged(prep.pins if prep else {}, shared.storage_options))
        log("exporting safetensors")
        export(
            plan,
            comm,
            store,
            out,
            prep.catalogs if prep else None,
            shard_bytes=shard_bytes_of(opts, plan),
            tokenizer_source=prep.cfg.vocabulary_source() if prep else None,
            add_tokens=tuple(prep.cfg.tokenizer.tokens or ()) if prep and prep.cfg.tokenizer else (),
            copy_tokenizer=opts.copy_tokenizer,
            write_card=opts.write_card,
            chat_template=prep.cfg.chat_template if prep else None,
            outdir=prep.outdir if prep else None,
            pins=prep.pins if prep else None,
            pin_mode=opts.verify_sources,
            config_text=prep.config_text if prep else None,
        )
        if comm.rank == 0 and not opts.keep_store:
            store.loc.remove(recursive=True)
            if opts.allow_bin:
                out.join(BIN_CACHE).remove(recursive=True)
        for lock in held:
            lock.release()  # the last write is done (and the release's storage calls count in the summary)
        report = RankReport(
            blocks_done=stats.blocks_done,
            blocks_skipped=stats.blocks_skipped,
            bytes_read=stats.bytes_read,
            retries=retries_done() - retries0,
            exec_s=t_exec,
            direct_bytes=getattr(store, "direct_bytes", 0),
            bytes_spilled=stats.bytes_spilled,
            peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            peak_gpu=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
        )
        reports: list[RankReport] = comm.allgather(report)
        return summarize(out, plan, reports, len(done), time.perf_counter() - t0, t_merge, device, log)
    finally:
        for lock in held:
            lock.release()


def _collective_pair(comm: Comm, fn: Any) -> tuple[Prepared | None, Shared]:
    """prepare() on rank 0; every rank gets the Shared part, rank 0 keeps its Prepared too."""
    kept: list[Prepared] = []

    def on_rank0() -> Shared:
        prep, shared = fn()
        kept.append(prep)
        return shared

    shared: Shared = _collective(comm, on_rank0)
    return (kept[0] if kept else None), shared


def prepare(
    config_path: str,
    stage: Stage | None,
    out_url: str,
    world_size: int,
    opts: MergeOptions,
    held: list[OutputLock],
) -> tuple[Prepared, Shared]:
    """Rank 0: read and check the config, keep OUT apart from every input, plan, take the lock
    on OUT, pin the sources, claim OUT's names and open the writer. Nothing is written to OUT
    before every check that can refuse the merge has passed."""
    if stage is None:
        cfg, config_text = load_config_and_text(config_path)
    else:  # one merge of a multi-document config: its own recipe, sources resolved
        cfg = _stage_config(config_path, stage)
        config_text = yaml.safe_dump(stage.config, sort_keys=False)
    opts_s = cfg.storage_options
    if not out_url.strip():  # "$OUT" of an unset variable: not the current directory
        raise ConfigError("OUT is empty: give the directory or URL to write the merged model to")
    out = location(out_url, opts_s)
    store_loc = location(opts.store, opts_s) if opts.store else out.join(STORE_DIR)
    own_store = store_loc if opts.store and relation(store_loc, out) not in ("is", "lies inside") else None
    check_distinct_sources(cfg.model_refs(), opts_s)
    check_apart(out, own_store, config_inputs(cfg), opts_s)
    check_tokenizer_source(cfg.vocabulary_source(), opts_s)
    plan, catalogs = plan_merge(cfg, world_size, opts, out.join(BIN_CACHE) if opts.allow_bin else None)
    # the catalogs' roots too: a bare PEFT adapter directory's base is known only from its config
    base_roots = [("source model", c.root.url) for c in catalogs]
    check_apart(out, own_store, aux_inputs(plan) + base_roots, opts_s)
    if own_store is not None:
        check_store(own_store, PLAN_FILE)
    lock = OutputLock(out)
    lock.acquire()
    held.append(lock)
    pins = pin_sources(source_files(plan), opts_s, opts.verify_sources, threads=max(1, opts.io_threads))
    outdir = OutputDir(out)
    names = {*Layout.of(plan, shard_bytes_of(opts, plan)).names, *META_NAMES, *TOKENIZER_FILES, *OWN_DIRS, *CARD_NAMES}
    outdir.claim(
        plan=plan.fingerprint(),
        config=plan.config_fingerprint,
        names=names,
        pins=pins,
        pin_mode=opts.verify_sources,
        overwrite=opts.overwrite,
    )
    kind = writer_kind(opts, out)
    shard_bytes = shard_bytes_of(opts, plan)
    store = DirectStore(out, plan, shard_bytes, opts.direct_io) if kind == "direct" else BlockStore(store_loc)
    store.prepare(plan, opts.overwrite)
    clear_finished_markers(out)
    prep = Prepared(cfg, config_text, catalogs, plan, store, out, outdir, pins)
    return prep, Shared(plan.to_json(), store_loc.url, kind, opts_s)


def open_store(shared: Shared, out: Location, plan: Plan, opts: MergeOptions) -> BlockStore | DirectStore:
    """The other ranks' handle on the writer rank 0 prepared."""
    if shared.writer == "direct":
        return DirectStore(out, plan, shard_bytes_of(opts, plan), opts.direct_io)
    return BlockStore(location(shared.store_url, shared.storage_options))


class ProgressReport:
    """Rank 0's progress bar shows the bytes of every rank; the others report to it at most once a second."""

    def __init__(self, comm: Comm, plan: Plan, enabled: bool) -> None:
        self.comm = comm
        self.bar = Progress(sum(plan.rank_bytes()), enabled=enabled, desc="merge", ranks=comm.size)
        self.bytes = 0
        self.sent = 0.0

    def on_block(self, n: int) -> None:
        self.bytes += n
        if self.comm.rank == 0:
            self.bar.set(self.bytes + sum(self.comm.poll_progress().values()))
        elif time.perf_counter() - self.sent >= 1.0:
            self.sent = time.perf_counter()
            self.comm.send_progress(self.bytes)

    def finish(self) -> None:
        self.comm.send_progress(self.bytes, final=True)
        self.comm.drain_progress()

    def close(self) -> None:
        self.bar.close()


def _execute(
    plan: Plan,
    comm: Comm,
    store: BlockStore | DirectStore,
    done: set[Any],
    storage_options: dict[str, Any] | None,
    opts: MergeOptions,
    device: torch.device,
    log: Log,
) -> tuple[float, Any]:
    """Every rank merges its blocks (those not already done) into the writer; (seconds, stats)."""
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
    progress = ProgressReport(comm, plan, enabled=comm.rank == 0 and not opts.quiet)
    t0 = time.perf_counter()
    try:
        stats = execute(
            plan,
            comm,
            store,
            reader,
            done,
            cache_bytes=opts.cache_bytes,
            on_block=progress.on_block,
            device=device,
            spill=opts.spill,
        )
        progress.finish()
    finally:
        reader.close()
        progress.close()
    return time.perf_counter() - t0, stats


def summarize(
    out: Location,
    plan: Plan,
    reports: list[RankReport],
    resumed: int,
    wall: float,
    merge_s: float,
    device: torch.device,
    log: Log,
) -> dict[str, Any]:
    """The run's summary (returned, and printed as the last line), from every rank's report."""
    peak = [r.peak_rss for r in reports]
    gpu_peak = [r.peak_gpu for r in reports]
    summary = {
        "out": out.url,
        "tensors": len(plan.tensors),
        "blocks_computed": sum(r.blocks_done for r in reports),
        "blocks_resumed": resumed,
        "bytes_read": sum(r.bytes_read for r in reports),
        "io_retries": sum(r.retries for r in reports),
        "direct_io_bytes": sum(r.direct_bytes for r in reports),
        "bytes_spilled": sum(r.bytes_spilled for r in reports),
        "wall_s": round(wall, 3),
        "merge_s": round(merge_s, 3),
        "peak_rss_bytes_per_rank": peak,
        "peak_gpu_bytes_per_rank": gpu_peak,
        "ranks": len(reports),
        "per_rank": [
            {"rank": i, "exec_s": round(r.exec_s, 3), "blocks": r.blocks_done, "bytes_read": r.bytes_read}
            for i, r in enumerate(reports)
        ],
    }
    if len(reports) > 1:
        times = [r.exec_s for r in reports]
        mean = sum(times) / len(times)
        slowest = max(range(len(times)), key=times.__getitem__)
        per = ", ".join(f"r{i} {r.exec_s:.1f}s/{r.blocks_done}blk" for i, r in enumerate(reports[:16]))
        more = f", ... ({len(reports) - 16} more)" if len(reports) > 16 else ""
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
