"""`bigmerge search` from top to bottom: baselines, the optimiser, the held-out report, the results.

    baselines   every checkpoint of the pool alone, and the uniform soup (search split)
    optimiser   CMA-ES over the space (``cma``), or greedy soup
    greedy soup beside CMA-ES when ``baselines`` (checkpoints added in order of their own score,
                each kept only if the soup's search-split score improves)
    held-out    the optimiser's best, the uniform soup, the best checkpoint (chosen on the search
                split) and the greedy soup, scored on the held-out documents
    results     OUT/best.yaml, OUT/history.jsonl (the journal), OUT/summary.json, OUT/report.md,
                OUT/pareto.json, OUT/fitness.png, OUT/pareto.png, OUT/weights.png

Rank 0 (or the only process) runs the optimiser and writes everything; candidates are scored in
this process, in worker processes (``evaluation.workers``) or on every MPI rank.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from bigmerge.engine.comm import Comm
from bigmerge.errors import ConfigError, OutputExistsError
from bigmerge.log import Log
from bigmerge.search.config import SearchConfig, load_search_config
from bigmerge.search.fitness import CandidateScorer, Job, model_bytes
from bigmerge.search.journal import Journal
from bigmerge.search.pipeline import PipelineBackend
from bigmerge.search.space import Space, WeightsSpace, linear_config, make_space, pool_models

STATE_FILE = "search.json"
JOURNAL_FILE = "history.jsonl"


@dataclass
class SearchOptions:
    overwrite: bool = False  # discard a previous search at OUT instead of resuming it
    quiet: bool = False
    workers: int | None = None  # overrides evaluation.workers
    mode: str | None = None  # overrides evaluation.mode


# --- where candidates are scored -------------------------------------------------------------


class Backend:
    def run(self, jobs: list[Job]) -> Iterator[tuple[Job, dict[str, Any]]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SerialBackend(Backend):
    def __init__(self, scorer: CandidateScorer) -> None:
        self.scorer = scorer

    def run(self, jobs: list[Job]) -> Iterator[tuple[Job, dict[str, Any]]]:
        for job in jobs:
            yield job, self.scorer.score(job)

    def close(self) -> None:
        self.scorer.close()


class PoolBackend(Backend):
    """Worker processes (spawned), each with its own merger and lm-eval; results as they finish."""

    def __init__(self, cfg: SearchConfig, mode: str, scratch: str | None, workers: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from bigmerge.search.fitness import worker_init

        self.pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=worker_init,
            initargs=(cfg.model_dump_json(), mode, scratch),
        )

    def run(self, jobs: list[Job]) -> Iterator[tuple[Job, dict[str, Any]]]:
        from concurrent.futures import as_completed

        from bigmerge.search.fitness import worker_score

        futures = {self.pool.submit(worker_score, job): job for job in jobs}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class MPIBackend(Backend):
    """Memory mode: rank 0 sends each batch to every rank; rank r scores jobs r, r + size, ..."""

    def __init__(self, comm: Comm, scorer: CandidateScorer) -> None:
        self.comm = comm
        self.scorer = scorer

    def run(self, jobs: list[Job]) -> Iterator[tuple[Job, dict[str, Any]]]:
        self.comm.bcast(("jobs", jobs))
        results = _serve_batch(self.comm, self.scorer, jobs)
        yield from zip(jobs, results)

    def close(self) -> None:
        self.comm.bcast(("stop", None))
        self.scorer.close()


def _serve_batch(comm: Comm, scorer: CandidateScorer, jobs: list[Job]) -> list[dict[str, Any]]:
    """Memory mode (disk mode under MPI is the pipeline)."""
    mine = {i: scorer.score(j) for i, j in enumerate(jobs) if i % comm.size == comm.rank}
    gathered = comm.allgather(mine)
    merged: dict[int, dict[str, Any]] = {}
    for g in gathered:
        merged.update(g)
    return [merged[i] for i in range(len(jobs))]


def serve(comm: Comm, scorer: CandidateScorer) -> None:
    """Ranks other than 0: score what rank 0 sends, or merge with it, until it says stop."""
    from bigmerge.search.fitness import merge_candidate

    try:
        while True:
            msg: Any = comm.bcast(None)
            kind, payload = msg
            if kind == "stop":
                return
            if kind == "merge":  # the pipeline (disk mode): one candidate, merged by every rank
                config, cfg_path, out = payload
                merge_candidate(comm, config, Path(cfg_path), out)
                continue
            _serve_batch(comm, scorer, payload)
    finally:
        scorer.close()


# --- the search ---------------------------------------------------------------------------------


class _OwnNumpyRandom:
    """cma draws from numpy's global generator, which lm-eval reseeds on every evaluation: keep
    the optimiser's stream apart so that a resumed search asks for exactly the same candidates."""

    def __init__(self) -> None:
        self.state: Any = None

    def __enter__(self) -> None:
        self.outer = np.random.get_state()
        if self.state is not None:
            np.random.set_state(self.state)

    def __exit__(self, *exc: object) -> None:
        self.state = np.random.get_state()
        np.random.set_state(self.outer)


class Search:
    def __init__(
        self, cfg: SearchConfig, out: Path, backend: Backend | PipelineBackend, journal: Journal, space: Space, log: Any
    ):
        self.cfg = cfg
        self.out = out
        self.backend = backend
        self.journal = journal
        self.space = space
        self.log = log
        self.weights = cfg.fitness.task_weights()
        self.evaluated = 0  # evaluations run by this process (not taken from the journal)
        self.reused = 0
        self.t0 = time.perf_counter()

    def evaluate(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """Journal entries of these jobs, scoring only those the journal lacks (duplicates once)."""
        todo: dict[str, Job] = {}
        for job in jobs:
            if self.journal.get(job.key()) is None:
                todo.setdefault(job.key(), job)
            else:
                self.reused += 1
        for job, res in self.backend.run(list(todo.values())):
            entry = self.journal.append(
                {
                    "key": job.key(),
                    "label": job.label,
                    "split": job.split,
                    **job.meta,
                    "x": job.x,
                    "config": job.config,
                    "scores": res["scores"],
                    "fitness": res["fitness"],
                    "seconds": res["seconds"],
                    "mode": res.get("mode"),  # memory or disk: where the candidate was merged
                    "backend": res.get("backend"),  # what scored it: hf, vllm, command
                    "pid": res.get("pid"),  # the process that scored it (a worker, an MPI rank)
                    **({"timeline": res["timeline"]} if "timeline" in res else {}),
                    "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
            )
            self.evaluated += 1
            self.log(
                f"[{entry['n']}] {job.label} ({job.split}): fitness {res['fitness']:.4f} "
                + " ".join(f"{t}={v:.3f}" for t, v in res["scores"].items())
                + f" ({sum(res['seconds'].values()):.1f} s)"
            )
        return [self.journal.get(job.key()) for job in jobs]  # type: ignore[misc]

    # -- baselines and greedy soup (linear merges of the pool) --

    def singles(self) -> list[dict[str, Any]]:
        models = pool_models(self.cfg.merge)
        jobs = [
            Job(f"single {m}", "search", linear_config(self.cfg.merge, {m: 1.0}), meta={"role": "single"})
            for m in models
        ]
        return self.evaluate(jobs)

    def uniform(self, split: str = "search") -> dict[str, Any]:
        models = pool_models(self.cfg.merge)
        cfg = linear_config(self.cfg.merge, {m: 1.0 for m in models})
        return self.evaluate([Job("uniform soup", split, cfg, meta={"role": "uniform"})])[0]

    def greedy(self, singles: list[dict[str, Any]]) -> dict[str, Any]:
        models = pool_models(self.cfg.merge)
        order = sorted(range(len(models)), key=lambda i: -singles[i]["fitness"])  # stable: pool order on ties
        soup = [models[order[0]]]
        best = singles[order[0]]
        for i in order[1:]:
            trial = soup + [models[i]]
            cfg = linear_config(self.cfg.merge, {m: 1.0 for m in trial})
            got = self.evaluate([Job(f"greedy +{models[i]}", "search", cfg, meta={"role": "greedy"})])[0]
            if got["fitness"] > best["fitness"]:
                soup, best = trial, got
        self.log(f"greedy soup: {len(soup)} of {len(models)} checkpoints, fitness {best['fitness']:.4f}")
        return best

    # -- CMA-ES --

    def cmaes(self) -> dict[str, Any] | None:
        try:
            import cma
        except ImportError as exc:
            raise ConfigError(
                f"optimizer 'cmaes' needs the cma package: pip install 'bigmerge[search]' ({exc})"
            ) from None
        o = self.cfg.optimizer
        sp = self.space
        popsize = o.popsize or 4 + int(3 * np.log(sp.dim))
        opts: dict[str, Any] = {"popsize": popsize, "seed": o.seed + 1, "verbose": -9}  # cma: seed 0 means "time"
        if sp.bounds is not None:
            opts["bounds"] = list(sp.bounds)
        rng = _OwnNumpyRandom()
        with rng:
            es = cma.CMAEvolutionStrategy(sp.x0.tolist(), o.sigma0 or sp.sigma0, opts)
        done, gen, best = 0, 0, None
        while done < o.budget:
            with rng:
                xs = es.ask()
            k = min(len(xs), o.budget - done)
            jobs, slots = [], []
            for i, x in enumerate(xs[:k]):
                cfg = sp.config(x)
                if cfg is not None:
                    slots.append(i)
                    jobs.append(
                        Job(
                            f"cmaes g{gen}.{i}",
                            "search",
                            cfg,
                            [float(v) for v in x],
                            {"role": "cmaes", "generation": gen},
                        )
                    )
            entries = self.evaluate(jobs)
            fits = [1.0] * len(xs)  # infeasible (every weight cut to 0): worse than any score
            for i, e in zip(slots, entries):
                fits[i] = -e["fitness"]
                if best is None or e["fitness"] > best["fitness"]:
                    best = e
            if k == len(xs):
                es.tell(xs, fits)
            done += k
            gen += 1
            if best is not None:
                self.log(f"cmaes generation {gen}: {done}/{o.budget} evaluations, best fitness {best['fitness']:.4f}")
        return best


def run_search(config_path: str, out_dir: str, comm: Comm, opts: SearchOptions) -> dict[str, Any]:
    """Run (or resume) a search; returns the summary (rank 0; {} elsewhere)."""
    from bigmerge.planning.catalog import catalog_models

    cfg = load_search_config(config_path)
    out = Path(out_dir)
    log = Log(rank=comm.rank, quiet=opts.quiet)
    ev = cfg.evaluation
    mode = opts.mode or ev.mode
    if mode == "memory" and not cfg.fitness.backend.in_memory():
        raise ConfigError(f"--mode memory: the {cfg.fitness.backend.type!r} backend scores a checkpoint on disk")
    if mode == "auto":  # in memory when the merged model fits one process comfortably
        fits = cfg.fitness.backend.in_memory() and model_bytes(cfg) <= ev.memory_limit_gb * 1e9
        mode = "memory" if fits else "disk"
    from bigmerge.eval.backends import check_installed

    check_installed(cfg.fitness.backend)  # before any merge
    scratch = ev.scratch or str(out / "scratch")
    workers = opts.workers or ev.workers
    if mode == "disk" and workers > 1:
        raise ConfigError(
            f"evaluation.workers {workers} with mode disk: a candidate on disk is merged by every rank together "
            "(mpirun -n N) and scored while the next one merges; for more scorings at once set evaluation.evaluators "
            "and in_flight instead"
        )
    if comm.rank == 0:
        _prepare_out(out, cfg, opts.overwrite)
    comm.barrier()
    scorer: CandidateScorer | None = None
    if comm.size > 1 or workers == 1:
        scorer = CandidateScorer(cfg, mode, scratch)
    if comm.rank != 0:
        assert scorer is not None
        serve(comm, scorer)
        return {}
    backend: Backend | PipelineBackend
    if mode == "disk" and workers == 1:  # every rank merges each candidate, rank 0's evaluator scores
        assert scorer is not None
        backend = PipelineBackend(
            comm, scorer, scratch, ev.in_flight, ev.evaluators, ev.keep_best, state=out / "scratch"
        )
    elif comm.size > 1:
        backend = MPIBackend(comm, scorer)  # type: ignore[arg-type]
    elif workers > 1:
        backend = PoolBackend(cfg, mode, scratch, workers)
    else:
        backend = SerialBackend(scorer)  # type: ignore[arg-type]
    template = cfg.template()
    cats = catalog_models(template.model_refs()[:1], template.storage_options)
    space = make_space(cfg, cats[0].num_layers())
    journal = Journal(out / JOURNAL_FILE)
    where = (
        "in memory"
        if mode == "memory"
        else f"merged to {scratch} ({ev.in_flight} in flight)"
        if isinstance(backend, PipelineBackend)
        else f"merged to {scratch}"
    ) + f", scored by {cfg.fitness.backend.type}"
    par = (
        f"{comm.size} MPI ranks"
        if comm.size > 1
        else f"{workers} worker process(es)"
        if workers > 1
        else "this process"
    )
    log(
        f"search: {len(pool_models(cfg.merge))} checkpoints, {cfg.optimizer.name} over {space.dim} coordinates, "
        f"tasks {', '.join(f'{t}×{w:g}' for t, w in cfg.fitness.task_weights().items())}; candidates {where}, on {par}"
        + (f"; resuming: {journal.resumed} evaluations in the journal" if journal.resumed else "")
    )
    search = Search(cfg, out, backend, journal, space, log)
    try:
        summary = _search(search)
    finally:
        backend.close()
    return summary


def _search(s: Search) -> dict[str, Any]:
    from bigmerge.search import report

    cfg = s.cfg
    rows: dict[str, dict[str, Any]] = {}
    singles: list[dict[str, Any]] = []
    if cfg.baselines or cfg.optimizer.name == "greedy":
        singles = s.singles()
        rows["uniform soup"] = s.uniform()
        best_single = max(singles, key=lambda e: e["fitness"])
        rows["best single"] = best_single
        rows["greedy soup"] = s.greedy(singles)
    if cfg.optimizer.name == "cmaes":
        best = s.cmaes()
        if best is None:
            raise ConfigError(
                "cmaes: every candidate was infeasible (all weights cut to zero); raise sigma0 or use constraint 'none'"
            )
        rows = {"cmaes": best, **rows}
        chosen = "cmaes"
    else:
        chosen = "greedy soup"
    # held-out scores of each row's config (the same config on the other split)
    held = s.evaluate(
        [
            Job(f"{name} (held-out)", "heldout", e["config"], meta={"role": "heldout", "of": e["key"]})
            for name, e in rows.items()
        ]
    )
    table = []
    for (name, e), h in zip(rows.items(), held):
        table.append(
            {
                "name": name,
                "label": e["label"],
                "search_fitness": e["fitness"],
                "heldout_fitness": h["fitness"],
                "heldout_scores": h["scores"],
                "search_scores": e["scores"],
                "nonzero_weights": _nonzero(s.space, e["config"]),
                "config": e["config"],
            }
        )
    summary = report.write_results(s, table, chosen)
    return summary


def _nonzero(space: Space, config: dict[str, Any]) -> int:
    if isinstance(space, WeightsSpace) or config.get("merge_method") == "linear":
        base = config.get("base_model")
        return sum(
            1 for m in config["models"] if m["model"] != base and (m.get("parameters") or {}).get("weight", 1) != 0
        )
    return len(config["models"])


def _prepare_out(out: Path, cfg: SearchConfig, overwrite: bool) -> None:
    import shutil

    state = out / STATE_FILE
    fp = cfg.fingerprint()
    if state.exists():
        old = json.loads(state.read_text())
        if old.get("fingerprint") != fp and not overwrite:
            was, now = old.get("backend"), cfg.backend_fingerprint()
            if was is not None and was != now and _without_backend(old.get("config"), cfg):
                raise OutputExistsError(
                    f"{out}: its journal was scored by backend {_describe(was)}; this config scores with "
                    f"{_describe(now)}, whose scores would not compare (use the same backend, or --overwrite)"
                )
            raise OutputExistsError(
                f"{out}: holds a search of another config (its journal would not apply); use --overwrite"
            )
        if overwrite:
            shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out}: exists and is not a search directory; use --overwrite or another --out")
    elif overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not state.exists():
        state.write_text(
            json.dumps(
                {"fingerprint": fp, "backend": cfg.backend_fingerprint(), "config": cfg.model_dump(mode="json")},
                indent=1,
            )
        )


def _without_backend(old: Any, cfg: SearchConfig) -> bool:
    """Whether the old search's config is this one apart from the backend (and evaluation)."""
    if not isinstance(old, dict):
        return False
    try:
        prev = SearchConfig.model_validate(old)
    except ValueError:
        return False

    def strip(c: SearchConfig) -> dict[str, Any]:
        return {
            **c.model_dump(mode="json", exclude={"evaluation"}),
            "fitness": c.fitness.model_dump(mode="json", exclude={"backend"}),
        }

    return strip(prev) == strip(cfg)


def _describe(backend: dict[str, Any]) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in backend.items() if k != "type" and v not in (None, {}, False))
    return f"{backend['type']!r}" + (f" ({args})" if args else "")
