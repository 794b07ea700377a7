"""Scoring models with lm-eval-harness: checkpoints on disk and in-memory models, zoo tasks and any other.

The zoo's tasks (``zoo_add``, ``zoo_rev``, ``zoo_sort``, ``zoo_fin``; ``zoo`` for all four) are
written at run time as lm-eval YAML files beside their jsonl data, with absolute paths, into a
temporary directory: lm-eval resolves relative data paths against the working directory. They
are ``loglikelihood`` tasks whose ``acc`` is 1 when the answer is the model's greedy
continuation, token by token: exact match of greedy decoding, in one forward pass per item.
Any other name is looked up among lm-eval's own tasks (which may need their data sets online).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bigmerge.errors import ConfigError, SourceError
from bigmerge.eval import zoo_tasks
from bigmerge.eval.table import Table
from bigmerge.log import Log

ZOO_TASKS = tuple(f"zoo_{s}" for s in zoo_tasks.SKILLS)
# Which metric a task's column shows: the first of these that lm-eval reports for it.
PREFERRED_METRICS = ("acc", "exact_match", "acc_norm", "f1", "bleu", "word_perplexity")

_TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""


def resolve_tasks(tasks: str | Sequence[str]) -> list[str]:
    """'zoo' -> every zoo task; 'zoo_add,zoo_rev' or a list -> those; other names pass through."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise ConfigError("no task given (examples: --tasks zoo, --tasks zoo_add,zoo_rev)")
    out: list[str] = []
    for n in names:
        expanded = list(ZOO_TASKS) if n == "zoo" else [n]
        for e in expanded:
            if e.startswith("zoo_") and e not in ZOO_TASKS:
                raise ConfigError(f"unknown zoo task {e!r}; the zoo has: zoo, {', '.join(ZOO_TASKS)}")
            if e not in out:
                out.append(e)
    return out


def write_zoo_tasks(task_dir: str | Path) -> Path:
    """Write the zoo's jsonl data and lm-eval YAML files into task_dir (absolute data paths)."""
    d = Path(task_dir).resolve()
    data = zoo_tasks.write_eval_files(d)
    for skill, path in data.items():
        # datasets' arrow cache beside the data: removed with it, not left in ~/.cache per run
        text = _TASK_YAML.format(
            name=f"zoo_{skill}", data=str(path), cache=str(d / "hf-cache"), version=zoo_tasks.DATA_VERSION
        )
        (d / f"zoo_{skill}.yaml").write_text(text, encoding="utf-8")
    return d


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in ("lm_eval", "lm-eval", "datasets", "transformers", "accelerate", "httpx", "filelock"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _import_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as exc:
        raise ConfigError(f"bigmerge eval needs lm-eval: pip install 'bigmerge[eval]' ({exc})") from None
    return lm_eval


def model_dir(path: str | os.PathLike[str]) -> Path:
    """The local checkpoint directory of ``path`` (a path or file:// URL), or a SourceError saying why not."""
    text = str(path)
    if "://" in text and not text.startswith("file://"):
        raise SourceError(f"{text}: bigmerge eval reads local checkpoint directories; copy the model here first")
    p = Path(text[len("file://") :] if text.startswith("file://") else text)
    if not p.is_dir():
        raise SourceError(f"{text}: no such model directory")
    if not (p / "config.json").is_file():
        raise SourceError(f"{text}: not a Hugging Face checkpoint (no config.json)")
    return p


def load_model(path: str | os.PathLike[str], dtype: str = "float32") -> tuple[Any, Any]:
    """A local Hugging Face checkpoint directory -> (model, tokenizer), in eval mode."""
    p = model_dir(path)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ConfigError(f"unknown dtype {dtype!r} (examples: float32, bfloat16)")
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"{path}: cannot load the model: {first}") from None
    model.eval()
    return model, tok


def pick_metric(result: dict[str, Any]) -> tuple[str, float] | None:
    numeric = {k: v for k, v in result.items() if "," in k and isinstance(v, (int, float)) and "stderr" not in k}
    for m in PREFERRED_METRICS:
        for k, v in numeric.items():
            if k.split(",")[0] == m:
                return m, float(v)
    if numeric:
        k, v = next(iter(numeric.items()))
        return k.split(",")[0], float(v)
    return None


class Evaluator:
    """Scores models on a fixed list of tasks; keeps lm-eval's task index between models.

    ``Evaluator(tasks).score(name, model, tokenizer)`` returns {task: score} for an in-memory model
    (what a search over merge coefficients calls for every candidate); ``table(models)`` scores
    several, loading paths from disk one at a time.
    """

    def __init__(
        self,
        tasks: str | Sequence[str] = "zoo",
        *,
        limit: int | float | None = None,
        batch_size: int = 64,
        device: str = "cpu",
        dtype: str = "float32",
        quiet: bool = True,
    ) -> None:
        self.tasks = resolve_tasks(tasks)
        self.limit = limit
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.quiet = quiet
        if quiet:
            _quiet_libraries()
        lm_eval = _import_lm_eval()
        from lm_eval.tasks import TaskManager

        self._lm_eval = lm_eval
        self._dir = tempfile.mkdtemp(prefix="bigmerge-eval-")
        # removed by close(), or when the evaluator is collected or the interpreter exits: an
        # evaluator whose construction failed (an unknown task) or was never closed left its
        # directory in /tmp, one per search worker
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
        write_zoo_tasks(self._dir)
        others = [t for t in self.tasks if t not in ZOO_TASKS]
        # Indexing lm-eval's thousands of own task files takes seconds: only when one is asked for.
        self._tm = TaskManager(include_path=self._dir, include_defaults=bool(others))
        known = set(self._tm.all_tasks)
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            raise ConfigError(f"unknown task(s) {', '.join(unknown)}: neither a zoo task nor one of lm-eval's")
        self.metric: dict[str, str] = {}

    def close(self) -> None:
        self._cleanup()

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def doc_counts(self) -> dict[str, int]:
        """{leaf task: number of evaluation documents}; a group's subtasks are listed, not the group."""
        from lm_eval.tasks import get_task_dict

        counts: dict[str, int] = {}

        def walk(d: dict[Any, Any]) -> None:
            for key, value in d.items():
                if isinstance(value, dict):
                    walk(value)
                elif value is not None:
                    counts[getattr(value, "task_name", None) or str(key)] = len(value.eval_docs)

        walk(get_task_dict(list(self.tasks), self._tm))
        return counts

    def score(
        self, name: str, model: Any, tokenizer: Any, *, samples: dict[str, list[int]] | None = None
    ) -> dict[str, float]:
        """{task: score} of an in-memory model (a transformers causal LM and its tokenizer).

        ``samples`` ({leaf task: document indices}) scores those documents instead of the first
        ``limit`` (a search scores one part of each task and reports on another).
        """
        from lm_eval.models.huggingface import HFLM

        with self._quiet():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, device=self.device)
        return self.score_lm(lm, samples=samples)

    def _quiet(self) -> Any:
        # lm-eval's progress bars cannot be turned off: in quiet mode they go nowhere.
        return contextlib.redirect_stderr(io.StringIO()) if self.quiet else contextlib.nullcontext()

    @property
    def include_path(self) -> str:
        """The directory of the zoo's task YAML files (lm-eval's --include_path)."""
        return self._dir

    def score_lm(self, lm: Any, *, samples: dict[str, list[int]] | None = None) -> dict[str, float]:
        """{task: score} of an lm-eval model object (HFLM, VLLM, ... as its registry builds them)."""
        with self._quiet():
            res = self._lm_eval.simple_evaluate(
                model=lm,
                tasks=list(self.tasks),
                task_manager=self._tm,
                limit=None if samples is not None else self.limit,
                samples=samples,
                bootstrap_iters=0,
                log_samples=False,
                verbosity="ERROR",
            )
        if res is None:  # lm-eval returns None on non-zero ranks of a distributed run
            return {}
        out: dict[str, float] = {}
        for t in self.tasks:
            picked = pick_metric(res["results"].get(t, {}))
            if picked is None:
                out[t] = math.nan
                continue
            self.metric[t], out[t] = picked
        return out

    def table(
        self,
        models: Sequence[str | os.PathLike[str] | tuple[str, Any, Any]],
        *,
        log: Callable[[str], None] | None = None,
        backend: Any = None,
    ) -> Table:
        """Score every model (a checkpoint path, or (name, model, tokenizer)) on every task; paths
        with ``backend`` (bigmerge.eval.backends: hf, vllm, command) when given."""
        rows: list[str] = []
        scores: dict[str, dict[str, float]] = {}
        seconds: dict[str, float] = {}
        for spec in models:
            t0 = time.perf_counter()
            if isinstance(spec, tuple):
                name, model, tok = spec
            else:
                name = str(spec)
            if name in scores:
                raise ConfigError(f"model {name!r} given twice")
            if isinstance(spec, tuple):
                scores[name] = self.score(name, model, tok)
            elif backend is not None and not backend.in_memory():
                from bigmerge.eval.backends import score_checkpoint

                work = Path(tempfile.mkdtemp(prefix="eval-", dir=self._dir))
                scores[name] = score_checkpoint(self, backend, Path(spec), label=name, work=work)
            else:
                model, tok = load_model(spec, self.dtype)
                scores[name] = self.score(name, model, tok)
            rows.append(name)
            seconds[name] = round(time.perf_counter() - t0, 2)
            if log:
                log(
                    f"{name}: "
                    + " ".join(f"{t}={v:.3f}" for t, v in scores[name].items())
                    + f" ({seconds[name]:.1f} s)"
                )
        meta = {"limit": self.limit, "lm_eval": getattr(self._lm_eval, "__version__", "?"), "seconds": seconds}
        return Table(rows, list(self.tasks), scores, dict(self.metric), meta=meta)


def evaluate(
    models: Sequence[str | os.PathLike[str] | tuple[str, Any, Any]],
    tasks: str | Sequence[str] = "zoo",
    *,
    limit: int | float | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    dtype: str = "float32",
    log: Callable[[str], None] | None = None,
    backend: Any = None,
) -> Table:
    """Score models (checkpoint directories, or (name, model, tokenizer) tuples) on tasks -> Table."""
    if not models:
        raise ConfigError("no model to evaluate")
    # A missing or wrong directory is known before lm-eval is even imported.
    for spec in models:
        if not isinstance(spec, tuple):
            model_dir(spec)
    with Evaluator(tasks, limit=limit, batch_size=batch_size, device=device, dtype=dtype) as ev:
        return ev.table(models, log=log, backend=backend)


def _limit(value: float | None) -> int | float | None:
    if value is None:
        return None
    if value <= 0:
        raise ConfigError(f"--limit must be positive, not {value:g}")
    return value if value < 1 else int(value)


def run_cli(args: Any) -> int:
    """``bigmerge eval``: score, print the table, write JSON / Markdown / PNG under --out."""
    say = None if args.quiet else Log()
    backend = cli_backend(args)
    table = evaluate(
        args.models,
        args.tasks,
        limit=_limit(args.limit),
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        log=say,
        backend=backend,
    )
    print(table.to_text())
    if args.out:
        paths = table.write(args.out, title="bigmerge eval")
        if say:
            say("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cli_backend(args: Any) -> Any:
    """``--backend``, ``--model-args``, ``--command``, ``--timeout``, ``--retries`` as a checked backend."""
    from typing import Annotated

    from pydantic import Field, TypeAdapter, ValidationError

    from bigmerge.eval.backends import Backend, check_backend

    kind = getattr(args, "backend", "hf") or "hf"
    spec: dict[str, Any] = {"type": kind}
    if getattr(args, "model_args", None):
        if kind == "command":
            raise ConfigError("--model-args: for --backend hf or vllm; a command names its own model arguments")
        pairs = [p for p in args.model_args.split(",") if p.strip()]
        if any("=" not in p for p in pairs):
            raise ConfigError(f"--model-args {args.model_args!r}: expected key=value,key=value")
        import yaml

        spec["model_args"] = {k.strip(): yaml.safe_load(v) for k, v in (p.split("=", 1) for p in pairs)}
    if kind == "command":
        if not getattr(args, "eval_command", None):
            raise ConfigError("--backend command: give --command 'TEMPLATE' (placeholders {model}, {eval_args}, ...)")
        spec.update(command=args.eval_command, timeout_s=args.timeout, retries=args.retries)
    elif getattr(args, "eval_command", None):
        raise ConfigError("--command: only with --backend command")
    try:
        backend = TypeAdapter(Annotated[Backend, Field(discriminator="type")]).validate_python(spec)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"][1:]) or "--backend"
        raise ConfigError(f"--backend {kind}: {where}: {err['msg']}") from None
    check_backend(backend, "--backend", own={"dtype": args.dtype})
    return backend
