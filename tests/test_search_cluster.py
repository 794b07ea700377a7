"""bigmerge search at cluster scale (issue 17): candidates merged by every rank through the executor
into scratch, scored by a backend (here the real ``lm_eval`` CLI in a subprocess, the ``hf`` model on
the CPU), the merge of one candidate overlapping the scoring of the one before; kills mid-merge and
mid-scoring; a failing evaluation command; the vllm / multi-GPU hf backends' config checks.

No GPU here: the ``vllm`` and ``hf`` ``parallelize`` backends are checked at config time only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_mpi import mpi_env, mpirun
from test_s3 import s3_env  # noqa: F401 - a fixture: the moto S3 server
from test_search_parallel import _journal
from zoo_fixture import small_zoo_dir

from bigmerge.cli import main
from bigmerge.errors import ConfigError, OutputExistsError
from bigmerge.search.config import load_search_config

LM_EVAL = Path(sys.executable).parent / "lm_eval"
# the real lm-eval CLI on the candidate's checkpoint; {eval_args}: tasks, output, include path, split
COMMAND = (
    f"{LM_EVAL} --model hf --model_args pretrained={{model}},dtype=float32 --device cpu --batch_size 32 {{eval_args}}"
)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_zoo_dir(tmp_path_factory)


def _cfg(zoo: Path, where: Path, mode: str = "memory", backend: dict[str, Any] | None = None, **ev: Any) -> Path:
    fitness: dict[str, Any] = {"tasks": {"zoo_sort": 2, "zoo_fin": 1}, "heldout": 12, "limit": 8, "batch_size": 32}
    if backend:
        fitness["backend"] = backend
    cfg: dict[str, Any] = {
        "merge": {"merge_method": "linear", "models": [{"model": str(zoo / m)} for m in ("sort", "fin", "mix1")]},
        "space": {"type": "weights", "constraint": "simplex"},
        "optimizer": {"name": "cmaes", "popsize": 3, "budget": 3, "seed": 0},
        "fitness": fitness,
        "evaluation": {"mode": mode, "scratch": str(where / "scratch"), **ev},
        "baselines": False,
    }
    where.mkdir(parents=True, exist_ok=True)
    path = where / "search.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def serial(small_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one process, candidates merged and scored in memory."""
    where = tmp_path_factory.mktemp("serial")
    assert main(["search", str(_cfg(small_zoo, where)), "--out", str(where / "run"), "--quiet"]) == 0
    return where / "run"


def _same_search(ref: Path, out: Path, backend: str) -> dict[str, dict[str, Any]]:
    want, got = _journal(ref), _journal(out)
    assert got.keys() == want.keys()  # the same candidates: CMA-ES saw the same fitness values
    for k, e in got.items():
        assert e["scores"] == want[k]["scores"], e["label"]
        assert e["fitness"] == want[k]["fitness"] and e["x"] == want[k]["x"], e["label"]
        assert (e["mode"], e["backend"]) == ("disk", backend), e["label"]
    rows = lambda p: json.loads((p / "summary.json").read_text())["rows"]  # noqa: E731
    assert rows(out) == rows(ref)
    # the same best.yaml, but for the line of its results that says which backend scored them
    differs = [i for i, ln in enumerate(_lines(out / "best.yaml")) if ln.startswith("#: Fitness:")]
    assert len(differs) == 1 and (backend == "command") == (
        "the `command` backend" in _lines(out / "best.yaml")[differs[0]]
    )
    assert [ln for i, ln in enumerate(_lines(out / "best.yaml")) if i not in differs] == [
        ln for i, ln in enumerate(_lines(ref / "best.yaml")) if i not in differs
    ]
    return got


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _candidates_on_disk(scratch: Path) -> int:
    return sum(1 for p in scratch.glob("c-*") if p.is_dir() and "." not in p.name)


@pytest.mark.slow
@pytest.mark.mpi
def test_mpirun_merges_command_scores_with_real_lm_eval_as_the_in_memory_search(
    small_zoo: Path, serial: Path, tmp_path: Path
) -> None:
    """Acceptance 1 and 2: every candidate merged by `mpirun -n 2` into scratch, scored by the real
    lm_eval CLI; the same journal as the in-memory search key by key; the merge of candidate i+1
    during the scoring of candidate i; never more than the candidates in flight (and the kept best)
    on disk."""
    cfg = _cfg(small_zoo, tmp_path, "disk", {"type": "command", "command": COMMAND, "timeout_s": 600}, in_flight=2)
    out, scratch = tmp_path / "run", tmp_path / "scratch"
    most, stop = [0], threading.Event()

    def watch() -> None:  # the scratch directory, seen from outside, every 20 ms
        while not stop.is_set():
            if scratch.exists():
                most[0] = max(most[0], _candidates_on_disk(scratch))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        proc = mpirun(2, "search", str(cfg), "--out", str(out), env={"OMP_NUM_THREADS": "1"}, timeout=900)
    finally:
        stop.set()
        watcher.join()
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _same_search(serial, out, "command")
    assert 1 <= most[0] <= 2 + 1  # in flight, plus the best candidate's checkpoint that is kept
    # the kept best is the best search candidate; everything else was removed after its scoring
    summary = json.loads((out / "summary.json").read_text())
    kept = Path(summary["best_checkpoint"]["path"])
    assert [p for p in scratch.glob("c-*") if p.is_dir()] == [kept]
    assert (kept / "config.json").is_file()
    # overlap, from the journal's timestamps: candidate i+1 was merged while candidate i was scored
    gen = sorted((e for e in got.values() if e.get("role") == "cmaes"), key=lambda e: e["label"])
    assert len(gen) == 3
    for a, b in zip(gen, gen[1:]):
        (m0, m1), (e0, e1) = b["timeline"]["merge"], a["timeline"]["eval"]
        assert m0 < e1 and m1 > e0, (a["label"], a["timeline"], b["label"], b["timeline"])
    # held-out scoring of the best config reused its kept checkpoint: no merge
    (held,) = [e for e in got.values() if e["split"] == "heldout"]
    assert held["timeline"]["merge"][1] - held["timeline"]["merge"][0] < 0.5


def _search(cfg: Path, out: Path, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("BIGMERGE_SEARCH_FAULT", None)
    if fault:
        env["BIGMERGE_SEARCH_FAULT"] = fault
    cmd = [sys.executable, "-m", "bigmerge", "search", str(cfg), "--out", str(out), "--quiet"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_kills_mid_merge_and_mid_scoring_resume_to_the_same_best(small_zoo: Path, serial: Path, tmp_path: Path) -> None:
    """Acceptance 3: SIGKILL during the third candidate's merge, then (rerun) during its scoring; the
    last rerun scores only what no journal line holds and ends with the uninterrupted best.yaml."""
    cfg = _cfg(small_zoo, tmp_path, "disk", in_flight=2)  # the hf backend in this process
    out, scratch = tmp_path / "run", tmp_path / "scratch"
    # run 1: c1 merged and scored, c2 merged (scoring), c3 killed after one block of its merge
    p1 = _search(cfg, out, "merge:3")
    assert p1.returncode == -9, p1.stderr[-2000:]
    j1 = (out / "history.jsonl").read_text().splitlines()
    assert len(j1) == 1 and not (out / "summary.json").exists()
    assert _candidates_on_disk(scratch) == 3  # c1 kept as the best so far, c2, c3 half-merged
    # run 2: c2's finished merge is scored without merging; c3's merge resumes; killed as c3's scoring starts
    p2 = _search(cfg, out, "eval:2")
    assert p2.returncode == -9, p2.stderr[-2000:]
    j2 = (out / "history.jsonl").read_text().splitlines()
    assert j2[:1] == j1 and len(j2) == 2
    # run 3: only c3 (merged by run 2) and the held-out scoring are new
    p3 = _search(cfg, out)
    assert p3.returncode == 0, p3.stderr[-2000:]
    j3 = (out / "history.jsonl").read_text().splitlines()
    assert j3[:2] == j2 and len(j3) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluations"]["run_now"] == 2 and summary["evaluations"]["taken_from_journal"] == 2
    got = _same_search(serial, out, "hf")
    assert got.keys() == _journal(serial).keys()


@pytest.mark.slow
def test_failing_command_is_retried_then_stops_with_one_line(
    small_zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Acceptance 5: the command fails every time; it is tried 1 + retries times, then one line names
    the candidate, the command and its last output; the journal keeps what was scored before."""
    counter = tmp_path / "attempts"
    # the first candidate is scored (fake results of the right shape), every later one fails
    script = tmp_path / "eval.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"echo x >> {counter}\n"
        f'if [ $(wc -l < {counter}) -gt 1 ]; then echo "loading {{model}}"; echo "CUDA out of memory on node 7"; exit 3; fi\n'
        'mkdir -p "$2/m" && echo \'{"results": {"zoo_sort": {"acc,none": 0.5}, "zoo_fin": {"acc,none": 0.25}}}\''
        ' > "$2/m/results_1.json"\n'
    )
    script.chmod(0o755)
    backend = {"type": "command", "command": f"{script} {{model}} {{output}}", "retries": 2, "retry_delay_s": 0}
    cfg = _cfg(small_zoo, tmp_path, "disk", backend)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["search", str(cfg), "--out", str(out)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1, err
    assert "candidate 'cmaes g0.1'" in err[0] and "failed 3 time(s)" in err[0] and "exit 3" in err[0]
    assert "CUDA out of memory on node 7" in err[0] and str(script) in err[0]
    assert len(counter.read_text().splitlines()) == 1 + 3  # the first candidate, then 3 attempts
    (line,) = (out / "history.jsonl").read_text().splitlines()
    assert json.loads(line)["scores"] == {"zoo_sort": 0.5, "zoo_fin": 0.25}


def test_timeout_kills_the_command(small_zoo: Path, tmp_path: Path) -> None:
    from bigmerge.errors import EvaluationError
    from bigmerge.eval.backends import CommandBackend, run_command

    b = CommandBackend(command="sleep 30 # {model} {output}", timeout_s=0.5, retries=0)
    t0 = time.monotonic()
    with pytest.raises(EvaluationError, match=r"candidate 'c'.*timed out after 0.5 s"):
        run_command(b, "echo started; sleep 30", tmp_path / "o", "c")
    assert time.monotonic() - t0 < 10


def test_stopping_the_search_kills_running_commands_and_starts_no_retry(tmp_path: Path) -> None:
    from bigmerge.eval.backends import STOP, CommandBackend, kill_running, run_command

    b = CommandBackend(command="x {model} {output}", retries=3, retry_delay_s=0)
    errors: list[BaseException] = []

    def score() -> None:
        try:
            run_command(b, "sleep 60", tmp_path / "o", "c")
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            errors.append(exc)

    t = threading.Thread(target=score)
    t.start()
    time.sleep(1)
    t0 = time.monotonic()
    kill_running()  # what the pipeline does when the search stops (Ctrl-C, a failed merge)
    t.join(20)
    STOP.clear()
    assert not t.is_alive() and time.monotonic() - t0 < 10
    assert "the search is stopping" in str(errors[0])


def test_a_command_that_writes_no_results_is_a_failure(tmp_path: Path) -> None:
    from bigmerge.errors import EvaluationError
    from bigmerge.eval.backends import CommandBackend, run_command

    b = CommandBackend(command="true {model} {output}", retries=1, retry_delay_s=0)
    with pytest.raises(
        EvaluationError, match=r"failed 2 time\(s\) \(it wrote no lm-eval results under .*last output: done"
    ):
        run_command(b, "echo done", tmp_path / "o", "c")


# --- backends checked at config time -------------------------------------------------------------


@pytest.mark.parametrize(
    "backend,message",
    [
        ({"type": "vllm", "tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"type": "vllm", "data_parallel_size": -1}, "data_parallel_size"),
        ({"type": "vllm", "gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"type": "vllm", "model_args": {"truncation_side": "up"}}, "truncation_side 'up' is not one of"),
        ({"type": "vllm", "model_args": {"pretrained": "x"}}, "model_args.pretrained: set by bigmerge"),
        ({"type": "vllm", "model_args": {"batch_size": 8}}, "model_args.batch_size: set by bigmerge"),
        ({"type": "hf", "max_memory_per_gpu": "70GiB"}, "only with parallelize: true"),
        ({"type": "hf", "parallelize": "sometimes"}, "parallelize"),
        ({"type": "tgi"}, "fitness.backend"),
        ({"type": "command", "command": "lm_eval {modle}"}, "unknown placeholder {modle}"),
        ({"type": "command", "command": "lm_eval --output_path {output}"}, "must name the candidate"),
        ({"type": "command", "command": "lm_eval {model}"}, "results must go to {output}"),
        ({"type": "command", "command": "x {model} {eval_args}", "retries": -1}, "retries"),
        ({"type": "command", "command": "x {model} {eval_args}", "timeout_s": 0}, "timeout_s"),
    ],
)
def test_backend_arguments_are_checked_at_config_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], backend: dict[str, Any], message: str
) -> None:
    cfg: dict[str, Any] = {
        "merge": {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]},
        "fitness": {"tasks": {"zoo_sort": 1}, "backend": backend},
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("{", r"\{").replace("}", r"\}")):
        load_search_config(path)
    capsys.readouterr()
    assert main(["search", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bigmerge: error: ") and "\n" not in err and "fitness.backend" in err
    assert not (tmp_path / "o").exists()


def test_vllm_and_multi_gpu_hf_are_lm_evals_registered_models(tmp_path: Path) -> None:
    """Good configs pass; the classes named are those lm-eval's registry builds (``--model vllm``,
    ``--model hf``): vLLM's arguments are read from lm-eval's source, since vllm is not installed."""
    from bigmerge.eval.backends import HFBackend, VLLMBackend, model_signature

    cfg: dict[str, Any] = {
        "merge": {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]},
        "fitness": {
            "tasks": {"zoo_sort": 1},
            "dtype": "bfloat16",
            "backend": {"type": "vllm", "tensor_parallel_size": 8, "data_parallel_size": 2, "max_model_len": 4096},
        },
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(cfg))
    spec = load_search_config(path)
    assert isinstance(spec.fitness.backend, VLLMBackend)
    assert spec.fitness.backend.lm_args()["tensor_parallel_size"] == 8
    sig = model_signature("vllm")
    assert sig.cls == "lm_eval.models.vllm_causallms.VLLM"
    assert {"tensor_parallel_size", "data_parallel_size", "max_model_len"} <= set(sig.params)
    cfg["fitness"]["dtype"] = "float64"  # not a dtype lm-eval's VLLM takes
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="dtype 'float64' is not one of"):
        load_search_config(path)
    cfg["fitness"] = {"tasks": {"zoo_sort": 1}, "backend": {"parallelize": True, "max_memory_per_gpu": "70GiB"}}
    path.write_text(yaml.safe_dump(cfg))
    spec = load_search_config(path)
    assert isinstance(spec.fitness.backend, HFBackend) and not spec.fitness.backend.in_memory()
    assert (
        model_signature("hf").cls == "lm_eval.models.huggingface.HFLM" and "parallelize" in model_signature("hf").params
    )
    # memory mode cannot hand a model object to a backend that loads a checkpoint itself
    cfg["evaluation"] = {"mode": "memory"}
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="evaluation.mode 'memory'"):
        load_search_config(path)


@pytest.mark.slow
def test_hf_through_lm_evals_registry_scores_as_the_in_process_evaluator(small_zoo: Path) -> None:
    """The path the vllm and parallelize backends take (lm-eval's registry builds the model from the
    checkpoint directory, as ``--model hf`` does), run on the CPU with the plain hf model; parallelize
    itself needs CUDA (lm-eval moves inputs to cuda), so it is checked at config time only here."""
    from bigmerge.eval import Evaluator
    from bigmerge.eval.backends import HFBackend, build_lm, score_checkpoint

    backend = HFBackend(model_args={"max_length": 256})  # not in memory: lm-eval loads the checkpoint
    assert not backend.in_memory()
    lm = build_lm(backend, str(small_zoo / "sort"), batch_size=32, device="cpu", dtype="float32")
    assert type(lm).__name__ == "HFLM" and lm.max_length == 256
    with Evaluator("zoo_sort,zoo_fin", limit=12, batch_size=32) as ev:
        via_registry = score_checkpoint(ev, backend, small_zoo / "sort", label="sort")
        in_process = score_checkpoint(ev, HFBackend(), small_zoo / "sort", label="sort")
    assert via_registry == in_process and via_registry["zoo_sort"] > 0


def test_mpi_env_is_not_passed_to_the_evaluation_command() -> None:
    from bigmerge.eval.backends import _child_env

    os.environ["OMPI_COMM_WORLD_RANK"] = "0"
    try:
        assert "OMPI_COMM_WORLD_RANK" not in _child_env()
    finally:
        del os.environ["OMPI_COMM_WORLD_RANK"]
    assert mpi_env()  # the helper the MPI tests use is importable here


# --- the estimate before launch --------------------------------------------------------------------


def test_estimate_of_the_recycle_pool_reads_no_source(capsys: pytest.CaptureFixture[str]) -> None:
    """configs/recycle-pool.yaml's sources are on an S3 bucket out of reach: --params stands in for
    their headers; docs/search.md prints this output."""
    args = ["search", str(REPO / "configs/recycle-pool.yaml"), "--estimate", "--nodes", "8", "--ranks-per-node", "8"]
    args += ["--cores-per-node", "64", "--read-gbps", "10", "--write-gbps", "5", "--params", "100B"]
    capsys.readouterr()
    assert main([*args, "--eval-seconds", "1800"]) == 0
    out = capsys.readouterr().out
    assert "candidates    132: checkpoints + uniform soup 17, greedy trials 15, CMA-ES 96 (8 x 12), held-out 4" in out
    assert "per candidate read 3.2 TB, write 200.0 GB to scratch" in out
    assert "5 in flight, 4 evaluator(s)" in out
    assert main(args) == 2  # no evaluation time given, no journal to measure it in
    assert "give --eval-seconds" in capsys.readouterr().err


@pytest.mark.slow
def test_estimate_measures_the_first_candidate_in_the_journal(serial: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["search", str(serial.parent / "search.yaml"), "--estimate", "--out", str(serial)]) == 0
    out = capsys.readouterr().out
    first = json.loads((serial / "history.jsonl").read_text().splitlines()[0])
    assert f"({'measured: ' + first['label']} in the journal)" in out
    assert "candidates    4: CMA-ES 3, held-out 1" in out  # the small zoo's headers were read


def test_pipelined_batch_time_is_simulated_as_the_pipeline_runs() -> None:
    from bigmerge.search.estimate import batch_seconds

    assert batch_seconds(3, 1, 10, in_flight=1, evaluators=1) == 33  # merge, score, one after the other
    assert batch_seconds(3, 1, 10, in_flight=2, evaluators=1) == 31  # merges hidden behind scorings
    assert batch_seconds(3, 10, 1, in_flight=2, evaluators=1) == 31  # scorings hidden behind merges
    assert batch_seconds(4, 1, 10, in_flight=5, evaluators=4) == 14  # four scorings at once
    assert batch_seconds(4, 1, 10, in_flight=2, evaluators=4) == 23  # in_flight bounds them: two at a time


# --- a killed search takes its evaluation command with it; the backend guards the journal ----------

# A real evaluation command, slow on demand: it logs the candidate it scores, and its score is drawn
# from the merged weights (so that every run agrees on the best); with a SLOW file beside it, it
# starts a grandchild (sleep) and waits for it, after writing both pids.
FAKE_EVAL = r"""#!/bin/bash
here=$(dirname "$0")
echo "$3" >> "$here/scored"
if [ -e "$here/SLOW" ]; then
  sleep 300 &
  echo "$$ $!" > "$here/pids"
  wait
fi
mkdir -p "$2/m"
s=$(cat "$1"/*.safetensors | sha256sum | cut -c1-6)
python3 -c "import json,sys; v=int('$s',16)/2**24; json.dump({'results': {'zoo_sort': {'acc,none': v}, 'zoo_fin': {'acc,none': 1-v}}}, open(sys.argv[1],'w'))" "$2/m/results_1.json"
"""


def _fake_eval(where: Path) -> dict[str, Any]:
    script = where / "eval.sh"
    script.write_text(FAKE_EVAL)
    script.chmod(0o755)
    return {"type": "command", "command": f"{script} {{model}} {{output}} {{label}}", "retry_delay_s": 0}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie waits for its (gone) parent's reaper: it runs no more


@pytest.mark.slow
def test_sigkill_of_the_search_kills_its_running_evaluation_command(small_zoo: Path, tmp_path: Path) -> None:
    """Item 1 of the leftovers: the search is SIGKILLed while a real command (a script and its
    child) scores the second candidate: both are gone at once; the rerun scores only candidates no
    journal line holds and ends with the best.yaml of a search never killed."""
    backend = _fake_eval(tmp_path)
    ref = tmp_path / "ref" / "run"  # its own scratch: nothing kept there is found by the run below
    assert main(["search", str(_cfg(small_zoo, ref.parent, "disk", backend, in_flight=1)), "--out", str(ref)]) == 0
    cfg = _cfg(small_zoo, tmp_path / "kill", "disk", backend, in_flight=1)
    (tmp_path / "scored").unlink()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "kill" / "run"
    cmd = [sys.executable, "-m", "bigmerge", "search", str(cfg), "--out", str(out), "--quiet"]
    search = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    journal = out / "history.jsonl"
    deadline = time.monotonic() + 300
    while not (journal.exists() and journal.read_text().count("\n") >= 1):  # the first candidate is journaled
        assert search.poll() is None and time.monotonic() < deadline, search.stderr.read() if search.stderr else ""
        time.sleep(0.05)
    (tmp_path / "SLOW").touch()  # the next scoring hangs
    pids = tmp_path / "pids"
    while not pids.exists() or not pids.read_text().strip():
        assert search.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    script_pid, sleep_pid = map(int, pids.read_text().split())
    assert _alive(script_pid) and _alive(sleep_pid)
    search.kill()  # SIGKILL: no handler of the search runs
    search.wait()
    gone = time.monotonic() + 10
    while (_alive(script_pid) or _alive(sleep_pid)) and time.monotonic() < gone:
        time.sleep(0.05)
    assert not _alive(script_pid) and not _alive(sleep_pid)
    kept = journal.read_text().splitlines()
    assert len(kept) == 1
    journaled = {json.loads(ln)["label"] for ln in kept}
    (tmp_path / "SLOW").unlink()
    (tmp_path / "scored").unlink()
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert journal.read_text().splitlines()[:1] == kept
    rescored = set((tmp_path / "scored").read_text().split())
    assert not rescored & journaled and "cmaes g0.1" in (tmp_path / "scored").read_text()
    assert (out / "best.yaml").read_text() == (ref / "best.yaml").read_text()


def test_a_resume_with_another_backend_is_refused_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The journal's scores came from one backend and its score-changing arguments: another one on
    the same --out is refused before anything runs; a command's timeout and retries may change."""
    from bigmerge.search.run import _prepare_out

    def spec(backend: dict[str, Any]) -> Any:
        path = tmp_path / "s.yaml"
        data = {
            "merge": {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]},
            "fitness": {"tasks": {"zoo_sort": 1}, "backend": backend},
            "evaluation": {"mode": "disk"},  # no source is read before the journal's backend is checked
        }
        path.write_text(yaml.safe_dump(data))
        return load_search_config(path)

    run = tmp_path / "run"
    first = {"type": "command", "command": "lm_eval --model hf --model_args pretrained={model} {eval_args}"}
    _prepare_out(run, spec(first), overwrite=False)
    (run / "history.jsonl").write_text('{"n": 0, "key": "k"}\n')
    _prepare_out(run, spec({**first, "timeout_s": 60, "retries": 3, "retry_delay_s": 1}), overwrite=False)
    for other, shown in [
        ({**first, "command": first["command"].replace("hf", "vllm")}, "--model vllm"),
        ({"type": "hf"}, "this config scores with 'hf'"),
        ({"type": "hf", "model_args": {"max_length": 64}}, "max_length"),
    ]:
        with pytest.raises(OutputExistsError, match="its journal was scored by backend 'command'") as err:
            _prepare_out(run, spec(other), overwrite=False)
        assert shown in str(err.value) and "\n" not in str(err.value)
    path = tmp_path / "s.yaml"
    spec({"type": "hf"})
    capsys.readouterr()
    assert main(["search", str(path), "--out", str(run)]) == 2
    err_text = capsys.readouterr().err.strip()
    assert err_text.startswith("bigmerge: error: ") and "\n" not in err_text and "backend" in err_text
    assert (run / "history.jsonl").read_text() == '{"n": 0, "key": "k"}\n'  # the journal is untouched
    _prepare_out(run, spec({"type": "hf"}), overwrite=True)  # --overwrite starts afresh
    assert not (run / "history.jsonl").exists()


def test_workers_in_disk_mode_are_refused_with_one_line(
    small_zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _cfg(small_zoo, tmp_path, "disk")
    capsys.readouterr()
    assert main(["search", str(cfg), "--out", str(tmp_path / "run"), "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bigmerge: error: evaluation.workers 2 with mode disk") and "\n" not in err
    assert "evaluators" in err and not (tmp_path / "run").exists()


# --- scratch on object storage --------------------------------------------------------------------


def _watch_bucket(prefix: str, most: list[int], seen: set[str], stop: threading.Event) -> None:
    """The candidates under an S3 prefix, listed from outside every 20 ms."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    while not stop.is_set():
        try:
            names = {p.rsplit("/", 1)[-1] for p in fs.ls(prefix, refresh=True)}
        except FileNotFoundError:
            names = set()
        cands = {n for n in names if n.startswith("c-")}
        seen |= cands
        most[0] = max(most[0], len(cands))
        time.sleep(0.02)


def _search_on_bucket(cfg: Path, bucket_path: str, out: Path) -> tuple[list[int], set[str]]:
    """Run the search with its scratch at s3://BUCKET_PATH while a thread lists the bucket every
    20 ms: (the most candidates seen at once, every candidate seen)."""
    data = yaml.safe_load(cfg.read_text())
    data["evaluation"]["scratch"] = f"s3://{bucket_path}"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    most, seen, stop = [0], set[str](), threading.Event()
    watcher = threading.Thread(target=_watch_bucket, args=(bucket_path, most, seen, stop))
    watcher.start()
    try:
        assert main(["search", str(cfg), "--out", str(out), "--quiet"]) == 0
    finally:
        stop.set()
        watcher.join()
    return most, seen


@pytest.mark.s3
@pytest.mark.slow
def test_scratch_on_s3_hf_backend_scores_a_local_copy_as_the_in_memory_search(
    s3_env: dict[str, str],  # noqa: F811 - the fixture imported from test_s3
    small_zoo: Path,
    serial: Path,
    tmp_path: Path,
) -> None:
    """Candidates are merged into s3:// scratch and the hf backend scores a local copy of each: the
    in-memory search's journal key by key; the bucket, listed from outside while the search runs,
    never holds more than in_flight + 1 (the kept best) candidates, and at the end only the best."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_env["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    fs.mkdir("scratch-bkt")
    cfg = _cfg(small_zoo, tmp_path, "disk", in_flight=2)
    most, seen = _search_on_bucket(cfg, "scratch-bkt/hf", tmp_path / "run")
    _same_search(serial, tmp_path / "run", "hf")
    assert len(seen) == 3 and 1 <= most[0] <= 2 + 1  # every CMA-ES candidate went through the bucket
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    best = summary["best_checkpoint"]["path"]
    assert best.startswith("s3://scratch-bkt/hf/c-")
    assert ["scratch-bkt/hf/" + best.rsplit("/", 1)[-1]] == fs.ls("scratch-bkt/hf", refresh=True)
    state = tmp_path / "run" / "scratch"  # the pipeline's own files stay local: no copy, no eval output left
    assert sorted(p.name for p in state.iterdir()) == ["best.json"]


@pytest.mark.s3
@pytest.mark.slow
def test_scratch_on_s3_the_command_gets_the_url(
    s3_env: dict[str, str],  # noqa: F811 - the fixture imported from test_s3
    small_zoo: Path,
    tmp_path: Path,
) -> None:
    """The command backend is given the candidate's URL and reads it from the bucket itself."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_env["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    fs.mkdir("scratch-cmd")
    script = tmp_path / "eval.py"
    script.write_text(
        "import fsspec, hashlib, json, os, sys\n"
        "model, out = sys.argv[1], sys.argv[2]\n"
        "open(os.path.join(os.path.dirname(__file__), 'models'), 'a').write(model + '\\n')\n"
        "fs, path = fsspec.core.url_to_fs(model)\n"
        "h = hashlib.sha256(b''.join(fs.cat_file(p) for p in sorted(fs.glob(path + '/*.safetensors'))))\n"
        "v = int(h.hexdigest()[:6], 16) / 2**24\n"
        "os.makedirs(out + '/m')\n"
        "json.dump({'results': {'zoo_sort': {'acc,none': v}, 'zoo_fin': {'acc,none': 1 - v}}}, open(out + '/m/results_1.json', 'w'))\n"
    )
    backend = {"type": "command", "command": f"{sys.executable} {script} {{model}} {{output}}"}
    cfg = _cfg(small_zoo, tmp_path, "disk", backend, in_flight=2)
    most, seen = _search_on_bucket(cfg, "scratch-cmd/cmd", tmp_path / "run")
    models = (tmp_path / "models").read_text().split()
    assert len(models) == 4 and all(m.startswith("s3://scratch-cmd/cmd/c-") for m in models)
    assert len(seen) == 3 and 1 <= most[0] <= 2 + 1
    assert len(fs.ls("scratch-cmd/cmd", refresh=True)) == 1  # the best, kept


def test_a_sigkilled_process_takes_its_command_and_the_commands_children(tmp_path: Path) -> None:
    """The mechanism alone, fast: a process running a command (a shell, its background child) in an
    evaluator thread is SIGKILLed; the command's whole group is gone at once."""
    pids = tmp_path / "pids"
    child = (
        "import threading, sys; from pathlib import Path\n"
        "from bigmerge.eval.backends import CommandBackend, run_command\n"
        "b = CommandBackend(command='x {model} {output}')\n"
        f"line = 'sleep 300 & echo $$ $! > {pids}; wait'\n"
        f"t = threading.Thread(target=run_command, args=(b, line, Path({str(tmp_path / 'o')!r}), 'c'))\n"
        "t.start(); t.join()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", child], env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 60
    while not pids.exists() or len(pids.read_text().split()) < 2:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    shell, sleeper = map(int, pids.read_text().split())
    assert _alive(shell) and _alive(sleeper)
    proc.kill()
    proc.wait()
    gone = time.monotonic() + 10
    while (_alive(shell) or _alive(sleeper)) and time.monotonic() < gone:
        time.sleep(0.02)
    assert not _alive(shell) and not _alive(sleeper)
