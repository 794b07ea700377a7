"""What a merge will cost before it is launched: time and peak memory per rank.

The model (stated in docs/performance.md, checked against measured runs there):

- Every rank reads its blocks' bytes from every source once; the ranks of a node share
  the node's read bandwidth. Reads are prefetched and the direct writer writes on its own
  threads, so reading, the arithmetic and writing overlap: a rank spends max(read, compute,
  write) on its blocks (the zarr writer's export, a second write, comes after).
- Compute: the operator's throughput in source bytes per second per core, measured on the
  benchmark machine (`tools/bench.py`, medium preset, warm page cache): the time above the
  I/O floor divided into the bytes read. Operators with several statistics rounds (TIES and
  the other sparsifying ones) cost more per byte than single-pass ones (linear).
- Writes: each rank writes its output blocks once with the direct writer (a POSIX output:
  blocks land at their final offsets), twice with the zarr writer (object storage: the
  store, then the exported safetensors), sharing the node's write bandwidth.
- Statistics passes over a tensor too large for the cache (`--cache-size`), as the executor's
  --spill policy does them: spilled to local scratch as the first pass reads it, every later
  pass (the rounds, then apply) reading it back from there (engine/spill.py; one local write
  and `rounds` local reads at LOCAL_WRITE_GBPS and LOCAL_READ_GBPS), or read from its sources
  again by every later pass (`rounds` more reads at the read bandwidth).
- Start-up: STARTUP_S (interpreter, torch, headers, plan, the numba kernels loaded from their
  cache, the metadata and the manifest at the end), plus COMPILE_S when the kernels are not in
  numba's cache yet (tools/warm_kernels.py fills it at install time).
- The slowest rank sets the time; blocks are balanced by bytes, so that is about the mean.
- Memory per rank: `Plan.peak_memory_estimate` (a few blocks per source in flight, the
  operator's work buffers, the statistics cache), independent of the model's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bigmerge.planning.plan import Plan, block_memory, spills

# Source bytes merged per second per core, by operator family (GB/s), from tools/bench.py on
# the 2-core development machine (quiet, session 7): the merge phase (all of its passes) over
# 2 cores. 70B-shaped slice, 17.74 GB of bf16 sources: linear 4.1 s (2.2), model_stock 13.1 s
# (0.68), ties 17.4 s (0.51), dare_ties 13.8 s (0.64), breadcrumbs 19.2 s (0.46); slerp 5.3 s
# for 11.83 GB (1.1); della 45.9 s (0.19; on medium 0.195): its per-fiber ranks.
COMPUTE_GBPS_PER_CORE = {
    "single_pass": 2.2,  # linear, task_arithmetic, passthrough, nearswap, fisher, dam
    "statistics": 0.7,  # nuslerp, model_stock, multislerp, karcher (norms, dots, cosines)
    "selection": 0.6,  # ties and every sparsifying operator (exact top-k, sign election)
}
# operators far from their family's throughput
METHOD_GBPS_PER_CORE = {"slerp": 1.1, "della": 0.19, "della_linear": 0.19}
# Start-up and the end of a merge (imports, headers and plan, kernels from numba's cache, the
# model card, manifest and summary): 0.9-1.1 s on the 70B slice and 1.1-1.2 s on medium, quiet.
STARTUP_S = 1.2
# numba's compilation of the kernels into an empty cache (4-layer toy TIES merge: 65 s against 5.4 s)
COMPILE_S = 60.0
# The spill's local write and read-back (engine/spill.py), GB/s per rank: page-cache copies here.
LOCAL_WRITE_GBPS = 1.5
LOCAL_READ_GBPS = 3.0
SELECTION = {"ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce"}
STATISTICS = {"slerp", "nuslerp", "multislerp", "karcher", "model_stock", "regmean"}


def family(method: str) -> str:
    return "selection" if method in SELECTION else "statistics" if method in STATISTICS else "single_pass"


@dataclass(frozen=True)
class Cluster:
    nodes: int = 1
    ranks_per_node: int = 1
    cores_per_node: int = 2
    read_gbps: float = 2.0  # per node, from the sources' storage
    write_gbps: float = 1.0  # per node, to the output's storage
    writer: str = "direct"  # direct: every output byte written once; zarr: twice (store, export)


@dataclass(frozen=True)
class Estimate:
    seconds: float
    read_s: float
    compute_s: float
    write_s: float
    peak_bytes_per_rank: int
    bytes_read: int
    bytes_written: int
    spill_s: float = 0.0  # the slowest rank's spill: local write once, read back per later pass
    bytes_spilled: int = 0  # source bytes written to local scratch, all ranks
    startup_s: float = STARTUP_S
    compile_s: float = 0.0  # numba's compilation, when its cache lacks the kernels

    def describe(self) -> str:
        spill = f", spill to local scratch {_duration(self.spill_s)}" if self.spill_s else ""
        compile_ = f" + compiling the kernels {_duration(self.compile_s)}" if self.compile_s else ""
        return (
            f"~{_duration(self.seconds)} (start-up {_duration(self.startup_s)}{compile_}; slowest rank: read "
            f"{_duration(self.read_s)}, compute {_duration(self.compute_s)} and write {_duration(self.write_s)} "
            f"overlapped{spill}); peak memory ~{self.peak_bytes_per_rank / 1e9:.2f} GB per rank"
        )


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def estimate_plan(
    plan: Plan,
    cluster: Cluster,
    prefetch: int = 2,
    cache_bytes: int = 512 << 20,
    uncached: float | None = None,
    spill: str = "auto",
) -> Estimate:
    """The time of `plan` on `cluster`: plan.world_size must be nodes x ranks_per_node.

    uncached: the fraction of the kernels numba's cache lacks (None: look, kernels.uncached_fraction).
    A kernel no merge of this install has called is missing too (a fifth of them after the test
    suite), so up to half missing counts as a warm cache, all missing as a fresh one (COMPILE_S),
    linear in between."""
    per_rank = plan.rank_bytes()
    out_per_rank = [0] * plan.world_size
    for t in plan.tensors:
        per_block = t.out_bytes() // max(1, t.n_blocks)
        for r in t.owners:
            out_per_rank[r] += per_block
    if uncached is None:
        from bigmerge.ops import kernels

        uncached = kernels.uncached_fraction()
    passes = spill_passes(plan, cache_bytes, spill)
    return _estimate(
        plan.merge_method,
        per_rank,
        out_per_rank,
        cluster,
        plan.peak_memory_estimate(prefetch, cache_bytes),
        [(w, r) for w, r, _ in passes],
        max(0.0, 2 * uncached - 1) * COMPILE_S,
        rereads=[rr for _, _, rr in passes],
    )


def spill_passes(plan: Plan, cache_bytes: int, spill: str = "always") -> list[tuple[int, int, int]]:
    """Per rank: (bytes spilled to local scratch, bytes read back from it, bytes read from the
    sources again), as the executor does: a tensor with statistics rounds whose local blocks
    exceed cache_bytes is spilled as its first pass reads it and read back by each later pass
    that reads its blocks (MergeOp.later_reads: rounds after the first, then apply), or read
    from its sources by each of them
    when it is not spilled (--spill never, or auto and every source on a local disk)."""
    from bigmerge.ops import get_op
    from bigmerge.storage.fs import location

    op = get_op(plan.merge_method)
    far: dict[str, bool] = {}

    def is_far(url: str) -> bool:
        if url not in far:
            far[url] = location(url).is_far
        return far[url]

    out = [(0, 0, 0)] * plan.world_size
    for t in plan.tensors:
        if t.n_blocks == 0:
            continue
        task = plan.task(t)
        if not op.rounds(task):
            continue
        rounds = op.later_reads(task)  # the later rounds that read their blocks, then apply
        per_block = t.in_bytes() // t.n_blocks
        mine = [0] * plan.world_size
        for r in t.owners:
            mine[r] += per_block
        for r, local in enumerate(mine):
            if local > cache_bytes:
                w, rd, rr = out[r]
                out[r] = (
                    (w + local, rd + rounds * local, rr) if spills(spill, t, is_far) else (w, rd, rr + rounds * local)
                )
    return out


def estimate_model(
    method: str,
    params: float,
    n_models: int,
    cluster: Cluster,
    *,
    source_bytes_per_param: int = 2,
    out_bytes_per_param: int = 2,
    block_bytes: int = 32 << 20,
    prefetch: int = 2,
    cache_bytes: int = 512 << 20,
) -> Estimate:
    """The same model for a model size alone (no config, no sources): balanced ranks assumed."""
    world = cluster.nodes * cluster.ranks_per_node
    read = params * source_bytes_per_param * n_models
    write = params * out_bytes_per_param
    peak = _block_peak(method, n_models, block_bytes, source_bytes_per_param, prefetch) + cache_bytes
    return _estimate(method, [int(read / world)] * world, [int(write / world)] * world, cluster, peak)


def _block_peak(method: str, n: int, block_bytes: int, itemsize: int, prefetch: int) -> int:
    from bigmerge.ops import get_op

    return block_memory(get_op(method), n, block_bytes // itemsize, n * block_bytes, 4, prefetch)


def _estimate(
    method: str,
    read_per_rank: list[int],
    write_per_rank: list[int],
    c: Cluster,
    peak: int,
    spills: list[tuple[int, int]] | None = None,
    compile_s: float = 0.0,
    rereads: list[int] | None = None,
) -> Estimate:
    cores_per_rank = max(1.0, c.cores_per_node / c.ranks_per_node)
    gbps = METHOD_GBPS_PER_CORE.get(method, COMPUTE_GBPS_PER_CORE[family(method)]) * cores_per_rank
    read_bw = c.read_gbps / c.ranks_per_node
    write_bw = c.write_gbps / c.ranks_per_node
    spills = spills or [(0, 0)] * len(read_per_rank)
    rereads = rereads or [0] * len(read_per_rank)
    worst = (0.0, 0.0, 0.0, 0.0, 0.0)
    for rb, wb, (sw, sr), rr in zip(read_per_rank, write_per_rank, spills, rereads):
        writes = 2 if c.writer == "zarr" else 1
        read_s, compute_s, once = (rb + rr) / 1e9 / read_bw, rb / 1e9 / gbps, wb / 1e9 / write_bw
        write_s = writes * once
        spill_s = sw / 1e9 / (LOCAL_WRITE_GBPS / c.ranks_per_node) + sr / 1e9 / (LOCAL_READ_GBPS / c.ranks_per_node)
        # the blocks' writes overlap the merge; the zarr writer's export writes everything again after
        total = max(read_s, compute_s, once) + spill_s + (writes - 1) * once
        if total > worst[0]:
            worst = (total, read_s, compute_s, write_s, spill_s)
    return Estimate(
        seconds=STARTUP_S + compile_s + worst[0],
        read_s=worst[1],
        compute_s=worst[2],
        write_s=worst[3],
        peak_bytes_per_rank=peak,
        bytes_read=sum(read_per_rank) + sum(rereads),
        bytes_written=sum(write_per_rank),
        spill_s=worst[4],
        bytes_spilled=sum(w for w, _ in spills),
        compile_s=compile_s,
    )


def parse_count(text: str) -> float:
    """'70B', '1.5T', '8e9' -> a number of parameters."""
    t = text.strip().upper()
    mult = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(t[-1:], 1.0)
    value = float(t[:-1] if t[-1:] in "KMBGT" else t)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(text)
    return value * mult
