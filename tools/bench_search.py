"""bigmerge search on the zoo's recycling pool: the serial in-memory search against disk-mode searches
(candidates merged through the executor into scratch, `mpirun -n 2`, pipelined or not), for the same
budget. Every variant must give the same journal (same candidates, same scores); the figure is the
wall time of the whole command.

    python tools/make_zoo.py zoo
    python tools/bench_search.py zoo --out bench-search [--budget 8] [--variants memory,disk-hf-2,...]

Variants:
    memory          one process, candidates merged and scored in memory (today's search)
    disk-hf-1       one process, merged to scratch, scored by lm-eval here, merge then score
    disk-hf-2       `mpirun -n 2`, pipelined (in_flight 2): merge of i+1 while i is scored (a thread)
    disk-cmd-1      `mpirun -n 2`, scored by the real lm_eval CLI per candidate, in_flight 1
    disk-cmd-2      the same, pipelined (in_flight 2)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
POOL = [
    "pool_trunk_200",
    "pool_trunk_400",
    "pool_trunk",
    "pool_add_sort_150",
    "pool_add_sort",
    "pool_rev_fin_150",
    "pool_rev_fin",
    "pool_add_rev_150",
    "pool_add_rev",
    "pool_sort_fin",
    "pool_add_fin",
    "pool_rev_sort",
    "pool_fin_only",
]
VARIANTS = ("memory", "disk-hf-1", "disk-hf-2", "disk-cmd-1", "disk-cmd-2")


def config(zoo: Path, where: Path, variant: str, budget: int, limit: int) -> Path:
    lm_eval = Path(sys.executable).parent / "lm_eval"
    fitness: dict[str, Any] = {
        "tasks": {"zoo_add": 1, "zoo_rev": 1, "zoo_sort": 1, "zoo_fin": 1},
        "heldout": 0.5,
        "limit": limit,
        "batch_size": 64,
    }
    ev: dict[str, Any] = {"mode": "memory" if variant == "memory" else "disk", "scratch": str(where / "scratch")}
    if variant.startswith("disk"):
        ev["in_flight"] = int(variant[-1])
    if variant.startswith("disk-cmd"):
        fitness["backend"] = {
            "type": "command",
            "command": f"{lm_eval} --model hf --model_args pretrained={{model}},dtype=float32 --device cpu "
            "--batch_size 64 {eval_args}",
            "timeout_s": 900,
        }
    cfg = {
        "merge": {"merge_method": "linear", "dtype": "float32", "models": [{"model": str(zoo / m)} for m in POOL]},
        "space": {"type": "weights", "constraint": "simplex"},
        "optimizer": {"name": "cmaes", "sigma0": 0.5, "popsize": budget, "budget": budget, "seed": 0},
        "fitness": fitness,
        "evaluation": ev,
        "baselines": False,
    }
    where.mkdir(parents=True, exist_ok=True)
    path = where / "search.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run(variant: str, cfg: Path, out: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_btl="^ofi")
    cmd = [sys.executable, "-m", "bigmerge", "search", str(cfg), "--out", str(out), "--quiet"]
    if variant in ("disk-hf-2", "disk-cmd-1", "disk-cmd-2"):
        mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or "mpirun"
        cmd = [mpirun, "-n", "2", "--oversubscribe", *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return wall


def journal(out: Path) -> dict[str, dict[str, Any]]:
    return {e["key"]: e for e in (json.loads(ln) for ln in (out / "history.jsonl").read_text().splitlines())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoo")
    ap.add_argument("--out", default="bench-search")
    ap.add_argument("--budget", type=int, default=8, help="CMA-ES candidates, one generation (default 8)")
    ap.add_argument("--limit", type=int, default=100, help="documents per task the search scores (default 100)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    a = ap.parse_args()
    zoo, base = Path(a.zoo).resolve(), Path(a.out).resolve()
    results: dict[str, Any] = {}
    ref: dict[str, dict[str, Any]] | None = None
    for v in a.variants.split(","):
        where = base / v
        shutil.rmtree(where, ignore_errors=True)
        cfg = config(zoo, where, v, a.budget, a.limit)
        wall = run(v, cfg, where / "run")
        got = journal(where / "run")
        same = None
        if ref is None:
            ref = got
        else:
            same = got.keys() == ref.keys() and all(got[k]["scores"] == ref[k]["scores"] for k in got)
        evals = [e["seconds"]["eval"] for e in got.values()]
        merges = [e["seconds"]["merge"] for e in got.values()]
        results[v] = {
            "wall_s": round(wall, 1),
            "evaluations": len(got),
            "merge_s_mean": round(sum(merges) / len(merges), 2),
            "eval_s_mean": round(sum(evals) / len(evals), 2),
            "same_journal_as_first": same,
        }
        print(
            f"{v:12s} wall {wall:7.1f} s  {len(got)} evaluations  merge {results[v]['merge_s_mean']:.2f} s  "
            f"eval {results[v]['eval_s_mean']:.2f} s  same journal: {same}",
            flush=True,
        )
    if "memory" in results:
        for r in results.values():
            r["vs_memory"] = round(r["wall_s"] / results["memory"]["wall_s"], 2)
    (base / "bench_search.json").write_text(
        json.dumps({"budget": a.budget, "limit": a.limit, "results": results}, indent=1)
    )
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
