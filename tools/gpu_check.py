"""The GPU check: every GPU path of bigmerge, run in one go on a machine lent for minutes.

    python3 tools/gpu_check.py OUT                        # on the GPU machine (about 5 minutes on an H200)
    python3 tools/gpu_check.py OUT --device cpu --quick   # the dry run: same script, CPU only, small sizes

Writes OUT/report.json (every figure), OUT/report.md (the tables) and OUT/log.txt (the commands
and their output, cut to the last lines of each). Fixtures are built on the machine, under
--work (default /tmp/bigmerge-gpu-check): no model travels. Python packages the machine lacks
are installed from the wheels in --wheels (default .whl/, made by tools/gpu_wheels.sh) into
WORK/env, which the children see through PYTHONPATH, PATH and LD_LIBRARY_PATH.

Parts, each a child process under its own timeout (a part that fails or runs out of time
reports what it measured so far and the others still run):

  fixtures  the families (generated on the device: a GPU draws them in seconds), the small zoo
            and its DAM data; meanwhile numba compiles every CPU kernel on a tiny family
  ops       every operator, --device DEVICE against --device cpu on the same sources (the
            medium preset, ~1 GB per model): identical bytes, or the largest difference in ulps,
            and each side's GB/s (input bytes over wall time)
  stats     fisher and regmean: `bigmerge stats` on the device, then both merges on each side
  dam       `bigmerge dam` under DeepSpeed ZeRO-3 on the device (NCCL on a GPU, offload on), a
            few steps on the small zoo: the loss falls, coefficients written, time per step;
            then the dam merge on each side
  eval      `bigmerge eval` of a zoo model on the device and on the CPU: equal scores
  slice     Llama-3-70B's real tensor sizes (one layer, ~6 GB per model): linear and ties on
            the device and on the CPU cores: wall, GB/s, peak host and GPU memory, same bytes
  scaling   CPU only: mpirun -n 1, 2, 4, 8 for linear and ties on the ops preset, speed-up

With --device cpu the "device" side of ops, stats, dam and slice is the CPU with the numba
kernels switched off (BIGMERGE_NO_NUMBA=1): the torch statements against the fused kernels.
--quick shrinks every size (tiny/small presets, 2 ranks, 2 DAM steps) so the whole check runs
in a few minutes on 2 cores; tests/test_gpu_check.py runs it so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
PARTS = ("fixtures", "dam", "eval", "ops", "slice", "scaling", "stats")
# Seconds per part in a full run; --quick runs use QUICK_TIMEOUTS. Summed they stay inside the
# lease's 10-minute command limit; a part that needs less ends sooner.
TIMEOUTS = {"fixtures": 120, "dam": 200, "eval": 60, "ops": 180, "slice": 150, "scaling": 60, "stats": 60}
QUICK_TIMEOUTS = {"fixtures": 180, "ops": 240, "stats": 120, "dam": 300, "eval": 120, "slice": 120, "scaling": 120}
NEEDED = ("pydantic", "crc32c", "deepspeed", "lm_eval", "cma", "mpi4py", "datasets")

FTS = ("ft1", "ft2", "ft3")


def ops_config(method: str, fam: dict[str, Any]) -> dict[str, Any]:
    """The config of one operator over a family (a base and fine-tunes); the methods that need
    statistics or learned coefficients run in their own parts."""

    def models(names: tuple[str, ...], **params: Any) -> list[dict[str, Any]]:
        return [{"model": str(fam[n]), **({"parameters": dict(params)} if params else {})} for n in names]

    tv = {  # task-vector family: the base and the three fine-tunes
        "ties": {"weight": 1.0, "density": 0.5},
        "dare_ties": {"weight": 1.0, "density": 0.5},
        "dare_linear": {"weight": 0.6, "density": 0.5},
        "della": {"weight": 1.0, "density": 0.5, "epsilon": 0.1},
        "della_linear": {"weight": 0.6, "density": 0.5, "epsilon": 0.1},
        "breadcrumbs": {"weight": 1.0, "density": 0.9, "gamma": 0.01},
        "breadcrumbs_ties": {"weight": 1.0, "density": 0.9, "gamma": 0.01},
        "task_arithmetic": {"weight": 0.5},
    }
    base = str(fam["base"])
    if method in tv:
        cfg: dict[str, Any] = {"base_model": base, "models": models(FTS, **tv[method])}
    elif method == "sce":
        cfg = {"base_model": base, "models": models(FTS), "parameters": {"select_topk": 0.5}}
    elif method == "linear":  # uniform soup of all four
        cfg = {"models": models(("base", *FTS), weight=1.0)}
    elif method in ("slerp", "nearswap"):
        cfg = {
            "base_model": base,
            "models": models(("base", "ft1")),
            "parameters": {"t": 0.5 if method == "slerp" else 0.001},
        }
    elif method == "nuslerp":
        cfg = {"models": models(("ft1",), weight=0.4) + models(("ft2",), weight=0.6)}
    elif method == "multislerp":
        cfg = {"models": models(FTS, weight=1.0)}
    elif method == "karcher":
        cfg = {"models": models(FTS)}
    elif method == "model_stock":
        cfg = {"base_model": base, "models": models(FTS)}
    elif method == "passthrough":
        cfg = {"models": models(("ft2",))}
    else:
        raise ValueError(method)
    return {"merge_method": method, **cfg, "dtype": "float32", "out_dtype": "bfloat16"}


OPS_METHODS = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "della",
    "della_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "sce",
    "slerp",
    "nuslerp",
    "multislerp",
    "karcher",
    "model_stock",
    "nearswap",
    "passthrough",
)
SCALING_METHODS = ("linear", "ties")


def slice_config(method: str, fam: dict[str, Any]) -> dict[str, Any]:
    """linear or ties of a base and two fine-tunes (the 70B-shaped slice)."""
    if method == "linear":
        cfg: dict[str, Any] = {
            "models": [{"model": str(fam[n]), "parameters": {"weight": 1.0}} for n in ("base", "ft1", "ft2")]
        }
    else:
        cfg = {
            "base_model": str(fam["base"]),
            "models": [{"model": str(fam[n]), "parameters": {"weight": 1.0, "density": 0.5}} for n in ("ft1", "ft2")],
        }
    return {"merge_method": method, **cfg, "dtype": "float32", "out_dtype": "bfloat16"}


def to_yaml(cfg: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(cfg, sort_keys=False)


# --------------------------------------------------------------------------- shared helpers


def now() -> float:
    return time.perf_counter()


def write_json(path: Path, doc: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


class Context:
    """What the parent prepared, handed to every part through WORK/context.json."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.device: str = doc["device"]
        self.quick: bool = doc["quick"]
        self.work = Path(doc["work"])
        self.env: dict[str, str] = doc["env"]
        self.cores: int = doc["cores"]
        self.python: str = doc["python"]

    @property
    def gpu(self) -> bool:
        return self.device != "cpu"

    def path(self, *parts: str) -> Path:
        return self.work.joinpath(*parts)


class Part:
    """A part's results, saved after every measurement so a timeout keeps what was measured."""

    def __init__(self, ctx: Context, name: str) -> None:
        self.ctx = ctx
        self.name = name
        self.file = ctx.path("parts", f"{name}.json")
        self.doc: dict[str, Any] = {"rows": [], "notes": []}
        self.logf = open(ctx.path("parts", f"{name}.log"), "a", buffering=1)

    def save(self) -> None:
        write_json(self.file, self.doc)

    def row(self, **row: Any) -> dict[str, Any]:
        self.doc["rows"].append(row)
        self.save()
        return row

    def note(self, text: str) -> None:
        self.doc["notes"].append(text)
        self.log(f"note: {text}")
        self.save()

    def log(self, text: str) -> None:
        self.logf.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")

    def run(
        self, cmd: list[str], *, timeout: float, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> dict[str, Any]:
        """Run a command; its wall time, peak RSS (its own and its waited children's), exit code, output."""
        full_env = {**os.environ, **self.ctx.env, **(env or {})}
        self.log("$ " + " ".join(cmd))
        t0 = now()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env, cwd=cwd, start_new_session=True
        )
        out_chunks: list[bytes] = []

        def drain() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                out_chunks.append(line)

        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(drain)
            deadline = t0 + timeout
            status = None
            rusage = None
            while status is None:
                pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    status, rusage = st, ru
                    break
                if now() > deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    _, st, ru = os.wait4(proc.pid, 0)
                    status, rusage = None, ru
                    break
                time.sleep(0.02)
            proc.returncode = os.waitstatus_to_exitcode(status) if status is not None else -9
            fut.result(timeout=10)
        wall = now() - t0
        output = b"".join(out_chunks).decode(errors="replace")
        tail = "\n".join(output.splitlines()[-25:])
        self.log(f"  -> rc {proc.returncode} in {wall:.2f} s, peak RSS {rusage.ru_maxrss / 2**20:.2f} GiB\n{tail}")
        return {
            "rc": proc.returncode if status is not None else "timeout",
            "wall_s": round(wall, 3),
            "peak_rss_gib": round(rusage.ru_maxrss / 2**20, 3),
            "output": output,
        }


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bigmerge_cmd(ctx: Context) -> list[str]:
    return [ctx.python, "-m", "bigmerge"]


_DONE = re.compile(r"done: .*?\(.*?([\d.]+) GB read in ([\d.]+) s, ([\d.]+) GB/s, peak RSS (\d+) MiB/rank")
_GPU = re.compile(r"peak GPU memory (\d+) MiB/rank")


def merge_figures(output: str) -> dict[str, Any]:
    """What bigmerge's own summary line says (its time excludes the interpreter's start and imports)."""
    m = _DONE.search(output)
    fig: dict[str, Any] = {}
    if m:
        fig.update(gb_read=float(m.group(1)), merge_s=float(m.group(2)), peak_rss_mib_rank=int(m.group(4)))
    g = _GPU.search(output)
    if g:
        fig["peak_gpu_mib_rank"] = int(g.group(1))
    return fig


def error_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    errs = [ln for ln in lines if "error" in ln.lower() or "Error" in ln]
    return (errs or lines or ["(no output)"])[-1][-400:]


def weight_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def input_bytes(cfg_text: str) -> int:
    """Bytes of the weight files of every model the config names (each read once)."""
    import yaml

    doc = yaml.safe_load(cfg_text)
    paths = {m["model"] for m in doc.get("models", [])}
    if doc.get("base_model"):
        paths.add(doc["base_model"])
    return sum(f.stat().st_size for p in paths for f in weight_files(Path(p)))


def ordered(bits: Any) -> Any:
    """Float bit patterns (as signed ints) to integers whose order is the floats' order (-0 == +0)."""
    import torch

    wide = bits.to(torch.int64)
    low = -(1 << (8 * bits.element_size() - 1))
    return torch.where(wide < 0, low - wide, wide)


def compare_dirs(a: Path, b: Path) -> dict[str, Any]:
    """Tensor by tensor: names, dtypes, identical bytes; else differing elements and the largest ulp gap."""
    import torch
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        out = {}
        for f in weight_files(d):
            with safe_open(str(f), "pt") as sf:
                out.update(dict.fromkeys(sf.keys(), f))
        return out

    ia, ib = index(a), index(b)
    res: dict[str, Any] = {"tensors": len(ia), "identical": 0, "differ": [], "max_ulp": 0, "max_abs": 0.0}
    if set(ia) != set(ib):
        res["name_mismatch"] = sorted(set(ia) ^ set(ib))[:10]
        return res
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    for name in sorted(ia):
        with safe_open(str(ia[name]), "pt") as fa, safe_open(str(ib[name]), "pt") as fb:
            ta, tb = fa.get_tensor(name), fb.get_tensor(name)
        if ta.dtype != tb.dtype or ta.shape != tb.shape:
            res["differ"].append({"tensor": name, "why": f"{ta.dtype}{tuple(ta.shape)} vs {tb.dtype}{tuple(tb.shape)}"})
            continue
        va, vb = ta.view(ints[ta.element_size()]), tb.view(ints[tb.element_size()])
        if torch.equal(va, vb):
            res["identical"] += 1
            continue
        ulp = (ordered(va) - ordered(vb)).abs()
        n = int((ulp != 0).sum())
        top = int(ulp.max())
        absd = float((ta.float() - tb.float()).abs().max())
        res["differ"].append({"tensor": name, "elements": n, "of": ta.numel(), "max_ulp": top, "max_abs": absd})
        res["max_ulp"] = max(res["max_ulp"], top)
        res["max_abs"] = max(res["max_abs"], absd)
    res["differ_count"] = len(res["differ"])
    res["differ"] = res["differ"][:5]
    return res


def device_side(ctx: Context) -> tuple[list[str], dict[str, str]]:
    """The merge flags and environment of the device side (the CPU's torch path in a dry run)."""
    if ctx.gpu:
        return ["--device", ctx.device], {}
    return ["--device", "cpu"], {"BIGMERGE_NO_NUMBA": "1"}


def merge_pair(
    part: Part, method: str, cfg_text: str, tag: str, timeout: float, extra: list[str] | None = None
) -> dict[str, Any]:
    """One config merged on the device side and on the CPU; both outputs compared, then removed."""
    ctx = part.ctx
    cfg = ctx.path("configs", f"{tag}-{method}.yaml")
    cfg.parent.mkdir(exist_ok=True)
    cfg.write_text(cfg_text)
    nbytes = input_bytes(cfg_text)
    dev_flags, dev_env = device_side(ctx)
    outs = {}
    row: dict[str, Any] = {"method": method, "input_gb": round(nbytes / 1e9, 3)}
    for side, flags, env in (("device", dev_flags, dev_env), ("cpu", ["--device", "cpu"], {})):
        out = ctx.path("outputs", f"{tag}-{method}-{side}")
        shutil.rmtree(out, ignore_errors=True)
        r = part.run(
            [*bigmerge_cmd(ctx), "merge", str(cfg), str(out), *flags, *(extra or [])], timeout=timeout, env=env
        )
        fig = merge_figures(r["output"])
        row[side] = {
            "rc": r["rc"],
            "wall_s": r["wall_s"],
            "gb_s": round(nbytes / 1e9 / r["wall_s"], 3),
            "peak_rss_gib": r["peak_rss_gib"],
            **fig,
        }
        if fig.get("merge_s"):
            row[side]["merge_gb_s"] = round(nbytes / 1e9 / max(fig["merge_s"], 1e-9), 3)
        if r["rc"] != 0:
            row[side]["error"] = error_line(r["output"])
        outs[side] = out
    if row["device"]["rc"] == 0 and row["cpu"]["rc"] == 0:
        cmp = compare_dirs(outs["device"], outs["cpu"])
        row["compare"] = cmp
        row["identical"] = cmp["identical"] == cmp["tensors"] and "name_mismatch" not in cmp
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    return part.row(**row)


# --------------------------------------------------------------------------- the parts


def sizes(ctx: Context) -> dict[str, Any]:
    if ctx.quick:
        return {"ops_preset": "tiny", "slice_preset": "small", "ranks": [1, 2], "dam_steps": 2, "eval_limit": 4}
    return {
        "ops_preset": "medium",
        "slice_preset": "70b-slice",
        "ranks": [1, 2, 4, 8],
        "dam_steps": 6,
        "eval_limit": 40,
    }


def family(ctx: Context, which: str) -> dict[str, Path]:
    """{"base": path, "ft1": path, ...} of the ops (3 fine-tunes), slice (2) or warm-up (3) family."""
    root, n = {"ops": ("fam-ops", 3), "slice": ("fam-slice", 2), "warm": ("fam-warm", 3)}[which]
    return {name: ctx.path(root, name) for name in ["base", *[f"ft{i}" for i in range(1, n + 1)]]}


def part_fixtures(part: Part) -> None:
    ctx = part.ctx
    sys.path.insert(0, str(TOOLS))
    import toy_models

    s = sizes(ctx)
    gen = ctx.device if ctx.gpu else "cpu"
    for which, n, preset in (("ops", 3, s["ops_preset"]), ("slice", 2, s["slice_preset"])):
        t0 = now()
        fam = family(ctx, which)
        toy_models.make_family(
            ctx.path(f"fam-{which}"), preset=preset, dtype="bfloat16", n_finetunes=n, sharded=True, device=gen
        )
        part.row(
            what=f"{which} family ({preset}, base + {n} fine-tunes, bf16, drawn on {gen})",
            seconds=round(now() - t0, 1),
            gb=round(sum(f.stat().st_size for p in fam.values() for f in weight_files(p)) / 1e9, 2),
        )
    t0 = now()
    import make_zoo

    from bigmerge.dam.zoo_data import write_zoo_data

    zoo = ctx.path("zoo-small")
    make_zoo.make_zoo(zoo, preset="small", threads=4 if ctx.gpu else 1)
    write_zoo_data(zoo, examples=16, out=ctx.path("dam-data"))
    part.row(what="small zoo (5 trained models) and its DAM data", seconds=round(now() - t0, 1))


def part_warmup(part: Part) -> None:
    """numba compiles each CPU kernel once (cached on disk): tiny merges with the same model counts
    and dtypes as the measured ones, several at a time, in the background of the first parts, so
    that no timed CPU merge pays a compilation. (--quick: linear and ties only, to run the code.)"""
    ctx = part.ctx
    sys.path.insert(0, str(TOOLS))
    import toy_models

    warm = family(ctx, "warm")
    toy_models.make_family(ctx.path("fam-warm"), preset="tiny", dtype="bfloat16", n_finetunes=3, sharded=True)
    methods = SCALING_METHODS if ctx.quick else OPS_METHODS
    configs = [(f"warm-{m}", to_yaml(ops_config(m, warm))) for m in methods]
    configs += [(f"warm-slice-{m}", to_yaml(slice_config(m, warm))) for m in SCALING_METHODS]
    jobs = max(1, min(len(configs), ctx.cores // 2 if ctx.gpu else 2))
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    todo = list(configs)
    t0 = now()
    warm_log = open(ctx.path("parts", "warmup-merges.log"), "w")

    def start_next() -> None:
        tag, text = todo.pop(0)
        cfg = ctx.path("configs", f"{tag}.yaml")
        cfg.write_text(text)
        out = ctx.path("outputs", tag)
        shutil.rmtree(out, ignore_errors=True)
        env = {**os.environ, **ctx.env, "NUMBA_NUM_THREADS": "1"}
        cmd = [*bigmerge_cmd(ctx), "merge", str(cfg), str(out), "--quiet"]
        procs.append((tag, subprocess.Popen(cmd, stdout=warm_log, stderr=warm_log, env=env)))

    failed = []
    while procs or todo:
        while todo and len(procs) < jobs:
            start_next()
        for item in list(procs):
            tag, p = item
            if p.poll() is not None:
                procs.remove(item)
                if p.returncode != 0:
                    failed.append(tag)
                shutil.rmtree(ctx.path("outputs", tag), ignore_errors=True)
        time.sleep(0.05)
    part.row(
        what=f"numba warm-up: {len(configs)} tiny merges, {jobs} at a time", seconds=round(now() - t0, 1), failed=failed
    )
    if failed:
        part.note(f"warm-up merges failed: {failed} (see log)")


def wait_for_warmup(part: Part, limit: float = 240) -> None:
    """CPU timings only after numba's compilations are on disk (the background warm-up part)."""
    t0 = now()
    marker = part.ctx.path("parts", "warmup.json")
    while now() - t0 < limit:
        try:
            if json.loads(marker.read_text()).get("status"):
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    waited = now() - t0
    if waited > 1:
        part.note(f"waited {waited:.0f} s for the numba warm-up to finish")


def part_ops(part: Part) -> None:
    ctx = part.ctx
    wait_for_warmup(part)
    fam = family(ctx, "ops")
    timeout = 60 if ctx.gpu else 120
    for method in OPS_METHODS:
        merge_pair(part, method, to_yaml(ops_config(method, fam)), "ops", timeout)


def part_stats(part: Part) -> None:
    ctx = part.ctx
    zoo = ctx.path("zoo-small")
    data = ctx.path("dam-data")
    dev = ctx.device
    models = ("sort", "fin")
    for kind in ("fisher", "regmean"):
        out = ctx.path("stats", kind)
        shutil.rmtree(out, ignore_errors=True)
        r = part.run(
            [
                *bigmerge_cmd(ctx),
                "stats",
                *[str(zoo / m) for m in models],
                "--kind",
                kind,
                "--data",
                *[str(data / f"{m}.jsonl") for m in models],
                "--out",
                str(out),
                "--device",
                dev,
                "--max-examples",
                "16",
                "--quiet",
            ],
            timeout=60,
        )
        part.row(
            what=f"bigmerge stats --kind {kind} --device {dev}",
            rc=r["rc"],
            wall_s=r["wall_s"],
            **({"error": error_line(r["output"])} if r["rc"] != 0 else {}),
        )
        if r["rc"] != 0:
            continue
        cfg = (
            f"merge_method: {kind}\nmodels:\n"
            + "".join(f"- {{model: {zoo / m}}}\n" for m in models)
            + f"parameters: {{statistics_dir: {out}}}\ndtype: float32\n"
        )
        merge_pair(part, kind, cfg, "stats", 60)


def part_dam(part: Part) -> None:
    import yaml

    ctx = part.ctx
    s = sizes(ctx)
    zoo = ctx.path("zoo-small")
    data = ctx.path("dam-data")
    out = ctx.path("dam")
    shutil.rmtree(out, ignore_errors=True)
    cfg = {
        "models": [{"model": str(zoo / m), "data": str(data / f"{m}.jsonl")} for m in ("sort", "fin")],
        "output": str(out),
        "training": {
            "batch_size": 8,
            "epochs": 50,
            "max_steps": s["dam_steps"],
            "lr": 0.01,
            "log_every": 1,
            "device": "cuda" if ctx.gpu else "cpu",
        },
        "deepspeed": {},  # the defaults: ZeRO-3, parameters and optimizer offloaded to the CPU
    }
    path = ctx.path("configs", "dam.yaml")
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    port = free_port()  # two checks on one machine (CI beside a developer) must not share a rendezvous
    env = {"MASTER_PORT": str(port)}
    r = part.run(
        [
            ctx.python,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "1",
            "--master_port",
            str(port),
            "-m",
            "bigmerge",
            "dam",
            str(path),
            "--restart",
        ],
        timeout=150,
        env=env,
    )
    log = out / "train-log.jsonl"
    steps = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    kl = [st.get("kl") for st in steps]
    coef = (
        sorted(p.name for p in (out / "coefficients").glob("*.safetensors")) if (out / "coefficients").is_dir() else []
    )
    engine = re.search(r"engine (\w+), (\w+)", r["output"])
    row: dict[str, Any] = {
        "what": f"bigmerge dam under torchrun (1 process), ZeRO-3 offload, on {'cuda (NCCL)' if ctx.gpu else 'cpu (gloo)'}",
        "rc": r["rc"],
        "wall_s": r["wall_s"],
        "steps": len(steps),
        "kl": kl,
        "loss_falls": bool(len(kl) >= 2 and kl[-1] is not None and kl[0] is not None and kl[-1] < kl[0]),
        "coefficient_files": coef,
        "engine": engine.group(0) if engine else None,
        "step_s": [st.get("step_s", st.get("seconds")) for st in steps],
        "peak_rss_gib": r["peak_rss_gib"],
    }
    if r["rc"] != 0:
        row["error"] = error_line(r["output"])
    part.row(**row)
    merge_yaml = out / "merge.yaml"
    if merge_yaml.exists():
        merge_pair(part, "dam", merge_yaml.read_text(), "dam", 60)
    dam_stored(part, cfg)


def dam_stored(part: Part, online: dict[str, Any]) -> None:
    """Issue 18's path on the device: `bigmerge dam logits` (each source alone, ZeRO-3) into a zarr
    data set, then training that reads it (one merged forward and backward per step, no teacher)."""
    import yaml

    ctx = part.ctx
    out = ctx.path("dam-stored")
    shutil.rmtree(out, ignore_errors=True)
    cfg = {**online, "output": str(out), "loss": {"teacher": "dataset", "top_k": 16}}
    path = ctx.path("configs", "dam-stored.yaml")
    path.write_text(yaml.safe_dump(cfg))
    launch = [ctx.python, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29534"]
    r1 = part.run([*launch, "-m", "bigmerge", "dam", "logits", str(path)], timeout=90, env={"MASTER_PORT": "29534"})
    r2 = part.run([*launch, "-m", "bigmerge", "dam", str(path), "--restart"], timeout=90, env={"MASTER_PORT": "29534"})
    log = out / "train-log.jsonl"
    steps = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    kl = [st.get("kl") for st in steps]
    row: dict[str, Any] = {
        "what": "bigmerge dam logits, then training from the data set (torchrun, 1 process, ZeRO-3 offload)",
        "rc": r1["rc"] or r2["rc"],
        "wall_s": round(r1["wall_s"] + r2["wall_s"], 1),
        "logits_wall_s": r1["wall_s"],
        "steps": len(steps),
        "kl": kl,
        "loss_falls": bool(len(kl) >= 2 and kl[-1] is not None and kl[0] is not None and kl[-1] < kl[0]),
        "step_s": [st.get("step_s") for st in steps],
        "gathered_bytes": [st.get("gathered_bytes") for st in steps],
        "coefficient_files": sorted(p.name for p in (out / "coefficients").glob("*.safetensors")),
    }
    if row["rc"] != 0:
        row["error"] = error_line(r1["output"] if r1["rc"] else r2["output"])
    part.row(**row)


def part_eval(part: Part) -> None:
    ctx = part.ctx
    s = sizes(ctx)
    model = ctx.path("zoo-small", "sort")
    scores = {}
    for side, dev in (("device", ctx.device), ("cpu", "cpu")):
        out = ctx.path("eval", side)
        shutil.rmtree(out, ignore_errors=True)
        r = part.run(
            [
                *bigmerge_cmd(ctx),
                "eval",
                str(model),
                "--tasks",
                "zoo",
                "--limit",
                str(s["eval_limit"]),
                "--device",
                dev,
                "--out",
                str(out),
                "--quiet",
            ],
            timeout=90,
        )
        doc = json.loads((out / "eval.json").read_text()) if (out / "eval.json").exists() else None
        scores[side] = doc
        part.row(
            what=f"bigmerge eval --device {dev}",
            rc=r["rc"],
            wall_s=r["wall_s"],
            **({"error": error_line(r["output"])} if r["rc"] != 0 else {}),
        )
    if scores["device"] is not None and scores["cpu"] is not None:
        a, b = extract_scores(scores["device"]), extract_scores(scores["cpu"])
        part.row(what="scores", device=a, cpu=b, equal=a == b)


def extract_scores(doc: dict[str, Any]) -> dict[str, float | None]:
    """{model/task: score} from an eval.json."""
    return {f"{row['name']}/{task}": v for row in doc.get("rows", []) for task, v in row.get("scores", {}).items()}


def part_slice(part: Part) -> None:
    ctx = part.ctx
    wait_for_warmup(part)
    fam = family(ctx, "slice")
    for method in SCALING_METHODS:
        merge_pair(part, method, to_yaml(slice_config(method, fam)), "slice", 240 if ctx.gpu else 120)


def part_scaling(part: Part) -> None:
    ctx = part.ctx
    wait_for_warmup(part)
    s = sizes(ctx)
    fam = family(ctx, "ops")
    mpirun = shutil.which("mpirun", path=ctx.env.get("PATH"))
    if not mpirun:
        part.note("no mpirun on PATH: nothing measured")
        return
    for method in SCALING_METHODS:
        text = to_yaml(ops_config(method, fam))
        cfg = ctx.path("configs", f"scaling-{method}.yaml")
        cfg.parent.mkdir(exist_ok=True)
        cfg.write_text(text)
        nbytes = input_bytes(text)
        base_wall = None
        for n in s["ranks"]:
            out = ctx.path("outputs", f"scaling-{method}-{n}")
            shutil.rmtree(out, ignore_errors=True)
            r = part.run(
                [
                    mpirun,
                    "-n",
                    str(n),
                    "--oversubscribe",
                    "--bind-to",
                    "none",
                    ctx.python,
                    "-m",
                    "bigmerge",
                    "merge",
                    str(cfg),
                    str(out),
                    "--device",
                    "cpu",
                ],
                timeout=90,
            )
            shutil.rmtree(out, ignore_errors=True)
            fig = merge_figures(r["output"])
            wall = fig.get("merge_s") or r["wall_s"]
            if n == s["ranks"][0]:
                base_wall = wall
            part.row(
                method=method,
                ranks=n,
                rc=r["rc"],
                wall_s=r["wall_s"],
                merge_s=fig.get("merge_s"),
                gb_s=round(nbytes / 1e9 / wall, 3),
                speedup=round(base_wall / wall, 2) if base_wall and r["rc"] == 0 else None,
                peak_rss_mib_rank=fig.get("peak_rss_mib_rank"),
                **({"error": error_line(r["output"])} if r["rc"] != 0 else {}),
            )


PART_FUNCS = {
    "warmup": part_warmup,
    "fixtures": part_fixtures,
    "ops": part_ops,
    "stats": part_stats,
    "dam": part_dam,
    "eval": part_eval,
    "slice": part_slice,
    "scaling": part_scaling,
}


# --------------------------------------------------------------------------- the parent


def missing_modules(python: str, env: dict[str, str]) -> list[str]:
    """The needed modules the interpreter cannot import (and "mpirun" when none is on PATH)."""
    code = f"import importlib.util, json; print(json.dumps([m for m in {NEEDED!r} if importlib.util.find_spec(m) is None]))"
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    try:
        missing = json.loads(r.stdout)
    except ValueError:
        missing = list(NEEDED)
    return missing + ([] if shutil.which("mpirun", path=env.get("PATH")) else ["mpirun"])


def prepare_env(work: Path, wheels: Path, log: Any) -> tuple[dict[str, str], dict[str, Any]]:
    """Children's environment; packages the machine lacks installed from the carried wheels into WORK/env."""
    python = sys.executable
    env: dict[str, str] = {
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_btl": os.environ.get("OMPI_MCA_btl", "^ofi"),
        "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PATH": f"{Path(python).parent}:{os.environ.get('PATH', '')}",
    }
    info: dict[str, Any] = {"installed": []}
    missing = missing_modules(python, env)
    info["missing_before"] = missing
    if missing and wheels.is_dir() and any(wheels.glob("*.whl")):
        prefix = work / "env"
        t0 = now()
        r = subprocess.run(
            [
                python,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--ignore-installed",
                "--disable-pip-version-check",
                "--prefix",
                str(prefix),
                *map(str, sorted(wheels.glob("*.whl"))),
            ],
            capture_output=True,
            text=True,
        )
        log.write(f"pip install from {wheels}: rc {r.returncode}\n{r.stdout[-3000:]}{r.stderr[-3000:]}\n")
        site = next(iter(sorted(prefix.glob("lib/python*/site-packages"))), None)
        if site:
            env["PYTHONPATH"] = f"{site}:{REPO}"
        env["PATH"] = f"{prefix / 'bin'}:{env['PATH']}"
        env["LD_LIBRARY_PATH"] = f"{prefix / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}"
        info["installed"] = sorted(p.name for p in wheels.glob("*.whl"))
        info["install_s"] = round(now() - t0, 1)
        info["install_rc"] = r.returncode
    info["missing_after"] = missing_modules(python, env)
    return env, info


def machine(python: str, env: dict[str, str]) -> dict[str, Any]:
    code = r"""
import json, os, platform, torch
d = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
     "cuda": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    d.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
for m in ("transformers", "numba", "deepspeed", "lm_eval", "mpi4py", "safetensors", "pydantic"):
    try:
        d[m] = __import__(m).__version__
    except Exception as e:
        d[m] = f"missing ({type(e).__name__})"
try:
    d["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
except (ValueError, OSError):
    pass
print(json.dumps(d))
"""
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": (r.stderr or r.stdout)[-500:]}


def run_part(name: str, context_file: Path) -> int:
    ctx = Context(json.loads(context_file.read_text()))
    part = Part(ctx, name)
    t0 = now()
    try:
        PART_FUNCS[name](part)
        part.doc["status"] = "ok"
    except Exception as exc:  # a part reports its failure; the parent goes on with the next
        import traceback

        part.doc["status"] = "failed"
        part.doc["error"] = f"{type(exc).__name__}: {exc}"
        part.log(traceback.format_exc())
    part.doc["seconds"] = round(now() - t0, 1)
    part.save()
    return 0 if part.doc["status"] == "ok" else 1


def render_markdown(rep: dict[str, Any]) -> str:
    m = rep["machine"]
    L = [f"# bigmerge GPU check ({rep['mode']})", ""]
    L.append(
        f"{rep['started']}; {m.get('gpu', 'no GPU')}, {m.get('cpus')} CPUs, {m.get('mem_gib', '?')} GiB; "
        f"Python {m.get('python')}, torch {m.get('torch')}, transformers {m.get('transformers')}, "
        f"numba {m.get('numba')}, deepspeed {m.get('deepspeed')}, lm_eval {m.get('lm_eval')}; "
        f"total {rep['total_s']} s; device side: {rep['device_side']}."
    )
    L.append("")
    L.append("| part | status | seconds |")
    L.append("|---|---|---|")
    for name, p in rep["parts"].items():
        L.append(
            f"| {name} | {p.get('status')}{' — ' + p['error'] if p.get('error') else ''} | {p.get('seconds', '')} |"
        )
    parts = rep["parts"]

    def pair_table(title: str, rows: list[dict[str, Any]]) -> None:
        L.extend(
            [
                "",
                f"## {title}",
                "",
                "| method | input GB | device wall s | device GB/s | cpu wall s | cpu GB/s | device merge s | cpu merge s | peak GPU MiB | peak RSS dev/cpu GiB | same bytes | max ulp |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
        )
        for r in rows:
            if "method" not in r:
                continue
            d, c = r.get("device", {}), r.get("cpu", {})
            cmp = r.get("compare", {})
            same = (
                "yes"
                if r.get("identical")
                else (f"no ({cmp.get('differ_count')}/{cmp.get('tensors')} tensors)" if cmp else "—")
            )
            err = d.get("error") or c.get("error")
            L.append(
                f"| {r['method']} | {r['input_gb']} | {d.get('wall_s', '')} | {d.get('gb_s', '')} | {c.get('wall_s', '')} | "
                f"{c.get('gb_s', '')} | {d.get('merge_s', '')} | {c.get('merge_s', '')} | {d.get('peak_gpu_mib_rank', '')} | "
                f"{d.get('peak_rss_gib', '')}/{c.get('peak_rss_gib', '')} | {same} | {cmp.get('max_ulp', '') if cmp else ''} |"
                + (f" error: {err}" if err else "")
            )

    def rows_table(title: str, rows: list[dict[str, Any]], keys: list[str]) -> None:
        L.extend(["", f"## {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)])
        for r in rows:
            L.append("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")

    fixture_rows = parts.get("fixtures", {}).get("rows", []) + parts.get("warmup", {}).get("rows", [])
    if fixture_rows:
        rows_table("Fixtures", fixture_rows, ["what", "seconds", "gb", "failed"])
    if "ops" in parts:
        pair_table("Every operator: device against CPU (ops preset)", parts["ops"].get("rows", []))
    if "stats" in parts:
        rows_table(
            "Statistics on the device",
            [r for r in parts["stats"].get("rows", []) if "what" in r],
            ["what", "rc", "wall_s", "error"],
        )
        pair_table("fisher and regmean merges: device against CPU", parts["stats"].get("rows", []))
    if "dam" in parts:
        rows_table(
            "DAM",
            [r for r in parts["dam"].get("rows", []) if "what" in r],
            ["what", "rc", "wall_s", "steps", "kl", "loss_falls", "step_s", "coefficient_files", "error"],
        )
        pair_table("dam merge: device against CPU", parts["dam"].get("rows", []))
    if "eval" in parts:
        rows_table(
            "Evaluation", parts["eval"].get("rows", []), ["what", "rc", "wall_s", "equal", "device", "cpu", "error"]
        )
    if "slice" in parts:
        pair_table("Llama-3-70B tensor sizes, one layer: device against CPU cores", parts["slice"].get("rows", []))
    if "scaling" in parts:
        rows_table(
            "CPU scaling (mpirun)",
            parts["scaling"].get("rows", []),
            ["method", "ranks", "rc", "wall_s", "merge_s", "gb_s", "speedup", "peak_rss_mib_rank", "error"],
        )
    notes = [f"{n}: {t}" for n, p in parts.items() for t in p.get("notes", [])]
    if notes:
        L.extend(["", "## Notes", ""] + [f"- {t}" for t in notes])
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, nargs="?", help="where report.json, report.md and log.txt go")
    ap.add_argument("--device", default="cuda", help="the device side: cuda (default) or cpu (a dry run)")
    ap.add_argument("--quick", action="store_true", help="small sizes: a few minutes on 2 CPU cores")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)} (default all)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bigmerge-gpu-check"), help="fixtures and scratch")
    ap.add_argument("--wheels", type=Path, default=REPO / ".whl", help="wheels to install what is missing from")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole check (parts get what is left)")
    ap.add_argument("--run-part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--context", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.run_part:
        return run_part(a.run_part, a.context)
    if a.out is None:
        ap.error("OUT is required")
    parts = [p for p in a.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts: {sorted(unknown)}")
    t_start = now()
    a.out.mkdir(parents=True, exist_ok=True)
    work = a.work.resolve()
    for sub in ("parts", "configs", "outputs"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    log = open(a.out / "log.txt", "w", buffering=1)
    env, install = prepare_env(work, a.wheels, log)
    mach = machine(sys.executable, env)
    if a.device != "cpu" and not mach.get("cuda"):
        log.write(f"--device {a.device}: torch sees no GPU\n")
    ctx_doc = {
        "device": a.device,
        "quick": a.quick,
        "work": str(work),
        "env": env,
        "python": sys.executable,
        "cores": mach.get("cpus") or os.cpu_count() or 1,
    }
    write_json(work / "context.json", ctx_doc)
    report: dict[str, Any] = {
        "schema": 1,
        "mode": ("quick " if a.quick else "full ") + f"--device {a.device}",
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": mach,
        "install": install,
        "device_side": f"--device {a.device}"
        if a.device != "cpu"
        else "CPU with BIGMERGE_NO_NUMBA=1 (torch statements)",
        "sizes": sizes(Context(ctx_doc)),
        "parts": {},
        "total_s": 0,
    }
    timeouts = QUICK_TIMEOUTS if a.quick else TIMEOUTS

    def save() -> None:
        report["total_s"] = round(now() - t_start, 1)
        write_json(a.out / "report.json", report)
        (a.out / "report.md").write_text(render_markdown(report))

    save()

    def spawn(name: str) -> subprocess.Popen[bytes]:
        (work / "parts" / f"{name}.json").unlink(missing_ok=True)
        (work / "parts" / f"{name}.log").unlink(missing_ok=True)
        return subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--run-part",
                name,
                "--context",
                str(work / "context.json"),
            ],
            env={**os.environ, **env},
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    warmup = spawn("warmup") if {"ops", "slice", "scaling"} & set(parts) else None
    for name in parts:
        limit = timeouts[name]
        if a.budget is not None:
            limit = min(limit, max(5.0, a.budget - (now() - t_start)))
        print(f"gpu_check: {name} (at most {limit:.0f} s)", file=sys.stderr, flush=True)
        t0 = now()
        child = spawn(name)
        try:
            child_out, _ = child.communicate(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child_out, _ = child.communicate()
            timed_out = True
        try:
            doc = json.loads((work / "parts" / f"{name}.json").read_text())
        except (OSError, ValueError):
            doc = {"rows": [], "notes": []}
        if timed_out:
            doc["status"] = "timeout"
            doc["error"] = f"stopped at its limit of {limit:.0f} s"
        elif "status" not in doc:
            doc["status"] = "failed"
            doc["error"] = f"exit {child.returncode}: " + (child_out or b"").decode(errors="replace")[-300:]
        doc["seconds"] = round(now() - t0, 1)
        report["parts"][name] = doc
        part_log = work / "parts" / f"{name}.log"
        log.write(f"\n===== {name}: {doc['status']} in {doc['seconds']} s =====\n")
        if part_log.exists():
            text = part_log.read_text(errors="replace")
            log.write(text[-400_000:])
        if child_out:
            log.write(child_out.decode(errors="replace")[-20_000:])
        save()
        print(f"gpu_check: {name}: {doc['status']} in {doc['seconds']} s", file=sys.stderr, flush=True)
    if warmup is not None:
        if warmup.poll() is None:
            os.killpg(warmup.pid, signal.SIGKILL)
        warmup.communicate()
        try:
            report["parts"]["warmup"] = json.loads((work / "parts" / "warmup.json").read_text())
        except (OSError, ValueError):
            report["parts"]["warmup"] = {"status": "killed", "rows": [], "notes": []}
        log.write(
            (work / "parts" / "warmup.log").read_text(errors="replace")[-50_000:]
            if (work / "parts" / "warmup.log").exists()
            else ""
        )
    save()
    print((a.out / "report.md").read_text())
    return 0 if all(p.get("status") == "ok" for p in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
