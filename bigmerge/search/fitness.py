"""Scoring one candidate merge config: merge it (in memory or through the executor), run lm-eval.

Every task's documents are split in two: the first ``heldout`` of them (a fraction, as lm-eval's
``--limit`` reads a fraction, or a count) are held out for the final report, so that
``bigmerge eval --tasks T --limit HELDOUT`` on a merged result reproduces its reported score;
the search scores documents after them (at most ``limit`` per task). The search never sees
a held-out document.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigmerge.engine.comm import SerialComm
from bigmerge.errors import ConfigError
from bigmerge.output.export import MANIFEST_NAME
from bigmerge.planning.config import parse_config
from bigmerge.search.config import SearchConfig

SPLITS = ("search", "heldout")


@dataclass
class Job:
    """One evaluation: a merge config scored on one split of the tasks."""

    label: str
    split: str
    config: dict[str, Any]
    x: list[float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        import hashlib
        import json

        text = json.dumps({"split": self.split, "config": self.config}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]


def heldout_count(n: int, heldout: float) -> int:
    """Documents held out of n: lm-eval's rule for --limit (a fraction is rounded up)."""
    return min(n, int(math.ceil(n * heldout)) if heldout < 1 else int(heldout))


def macro(scores: dict[str, float], weights: dict[str, float]) -> float:
    """Weighted macro-average over tasks; a missing or NaN score counts as 0."""
    total = sum(weights.values())
    return (
        sum(w * (scores.get(t, 0.0) if not math.isnan(scores.get(t, math.nan)) else 0.0) for t, w in weights.items())
        / total
    )


def model_bytes(cfg: SearchConfig) -> int:
    """Bytes of the merged model: the largest source, read from headers only."""
    from bigmerge.planning.catalog import catalog_models

    template = cfg.template()
    cats = catalog_models(template.model_refs(), template.storage_options)
    return max(sum(i.end - i.start for i in c.tensors.values()) for c in cats)


class CandidateScorer:
    """Merges and scores candidates in this process; one per worker process or MPI rank."""

    def __init__(self, cfg: SearchConfig, mode: str, scratch: str | None = None) -> None:
        from bigmerge.eval import Evaluator
        from bigmerge.search.inmemory import InMemoryMerger

        self.cfg = cfg
        self.mode = mode
        self.scratch = scratch
        self.weights = cfg.fitness.task_weights()
        f = cfg.fitness
        self.evaluator = Evaluator(
            list(self.weights), limit=f.heldout, batch_size=f.batch_size, device=f.device, dtype=f.dtype
        )
        try:
            self.samples = self._search_samples()
            template = cfg.template()
            self.merger = InMemoryMerger.for_config(template)
        except BaseException:
            self.evaluator.close()
            raise
        self._tokenizer: Any = None

    def _search_samples(self) -> dict[str, list[int]]:
        f = self.cfg.fitness
        out: dict[str, list[int]] = {}
        for task, n in self.evaluator.doc_counts().items():
            h = heldout_count(n, f.heldout)
            end = n if f.limit is None else min(n, h + f.limit)
            if end <= h:
                raise ConfigError(
                    f"fitness: task {task!r} has {n} documents and all are held out (heldout {f.heldout:g}); "
                    "hold out fewer"
                )
            out[task] = list(range(h, end))
        return out

    def close(self) -> None:
        self.evaluator.close()

    def tokenizer(self, path: str | None = None) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from bigmerge.eval.harness import model_dir
            from bigmerge.planning.catalog import catalog_model

            template = self.cfg.template()
            src = path or template.tokenizer_source or template.base_model or template.model_refs()[0]
            if src != template.tokenizer_source:
                # a model reference: BASE+ADAPTER (or a bare adapter) has its base's tokenizer
                src = catalog_model(src, template.storage_options).root.url
            self._tokenizer = AutoTokenizer.from_pretrained(str(model_dir(src)))
        return self._tokenizer

    def score(self, job: Job, comm: Any = None) -> dict[str, Any]:
        """{'scores': {task: score}, 'fitness': macro, 'seconds': {...}} of one job."""
        t0 = time.perf_counter()
        if self.mode == "memory":
            from bigmerge.search.inmemory import build_model

            config = parse_config(job.config, f"candidate {job.label}")
            tensors, plan = self.merger.merge(config)
            model = build_model(tensors, self.merger.hf_config(plan), self.cfg.fitness.dtype)
            t1 = time.perf_counter()
            samples = self.samples if job.split == "search" else None
            scores = self.evaluator.score(job.label, model, self.tokenizer(), samples=samples)
            return self._result(scores, t1 - t0, time.perf_counter() - t1)
        comm = comm or SerialComm()
        # one directory per worker process; under MPI, rank 0's, shared by the ranks
        d = Path(self.scratch or "scratch") / (f"p{os.getpid()}" if comm.size == 1 else "mpi")
        out = d / "model"
        merge_candidate(comm, job.config, d / "candidate.yaml", out, overwrite=True)
        if comm.rank != 0:  # it helped merge, rank 0 scores
            return {}
        t1 = time.perf_counter()
        try:
            res = self.score_checkpoint(job, out)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        res["seconds"]["merge"] = round(t1 - t0, 3)
        return res

    def _result(self, scores: dict[str, float], merge_s: float, eval_s: float) -> dict[str, Any]:
        return {
            "scores": scores,
            "fitness": macro(scores, self.weights),
            "seconds": {"merge": round(merge_s, 3), "eval": round(eval_s, 3)},
            "mode": self.mode,
            "backend": self.cfg.fitness.backend.type,
            "pid": os.getpid(),
        }

    def score_checkpoint(self, job: Job, checkpoint: str | Path, work: Path | None = None) -> dict[str, Any]:
        """Score the merged checkpoint of ``job`` with the configured backend (this process, or a
        command whose lm-eval results are read back); ``work`` holds a command's output."""
        from bigmerge.eval.backends import score_checkpoint

        samples = self.samples if job.split == "search" else None
        t0 = time.perf_counter()
        scores = score_checkpoint(
            self.evaluator, self.cfg.fitness.backend, checkpoint, label=job.label, samples=samples, work=work
        )
        return self._result(scores, 0.0, time.perf_counter() - t0)


def merge_candidate(
    comm: Any, config: dict[str, Any], cfg_path: Path, out: str | Path, overwrite: bool = False
) -> bool:
    """Merge a candidate's config into ``out`` (a directory or a URL) with every rank, through the
    executor (collective).

    A finished merge there (its manifest) is kept as it is (False: nothing merged); an interrupted
    one resumes from its journal; one that cannot resume is removed and merged again."""
    import yaml

    from bigmerge.errors import OutputExistsError
    from bigmerge.merge import MergeOptions, run_merge
    from bigmerge.storage.fs import location

    dest = location(str(out))
    finished = False
    if comm.rank == 0:
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        finished = not overwrite and dest.join(MANIFEST_NAME).exists()
    if comm.bcast(finished):
        return False
    try:
        run_merge(str(cfg_path), dest.url, comm, MergeOptions(overwrite=overwrite, quiet=True))
    except OutputExistsError:  # a candidate directory left by a kill at a moment a merge cannot resume from
        if comm.rank == 0:
            dest.remove(recursive=True)
        comm.barrier()
        run_merge(str(cfg_path), dest.url, comm, MergeOptions(overwrite=True, quiet=True))
    return True


# --- worker processes ------------------------------------------------------------------------

_WORKER: CandidateScorer | None = None


def worker_init(cfg_json: str, mode: str, scratch: str | None) -> None:
    global _WORKER
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    _WORKER = CandidateScorer(SearchConfig.model_validate_json(cfg_json), mode, scratch)


def worker_score(job: Job) -> dict[str, Any]:
    assert _WORKER is not None
    return _WORKER.score(job)
