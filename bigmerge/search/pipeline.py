"""Disk mode at scale: every rank merges each candidate through the executor into scratch while rank 0's
evaluator scores the one before it.

    rank 0:   merge c0 ─ merge c1 ─ (wait) ─ merge c2 ─ …           every rank takes part in each merge
    eval:              score c0 ─── score c1 ─── score c2 …          a thread: lm-eval here, or a command

At most ``evaluation.in_flight`` candidates exist in scratch at once (merged or being merged, not yet
scored): before a merge starts, rank 0 waits for a scoring to finish and removes that candidate's
checkpoint. The best search candidate's checkpoint is kept (``keep_best``; one more directory, replaced
when a better one is scored), and a held-out scoring of its config reuses it instead of merging again.

A candidate's directory is named by its merge config, so that a rerun after a kill finds it: a
finished merge there is scored without merging again, an interrupted one resumes from its block
journal. Journal lines carry each candidate's merge and scoring times (``timeline``, seconds since
the epoch) to show the overlap.

Scratch may be a local or shared directory or an object store URL (``s3://bucket/scratch``): the
candidates' checkpoints go there; what the pipeline keeps for itself (``best.json``, each candidate's
merge config and its evaluation's work directory) stays in a local directory (``state``: the scratch
directory itself when it is local, else ``OUT/scratch``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from bigmerge.engine.faults import FAULT_ENV as EXECUTOR_FAULT_ENV
from bigmerge.output.export import MANIFEST_NAME
from bigmerge.search.fitness import CandidateScorer, Job, merge_candidate

BEST_FILE = "best.json"


def candidate_name(config: dict[str, Any]) -> str:
    """One directory per merge config (both splits of one config share it)."""
    return "c-" + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def candidate_dir(scratch: Path, config: dict[str, Any]) -> Path:
    return scratch / candidate_name(config)


class _NotStarted(Exception):
    """A queued scoring dropped because an earlier one failed for good (never journaled)."""


class PipelineBackend:
    """Rank 0's side: merges in this thread (collectively, with the other ranks), scorings in a pool."""

    def __init__(
        self,
        comm: Any,
        scorer: CandidateScorer,
        scratch: str | Path,
        in_flight: int,
        evaluators: int,
        keep_best: bool,
        state: Path | None = None,
    ):
        from bigmerge.storage.fs import location

        self.comm = comm
        self.scorer = scorer
        self.store = location(str(scratch))  # where candidates are merged: a directory or a URL
        self.scratch = Path(self.store.path) if self.store.is_local else (state or Path("scratch"))  # local state
        self.in_flight = in_flight
        self.keep_best = keep_best
        self.pool = ThreadPoolExecutor(evaluators, thread_name_prefix="bigmerge-eval")
        self._failed = threading.Event()  # a scoring failed for good: queued ones do not start
        from bigmerge.eval.backends import STOP

        STOP.clear()  # a search stopped earlier in this process (tests, notebooks) does not stop this one
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.store.makedirs()
        best = self.scratch / BEST_FILE
        self.best: dict[str, Any] | None = json.loads(best.read_text()) if best.is_file() else None
        if self.best is not None and not self.store.join(self.best["dir"], MANIFEST_NAME).exists():
            self.best = None
        self.max_on_disk = 0  # most candidate directories seen at once, the kept best not counted
        self.merges = 0  # candidates merged by this process (for fault injection)
        self.scorings = 0
        self.handed = 0  # results handed on (journaled by the caller)

    def url(self, name: str) -> str:
        """A candidate's checkpoint: a local path, or a URL in the object store."""
        return self.store.join(name).url

    def run(self, jobs: list[Job]) -> Iterator[tuple[Job, dict[str, Any]]]:
        wanted = {candidate_name(j.config) for j in jobs}
        self._failed.clear()
        self._remove_stale(wanted)
        pending: dict[Future[dict[str, Any]], tuple[Job, str, list[float]]] = {}
        try:
            for job in jobs:
                while len(pending) >= self.in_flight:
                    yield from self._finish(pending, wait(pending, return_when=FIRST_COMPLETED).done)
                name = candidate_name(job.config)
                t0 = time.time()
                if (
                    not self._is_best(name) and not self.store.join(name, MANIFEST_NAME).exists()
                ):  # not merged by a killed run
                    self._note_on_disk(len(pending) + 1)
                    self.merges += 1
                    if _injected("merge", self.merges):  # killed after the merge's first block
                        os.environ[EXECUTOR_FAULT_ENV] = "0:1:kill"
                    cfg_path = str(self.scratch / (name + ".yaml"))
                    self.comm.bcast(("merge", (job.config, cfg_path, self.url(name))))
                    merge_candidate(self.comm, job.config, Path(cfg_path), self.url(name))
                timeline = [t0, time.time()]
                pending[self.pool.submit(self._score, job, name, timeline)] = (job, name, timeline)
            while pending:
                yield from self._finish(pending, wait(pending, return_when=FIRST_COMPLETED).done)
        except BaseException:
            from bigmerge.eval.backends import STOP, kill_running

            for fut in pending:  # scorings not started are dropped, running commands stopped
                fut.cancel()
            kill_running()
            wait(pending)
            STOP.clear()  # the threads have stopped: later evaluations in this process may run
            raise

    def _score(self, job: Job, name: str, timeline: list[float]) -> dict[str, Any]:
        if self._failed.is_set():  # queued behind a scoring that failed for good: never started
            raise _NotStarted(name)
        try:
            return self._score_now(job, name, timeline)
        except BaseException:
            # before this worker takes the next queued scoring: the search stops, and an
            # evaluation job (a GPU node for half an hour) must not start in the meantime
            self._failed.set()
            raise

    def _score_now(self, job: Job, name: str, timeline: list[float]) -> dict[str, Any]:
        self.scorings += 1
        if _injected("eval", self.scorings):  # once the scorings before it are journaled
            deadline = time.time() + 120
            while self.handed < self.scorings - 1 and time.time() < deadline:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)
        t2 = time.time()
        res = self.scorer.score_checkpoint(job, self.url(name), work=self.scratch / (name + ".eval"))
        t3 = time.time()
        res["seconds"]["merge"] = round(timeline[1] - timeline[0], 3)
        res["timeline"] = {"merge": [round(t, 3) for t in timeline], "eval": [round(t2, 3), round(t3, 3)]}
        return res

    def _finish(
        self, pending: dict[Future[dict[str, Any]], tuple[Job, str, list[float]]], done: set[Future[dict[str, Any]]]
    ) -> Iterator[tuple[Job, dict[str, Any]]]:
        """Results of finished scorings, in submission order; a failed one is raised after every
        other scoring that finishes has been handed on (so that it is journaled)."""
        error: BaseException | None = None
        for fut in [f for f in pending if f in done]:
            job, name, _ = pending.pop(fut)
            try:
                res = fut.result()
            except _NotStarted:
                continue
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                error = error or exc
                continue
            self._keep_or_remove(job, name, res)
            yield job, res
            self.handed += 1
        if error is not None:  # scorings already running finish and are journaled; queued ones are dropped
            for fut in pending:
                fut.cancel()
            wait(pending)
            for fut in list(pending):
                job, name, _ = pending.pop(fut)
                if not fut.cancelled() and fut.exception() is None:
                    res = fut.result()
                    self._keep_or_remove(job, name, res)
                    yield job, res
            raise error

    def _is_best(self, name: str) -> bool:
        return self.best is not None and self.best["dir"] == name

    def _keep_or_remove(self, job: Job, name: str, res: dict[str, Any]) -> None:
        if self._is_best(name):
            self._remove_extras(name)
            return
        if self.keep_best and job.split == "search" and (self.best is None or res["fitness"] > self.best["fitness"]):
            old = self.best
            self.best = {"dir": name, "label": job.label, "fitness": res["fitness"], "config": job.config}
            tmp = self.scratch / (BEST_FILE + ".tmp")
            tmp.write_text(json.dumps(self.best, indent=1))
            tmp.replace(self.scratch / BEST_FILE)
            if old is not None:
                self._remove(old["dir"])
            self._remove_extras(name)
            return
        self._remove(name)

    def _remove_stale(self, wanted: set[str]) -> None:
        """Candidates of an earlier batch or a killed run that this batch does not ask for."""
        names = {n for n in self.store.listdir() if n.startswith("c-")}
        names |= {p.name.split(".")[0] for p in self.scratch.glob("c-*")}
        for name in names:
            if name not in wanted and not self._is_best(name):
                self._remove(name)

    def _note_on_disk(self, n: int) -> None:
        self.max_on_disk = max(self.max_on_disk, n)

    def best_checkpoint(self) -> dict[str, Any] | None:
        if self.best is None:
            return None
        return {**self.best, "path": self.url(self.best["dir"])}

    def close(self) -> None:
        self.comm.bcast(("stop", None))
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.scorer.close()

    def _remove(self, name: str) -> None:
        self.store.join(name).remove(recursive=True)
        self._remove_extras(name)

    def _remove_extras(self, name: str) -> None:
        (self.scratch / (name + ".yaml")).unlink(missing_ok=True)
        shutil.rmtree(self.scratch / (name + ".eval"), ignore_errors=True)


FAULT_ENV = "BIGMERGE_SEARCH_FAULT"


def _injected(stage: str, n: int) -> bool:
    """For the kill tests: BIGMERGE_SEARCH_FAULT=merge:K kills this process (SIGKILL) after the
    first block of its K-th merge; eval:K as its K-th scoring starts."""
    return os.environ.get(FAULT_ENV, "") == f"{stage}:{n}"
