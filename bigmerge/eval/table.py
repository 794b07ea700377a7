"""A table of scores (rows: models, columns: tasks) with its macro average, as text, JSON, Markdown and PNG."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BAR_ROWS = 8  # panels with more rows are drawn as a heatmap: bars would be too thin to read


@dataclass
class Table:
    """Scores in [0, 1] (or any metric) by row and task; ``metric`` says which metric each task reports.

    A missing score is NaN. ``macro(row)`` is the unweighted mean over the tasks that have a score.
    ``groups`` optionally labels rows (e.g. a scenario), for plots with one panel per group.
    """

    rows: list[str]
    tasks: list[str]
    scores: dict[str, dict[str, float]]
    metric: dict[str, str] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def score(self, row: str, task: str) -> float:
        return self.scores.get(row, {}).get(task, math.nan)

    def macro(self, row: str) -> float:
        vals = [v for t in self.tasks if not math.isnan(v := self.score(row, t))]
        return sum(vals) / len(vals) if vals else math.nan

    def row(self, name: str) -> dict[str, float]:
        """{task: score, ..., "avg": macro} of one row."""
        return {**{t: self.score(name, t) for t in self.tasks}, "avg": self.macro(name)}

    # --- text ------------------------------------------------------------------------------------

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        head = ["model", *self.tasks, "avg"]
        body = []
        for r in self.rows:
            vals = [self.score(r, t) for t in self.tasks] + [self.macro(r)]
            body.append([r, *("–" if math.isnan(v) else f"{v:.3f}" for v in vals)])
        return head, body

    def to_text(self) -> str:
        head, body = self._cells()
        widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
        lines = [
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in [head, *body]
        ]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        head, body = self._cells()
        out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        out += ["| " + " | ".join(row) + " |" for row in body]
        if self.metric:
            metrics = sorted(set(self.metric.values()))
            out.append("")
            out.append(f"Metric: {', '.join(metrics)}; avg is the unweighted mean over the tasks.")
        return "\n".join(out) + "\n"

    def to_json(self) -> dict[str, Any]:
        def num(v: float) -> float | None:
            return None if math.isnan(v) else v

        return {
            "tasks": self.tasks,
            "metric": self.metric,
            "rows": [
                {
                    "name": r,
                    **({"group": self.groups[r]} if r in self.groups else {}),
                    "scores": {t: num(self.score(r, t)) for t in self.tasks},
                    "avg": num(self.macro(r)),
                }
                for r in self.rows
            ],
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Table:
        rows = [r["name"] for r in data["rows"]]
        scores = {r["name"]: {t: (math.nan if v is None else v) for t, v in r["scores"].items()} for r in data["rows"]}
        groups = {r["name"]: r["group"] for r in data["rows"] if "group" in r}
        return cls(rows, list(data["tasks"]), scores, dict(data.get("metric", {})), groups, dict(data.get("meta", {})))

    # --- plot ------------------------------------------------------------------------------------

    def plot(self, path: str | Path, title: str = "") -> Path:
        """One panel per group: a grouped bar chart (tasks and avg on the x axis, one bar per row)
        when the panel has at most ``BAR_ROWS`` rows, else a heatmap with every score written in."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels: dict[str, list[str]] = {}
        for r in self.rows:
            panels.setdefault(self.groups.get(r, ""), []).append(r)
        cols = [*self.tasks, "avg"]
        bounded = all(0 <= v <= 1 for s in self.scores.values() for v in s.values() if not math.isnan(v))
        heights = [3.4 if len(rows) <= BAR_ROWS else 0.8 + 0.32 * len(rows) for rows in panels.values()]
        fig, axes = plt.subplots(
            len(panels),
            1,
            figsize=(max(7.0, 1.3 * len(cols) + 3.0), sum(heights) + 0.6),
            squeeze=False,
            gridspec_kw={"height_ratios": heights},
        )
        cmap = plt.get_cmap("tab10")
        for ax, (group, rows) in zip(axes[:, 0], panels.items()):
            labels = [r.removeprefix(f"{group}/") if group else r for r in rows]
            vals = [[self.row(r)[c] for c in cols] for r in rows]
            if len(rows) <= BAR_ROWS:
                width = 0.8 / len(rows)
                for i, (label, v) in enumerate(zip(labels, vals)):
                    xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(cols))]
                    ax.bar(xs, [0.0 if math.isnan(x) else x for x in v], width, label=label, color=cmap(i % 10))
                ax.set_xticks(range(len(cols)), cols)
                if bounded:
                    ax.set_ylim(0, 1.0)
                ax.set_ylabel(", ".join(sorted(set(self.metric.values()))) or "score")
                ax.grid(axis="y", alpha=0.3)
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
            else:
                im = ax.imshow(
                    vals, aspect="auto", cmap="viridis", vmin=0.0 if bounded else None, vmax=1.0 if bounded else None
                )
                ax.set_xticks(range(len(cols)), cols)
                ax.set_yticks(range(len(rows)), labels, fontsize=8)
                for i, v in enumerate(vals):
                    for j, x in enumerate(v):
                        if not math.isnan(x):
                            ax.text(
                                j,
                                i,
                                f"{x:.2f}",
                                ha="center",
                                va="center",
                                fontsize=7,
                                color="white" if x < 0.6 else "black",
                            )
                fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
            ax.set_title(group or title)
        top = 1.0
        if title and panels.keys() != {""}:
            fig.suptitle(title)
            top = 1.0 - 0.5 / fig.get_figheight()  # room for the title above the first panel's
        fig.tight_layout(rect=(0.0, 0.0, 1.0, top))
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out

    def write(self, out_dir: str | Path, stem: str = "eval", title: str = "") -> dict[str, Path]:
        """Write STEM.json, STEM.md and STEM.png into out_dir; returns their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
        paths["json"].write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        paths["md"].write_text((f"# {title}\n\n" if title else "") + self.to_markdown(), encoding="utf-8")
        self.plot(paths["png"], title=title)
        return paths
