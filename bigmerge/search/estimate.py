"""What a whole search will cost before it is launched (``bigmerge search CONFIG --estimate``).

- Candidates, by phase, as ``run.py`` asks for them: every checkpoint alone and the uniform soup
  (one batch), the greedy soup's trials (one candidate per batch: each depends on the last), the
  optimiser's generations (batches of popsize), the held-out scorings (one batch).
- Per candidate merge: ``bigmerge plan``'s cost model for one merge of the pool on the cluster
  (``bigmerge.planning.estimate``), every source read once, the merged model written once to scratch.
- Per candidate evaluation: given (``--eval-seconds``), or measured: the first candidate in the
  journal at OUT.
- Wall time: a batch of k candidates takes k·(M + E) one after the other; pipelined, the batch is
  simulated as the pipeline runs it (``batch_seconds``): merges hide behind scorings (in flight ≥ 2),
  and up to ``evaluators`` scorings run at once; a batch of one (a greedy trial) cannot overlap.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from bigmerge.errors import ConfigError
from bigmerge.planning.estimate import Cluster, Estimate, estimate_model
from bigmerge.search.config import SearchConfig, WeightSpace
from bigmerge.search.space import pool_models

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass
class SearchEstimate:
    batches: list[tuple[str, int, int]]  # (phase, batches, candidates per batch)
    merge: Estimate
    eval_s: float
    eval_from: str
    in_flight: int
    evaluators: int
    params: float

    @property
    def candidates(self) -> int:
        return sum(n * k for _, n, k in self.batches)

    def wall(self, pipelined: bool) -> float:
        m, e = self.merge.seconds, self.eval_s
        total = 0.0
        for _, n, k in self.batches:
            one = batch_seconds(k, m, e, self.in_flight, self.evaluators) if pipelined else k * (m + e)
            total += n * one
        return total

    def describe(self) -> str:
        m = self.merge
        cand = self.candidates
        phases = ", ".join(
            f"{name} {n * k}" + (f" ({n} x {k})" if n > 1 and k > 1 else "") for name, n, k in self.batches
        )
        lines = [
            f"candidates    {cand}: {phases}",
            f"model         {self.params / 1e9:g}B parameters; per candidate read {_gb(m.bytes_read)}, "
            f"write {_gb(m.bytes_written)} to scratch",
            f"merge         per candidate {m.describe()}",
            f"evaluation    ~{_duration(self.eval_s)} per candidate ({self.eval_from})",
            f"whole search  ~{_duration(self.wall(self.in_flight >= 2))} wall"
            + (
                f" pipelined ({self.in_flight} in flight, {self.evaluators} evaluator(s)); "
                f"~{_duration(self.wall(False))} one after the other"
                if self.in_flight >= 2
                else " (in_flight 1: merge and scoring one after the other)"
            ),
            f"bytes         read {_gb(cand * m.bytes_read)}, written {_gb(cand * m.bytes_written)} "
            f"(scratch holds at most {self.in_flight + 1} candidates: {_gb((self.in_flight + 1) * m.bytes_written)})",
        ]
        return "\n".join(lines)


def batch_seconds(k: int, merge_s: float, eval_s: float, in_flight: int, evaluators: int) -> float:
    """A batch of k candidates through the pipeline, simulated as ``pipeline.py`` runs it: merges
    one after the other, each starting once fewer than in_flight candidates are unscored on disk;
    a scoring starts as soon as its merge is done and one of the evaluators is free."""
    import heapq

    free = [0.0] * evaluators  # when each evaluator is next free
    ends: list[float] = []  # scorings' end times, of the candidates still on disk
    t = 0.0  # the merging thread's clock
    last = 0.0
    for _ in range(k):
        ends.sort()
        while len(ends) >= in_flight:  # wait for the first scoring to end; its candidate is removed
            t = max(t, ends.pop(0))
        t += merge_s
        start = max(t, heapq.heappop(free))
        end = start + eval_s
        heapq.heappush(free, end)
        ends.append(end)
        last = max(last, end)
    return last


def _duration(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _gb(n: float) -> str:
    return f"{n / 1e12:.1f} TB" if n >= 1e12 else f"{n / 1e9:.1f} GB"


def phases(cfg: SearchConfig, n_pool: int) -> list[tuple[str, int, int]]:
    """(phase, number of batches, candidates per batch), in the order the search runs them."""
    out: list[tuple[str, int, int]] = []
    o = cfg.optimizer
    rows = 1
    if cfg.baselines or o.name == "greedy":
        out.append(("checkpoints + uniform soup", 1, n_pool + 1))
        out.append(("greedy trials", n_pool - 1, 1))
        rows += 3
    if o.name == "cmaes":
        dim = n_pool if isinstance(cfg.space, WeightSpace) else n_pool * 4
        pop = o.popsize or 4 + int(3 * math.log(dim))
        full, rest = divmod(o.budget, pop)
        if full:
            out.append(("CMA-ES", full, pop))
        if rest:
            out.append(("CMA-ES (last, partial)", 1, rest))
    else:
        rows -= 1
    out.append(("held-out", 1, rows))
    return out


def estimate_search(
    cfg: SearchConfig,
    cluster: Cluster,
    *,
    params: float | None = None,
    eval_seconds: float | None = None,
    journal: Path | None = None,
) -> SearchEstimate:
    template = cfg.template()
    n_sources = len(template.model_refs())
    n_pool = len(pool_models(cfg.merge))
    src_item = 2  # training checkpoints: bf16 on disk
    out_item = ITEMSIZE.get(template.out_dtype or "bfloat16", 2)
    if params is None:
        from bigmerge.search.fitness import model_bytes

        try:
            params = model_bytes(cfg) / src_item
        except Exception as exc:  # noqa: BLE001 - unreachable sources: say what to give instead
            raise ConfigError(
                f"--estimate: cannot read the sources' headers ({exc}); give --params, e.g. 100B"
            ) from None
    if eval_seconds is not None:
        eval_from = "given"
    else:
        first = _first_eval(journal)
        if first is None:
            raise ConfigError(
                "--estimate: give --eval-seconds S (one candidate's scoring), or --out of a search that has "
                "scored its first candidate (measured there)"
            )
        eval_seconds, label = first
        eval_from = f"measured: {label} in the journal"
    merge = estimate_model(
        template.merge_method, params, n_sources, cluster, source_bytes_per_param=src_item, out_bytes_per_param=out_item
    )
    ev = cfg.evaluation
    return SearchEstimate(phases(cfg, n_pool), merge, eval_seconds, eval_from, ev.in_flight, ev.evaluators, params)


def _first_eval(journal: Path | None) -> tuple[float, str] | None:
    if journal is None or not journal.is_file():
        return None
    for line in journal.read_text().splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        return float(e["seconds"]["eval"]), str(e["label"])
    return None
