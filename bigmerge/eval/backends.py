"""Where a checkpoint is scored: in this process (lm-eval's ``hf`` or ``vllm`` model, built through
lm-eval's own model registry), or by a user's command (an ``srun … lm_eval …`` line, a Slurm job
that waits) whose lm-eval results JSON is read back.

    fitness:
      backend: {type: hf}                                        # default: in this process
      backend: {type: hf, parallelize: true}                     # the HF model across this node's GPUs
      backend: {type: vllm, tensor_parallel_size: 8}             # lm-eval's vLLM model
      backend:
        type: command                                            # any evaluator, run per candidate
        command: "srun -N1 --gpus 8 lm_eval --model vllm --model_args pretrained={model},tensor_parallel_size=8 {eval_args}"
        timeout_s: 7200
        retries: 1

Arguments are checked when the config is read, against the model class that lm-eval's registry
gives for the name (an unknown argument or a bad value is one ConfigError), not when the first
candidate is already merged.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bigmerge.errors import ConfigError, EvaluationError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HFBackend(_Strict):
    """lm-eval's ``hf`` model. Plain: the candidate is scored in this process (in memory when it
    fits); ``parallelize`` (accelerate's device map over the node's GPUs) loads it from its
    checkpoint directory through lm-eval."""

    type: Literal["hf"] = "hf"
    parallelize: bool = False
    max_memory_per_gpu: str | None = None  # e.g. "70GiB"; only with parallelize
    model_args: dict[str, Any] = Field(default_factory=dict)  # more HFLM arguments

    def lm_args(self) -> dict[str, Any]:
        args: dict[str, Any] = dict(self.model_args)
        if self.parallelize:
            args["parallelize"] = True
        if self.max_memory_per_gpu is not None:
            args["max_memory_per_gpu"] = self.max_memory_per_gpu
        return args

    def in_memory(self) -> bool:
        """Scored as today: the model object built here, handed to lm-eval (no lm-eval loading)."""
        return not self.parallelize and not self.model_args and self.max_memory_per_gpu is None


class VLLMBackend(_Strict):
    """lm-eval's ``vllm`` model on the candidate's checkpoint directory."""

    type: Literal["vllm"] = "vllm"
    tensor_parallel_size: int = Field(default=1, ge=1)
    data_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    max_model_len: int | None = Field(default=None, ge=1)
    model_args: dict[str, Any] = Field(default_factory=dict)  # more arguments of lm-eval's VLLM

    def lm_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {
            "tensor_parallel_size": self.tensor_parallel_size,
            "data_parallel_size": self.data_parallel_size,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            **self.model_args,
        }
        if self.max_model_len is not None:
            args["max_model_len"] = self.max_model_len
        return args

    def in_memory(self) -> bool:
        return False


class CommandBackend(_Strict):
    """A command line run per candidate (through ``bash -c``), placeholders shell-quoted:

    {model}        the candidate's checkpoint (path or URL)
    {tasks}        the task list, comma-separated
    {output}       a fresh directory for lm-eval's --output_path (results*.json is read from it)
    {include_path} the zoo's task YAML directory (for lm-eval's --include_path)
    {samples}      a JSON file of {task: [document indices]} (lm-eval's --samples), search split
    {limit}        the held-out documents (lm-eval's --limit), held-out split
    {label}        the candidate's label
    {eval_args}    all of these as lm-eval options: --tasks … --output_path … [--include_path …]
                   --samples … | --limit …
    """

    type: Literal["command"] = "command"
    command: str
    timeout_s: float | None = Field(default=None, gt=0)  # one attempt's limit
    retries: int = Field(default=0, ge=0)  # attempts after the first that failed
    retry_delay_s: float = Field(default=5.0, ge=0)

    def in_memory(self) -> bool:
        return False


Backend = HFBackend | VLLMBackend | CommandBackend
PLACEHOLDERS = ("model", "tasks", "output", "include_path", "samples", "limit", "label", "eval_args")
LM_EVAL_NAME = {"hf": "hf", "vllm": "vllm"}
# Arguments bigmerge itself gives the model class: the user does not set them in model_args.
OWN_ARGS = {"pretrained", "batch_size", "device", "dtype", "tokenizer"}


def check_backend(backend: Backend, where: str = "fitness.backend", own: dict[str, Any] | None = None) -> None:
    """One ConfigError for any argument lm-eval's model class would refuse or bigmerge sets itself
    (``own``: the arguments bigmerge gives it, e.g. {"dtype": fitness.dtype})."""
    if isinstance(backend, CommandBackend):
        _check_template(backend.command, where)
        return
    sig = model_signature(backend.type, where)
    for name in backend.model_args:
        if name in OWN_ARGS:
            raise ConfigError(
                f"{where}.model_args.{name}: set by bigmerge (the candidate, fitness.batch_size/device/dtype)"
            )
        if name not in sig.params and not sig.takes_any:
            raise ConfigError(
                f"{where}.model_args.{name}: not an argument of lm-eval's {backend.type!r} model ({sig.cls})"
            )
    if isinstance(backend, HFBackend) and backend.max_memory_per_gpu is not None and not backend.parallelize:
        raise ConfigError(f"{where}.max_memory_per_gpu: only with parallelize: true")
    for name, value in {**(own or {}), **backend.lm_args()}.items():
        allowed = sig.params.get(name)
        if allowed and value not in allowed:
            raise ConfigError(
                f"{where}: {name} {value!r} is not one of {', '.join(repr(a) for a in allowed)} ({sig.cls})"
            )


@dataclass(frozen=True)
class ModelSignature:
    cls: str
    params: dict[str, tuple[Any, ...]]  # argument -> its Literal values (empty: any value)
    takes_any: bool  # **kwargs: passed on (vLLM's engine arguments), not checked here


def model_signature(name: str, where: str = "fitness.backend") -> ModelSignature:
    """The arguments of the class lm-eval's registry names for ``name``, read from its source when
    it cannot be imported here (lm-eval's vLLM module imports vllm, absent where no GPU is)."""
    try:
        from lm_eval.api.registry import model_registry
        from lm_eval.models import MODEL_MAPPING
    except ImportError as exc:
        raise ConfigError(f"{where}: needs lm-eval: pip install 'bigmerge[eval]' ({exc})") from None
    key = LM_EVAL_NAME[name]
    if key not in model_registry or key not in MODEL_MAPPING:
        raise ConfigError(f"{where}: lm-eval {getattr(__import__('lm_eval'), '__version__', '?')} has no {key!r} model")
    module, cls_name = MODEL_MAPPING[key].split(":")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ConfigError(f"{where}: lm-eval's {module} is missing")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    a = item.args
                    params = {p.arg: _literal_values(p.annotation) for p in a.args[1:] + a.kwonlyargs}
                    return ModelSignature(f"{module}.{cls_name}", params, a.kwarg is not None)
    raise ConfigError(f"{where}: lm-eval's {module} has no class {cls_name} with an __init__")


def _literal_values(ann: ast.expr | None) -> tuple[Any, ...]:
    """The values of a ``Literal[...]`` annotation (as written in the source), else ()."""
    if isinstance(ann, ast.Subscript) and getattr(ann.value, "id", getattr(ann.value, "attr", "")) == "Literal":
        try:
            v = ast.literal_eval(ann.slice)
        except ValueError:
            return ()
        return v if isinstance(v, tuple) else (v,)
    return ()


def _check_template(command: str, where: str) -> None:
    import string

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(command) if f is not None]
    except ValueError as exc:
        raise ConfigError(f"{where}.command: {exc} (write a literal brace as {{{{ or }}}})") from None
    for f in fields:
        if f not in PLACEHOLDERS:
            raise ConfigError(
                f"{where}.command: unknown placeholder {{{f}}}; known: " + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
            )
    if "model" not in fields:
        raise ConfigError(f"{where}.command: the command must name the candidate: {{model}}")
    if "output" not in fields and "eval_args" not in fields:
        raise ConfigError(f"{where}.command: lm-eval's results must go to {{output}} (or use {{eval_args}})")


def check_installed(backend: Backend) -> None:
    """Before the first merge: the packages the backend imports in this process are there."""
    if isinstance(backend, VLLMBackend) and importlib.util.find_spec("vllm") is None:
        raise ConfigError("fitness.backend 'vllm' needs vLLM where rank 0 runs: pip install 'lm-eval[vllm]'")


def lm_eval_model_class(name: str) -> type:
    """The class lm-eval's registry gives for ``name`` (imports its module: vllm for 'vllm')."""
    import lm_eval.models  # noqa: F401 - registers the models
    from lm_eval.api.registry import get_model

    try:
        return get_model(LM_EVAL_NAME[name])  # type: ignore[no-any-return]
    except ImportError as exc:
        raise EvaluationError(f"{name} backend: {exc}") from None


# --- in this process -----------------------------------------------------------------------------


def build_lm(backend: HFBackend | VLLMBackend, checkpoint: str, *, batch_size: int, device: str, dtype: str) -> Any:
    """lm-eval's model for a checkpoint directory, built through its registry (as ``--model``)."""
    cls = lm_eval_model_class(backend.type)
    args = {"pretrained": str(checkpoint), "dtype": dtype, **backend.lm_args()}
    extra: dict[str, Any] = {"batch_size": batch_size}
    if isinstance(backend, HFBackend) and not backend.parallelize:
        extra["device"] = device
    return cls.create_from_arg_obj(args, extra)  # type: ignore[attr-defined]


def score_checkpoint(
    evaluator: Any,
    backend: Backend,
    checkpoint: str | Path,
    *,
    label: str,
    samples: dict[str, list[int]] | None = None,
    work: Path | None = None,
) -> dict[str, float]:
    """{task: score} of a checkpoint directory with ``backend``, on the evaluator's tasks (its limit,
    or ``samples``); a command's output goes under ``work`` (default: beside the checkpoint)."""
    tasks = list(evaluator.tasks)
    if isinstance(backend, CommandBackend):
        work = work or Path(str(checkpoint).rstrip("/") + ".eval")
        output = work / "results"
        work.mkdir(parents=True, exist_ok=True)
        line = command_line(
            backend,
            model=str(checkpoint),
            tasks=tasks,
            output=output,
            include_path=evaluator.include_path,
            samples=samples,
            limit=None if samples is not None else evaluator.limit,
            label=label,
        )
        results = run_command(backend, line, output, label, log_path=work / "eval.log")
        scores, metrics = scores_from_results(results, tasks, label)
        evaluator.metric.update(metrics)
        return scores
    if is_remote(str(checkpoint)):  # lm-eval and transformers read local directories: a copy, removed after
        import shutil

        copy = (work or Path(tempfile.mkdtemp(prefix="bigmerge-eval-"))) / "checkpoint"
        try:
            local_copy(str(checkpoint), copy)
            return score_checkpoint(evaluator, backend, copy, label=label, samples=samples, work=work)
        finally:
            shutil.rmtree(copy if work else copy.parent, ignore_errors=True)
    if backend.in_memory():
        from bigmerge.eval.harness import load_model

        model, tok = load_model(checkpoint, evaluator.dtype)
        return evaluator.score(label, model, tok, samples=samples)  # type: ignore[no-any-return]
    lm = build_lm(
        backend, str(checkpoint), batch_size=evaluator.batch_size, device=evaluator.device, dtype=evaluator.dtype
    )
    return evaluator.score_lm(lm, samples=samples)  # type: ignore[no-any-return]


def is_remote(checkpoint: str) -> bool:
    return "://" in checkpoint and not checkpoint.startswith("file://")


def local_copy(url: str, dest: Path) -> None:
    """The files of a checkpoint in object storage, copied into ``dest`` (for backends that load a
    local directory: lm-eval's hf and vllm models). bigmerge's own files (its manifest, the block
    journal) are left out."""
    from bigmerge.storage.fs import location

    src = location(url)
    dest.mkdir(parents=True, exist_ok=True)
    for name in src.listdir():
        if name.endswith((".json", ".safetensors", ".model", ".txt", ".jinja", ".tiktoken")):
            f = src.join(name)
            target = str(dest / name)
            src.call("copy", partial(f.fs.get_file, f.path, target))


# --- a command per candidate ---------------------------------------------------------------------


def command_line(
    backend: CommandBackend,
    *,
    model: str,
    tasks: list[str],
    output: Path,
    include_path: str | None,
    samples: dict[str, list[int]] | None,
    limit: float | None,
    label: str,
) -> str:
    samples_file = ""
    if samples is not None:
        samples_file = str(output.parent / (output.name + ".samples.json"))
        Path(samples_file).write_text(json.dumps(samples))
    limit_text = "" if limit is None else (str(int(limit)) if limit >= 1 else repr(float(limit)))
    eval_args = ["--tasks", ",".join(tasks), "--output_path", str(output)]
    if include_path:
        eval_args += ["--include_path", include_path]
    if samples is not None:
        eval_args += ["--samples", samples_file]
    elif limit is not None:
        eval_args += ["--limit", limit_text]
    values = {
        "model": model,
        "tasks": ",".join(tasks),
        "output": str(output),
        "include_path": include_path or "",
        "samples": samples_file,
        "limit": limit_text,
        "label": label,
    }
    quoted = {k: shlex.quote(v) for k, v in values.items()}
    quoted["eval_args"] = " ".join(shlex.quote(a) for a in eval_args)
    return backend.command.format(**quoted)


def run_command(
    backend: CommandBackend,
    line: str,
    output: Path,
    label: str,
    log_path: Path | None = None,
) -> dict[str, Any]:
    """Run ``line`` until it writes lm-eval results into ``output``: retried as configured, then an
    EvaluationError naming the candidate, the command and its last output line."""
    attempts = backend.retries + 1
    last = ""
    for attempt in range(1, attempts + 1):
        if STOP.is_set():
            raise EvaluationError(f"candidate {label!r}: evaluation stopped: the search is stopping")
        if output.exists():  # left by an earlier attempt, or by a run that was killed
            import shutil

            shutil.rmtree(output)
        output.mkdir(parents=True)
        code, tail = _run_once(line, backend.timeout_s, log_path)
        results = find_results(output)
        if code == 0 and results is not None:
            return results
        last = tail or "(no output)"
        why = (
            f"timed out after {backend.timeout_s:g} s"
            if code is None
            else f"exit {code}"
            if code != 0
            else f"it wrote no lm-eval results under {output}"
        )
        last = f"{why}; last output: {last}"
        if attempt < attempts:
            time.sleep(backend.retry_delay_s)
    raise EvaluationError(
        f"candidate {label!r}: evaluation command failed {attempts} time(s) ({last}); command: {line}"
    )


def _run_once(line: str, timeout: float | None, log_path: Path | None) -> tuple[int | None, str]:
    """(exit code or None on timeout, last non-empty output line); output also appended to log_path.

    The command runs under a small supervisor (``_SUPERVISOR``), the leader of its own process group:
    a timeout, a stop or any error kills that whole group, and when this process dies, even by
    SIGKILL, the supervisor sees its end of a pipe close and kills the group itself, so an evaluation
    never outlives the search. The supervisor also asks for a parent-death signal (prctl
    PR_SET_PDEATHSIG) as a second guard; alone it would not do: it reaches only the direct child.
    (No preexec_fn: the command starts from an evaluator thread, where it is unsafe.)"""
    import sys

    with tempfile.TemporaryFile() as buf:
        lifeline_r, lifeline_w = os.pipe()  # both ends close-on-exec: no other child inherits the write end
        try:
            proc = subprocess.Popen(
                [sys.executable, "-S", "-c", _SUPERVISOR, line],
                stdin=lifeline_r,
                stdout=buf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=_child_env(),
            )
        finally:
            os.close(lifeline_r)
        _RUNNING.add(proc)
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
            _kill_group(proc)
        except BaseException:
            _kill_group(proc)  # a kill of the search (Ctrl-C) takes the evaluation with it
            raise
        finally:
            _RUNNING.discard(proc)
            _kill_group(proc)  # what the command left running in its group (a background job)
            os.close(lifeline_w)
        buf.seek(0)
        text = buf.read().decode("utf-8", "replace")
    if log_path is not None:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(f"$ {line}\n{text}\n")
    tail = deque((ln.strip() for ln in text.splitlines() if ln.strip()), maxlen=1)
    return code, (tail[0] if tail else "")


# Runs the command (bash -c) in its own process group, exits with its status; when its stdin (the
# search's end of a pipe) closes before the command ends, the search is gone: it kills the group.
_SUPERVISOR = """
import ctypes, os, signal, subprocess, sys, threading
def end(*_):
    os.killpg(0, signal.SIGKILL)
signal.signal(signal.SIGTERM, end)
try:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
except (OSError, AttributeError):
    pass
child = subprocess.Popen(["bash", "-c", sys.argv[1]], stdin=subprocess.DEVNULL)
def watch():
    while os.read(0, 1):
        pass
    end()
threading.Thread(target=watch, daemon=True).start()
code = child.wait()
sys.exit(code if code >= 0 else 128 - code)
"""


_RUNNING: set[subprocess.Popen[bytes]] = set()  # evaluation commands running in any thread
STOP = threading.Event()  # set by kill_running: no further attempt starts (cleared once they stopped)


def kill_running() -> None:
    """Stop every evaluation command still running (the search stops: Ctrl-C, an error elsewhere);
    their threads then see a failed attempt and start no other."""
    STOP.set()
    for proc in list(_RUNNING):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # An evaluator started from a rank of an MPI job must not take it for its own MPI world.
    for k in list(env):
        if k.startswith(("OMPI_COMM_WORLD", "PMIX_", "PMI_", "OMPI_MCA_orte", "OMPI_MCA_ess")):
            env.pop(k)
    return env


def find_results(output: Path) -> dict[str, Any] | None:
    """lm-eval's results JSON under its --output_path (``DIR/<model>/results_<time>.json``, or a
    file given as the path), the newest if several; None when there is none."""
    found = [p for p in output.rglob("results*.json") if p.is_file()]
    if not found:
        return None
    newest = max(found, key=lambda p: p.stat().st_mtime)
    try:
        data = json.loads(newest.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("results"), dict) else None


def scores_from_results(
    results: dict[str, Any], tasks: list[str], label: str
) -> tuple[dict[str, float], dict[str, str]]:
    """{task: score} (the metric bigmerge eval shows) from lm-eval's results JSON."""
    from bigmerge.eval.harness import pick_metric

    scores: dict[str, float] = {}
    metrics: dict[str, str] = {}
    missing = [t for t in tasks if t not in results["results"]]
    if missing:
        raise EvaluationError(f"candidate {label!r}: the evaluation's results lack task(s) {', '.join(missing)}")
    for t in tasks:
        picked = pick_metric(results["results"][t])
        if picked is None:
            scores[t] = math.nan
            continue
        metrics[t], scores[t] = picked
    return scores, metrics
