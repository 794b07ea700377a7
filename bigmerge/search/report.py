"""The search's result directory: best.yaml, summary.json, report.md, pareto.json and the plots."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from bigmerge.output.card import results_comment

if TYPE_CHECKING:
    from bigmerge.search.run import Search


def pareto_front(entries: list[dict[str, Any]], tasks: list[str]) -> list[dict[str, Any]]:
    """Entries no other entry dominates (at least as good on every task, better on one)."""
    pts = [[e["scores"].get(t, 0.0) for t in tasks] for e in entries]
    front = []
    for i, p in enumerate(pts):
        dominated = any(all(q[k] >= p[k] for k in range(len(p))) and q != p for j, q in enumerate(pts) if j != i)
        if not dominated:
            front.append(entries[i])
    # identical score vectors: keep the first
    seen, out = set(), []
    for e in front:
        key = tuple(e["scores"].get(t, 0.0) for t in tasks)
        if key not in seen:
            seen.add(key)
            out.append(e)
    return sorted(out, key=lambda e: -e["fitness"])


def write_results(s: Search, table: list[dict[str, Any]], chosen: str) -> dict[str, Any]:
    out: Path = s.out
    tasks = list(s.weights)
    best = next(r for r in table if r["name"] == chosen)
    header = (
        f"# bigmerge search: the best merge ({chosen}, {best['label']})\n"
        f"# fitness {best['search_fitness']:.4f} on the search split, {best['heldout_fitness']:.4f} held out\n"
    )
    (out / "best.yaml").write_text(
        header + results_comment(_best_results(s, table, chosen)) + yaml.safe_dump(best["config"], sort_keys=False)
    )
    searched = [e for e in s.journal.entries if e["split"] == "search"]
    front = pareto_front(searched, tasks)
    (out / "pareto.json").write_text(
        json.dumps(
            [
                {"label": e["label"], "fitness": e["fitness"], "scores": e["scores"], "config": e["config"]}
                for e in front
            ],
            indent=1,
        )
    )
    opt_entries = [
        e
        for e in searched
        if e.get("role") == s.cfg.optimizer.name or (chosen == "greedy soup" and e.get("role") == "greedy")
    ]
    summary = {
        "best": chosen,
        "best_config": "best.yaml",
        "tasks": s.weights,
        "heldout": s.cfg.fitness.heldout,
        "rows": [{k: v for k, v in r.items() if k != "config"} for r in table],
        "evaluations": {
            "total_in_journal": len(s.journal.entries),
            "search_split": len(searched),
            "optimizer": len(opt_entries),
            "heldout_split": len(s.journal.entries) - len(searched),
            "run_now": s.evaluated,
            "taken_from_journal": s.reused,
        },
        "seconds": round(time.perf_counter() - s.t0, 1),
        "eval_seconds_total": round(sum(sum(e["seconds"].values()) for e in s.journal.entries), 1),
        "pareto_front": len(front),
    }
    kept = getattr(s.backend, "best_checkpoint", lambda: None)()
    if kept is not None:  # disk mode: the best search candidate's merged checkpoint, left in scratch
        summary["best_checkpoint"] = {k: kept[k] for k in ("path", "label", "fitness")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "report.md").write_text(_markdown(summary, tasks))
    try:
        _plots(s, table, chosen, searched, front, tasks)
    except ImportError:  # matplotlib missing: the numbers are written, the pictures are not
        s.log("matplotlib is not installed: no plots")
    s.log(
        f"best: {chosen} held-out {best['heldout_fitness']:.4f} (search {best['search_fitness']:.4f}); wrote {out}/best.yaml"
    )
    for r in table:
        s.log(
            f"  {r['name']:<14} search {r['search_fitness']:.4f}  held-out {r['heldout_fitness']:.4f}  ({r['nonzero_weights']} checkpoints)"
        )
    return summary


def _best_results(s: Search, table: list[dict[str, Any]], chosen: str) -> str:
    """How good best.yaml's merge is and how that was measured, for the model card of its merge."""
    cfg = s.cfg
    f, o = cfg.fitness, cfg.optimizer
    tasks = list(s.weights)
    best = next(r for r in table if r["name"] == chosen)
    held = (
        f"the first {f.heldout:g} of each task's documents"
        if f.heldout >= 1
        else f"the first {f.heldout:.0%} of each task's documents"
    )
    after = f"up to {f.limit} documents after them" if f.limit else "every document after them"
    if cfg.optimizer.name == "cmaes":
        how = f"CMA-ES over {cfg.space.type} ({getattr(cfg.space, 'constraint', '')}), budget {o.budget} evaluations, seed {o.seed}".replace(
            " ()", ""
        )
    else:
        how = "greedy soup (checkpoints added in order of their own score while the soup improves)"
    b = cfg.backend_fingerprint()
    if b["type"] == "command":  # the line names a cluster, paths, perhaps a user: not in a card
        backend = "the `command` backend (an lm-eval run per candidate; its results JSON read back)"
    else:
        args = ", ".join(f"{k}={v}" for k, v in b.items() if k != "type" and v not in (None, {}, False))
        backend = f"lm-eval's `{b['type']}` model" + (f" ({args})" if args else "") + f", {f.dtype}"
    lines = [
        f"Found by `bigmerge search`: {how}; {len(s.journal.entries)} evaluations in all. The merge is the "
        f"optimiser's best on the search split ({best['label']}); its held-out score is on documents the search never saw.",
        "",
        "| split | documents | fitness | " + " | ".join(tasks) + " |",
        "|---|---|---|" + "---|" * len(tasks),
        f"| search | {after} | {best['search_fitness']:.4f} | "
        + " | ".join(f"{best['search_scores'].get(t, float('nan')):.3f}" for t in tasks)
        + " |",
        f"| held-out | {held} | {best['heldout_fitness']:.4f} | "
        + " | ".join(f"{best['heldout_scores'].get(t, float('nan')):.3f}" for t in tasks)
        + " |",
        "",
        "Fitness: the weighted mean of lm-eval's scores on the tasks ("
        + ", ".join(f"{t} ×{w:g}" for t, w in s.weights.items())
        + f"), scored by {backend}.",
    ]
    others = [r for r in table if r["name"] != chosen]
    if others:
        lines += [
            "",
            "Held-out fitness of the others: "
            + ", ".join(f"{r['name']} {r['heldout_fitness']:.4f}" for r in others)
            + ".",
        ]
    return "\n".join(lines)


def _markdown(summary: dict[str, Any], tasks: list[str]) -> str:
    lines = [
        "| merge | checkpoints | search fitness | held-out fitness | " + " | ".join(tasks) + " |",
        "|---|---|---|---|" + "---|" * len(tasks),
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['name']} | {r['nonzero_weights']} | {r['search_fitness']:.4f} | {r['heldout_fitness']:.4f} | "
            + " | ".join(f"{r['heldout_scores'].get(t, float('nan')):.3f}" for t in tasks)
            + " |"
        )
    ev = summary["evaluations"]
    lines.append("")
    lines.append(
        f"Task columns: held-out scores. {ev['search_split']} search-split evaluations ({ev['optimizer']} by the "
        f"optimiser), {ev['heldout_split']} held-out; {summary['eval_seconds_total']:.0f} s of evaluation in all."
    )
    return "\n".join(lines) + "\n"


def _plots(
    s: Search,
    table: list[dict[str, Any]],
    chosen: str,
    searched: list[dict[str, Any]],
    front: list[dict[str, Any]],
    tasks: list[str],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: Path = s.out
    # fitness over evaluations, best so far, baselines as lines
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = list(range(len(searched)))
    ax.plot(xs, [e["fitness"] for e in searched], ".", alpha=0.6, label="candidate")
    run = []
    for e in searched:
        run.append(max(e["fitness"], run[-1]) if run else e["fitness"])
    ax.plot(xs, run, "-", label="best so far")
    others = [r for r in table if r["name"] != chosen]
    for k, r in enumerate(others):
        ax.axhline(r["search_fitness"], ls=("--", ":", "-.")[k % 3], lw=1, label=r["name"], color=f"C{k + 2}")
    ax.set_xlabel("evaluation (search split)")
    ax.set_ylabel("fitness (weighted macro-average)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fitness.png", dpi=110)
    plt.close(fig)
    # the Pareto front over tasks: one line per member across the tasks
    fig, ax = plt.subplots(figsize=(7, 4))
    for e in searched:
        ax.plot(tasks, [e["scores"].get(t, 0.0) for t in tasks], color="0.85", lw=0.5)
    for e in front[:20]:
        ax.plot(tasks, [e["scores"].get(t, 0.0) for t in tasks], marker="o", lw=1, label=e["label"])
    ax.set_ylabel("score (search split)")
    ax.set_title(f"Pareto front over tasks: {len(front)} of {len(searched)} candidates")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)
    # the best merge's weights
    best = next(r for r in table if r["name"] == chosen)
    desc = s.space.describe(best["config"]) if chosen == "cmaes" else _soup_weights(best["config"], s)
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [Path(m).name for m in desc]
    if desc and all(isinstance(v, (int, float)) for v in desc.values()):
        ax.bar(names, list(desc.values()))
        ax.set_ylabel("weight")
    else:
        import numpy as np

        params = list(next(iter(desc.values())))
        groups = len(next(iter(desc.values()))[params[0]])
        width = 0.8 / max(1, len(desc) * len(params))
        for k, (m, per) in enumerate(desc.items()):
            for j, p in enumerate(params):
                ax.bar(np.arange(groups) + (k * len(params) + j) * width, per[p], width, label=f"{Path(m).name} {p}")
        ax.set_xticks(np.arange(groups), [f"group {g}" for g in range(groups - 1)] + ["other"])
        ax.legend(fontsize=6)
    ax.set_title(f"best merge ({chosen})")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "weights.png", dpi=110)
    plt.close(fig)


def _soup_weights(config: dict[str, Any], s: Search) -> dict[str, float]:
    from bigmerge.search.space import pool_models

    got = {m["model"]: (m.get("parameters") or {}).get("weight", 0.0) for m in config["models"]}
    total = sum(got.values()) or 1.0
    return {m: got.get(m, 0.0) / total for m in pool_models(s.cfg.merge)}
