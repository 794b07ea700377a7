"""`bigmerge plan --estimate`'s model: time falls with nodes, grows with the model; memory stays flat."""

from __future__ import annotations

from pathlib import Path

from helpers import bigmerge, synthetic_family

from bigmerge.merge import MergeOptions, plan_merge
from bigmerge.ops import get_op
from bigmerge.planning.config import load_config
from bigmerge.planning.estimate import COMPILE_S, Cluster, estimate_model, estimate_plan, parse_count


def test_more_nodes_less_time_same_memory() -> None:
    one = estimate_model("ties", 70e9, 3, Cluster(nodes=1, ranks_per_node=8, cores_per_node=64))
    eight = estimate_model("ties", 70e9, 3, Cluster(nodes=8, ranks_per_node=8, cores_per_node=64))
    assert eight.seconds < one.seconds / 7
    assert eight.peak_bytes_per_rank == one.peak_bytes_per_rank
    assert one.bytes_read == 3 * 70e9 * 2 and one.bytes_written == 70e9 * 2


def test_model_size_doubles_time_not_memory() -> None:
    c = Cluster(nodes=2, ranks_per_node=4, cores_per_node=32)
    small, big = estimate_model("linear", 35e9, 3, c), estimate_model("linear", 70e9, 3, c)
    assert abs((big.seconds - big.startup_s) / (small.seconds - small.startup_s) - 2) < 1e-6
    assert big.peak_bytes_per_rank == small.peak_bytes_per_rank
    # selection operators cost more per byte than a single pass
    assert estimate_model("ties", 70e9, 3, c).compute_s > big.compute_s


def test_the_zarr_writer_writes_every_byte_twice() -> None:
    direct = estimate_model("linear", 70e9, 3, Cluster(nodes=2, ranks_per_node=4, cores_per_node=32))
    zarr = estimate_model("linear", 70e9, 3, Cluster(nodes=2, ranks_per_node=4, cores_per_node=32, writer="zarr"))
    assert abs(zarr.write_s / direct.write_s - 2) < 1e-9 and zarr.read_s == direct.read_s


def test_estimate_of_a_real_plan(tmp_path: Path) -> None:
    f = synthetic_family(tmp_path / "m", rows=4000)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"merge_method: ties\nbase_model: {f['base']}\nmodels:\n  - model: {f['ft1']}\n    parameters: {{weight: 1, density: 0.5}}\n"
    )
    plans = {n: plan_merge(load_config(cfg), n, MergeOptions(block_bytes=4096))[0] for n in (1, 4)}
    t1 = estimate_plan(plans[1], Cluster(1, 1, 2))
    t4 = estimate_plan(plans[4], Cluster(2, 2, 2))
    assert t1.bytes_read == t4.bytes_read == sum(t.in_bytes() for t in plans[1].tensors)
    assert t4.seconds < t1.seconds


def test_cli_estimate_without_a_config() -> None:
    proc = bigmerge(
        "plan", "--params", "70B", "--models", "3", "--method", "ties", "--nodes", "8", "--ranks-per-node", "8"
    )
    assert proc.returncode == 0, proc.stderr
    assert "420.0 GB" in proc.stdout and "estimate      ~" in proc.stdout and "per rank" in proc.stdout
    bad = bigmerge("plan", "--params", "70B", "--method", "tiez")
    assert bad.returncode == 2 and "unknown merge_method 'tiez'" in bad.stderr
    assert parse_count("1.5T") == 1.5e12 and parse_count("8e9") == 8e9


def test_spilled_passes_compilation_and_start_up_are_counted(tmp_path: Path) -> None:
    """What the merge really does: a tensor larger than the cache is read from the sources once
    and spilled, each later pass reads it back locally (engine/spill.py); an empty numba cache
    costs the compilation; every merge pays the start-up."""
    f = synthetic_family(tmp_path / "m", rows=4000)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"merge_method: ties\nbase_model: {f['base']}\nmodels:\n  - model: {f['ft1']}\n    parameters: {{weight: 1, density: 0.5}}\n"
    )
    plan = plan_merge(load_config(cfg), 1, MergeOptions(block_bytes=4096))[0]
    c = Cluster(1, 1, 2)
    kept = estimate_plan(plan, c, cache_bytes=1 << 30, uncached=0.0)
    spilled = estimate_plan(plan, c, cache_bytes=1024, uncached=0.0, spill="always")
    reread = estimate_plan(plan, c, cache_bytes=1024, uncached=0.0)  # auto: local sources are read again
    cold = estimate_plan(plan, c, cache_bytes=1 << 30, uncached=1.0)
    source = sum(t.in_bytes() for t in plan.tensors)
    assert kept.bytes_read == spilled.bytes_read == source  # the sources once, either way
    assert kept.bytes_spilled == 0 and kept.spill_s == 0
    big = [t for t in plan.tensors if t.n_blocks > 1]  # the tensors with statistics rounds
    assert spilled.bytes_spilled == sum(t.in_bytes() for t in big) > 0
    assert abs(spilled.seconds - kept.seconds - spilled.spill_s) < 1e-9 and spilled.spill_s > 0
    assert abs(cold.seconds - kept.seconds - COMPILE_S) < 1e-9 and cold.compile_s == COMPILE_S
    assert estimate_plan(plan, c, cache_bytes=1 << 30, uncached=0.3).compile_s == 0  # never-called kernels
    assert kept.seconds > kept.startup_s > 0
    rounds = {t.index: get_op("ties").later_reads(plan.task(t)) for t in big}  # HI, then apply
    assert reread.bytes_spilled == 0 and reread.spill_s == 0
    assert set(rounds.values()) == {1}  # LO and TIES count from what the HI round kept (kept.py)
    assert reread.bytes_read == source + sum(rounds[t.index] * t.in_bytes() for t in big)
    assert reread.read_s > kept.read_s
    assert "spill to local scratch" in spilled.describe() and "compiling the kernels" in cold.describe()
