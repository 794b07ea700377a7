"""Every merge operator on every zoo scenario, scored with lm-eval beside the scenario's sources.

    python tools/bench_quality.py ZOO [--out DIR] [--limit 200] [--scenarios a,b] [--methods m,n]
                                      [--set METHOD.PARAM=VALUE ...] [--preset full] [--no-search]

ZOO is a zoo built by tools/make_zoo.py (built here with ``--preset`` if ZOO/zoo.json is missing).
For each scenario of ZOO/zoo.json and each operator in ``bigmerge.ops.REGISTRY`` (new operators
appear without edits here) it writes a config with the operator's usual parameters:

- ``base_model`` the scenario's base unless the operator ignores the base;
- per model ``weight: 1.0``; ``density: 0.5`` where the operator has a density (mergekit's examples);
- ``normalize: true`` where the operator has it (mergekit's default for every task-vector method:
  the merged task vector is a weighted mean, so task_arithmetic equals the uniform soup);
- ``t: 0.5`` where an operator requires a ``t``; every other parameter at its default;
- ``--set METHOD.PARAM=VALUE`` overrides any of them (``*.PARAM`` for every method).

``dam`` trains its coefficients first (``bigmerge dam``, one process, ``training.engine: torch``;
``--set dam.teacher=dataset`` computes the teachers' top-k logits first with ``bigmerge dam logits``)
on a scenario whose models each train on their own skills (the zoo's ``mixture``: specialists,
domain): each model's data are its skills' items from ``bigmerge.dam.zoo_data`` (``DAM_EXAMPLES``
per model, split over its skills), the training settings ``DAM_TRAINING``, which
``--set dam.KEY=VALUE`` overrides (any ``training:`` key, or ``examples``); its config is
DIR/configs/SCENARIO-dam-train.yaml. Other scenarios skip ``dam`` with the reason.

A scenario with a search config in ``SEARCHES`` (``recycle``: ``configs/recycle-zoo.yaml``, whose
``zoo/...`` paths are rewritten to ZOO) also gets ``bigmerge search`` (one process, resumed from
DIR/search-SCENARIO's journal on a rerun): rows "SCENARIO/search: cmaes" and "SCENARIO/search:
greedy soup" are its CMA-ES best and greedy soup, merged and scored like every other row;
``--no-search`` leaves them out; ``--search SCENARIO=CONFIG`` adds one (docs/dam.md's DAM against
CMA-ES: ``--search specialists=configs/specialists-zoo-search.yaml --search
domain=configs/domain-zoo-search.yaml``).

An operator that takes exactly two models (slerp, nearswap) runs on a two-model scenario with
the first model in the base's place. An operator that cannot run on the scenario (it raises ConfigError or SourceError: it needs data
statistics, exactly two models, a parameter without a usual value, ...) is skipped with the reason.
Each merge runs in this process (``run_merge`` with a serial communicator), is scored, and
removed. Output: DIR/quality.{json,md,png} (rows "scenario/model", sources first, one chart
panel per scenario) and DIR/configs/*.yaml.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bigmerge.errors import BigmergeError  # noqa: E402
from bigmerge.eval import Evaluator, Table, load_model  # noqa: E402

SCENARIO_ORDER = ("specialists", "similar", "recycle", "domain")  # zoo.json keeps its keys sorted
USUAL = {"weight": 1.0, "density": 0.5, "normalize": True, "t": 0.5}
# DAM for the table: one process; lr 1e-2 for 2 epochs is docs/dam.md's better zoo setting
DAM_TRAINING = {"engine": "torch", "lr": 1e-2, "epochs": 2, "batch_size": 8, "log_every": 8, "checkpoint_every": 1000}
DAM_EXAMPLES = 128
REPO = Path(__file__).resolve().parents[1]
# scenario -> the search config run on it (its model paths "zoo/NAME" name the zoo's models)
SEARCHES = {"recycle": REPO / "configs" / "recycle-zoo.yaml"}  # --search adds others (DAM's scenarios)
SEARCH_ROWS = ("cmaes", "greedy soup")  # rows of the search's summary that join the table


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, param = key.partition(".")
        if not sep or not dot or not method or not param:
            raise SystemExit(f"--set {item!r}: expected METHOD.PARAM=VALUE (METHOD may be *)")
        out.setdefault(method, {})[param] = _parse_value(value)
    return out


def merge_config(method: str, base: str, models: list[str], overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The config for one operator on one scenario, with the usual parameters (module docstring)."""
    from bigmerge.ops import REGISTRY

    op = REGISTRY[method]
    chosen = {**overrides.get("*", {}), **overrides.get(method, {})}
    shared: dict[str, Any] = {}
    per_model: dict[str, Any] = {}
    for p in op.params:
        if p.name in chosen:
            value = chosen[p.name]
        elif p.name in USUAL and (p.required or p.name in ("weight", "density", "normalize")):
            value = USUAL[p.name]
        elif p.required:
            raise KeyError(p.name)
        else:
            continue
        (shared if p.scope == "shared" else per_model)[p.name] = value
    cfg: dict[str, Any] = {"merge_method": method}
    if op.base != "ignored":
        cfg["base_model"] = base
    cfg["models"] = [{"model": m, **({"parameters": dict(per_model)} if per_model else {})} for m in models]
    if shared:
        cfg["parameters"] = shared
    cfg["dtype"] = "float32"
    return cfg


def dam_skills(info: dict[str, Any], models: list[str]) -> dict[str, list[str]]:
    """Each model's own skills (its training mixture); ValueError when DAM has no data per model."""
    skills = {m: sorted(info["models"][m].get("mixture", {})) for m in models}
    if any(not s or len(s) == len(info["skills"]) for s in skills.values()):
        raise ValueError("needs models that each train on their own skills; these train on every skill")
    if len({tuple(s) for s in skills.values()}) < len(skills):
        raise ValueError("needs models with distinct skills; some train on the same ones")
    return skills


def dam_config(
    info: dict[str, Any], zoo: Path, models: list[str], work: Path, overrides: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The `bigmerge dam` config of a scenario: per model its skills' data, written under `work`."""
    from bigmerge.dam.zoo_data import write_zoo_data

    training = {**DAM_TRAINING, **overrides.get("dam", {})}
    examples = int(training.pop("examples", DAM_EXAMPLES))
    loss = {k: training.pop(k) for k in ("teacher", "top_k") if k in training}  # loss: keys, not training:
    skills = dam_skills(info, models)
    files = write_zoo_data(zoo, examples=examples, out=work / "data")
    cfg_models = []
    for m in models:
        per_skill = max(1, examples // len(skills[m]))
        lines = [ln for s in skills[m] for ln in files[s].read_text().splitlines()[:per_skill]]
        (work / f"{m}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        cfg_models.append({"model": str(zoo / m), "data": str(work / f"{m}.jsonl")})
    out: dict[str, Any] = {"models": cfg_models, "output": str(work / "train"), "training": training}
    if loss:
        out["loss"] = loss
    return out


def search_rows(scenario: str, config: Path, zoo: Path, out: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Run (or resume) ``bigmerge search`` of ``config`` on ``zoo``: ({row name: merge config} of its
    SEARCH_ROWS, a digest of its summary for the benchmark's metadata)."""
    from bigmerge.engine.comm import SerialComm
    from bigmerge.search.journal import Journal
    from bigmerge.search.run import JOURNAL_FILE, SearchOptions, run_search

    data = yaml.safe_load(config.read_text())
    for m in data["merge"]["models"]:
        if str(m["model"]).startswith("zoo/"):
            m["model"] = str(zoo / str(m["model"])[4:])
    path = out / "configs" / f"{scenario}-search.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    where = out / f"search-{scenario}"
    summary = run_search(str(path), str(where), SerialComm(), SearchOptions(overwrite=False, quiet=True))
    configs = {e["label"]: e["config"] for e in Journal(where / JOURNAL_FILE).entries if e["split"] == "search"}
    rows = {f"search: {r['name']}": configs[r["label"]] for r in summary["rows"] if r["name"] in SEARCH_ROWS}
    digest = {
        "config": str(config.relative_to(REPO)) if config.is_relative_to(REPO) else str(config),
        "evaluations": summary["evaluations"]["total_in_journal"],
        "rows": {
            r["name"]: {
                "search_fitness": round(r["search_fitness"], 4),
                "heldout_fitness": round(r["heldout_fitness"], 4),
                "nonzero_weights": r["nonzero_weights"],
            }
            for r in summary["rows"]
        },
    }
    return rows, digest


def run(args: argparse.Namespace) -> int:
    from bigmerge.engine.comm import SerialComm
    from bigmerge.merge import MergeOptions, run_merge
    from bigmerge.ops import REGISTRY

    zoo = Path(args.zoo).resolve()
    if not (zoo / "zoo.json").is_file():
        from make_zoo import make_zoo

        print(f"building the {args.preset} zoo in {zoo}", file=sys.stderr)
        make_zoo(zoo, preset=args.preset, log=lambda m: print(m, file=sys.stderr))
    info = json.loads((zoo / "zoo.json").read_text())
    wanted = args.scenarios.split(",") if args.scenarios else list(info["scenarios"])
    order = [s for s in SCENARIO_ORDER if s in wanted] + [s for s in wanted if s not in SCENARIO_ORDER]
    missing = [s for s in order if s not in info["scenarios"]]
    if missing:
        raise SystemExit(f"no scenario {', '.join(missing)} in {zoo}/zoo.json; it has: {', '.join(info['scenarios'])}")
    scenarios = {k: info["scenarios"][k] for k in order}
    methods = sorted(REGISTRY) if not args.methods else args.methods.split(",")
    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        raise SystemExit(f"unknown method(s): {', '.join(unknown)}; known: {', '.join(sorted(REGISTRY))}")
    overrides = parse_overrides(args.set or [])
    searches_of = dict(SEARCHES)
    for item in args.search or []:
        scenario, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"--search {item!r}: expected SCENARIO=CONFIG")
        searches_of[scenario] = Path(path).resolve()
    out = Path(args.out).resolve()
    (out / "configs").mkdir(parents=True, exist_ok=True)
    work = out / "merged"
    t_start = time.perf_counter()

    rows: list[str] = []
    scores: dict[str, dict[str, float]] = {}
    groups: dict[str, str] = {}
    skipped: dict[str, str] = {}
    pairwise: dict[str, str] = {}
    seconds: dict[str, dict[str, float]] = {}
    searches: dict[str, dict[str, Any]] = {}
    cache: dict[str, dict[str, float]] = {}  # a source scored once, whatever scenarios share it

    with Evaluator(args.tasks, limit=args.limit, batch_size=args.batch_size) as ev:

        def score(name: str, path: Path) -> dict[str, float]:
            model, tok = load_model(path)
            return ev.score(name, model, tok)

        def add(row: str, group: str, sc: dict[str, float]) -> None:
            rows.append(row)
            scores[row] = sc
            groups[row] = group
            vals = [v for v in sc.values() if not math.isnan(v)]
            avg = sum(vals) / len(vals) if vals else math.nan
            print(
                f"{row:<34} "
                + " ".join(f"{t.removeprefix('zoo_')}={v:.3f}" for t, v in sc.items())
                + f"  avg={avg:.3f}",
                flush=True,
            )

        def scored(row: str, group: str, method: str, phase: str, target: Path, t0: float) -> None:
            """Score a merged row, record its times (phase: what ran since t0, before scoring)."""
            t_made = time.perf_counter() - t0
            add(row, group, score(row, target))
            seconds.setdefault(group, {})[method] = round(time.perf_counter() - t0, 1)
            seconds[group][f"{method}:{phase}"] = round(t_made, 1)
            if not args.keep:
                shutil.rmtree(target, ignore_errors=True)

        for sc_name, sc in scenarios.items():
            base, models = sc["base"], list(sc["models"])
            for m in [base, *models]:
                if m not in cache:
                    t0 = time.perf_counter()
                    cache[m] = score(m, zoo / m)
                    seconds.setdefault(sc_name, {})[m] = round(time.perf_counter() - t0, 1)
                add(f"{sc_name}/{m}", sc_name, cache[m])
            for method in methods:
                row = f"{sc_name}/{method}"
                if method == "dam":
                    from bigmerge.dam.train import DamOptions, run_dam

                    cfg_path = out / "configs" / f"{sc_name}-dam-train.yaml"
                    target = work / f"{sc_name}-dam"
                    t0 = time.perf_counter()
                    try:
                        dam = dam_config(info, zoo, models, work / f"{sc_name}-dam-train", overrides)
                        cfg_path.write_text(yaml.safe_dump(dam, sort_keys=False), encoding="utf-8")
                        if dam.get("loss", {}).get("teacher") == "dataset":  # the teachers' logits first, once
                            from bigmerge.dam.logits import LogitsOptions, run_logits

                            run_logits(str(cfg_path), LogitsOptions(quiet=True))
                            seconds.setdefault(sc_name, {})["dam:logits"] = round(time.perf_counter() - t0, 1)
                        run_dam(str(cfg_path), DamOptions(str(target), restart=True, quiet=True, overwrite=True))
                    except (BigmergeError, ValueError, RuntimeError) as exc:
                        skipped[row] = str(exc).splitlines()[0]
                        print(f"{row:<34} skipped: {skipped[row]}", flush=True)
                        continue
                    scored(row, sc_name, method, "train+merge", target, t0)
                    continue
                try:
                    cfg = merge_config(method, str(zoo / base), [str(zoo / m) for m in models], overrides)
                except KeyError as exc:
                    skipped[row] = f"needs parameter {exc.args[0]!r} (give --set {method}.{exc.args[0]}=VALUE)"
                    print(f"{row:<34} skipped: {skipped[row]}", flush=True)
                    continue
                cfg_path = out / "configs" / f"{sc_name}-{method}.yaml"
                target = work / f"{sc_name}-{method}"
                t0 = time.perf_counter()
                try:
                    try:
                        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
                        run_merge(str(cfg_path), str(target), SerialComm(), MergeOptions(quiet=True, overwrite=True))
                    except BigmergeError:
                        if len(models) != 2 or REGISTRY[method].base == "ignored":
                            raise
                        # Pairwise operators (slerp, nearswap) interpolate between two models: the
                        # first model takes the base's place, as in mergekit's two-model configs.
                        cfg = merge_config(method, str(zoo / models[0]), [str(zoo / models[1])], overrides)
                        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
                        run_merge(str(cfg_path), str(target), SerialComm(), MergeOptions(quiet=True, overwrite=True))
                        pairwise[row] = f"base_model {models[0]}, model {models[1]}"
                except (BigmergeError, KeyError) as exc:
                    skipped[row] = str(exc).splitlines()[0]
                    print(f"{row:<34} skipped: {skipped[row]}", flush=True)
                    shutil.rmtree(target, ignore_errors=True)
                    continue
                scored(row, sc_name, method, "merge", target, t0)
            if sc_name in searches_of and not args.no_search:
                t0 = time.perf_counter()
                found, searches[sc_name] = search_rows(sc_name, searches_of[sc_name], zoo, out)
                seconds.setdefault(sc_name, {})["search"] = round(time.perf_counter() - t0, 1)
                for name, cfg in found.items():
                    slug = name.replace("search: ", "search-").replace(" ", "-")
                    cfg_path = out / "configs" / f"{sc_name}-{slug}.yaml"
                    target = work / f"{sc_name}-{slug}"
                    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
                    run_merge(str(cfg_path), str(target), SerialComm(), MergeOptions(quiet=True, overwrite=True))
                    add(f"{sc_name}/{name}", sc_name, score(f"{sc_name}/{name}", target))
                    if not args.keep:
                        shutil.rmtree(target, ignore_errors=True)
        tasks = list(ev.tasks)
        metric = dict(ev.metric)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)

    meta = {
        "zoo": str(zoo),
        "zoo_args": info.get("args"),
        "limit": args.limit,
        "usual_parameters": USUAL,
        "dam": {"training": DAM_TRAINING, "examples": DAM_EXAMPLES},
        "overrides": overrides,
        "skipped": skipped,
        "pairwise": pairwise,
        "seconds": seconds,
        "searches": searches,
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "scenarios": {
            k: {"base": v["base"], "models": v["models"], "about": v.get("about", "")} for k, v in scenarios.items()
        },
    }
    table = Table(rows, tasks, scores, metric, groups, meta)
    paths = table.write(out, stem="quality", title="bigmerge: quality of every operator on the zoo's scenarios")
    with paths["md"].open("a", encoding="utf-8") as f:
        f.write(
            f"\nSources are listed first in each scenario (base, then the models merged). limit={args.limit} items per task.\n"
        )
        if pairwise:
            f.write("\nPairwise operators, first model as the base: " + ", ".join(pairwise) + "\n")
        for sc_name, digest in searches.items():
            f.write(
                f"\n{sc_name}/search: `bigmerge search {digest['config']}` ({digest['evaluations']} evaluations); "
                "macro average on its search split / held-out documents, checkpoints with weight > 0: "
                + "; ".join(
                    f"{k} {v['search_fitness']:.3f} / {v['heldout_fitness']:.3f}, {v['nonzero_weights']}"
                    for k, v in digest["rows"].items()
                )
                + "\n"
            )
        if skipped:
            f.write("\nSkipped:\n\n" + "".join(f"- {k}: {v}\n" for k, v in skipped.items()))
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {meta['total_seconds']:.0f} s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("zoo", help="a zoo directory (tools/make_zoo.py)")
    ap.add_argument("--out", default="bench-quality", help="output directory (default ./bench-quality)")
    ap.add_argument("--tasks", default="zoo")
    ap.add_argument("--limit", type=int, default=200, help="items per task (default 200)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--scenarios", default="", help="comma-separated scenario names (default all)")
    ap.add_argument("--methods", default="", help="comma-separated merge methods (default every registered one)")
    ap.add_argument("--set", action="append", metavar="METHOD.PARAM=VALUE", help="override a parameter (repeatable)")
    ap.add_argument("--preset", default="full", help="zoo preset to build when ZOO has no zoo.json (default full)")
    ap.add_argument("--keep", action="store_true", help="keep the merged checkpoints under OUT/merged")
    ap.add_argument("--no-search", action="store_true", help="leave out the bigmerge search rows (SEARCHES)")
    ap.add_argument(
        "--search", action="append", metavar="SCENARIO=CONFIG", help="also run this search config on SCENARIO"
    )
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
