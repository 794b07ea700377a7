"""bigmerge eval and bigmerge.eval: lm-eval on checkpoints on disk, merged checkpoints and in-memory models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from make_zoo import greedy_accuracy, load_checkpoint
from zoo_fixture import small_zoo_dir

from bigmerge.cli import main as cli_main
from bigmerge.engine.comm import SerialComm
from bigmerge.errors import ConfigError, SourceError
from bigmerge.eval import Evaluator, Table, evaluate, resolve_tasks, zoo_tasks
from bigmerge.merge import MergeOptions, run_merge

pytestmark = pytest.mark.slow  # lm-eval on the zoo's models


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_zoo_dir(tmp_path_factory)


LIMIT = 40


@pytest.fixture(scope="module")
def evaluator() -> Evaluator:
    with Evaluator("zoo_sort,zoo_fin", limit=LIMIT) as ev:
        yield ev


def test_lm_eval_scores_are_greedy_exact_match(small_zoo: Path, evaluator: Evaluator) -> None:
    """lm-eval's acc on a zoo task equals our own count of items answered greedily, on disk and in memory."""
    from bigmerge.eval import load_model

    table = evaluator.table([small_zoo / "base", small_zoo / "sort"])
    assert table.rows == [str(small_zoo / "base"), str(small_zoo / "sort")]
    assert table.metric == {"zoo_sort": "acc", "zoo_fin": "acc"}
    ours = load_checkpoint(small_zoo / "sort")
    for task in ("zoo_sort", "zoo_fin"):
        items = zoo_tasks.eval_items(task.removeprefix("zoo_"))[:LIMIT]
        assert table.score(str(small_zoo / "sort"), task) == pytest.approx(greedy_accuracy(ours, items), abs=1e-9)
    # the specialist is better at its skill than the base, as lm-eval sees it
    assert table.score(str(small_zoo / "sort"), "zoo_sort") >= table.score(str(small_zoo / "base"), "zoo_sort") + 0.25
    # an in-memory model scores the same as its checkpoint
    model, tok = load_model(small_zoo / "sort")
    assert evaluator.score("cand", model, tok) == table.scores[str(small_zoo / "sort")]
    # ...and a changed in-memory model (what a search tries) scores differently
    for p in model.parameters():
        p.data.mul_(0.5)
    assert evaluator.score("cand", model, tok)["zoo_sort"] < table.score(str(small_zoo / "sort"), "zoo_sort")


def test_cli_scores_a_merge_beside_its_sources(
    small_zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(
        f"merge_method: linear\nmodels:\n  - model: {small_zoo / 'mix1'}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {small_zoo / 'mix2'}\n    parameters: {{weight: 1.0}}\ndtype: float32\n"
    )
    run_merge(str(cfg), str(tmp_path / "merged"), SerialComm(), MergeOptions(quiet=True))
    models = [str(tmp_path / "merged"), str(small_zoo / "mix1"), str(small_zoo / "sort")]
    rc = cli_main(
        ["eval", *models, "--tasks", "zoo_sort,zoo_fin", "--limit", "20", "--out", str(tmp_path / "ev"), "--quiet"]
    )
    assert rc == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["model", "zoo_sort", "zoo_fin", "avg"]
    data = json.loads((tmp_path / "ev" / "eval.json").read_text())
    table = Table.from_json(data)
    assert table.rows == models and table.tasks == ["zoo_sort", "zoo_fin"]
    for line, row in zip(printed[1:], table.rows):
        cells = line.split()
        assert cells[0] == row
        assert [float(c) for c in cells[1:]] == [round(table.row(row)[c], 3) for c in ("zoo_sort", "zoo_fin", "avg")]
    for row in data["rows"]:
        assert math.isclose(row["avg"], sum(row["scores"].values()) / 2)
    # the soup of two near-identical models scores like them (averaging is harmless among similar models)
    assert abs(table.macro(models[0]) - table.macro(models[1])) <= 0.15
    md = (tmp_path / "ev" / "eval.md").read_text()
    assert f"| {models[2]} | {table.score(models[2], 'zoo_sort'):.3f} |" in md
    png = (tmp_path / "ev" / "eval.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_plot_draws_one_bar_per_row_and_column(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = Table(
        ["a", "b"], ["x", "y"], {"a": {"x": 0.25, "y": 0.75}, "b": {"x": 1.0, "y": math.nan}}, {"x": "acc", "y": "acc"}
    )
    assert t.macro("a") == 0.5 and t.macro("b") == 1.0
    heights: list[float] = []
    real = plt.Figure.savefig

    def spy(fig, *args, **kwargs):  # type: ignore[no-untyped-def]
        for ax in fig.axes:
            heights.extend(round(p.get_height(), 4) for p in ax.patches)
        return real(fig, *args, **kwargs)

    plt.Figure.savefig = spy  # type: ignore[method-assign]
    try:
        t.plot(tmp_path / "t.png")
    finally:
        plt.Figure.savefig = real  # type: ignore[method-assign]
    assert heights == [0.25, 0.75, 0.5, 1.0, 0.0, 1.0]  # row a: x, y, avg; row b: x, y (missing), avg


def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SourceError, match="no such model directory"):
        evaluate([tmp_path / "missing"], "zoo")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="unknown zoo task 'zoo_nope'"):
        resolve_tasks("zoo_add,zoo_nope")
    assert resolve_tasks("zoo,zoo_add") == ["zoo_add", "zoo_rev", "zoo_sort", "zoo_fin"]
    assert cli_main(["eval", str(tmp_path / "empty"), "--tasks", "zoo_add", "--limit", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"bigmerge: error: {tmp_path / 'empty'}: not a Hugging Face checkpoint (no config.json)"]


def test_an_evaluator_leaves_no_directory_behind_closed_or_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its task files live in a temporary directory: gone after close(), after a failed
    construction (an unknown task), and when an evaluator nobody closed is collected."""
    import gc
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    left = lambda: sorted(p.name for p in tmp_path.glob("bigmerge-eval-*"))  # noqa: E731
    ev = Evaluator("zoo_sort", limit=2)
    assert len(left()) == 1  # the directory exists while the evaluator is in use
    ev.close()
    assert left() == []
    with pytest.raises(ConfigError, match="no_such_task"):
        Evaluator("zoo_sort,no_such_task", limit=2)
    gc.collect()
    assert left() == []
    Evaluator("zoo_add", limit=2)  # never closed, dropped at once
    gc.collect()
    assert left() == []
