"""tools/bench_quality.py: configs with each operator's usual parameters, and a run on the small zoo."""

from __future__ import annotations

import json
from pathlib import Path

import bench_quality
import pytest
import yaml
from zoo_fixture import small_zoo_dir

from bigmerge.ops import REGISTRY
from bigmerge.planning.config import load_config

pytestmark = pytest.mark.slow  # every operator merged and scored on the zoo


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_zoo_dir(tmp_path_factory)


def test_usual_parameters(tmp_path: Path) -> None:
    ties = bench_quality.merge_config("ties", "B", ["m1", "m2"], {})
    assert ties["base_model"] == "B"
    assert ties["models"] == [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in ("m1", "m2")]
    assert ties["parameters"] == {"normalize": True}
    lin = bench_quality.merge_config("linear", "B", ["m1", "m2"], {"linear": {"weight": 0.25}})
    assert "base_model" not in lin and lin["models"][1]["parameters"] == {"weight": 0.25}
    over = bench_quality.merge_config(
        "ties", "B", ["m1"], bench_quality.parse_overrides(["*.density=0.3", "ties.lambda=2"])
    )
    assert over["models"][0]["parameters"]["density"] == 0.3 and over["parameters"]["lambda"] == 2
    # every registered operator gets a config the config loader accepts, or a named missing parameter
    for method in REGISTRY:
        try:
            cfg = bench_quality.merge_config(method, "B", ["m1", "m2"], {})
        except KeyError as exc:
            assert any(p.name == exc.args[0] and p.required for p in REGISTRY[method].params)
            continue
        path = tmp_path / f"{method}.yaml"
        path.write_text(json.dumps(cfg))
        assert load_config(str(path)).merge_method == method


def test_bench_on_the_small_zoo(small_zoo: Path, tmp_path: Path) -> None:
    rc = bench_quality.main(
        [
            str(small_zoo),
            "--out",
            str(tmp_path),
            "--scenarios",
            "specialists",
            "--methods",
            "linear,ties,dam",
            "--limit",
            "10",
            "--set",
            "dam.max_steps=2",
            "--set",
            "dam.examples=16",
        ]
    )
    assert rc == 0
    data = json.loads((tmp_path / "quality.json").read_text())
    rows = [r["name"] for r in data["rows"]]
    assert rows == [
        "specialists/base",
        "specialists/sort",
        "specialists/fin",
        "specialists/linear",
        "specialists/ties",
        "specialists/dam",
    ]
    assert {r["group"] for r in data["rows"]} == {"specialists"}
    dam = next(r for r in data["rows"] if r["name"] == "specialists/dam")
    assert sorted(dam["scores"]) == sorted(data["tasks"])
    assert all(0 <= v <= 1 for v in dam["scores"].values()) and 0 <= dam["avg"] <= 1
    train = yaml.safe_load((tmp_path / "configs" / "specialists-dam-train.yaml").read_text())
    assert [Path(m["model"]).name for m in train["models"]] == ["sort", "fin"]
    assert train["training"]["engine"] == "torch" and train["training"]["max_steps"] == 2
    assert "| specialists/dam |" in (tmp_path / "quality.md").read_text()
    # a scenario whose models all train on every skill gives DAM no data of their own: skipped
    info = json.loads((small_zoo / "zoo.json").read_text())
    with pytest.raises(ValueError, match="every skill"):
        bench_quality.dam_skills(info, info["scenarios"]["similar"]["models"])
    assert sorted(p.name for p in (tmp_path / "configs").iterdir()) == [
        "specialists-dam-train.yaml",
        "specialists-linear.yaml",
        "specialists-ties.yaml",
    ]
    assert not (tmp_path / "merged").exists()  # merges are scored, then removed
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    assert "| specialists/ties |" in (tmp_path / "quality.md").read_text()


def test_search_rows_on_the_small_zoo(small_zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scenario with a search config gets bigmerge search's CMA-ES best and greedy soup as rows,
    merged and scored like the operators: on the search's held-out documents, its held-out scores."""
    cfg = {
        "merge": {
            "merge_method": "linear",
            "models": [{"model": "zoo/mix1"}, {"model": "zoo/mix2"}, {"model": "zoo/sort"}],
        },
        "optimizer": {"name": "cmaes", "popsize": 2, "budget": 4, "seed": 0},
        "fitness": {"tasks": {"zoo_sort": 1}, "heldout": 12, "limit": 8, "batch_size": 32},
        "evaluation": {"mode": "memory"},
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(bench_quality, "SEARCHES", {"similar": path})
    out = tmp_path / "bench"
    args = [str(small_zoo), "--out", str(out), "--scenarios", "similar", "--methods", "linear"]
    assert bench_quality.main([*args, "--tasks", "zoo_sort", "--limit", "12"]) == 0
    data = json.loads((out / "quality.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows)[-2:] == ["similar/search: cmaes", "similar/search: greedy soup"]
    summary = json.loads((out / "search-similar" / "summary.json").read_text())
    held = {r["name"]: r["heldout_scores"] for r in summary["rows"]}
    assert rows["similar/search: cmaes"]["scores"] == held["cmaes"]
    assert rows["similar/search: greedy soup"]["scores"] == held["greedy soup"]
    digest = data["meta"]["searches"]["similar"]
    assert digest["rows"]["cmaes"]["nonzero_weights"] >= 1 and digest["evaluations"] == len(
        (out / "search-similar" / "history.jsonl").read_text().splitlines()
    )
    written = yaml.safe_load((out / "configs" / "similar-search.yaml").read_text())
    assert [m["model"] for m in written["merge"]["models"]] == [str(small_zoo / m) for m in ("mix1", "mix2", "sort")]
    assert "similar/search: `bigmerge search" in (out / "quality.md").read_text()
    # a rerun resumes the search from its journal: nothing is scored again
    assert bench_quality.main([*args, "--tasks", "zoo_sort", "--limit", "12"]) == 0
    assert json.loads((out / "search-similar" / "summary.json").read_text())["evaluations"]["run_now"] == 0
    # --no-search leaves the rows out
    assert (
        bench_quality.main(
            [*args, "--tasks", "zoo_sort", "--limit", "12", "--out", str(tmp_path / "b2"), "--no-search"]
        )
        == 0
    )
    assert not any("search" in r["name"] for r in json.loads((tmp_path / "b2" / "quality.json").read_text())["rows"])
