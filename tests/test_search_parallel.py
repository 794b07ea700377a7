"""bigmerge search scored in parallel (worker processes, MPI ranks) and through the executor to a
scratch store (disk mode) gives the journal of one process scoring in memory: the same candidates,
the same scores, the same result table.

A parallel or disk search is only useful if it is the same search: every candidate's scores must
not depend on where it was merged or which process scored it, and CMA-ES must then ask for the same
candidates. Each variant runs the whole command on the small zoo (real spawned workers, real
``mpirun -n 2``) and is compared, key by key, with a serial in-memory run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_mpi import mpirun
from zoo_fixture import small_zoo_dir

from bigmerge.cli import main
from bigmerge.search.config import load_search_config
from bigmerge.search.fitness import CandidateScorer, Job
from bigmerge.search.space import linear_config

pytestmark = pytest.mark.slow  # searches under several processes


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("BIGMERGE_SMALL_ZOO"):  # an already built one, to iterate quickly
        from make_zoo import make_zoo

        make_zoo(os.environ["BIGMERGE_SMALL_ZOO"], preset="small")
        return Path(os.environ["BIGMERGE_SMALL_ZOO"])
    return small_zoo_dir(tmp_path_factory)


def _cfg(zoo: Path, where: Path, mode: str = "memory") -> Path:
    cfg: dict[str, Any] = {
        "merge": {"merge_method": "linear", "models": [{"model": str(zoo / m)} for m in ("sort", "fin", "mix1")]},
        "space": {"type": "weights", "constraint": "simplex"},
        # generations of 3: every batch but the greedy trials has more jobs than processes
        "optimizer": {"name": "cmaes", "popsize": 3, "budget": 6, "seed": 0},
        "fitness": {"tasks": {"zoo_sort": 2, "zoo_fin": 1}, "heldout": 12, "limit": 8, "batch_size": 32},
        "evaluation": {"mode": mode, "scratch": str(where / "scratch")},
        "baselines": True,
    }
    where.mkdir(parents=True, exist_ok=True)
    path = where / "search.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _journal(out: Path) -> dict[str, dict[str, Any]]:
    entries = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    by_key = {e["key"]: e for e in entries}
    assert len(by_key) == len(entries)  # nothing scored twice
    return by_key


def _rows(out: Path) -> list[dict[str, Any]]:
    return json.loads((out / "summary.json").read_text())["rows"]


@pytest.fixture(scope="module")
def serial(small_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one process, candidates merged and scored in memory."""
    where = tmp_path_factory.mktemp("serial")
    cfg = _cfg(small_zoo, where)
    assert main(["search", str(cfg), "--out", str(where / "run"), "--quiet"]) == 0
    return where / "run"


def _same_search(ref: Path, out: Path, mode: str) -> dict[str, dict[str, Any]]:
    want, got = _journal(ref), _journal(out)
    assert got.keys() == want.keys()  # the same candidates (so CMA-ES saw the same fitness values)
    for k, e in got.items():
        assert e["scores"] == want[k]["scores"], e["label"]
        assert e["fitness"] == want[k]["fitness"] and e["x"] == want[k]["x"], e["label"]
        assert e["mode"] == mode, e["label"]
    assert _rows(out) == _rows(ref)
    assert (out / "best.yaml").read_text() == (ref / "best.yaml").read_text()
    return got


def test_worker_processes_score_as_one_process(small_zoo: Path, serial: Path, tmp_path: Path) -> None:
    cfg = _cfg(small_zoo, tmp_path)
    out = tmp_path / "run"
    assert main(["search", str(cfg), "--out", str(out), "--workers", "2", "--quiet"]) == 0
    got = _same_search(serial, out, "memory")
    pids = {e["pid"] for e in got.values()}
    assert len(pids) == 2 and os.getpid() not in pids  # two spawned workers did the scoring


@pytest.mark.mpi
def test_mpi_ranks_score_as_one_process_and_resume_a_serial_journal(
    small_zoo: Path, serial: Path, tmp_path: Path
) -> None:
    """Two MPI ranks finish a search cut short on one process: the journal does not depend on the
    parallelism, so they score only what it lacks, and end with the serial run's journal."""
    cfg = _cfg(small_zoo, tmp_path)
    out = tmp_path / "run"
    ref = (serial / "history.jsonl").read_text().splitlines()
    out.mkdir()
    (out / "search.json").write_text((serial / "search.json").read_text())
    (out / "history.jsonl").write_text("\n".join(ref[:5]) + "\n")  # as if killed after 5 evaluations
    proc = mpirun(2, "search", str(cfg), "--out", str(out), env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming: 5 evaluations in the journal" in proc.stderr
    assert json.loads((out / "summary.json").read_text())["evaluations"]["run_now"] == len(ref) - 5
    got = _same_search(serial, out, "memory")
    # rank r scores the jobs r, r + 2, ... of each batch: both ranks scored candidates
    new = [e for e in got.values() if e["n"] >= 5]
    assert len(new) == len(ref) - 5 and len({e["pid"] for e in new}) == 2


def test_disk_mode_scores_as_memory_mode(small_zoo: Path, serial: Path, tmp_path: Path) -> None:
    cfg = _cfg(small_zoo, tmp_path, mode="disk")
    out = tmp_path / "run"
    assert main(["search", str(cfg), "--out", str(out), "--quiet"]) == 0
    _same_search(serial, out, "disk")
    # each candidate went through the executor into this process's scratch store, then was removed
    (d,) = (tmp_path / "scratch").iterdir()
    assert d.name == f"p{os.getpid()}" and (d / "candidate.yaml").is_file() and not (d / "model").exists()


@pytest.mark.mpi
def test_mpi_disk_mode_merges_with_every_rank_and_scores_as_memory_mode(
    small_zoo: Path, serial: Path, tmp_path: Path
) -> None:
    cfg = _cfg(small_zoo, tmp_path, mode="disk")
    out = tmp_path / "run"
    proc = mpirun(2, "search", str(cfg), "--out", str(out), "--quiet", env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _same_search(serial, out, "disk")
    assert len({e["pid"] for e in got.values()}) == 1  # both ranks merge each candidate, rank 0 scores it
    assert [d.name for d in (tmp_path / "scratch").iterdir()] == ["mpi"]


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_disk_and_memory_scorers_agree_on_one_candidate(small_zoo: Path, tmp_path: Path, method: str) -> None:
    spec = load_search_config(_cfg(small_zoo, tmp_path))
    weights = {str(small_zoo / "sort"): 0.7, str(small_zoo / "fin"): 0.3, str(small_zoo / "mix1"): 0.2}
    config = linear_config(spec.merge, weights)
    if method == "ties":
        config = {
            **config,
            "merge_method": "ties",
            "base_model": str(small_zoo / "base"),
            "parameters": {"density": 0.5},
        }
    mem = CandidateScorer(spec, "memory")
    disk = CandidateScorer(spec, "disk", str(tmp_path / "scratch"))
    try:
        for split in ("search", "heldout"):
            job = Job(f"{method} {split}", split, config)
            a, b = mem.score(job), disk.score(job)
            assert (a["mode"], b["mode"]) == ("memory", "disk")
            assert a["scores"] == b["scores"] and a["fitness"] == b["fitness"], split
            assert set(a["scores"]) == {"zoo_sort", "zoo_fin"}
    finally:
        mem.close()
        disk.close()
