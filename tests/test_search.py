"""bigmerge search: in-memory merges equal bigmerge merge, the optimisers, the journal and resume
(a real SIGKILL), the best config reproducing its score, and bad input.

Quality (CMA-ES against the soups on the full zoo) is measured by tools/bench_quality.py, not here:
the small zoo's skills are too weak for a cheap, reliable comparison. Runs use few documents.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from bigmerge.cli import main
from bigmerge.engine.comm import SerialComm
from bigmerge.errors import ConfigError
from bigmerge.merge import MergeOptions, run_merge
from bigmerge.planning.config import parse_config
from bigmerge.search.config import parse_search_config
from bigmerge.search.fitness import heldout_count
from bigmerge.search.inmemory import InMemoryMerger, build_model
from bigmerge.search.journal import Journal
from bigmerge.search.run import Backend, Search
from bigmerge.search.space import LayerGroupsSpace, WeightsSpace

pytestmark = pytest.mark.slow  # CMA-ES searches scored with lm-eval


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small zoo, where the other modules build it (built once per session); or, to iterate
    quickly, an already built one named by BIGMERGE_SMALL_ZOO (make_zoo checks its stamp)."""
    from make_zoo import make_zoo

    out = Path(os.environ.get("BIGMERGE_SMALL_ZOO") or tmp_path_factory.getbasetemp() / "zoo-small")
    make_zoo(out, preset="small")
    return out


REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _search_cfg(zoo: Path, out: Path, **over: Any) -> Path:
    cfg: dict[str, Any] = {
        "merge": {"merge_method": "linear", "models": [{"model": str(zoo / m)} for m in ("sort", "fin", "mix1")]},
        "space": {"type": "weights", "constraint": "simplex"},
        "optimizer": {"name": "cmaes", "popsize": 4, "budget": 4, "seed": 0},
        "fitness": {"tasks": {"zoo_sort": 2, "zoo_fin": 1}, "heldout": 12, "limit": 8, "batch_size": 32},
        "evaluation": {"mode": "memory"},
        "baselines": True,
    }
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    path = out / "search.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(f))
    return got


# --- in-memory merges are bigmerge merge's bytes --------------------------------------------------


@pytest.mark.parametrize(
    "method,extra",
    [
        ("linear", {}),
        ("ties", {"base_model": "base", "density": 0.4}),
        ("dare_ties", {"base_model": "base", "density": 0.6}),  # random: seeded by (seed, tensor, block)
    ],
)
def test_in_memory_merge_is_bit_identical_to_bigmerge_merge(
    small_zoo: Path,
    tmp_path: Path,
    method: str,
    extra: dict[str, Any],
) -> None:
    cfg: dict[str, Any] = {"merge_method": method, "out_dtype": "bfloat16", "models": []}
    for m, w in (("sort", 0.7), ("fin", 0.4), ("mix1", 0.2)):
        params: dict[str, Any] = {"weight": w}
        if "density" in extra:
            params["density"] = extra["density"]
        cfg["models"].append({"model": str(small_zoo / m), "parameters": params})
    if "base_model" in extra:
        cfg["base_model"] = str(small_zoo / extra["base_model"])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    block = 4096  # several blocks per tensor: the block index seeds the random operators
    run_merge(str(path), str(tmp_path / "out"), SerialComm(), MergeOptions(block_bytes=block, quiet=True))
    merger = InMemoryMerger.for_config(parse_config(cfg), block_bytes=block)
    mem, plan = merger.merge(parse_config(cfg))
    assert any(t.n_blocks > 1 for t in plan.tensors)
    disk = _tensors(tmp_path / "out")
    assert disk.keys() == mem.keys()
    for name, x in disk.items():
        assert x.dtype == mem[name].dtype == torch.bfloat16
        assert torch.equal(x.view(torch.int16), mem[name].view(torch.int16)), name
    model = build_model(mem, merger.hf_config(plan))
    state = model.state_dict()
    for name, x in mem.items():
        assert torch.equal(state[name], x.float()), name


# --- spaces --------------------------------------------------------------------------------------


def test_weight_space_maps_x_to_configs_bigmerge_merge_reads() -> None:
    merge = {"merge_method": "linear", "models": [{"model": m} for m in ("a", "b", "c", "d")]}
    sp = WeightsSpace(parse_search_config({"merge": merge, "fitness": {"tasks": "zoo_sort"}}).space, merge)  # type: ignore[arg-type]
    assert sp.dim == 4 and sp.x0.tolist() == [1, 1, 1, 1]
    cfg = sp.config(np.array([2.0, -1.0, 1.0, 1.0]))
    assert cfg is not None
    assert [(m["model"], m["parameters"]["weight"]) for m in cfg["models"]] == [("a", 0.5), ("c", 0.25), ("d", 0.25)]
    parse_config(cfg)
    assert sp.config(np.array([-1.0, -2.0, 0.0, -0.5])) is None  # every weight cut: infeasible
    free = parse_search_config(
        {"merge": merge, "space": {"constraint": "none", "negative": True}, "fitness": {"tasks": "zoo_sort"}}
    )
    sp2 = WeightsSpace(free.space, merge)  # type: ignore[arg-type]
    assert sp2.weights(np.array([2.0, -1.0, 1.0, 1.0])) == [0.5, -0.25, 0.25, 0.25]


def test_layer_group_space_gives_per_group_values_to_every_layer(small_zoo: Path) -> None:
    merge = {
        "merge_method": "ties",
        "base_model": str(small_zoo / "base"),
        "models": [{"model": str(small_zoo / m)} for m in ("sort", "fin")],
    }
    spec = parse_search_config(
        {
            "merge": merge,
            "space": {"type": "layer_groups", "groups": 2, "parameters": {"weight": [0, 1], "density": [0.2, 1.0]}},
            "fitness": {"tasks": "zoo_sort"},
        }
    ).space
    sp = LayerGroupsSpace(spec, merge, num_layers=2)  # type: ignore[arg-type]
    assert sp.dim == 2 * 3 * 2 and sp.bounds == (0.0, 1.0)
    x = np.linspace(0, 1, sp.dim)
    cfg = sp.config(x)
    assert cfg is not None
    vals = sp.values(x)
    merger = InMemoryMerger.for_config(parse_config(cfg))
    plan = merger.plan(parse_config(cfg))
    for t in plan.tensors:
        g = 2 if ".layers." not in t.name else int(t.name.split(".layers.")[1].split(".")[0])
        for k in range(2):  # sort, fin: sources 0 and 1 (the base is last)
            assert t.per_model[k]["weight"] == pytest.approx(round(vals[k, g, 0], 6))
            assert t.per_model[k]["density"] == pytest.approx(round(vals[k, g, 1], 6))
    assert sp.describe(cfg)[str(small_zoo / "sort")]["density"] == pytest.approx([round(v, 6) for v in vals[0, :, 1]])


# --- optimisers, journal and resume with a fake fitness (no lm-eval) --------------------------------


class FakeBackend(Backend):
    """Fitness = a fixed concave function of the weights; reseeds numpy as lm-eval does."""

    def __init__(self, target: dict[str, float]) -> None:
        self.target = target
        self.calls = 0

    def run(self, jobs: list[Any]) -> Any:
        for job in jobs:
            self.calls += 1
            np.random.seed(1234)
            w = {m["model"]: m["parameters"]["weight"] for m in job.config["models"]}
            total = sum(w.values())
            a = sum((w.get(k, 0) / total - v) ** 2 for k, v in self.target.items())
            scores = {"zoo_sort": 1 - a, "zoo_fin": 1 - 2 * a + 0.1 * (w.get("b", 0) > 0)}
            yield (
                job,
                {
                    "scores": scores,
                    "fitness": (2 * scores["zoo_sort"] + scores["zoo_fin"]) / 3,
                    "seconds": {"eval": 0.0},
                },
            )


def _fake_search(tmp_path: Path, budget: int = 24) -> tuple[Search, FakeBackend]:
    merge = {"merge_method": "linear", "models": [{"model": m} for m in ("a", "b", "c", "d")]}
    cfg = parse_search_config(
        {
            "merge": merge,
            "optimizer": {"popsize": 6, "budget": budget, "sigma0": 0.5},
            "fitness": {"tasks": {"zoo_sort": 2, "zoo_fin": 1}},
        }
    )
    backend = FakeBackend({"a": 0.6, "b": 0.0, "c": 0.4, "d": 0.0})
    space = WeightsSpace(cfg.space, merge)  # type: ignore[arg-type]
    return Search(cfg, tmp_path, backend, Journal(tmp_path / "history.jsonl"), space, lambda m: None), backend


def test_cmaes_improves_and_a_rerun_takes_everything_from_the_journal(tmp_path: Path) -> None:
    s, backend = _fake_search(tmp_path)
    uniform = s.uniform()
    best = s.cmaes()
    assert best is not None and best["fitness"] > uniform["fitness"]
    assert backend.calls == 1 + 24
    s2, backend2 = _fake_search(tmp_path)  # the same search again, on the same journal
    best2 = s2.cmaes()
    assert backend2.calls == 0 and s2.reused == 24
    assert best2 == best
    # a longer budget continues where the journal ends: the first 24 candidates are the same ones
    s3, backend3 = _fake_search(tmp_path, budget=30)
    s3.cmaes()
    assert backend3.calls == 6 and s3.reused == 24


def test_greedy_soup_keeps_a_checkpoint_only_when_the_score_improves(tmp_path: Path) -> None:
    s, backend = _fake_search(tmp_path)
    singles = s.singles()
    assert [e["label"] for e in singles] == ["single a", "single b", "single c", "single d"]
    soup = s.greedy(singles)
    kept = [m["model"] for m in soup["config"]["models"]]
    assert kept == ["a", "c"]  # a first (best alone), then c helps; b and d do not
    assert backend.calls == 4 + 3


def test_journal_drops_a_line_cut_by_a_kill(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    j = Journal(path)
    j.append({"key": "k0", "fitness": 0.5})
    j.append({"key": "k1", "fitness": 0.6})
    with open(path, "a") as f:
        f.write('{"key":"k2","fitn')
    j2 = Journal(path)
    assert [e["key"] for e in j2.entries] == ["k0", "k1"]
    j2.append({"key": "k2", "fitness": 0.7})
    assert [e["key"] for e in Journal(path).entries] == ["k0", "k1", "k2"]


def test_heldout_split_follows_lm_evals_limit() -> None:
    assert heldout_count(64, 0.5) == 32 and heldout_count(400, 0.5) == 200
    assert heldout_count(7, 0.5) == 4  # a fraction rounds up, as lm-eval's --limit 0.5
    assert heldout_count(400, 12) == 12 and heldout_count(10, 12) == 10


# --- the whole command, on the small zoo -------------------------------------------------------


def test_search_writes_results_and_best_config_reproduces_its_heldout_score(
    small_zoo: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = _search_cfg(small_zoo, tmp_path, optimizer={"popsize": 2, "budget": 3})  # a partial last generation
    out = tmp_path / "run"
    assert main(["search", str(cfg), "--out", str(out), "--quiet"]) == 0
    for name in (
        "best.yaml",
        "history.jsonl",
        "summary.json",
        "report.md",
        "pareto.json",
        "fitness.png",
        "pareto.png",
        "weights.png",
    ):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["name"]: r for r in summary["rows"]}
    assert list(rows) == ["cmaes", "uniform soup", "best single", "greedy soup"]
    assert summary["evaluations"]["optimizer"] == 3
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len({e["key"] for e in history}) == len(history) == summary["evaluations"]["total_in_journal"]
    assert all({"config", "scores", "fitness", "seconds", "time"} <= e.keys() for e in history)
    best = max((e for e in history if e.get("role") == "cmaes"), key=lambda e: e["fitness"])
    assert rows["cmaes"]["search_fitness"] == best["fitness"]
    assert rows["best single"]["search_fitness"] == max(e["fitness"] for e in history if e.get("role") == "single")
    front = json.loads((out / "pareto.json").read_text())
    searched = [e for e in history if e["split"] == "search"]
    assert front
    for f in front:  # nothing searched dominates a member of the front
        for e in searched:
            ge = all(e["scores"][t] >= f["scores"][t] for t in f["scores"])
            assert not (ge and any(e["scores"][t] > f["scores"][t] for t in f["scores"]))
    assert yaml.safe_load((out / "best.yaml").read_text()) == best["config"]

    # bigmerge merge of best.yaml, scored by bigmerge eval on the held-out documents: the same scores
    merged = tmp_path / "merged"
    assert main(["merge", str(out / "best.yaml"), str(merged), "--quiet"]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                str(merged),
                "--tasks",
                "zoo_sort,zoo_fin",
                "--limit",
                "12",
                "--out",
                str(tmp_path / "ev"),
                "--quiet",
            ]
        )
        == 0
    )
    table = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert table["rows"][0]["scores"] == rows["cmaes"]["heldout_scores"]
    # its model card carries the search's scores and how they were obtained, and parses on the hub
    from huggingface_hub import ModelCard

    card = ModelCard.load(merged / "README.md")
    assert {"merge", "bigmerge", "linear"} <= set(card.data.to_dict()["tags"])
    how = card.content.split("## How good it is")[1].split("## Configuration")[0]
    held = f"| held-out | the first 12 of each task's documents | {rows['cmaes']['heldout_fitness']:.4f} | "
    assert held + " | ".join(f"{rows['cmaes']['heldout_scores'][t]:.3f}" for t in ("zoo_sort", "zoo_fin")) in how
    assert f"| search | up to 8 documents after them | {rows['cmaes']['search_fitness']:.4f} |" in how
    assert "CMA-ES over weights (simplex), budget" in how and "zoo_sort ×2, zoo_fin ×1" in how
    assert "lm-eval's `hf` model" in how and str(tmp_path) not in card.content
    assert "#:" not in card.content.split("## Configuration")[1]  # shown once, not again in the config

    # a rerun finds every evaluation in the journal and evaluates nothing
    assert main(["search", str(cfg), "--out", str(out), "--quiet"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["evaluations"]["run_now"] == 0 and again["rows"] == summary["rows"]


def test_lorahub_search_over_adapters_and_best_config_reproduces_its_heldout_score(
    small_zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """LoraHub: the pool is LoRA adapters on one base (mergekit's BASE+ADAPTER sources); singles
    are the base with one adapter, and best.yaml merges and scores as the search said."""
    models = [{"model": f"{small_zoo / 'base'}+{small_zoo / m}"} for m in ("lora_sort", "lora_fin")]
    cfg = _search_cfg(small_zoo, tmp_path, optimizer={"popsize": 2, "budget": 2})
    data = yaml.safe_load(cfg.read_text())
    data["merge"]["models"] = models
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "run"
    assert main(["search", str(cfg), "--out", str(out), "--quiet"]) == 0
    rows = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    singles = {e["config"]["models"][0]["model"]: e for e in history if e.get("role") == "single"}
    assert sorted(singles) == sorted(m["model"] for m in models)
    # each adapter changes the base: the two singles score differently on the skills
    assert singles[models[0]["model"]]["scores"] != singles[models[1]["model"]]["scores"]
    merged = tmp_path / "merged"
    assert main(["merge", str(out / "best.yaml"), str(merged), "--quiet"]) == 0
    capsys.readouterr()
    args = ["eval", str(merged), "--tasks", "zoo_sort,zoo_fin", "--limit", "12", "--out", str(tmp_path / "ev")]
    assert main([*args, "--quiet"]) == 0
    table = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert table["rows"][0]["scores"] == rows["cmaes"]["heldout_scores"]


def test_killed_search_resumes_without_reevaluating(small_zoo: Path, tmp_path: Path) -> None:
    cfg = _search_cfg(
        small_zoo,
        tmp_path,
        optimizer={"popsize": 2, "budget": 4},
        fitness={"tasks": {"zoo_sort": 1}, "heldout": 4, "limit": 4},
        baselines=False,
    )
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "bigmerge", "search", str(cfg), "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, env=ENV, stderr=subprocess.PIPE)
    journal = out / "history.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = [json.loads(line) for line in journal.read_text().splitlines() if line.endswith("}")]
    assert 1 <= len(before) < 5 and not (out / "summary.json").exists()
    assert main(["search", str(cfg), "--out", str(out), "--quiet"]) == 0  # the rerun, here
    after = [json.loads(line) for line in journal.read_text().splitlines()]
    assert after[: len(before)] == before  # kept, not redone
    assert len({e["key"] for e in after}) == len(after) == 4 + 1  # 4 candidates, the best held out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluations"]["taken_from_journal"] >= len(before)
    assert summary["evaluations"]["run_now"] == len(after) - len(before)


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,message",
    [
        ({"optimizer": {"name": "annealing"}}, "unknown optimizer 'annealing'"),
        ({"merge": {"merge_method": "linear", "models": []}}, "the pool is empty"),
        ({"fitness": {"tasks": {"zoo_nope": 1}}}, "unknown zoo task 'zoo_nope'"),
        ({"fitness": {"heldout": 0.5}}, "missing required key 'fitness.tasks'"),
        ({"space": {"type": "layer_groups", "parameters": {}}, "optimizer": {"name": "greedy"}}, "greedy"),
    ],
)
def test_bad_input_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, Any], message: str
) -> None:
    cfg: dict[str, Any] = {
        "merge": {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]},
        "fitness": {"tasks": {"zoo_sort": 1}},
    }
    for k, v in change.items():
        cfg[k] = v
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        from bigmerge.search.config import load_search_config

        load_search_config(path)
    capsys.readouterr()
    assert main(["search", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bigmerge: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()
