"""Benchmark bigmerge against mergekit 0.1.5 and against the I/O floor, in one process.

One command (the first run builds the fixtures, and creates ``.venv`` and mergekit's venv if
they are missing)::

    python tools/bench.py --preset medium            # or .venv/bin/python tools/bench.py ...

Useful options: ``--methods linear ties``, ``--repeats 5``, ``--ranks 1 2`` (also time
``launch/mpirun.sh -n 2``, mpirun as users run it on one node), ``--preset small`` for a quick check, ``--out DIR`` (default
bench-out/), ``--mergekit PATH/TO/mergekit-yaml``, ``--bigmerge-args "--block-size 64M"``.
Run without the project venv, the script re-executes itself under ``.venv/bin/python``.

What it does:

- Fixtures: ``tools/toy_models.make_family`` with a base and three fine-tunes, bfloat16, sharded
  safetensors (``--preset``: small ~48 MB, medium ~1.0 GB, large ~2.5 GB per model), cached under
  ``--fixtures`` (default bench-out/fixtures/PRESET).
- Configs: one mergekit YAML per method, read as is by both tools, with ``dtype: float32`` and
  ``out_dtype: bfloat16`` so both compute the same thing (see ``render_config``). A method that
  ``bigmerge.ops.REGISTRY`` lacks is run for mergekit only and marked in the table.
- Measurement: for every method, ``--repeats`` rounds; each round runs the floor, bigmerge (per
  ``--ranks``) and mergekit once, the order rotated by one every round (F B M, B M F, M F B, ...),
  so every bigmerge run has a mergekit run next to it. Before each run: the previous output is
  deleted, ``sync`` (so one run's dirty pages are not written back on the next one's time),
  then every input file of the config is read once (warm page cache, the same state for every
  tool). Each run is a child of a tiny launcher (see ``LAUNCHER``) that times it with
  ``perf_counter`` and reaps it with ``os.wait4``: user+sys CPU and peak RSS of that command
  alone (under mpirun the ranks are included: CPU summed over ranks, peak RSS the largest rank's). ``other CPU`` is the CPU time
  the rest of the machine used meanwhile (``/proc/stat`` busy time minus the child's): a
  measure of contention from other users.
- Warm-up: one untimed bigmerge run per method before its rounds, so that no timed run pays
  numba's compilation of the kernels (cached on disk after the first merge; ``--no-warmup``).
- I/O floor (``tools/bench_floor.py``): read every input byte once (64 MiB ``readinto``) and
  write one fresh file the size of the merged model's weights, without fsync (neither tool
  fsyncs; ``--fsync-floor`` to change that), timed like the merges.
- Check: in the first round, the two outputs are compared tensor by tensor (names, dtypes,
  bit-identical tensors, differing elements, largest difference) before being deleted.
- Output: every sample and the summary as JSON, and a Markdown table (median and min-max per
  method and tool; ratios are medians of the per-round ratios), printed and written to
  ``--out``: bench-PRESET-TIMESTAMP.{json,md} and bench-PRESET-latest.{json,md}; the log of every
  run (stdout+stderr with arrival times) in ``--out``/logs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs", "slerp", "model_stock")
PRESETS = ("tiny", "small", "medium", "large", "70b-slice")
# Fine-tunes per preset: the 70B-shaped slice is base + 2 (17.7 GB in all, as in issue 20's table).
N_FINETUNES = {"70b-slice": 2}
CHUNK = 64 << 20
SCHEMA = 1


# --------------------------------------------------------------------------- environment


def ensure_project_env() -> None:
    """Re-execute under the project venv (creating it with tools/setup_env.sh) if torch/bigmerge are missing."""
    try:
        import safetensors  # noqa: F401
        import torch  # noqa: F401

        import bigmerge  # noqa: F401

        return
    except ImportError as exc:
        missing = exc
    venv_py = REPO / ".venv" / "bin" / "python"
    if os.environ.get("_BIGMERGE_BENCH_REEXEC"):
        raise SystemExit(f"bench.py: {missing} even under {sys.executable}; run tools/setup_env.sh")
    if not venv_py.exists():
        print("bench.py: no .venv, creating it with tools/setup_env.sh", file=sys.stderr)
        subprocess.run(["bash", str(TOOLS / "setup_env.sh")], check=True)
    os.environ["_BIGMERGE_BENCH_REEXEC"] = "1"
    os.execv(str(venv_py), [str(venv_py), str(Path(__file__).resolve()), *sys.argv[1:]])


def locate_mergekit(explicit: str | None, *, setup: bool) -> Path:
    """make_golden's search (--mergekit, $MERGEKIT_PYTHON, .mkvenv, PATH); else create .mkvenv."""
    import make_golden

    try:
        return make_golden.find_mergekit(explicit, setup=False)
    except SystemExit:
        if explicit or not setup:
            raise
    return make_golden.setup_mkvenv()


def bigmerge_command() -> list[str]:
    exe = Path(sys.executable).parent / "bigmerge"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "bigmerge"]


def mpirun_path() -> str:
    found = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
    if not found:
        raise SystemExit("bench.py: --ranks > 1 needs mpirun (tools/setup_env.sh installs it into .venv)")
    return found


def child_env(allow_gpu: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("_BIGMERGE_BENCH_REEXEC", None)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(
        BIGMERGE_PYTHON=sys.executable, MPIRUN=shutil.which("mpirun", path=str(Path(sys.executable).parent)) or ""
    )
    if not allow_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    # Open MPI as root on one node with more ranks than cores (harmless otherwise).
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_rmaps_base_oversubscribe="1",
        PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe",
    )
    return env


def _run_text(cmd: list[str], **kw: Any) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info(mergekit: Path | None) -> dict[str, Any]:
    import torch

    import bigmerge

    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    commit = _run_text(["git", "rev-parse", "--short", "HEAD"], cwd=REPO)
    dirty = bool(_run_text(["git", "status", "--porcelain", "--", "bigmerge"], cwd=REPO))
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_bytes": mem_total,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "bigmerge": bigmerge.__version__,
        "git_commit": commit + ("+dirty(bigmerge/)" if dirty else ""),
        "loadavg_start": list(os.getloadavg()),
    }
    if mergekit is not None:
        try:
            import make_golden

            info["mergekit_env"] = make_golden.mergekit_versions(mergekit.parent / "python")
        except Exception as exc:  # versions are informative only
            info["mergekit_env"] = {"error": str(exc)}
        info["mergekit_yaml"] = str(mergekit)
    return info


# --------------------------------------------------------------------------- fixtures and configs


def build_fixtures(root: Path, preset: str) -> dict[str, Path]:
    from toy_models import make_family

    t0 = time.perf_counter()
    print(f"bench: fixtures {preset} under {root} (built once, then reused)", file=sys.stderr, flush=True)
    n = N_FINETUNES.get(preset, 3)
    fam = make_family(root, preset=preset, dtype="bfloat16", n_finetunes=n, sharded=True, seed=0)
    print(f"bench: fixtures ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return fam


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("model*.safetensors"))


def model_files(model_dir: Path) -> list[Path]:
    return sorted(f for f in model_dir.iterdir() if f.is_file())


def config_models(
    method: str, n_finetunes: int = 3
) -> tuple[str | None, list[tuple[str, dict[str, float]]], dict[str, float]]:
    """(base_model, [(model, parameters)], global parameters) of the benchmark config of a method."""
    fts = [f"ft{i}" for i in range(1, n_finetunes + 1)]
    if method == "linear":  # uniform soup of all four
        return None, [(m, {"weight": 1.0}) for m in ["base", *fts]], {}
    if method == "task_arithmetic":
        return "base", [(m, {"weight": 0.5}) for m in fts], {}
    if method in ("ties", "dare_ties"):
        return "base", [(m, {"weight": 1.0, "density": 0.5}) for m in fts], {}
    if method == "della":
        return "base", [(m, {"weight": 1.0, "density": 0.5, "epsilon": 0.1}) for m in fts], {}
    if method == "breadcrumbs":
        return "base", [(m, {"weight": 1.0, "density": 0.9, "gamma": 0.01}) for m in fts], {}
    if method == "slerp":  # two models by definition: the base and one fine-tune
        return "base", [("base", {}), ("ft1", {})], {"t": 0.5}
    if method == "model_stock":
        return "base", [(m, {}) for m in fts], {}
    raise ValueError(method)


def render_config(method: str, fam: dict[str, Path]) -> str:
    base, models, params = config_models(method, len(fam) - 1)
    lines = [f"merge_method: {method}"]
    if base:
        lines.append(f"base_model: {fam[base]}")
    lines.append("models:")
    for name, p in models:
        lines.append(f"  - model: {fam[name]}")
        if p:
            lines.append("    parameters:")
            lines += [f"      {k}: {v}" for k, v in p.items()]
    if params:
        lines.append("parameters:")
        lines += [f"  {k}: {v}" for k, v in params.items()]
    lines += ["dtype: float32", "out_dtype: bfloat16"]
    return "\n".join(lines) + "\n"


def config_inputs(method: str, fam: dict[str, Path]) -> list[Path]:
    base, models, _ = config_models(method, len(fam) - 1)
    names = dict.fromkeys(([base] if base else []) + [m for m, _ in models])
    return [f for n in names for f in model_files(fam[n])]


# --------------------------------------------------------------------------- measurement


def proc_stat_busy() -> float:
    """Busy CPU seconds of the whole machine since boot (user+nice+system+irq+softirq+steal)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        v = [int(x) for x in fields]
        return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def read_files(paths: list[Path]) -> int:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


# The measured command is started by this tiny launcher, not by bench.py itself: on Linux a child
# inherits its parent's RSS high-water mark through fork and exec (the kernel folds the old mm's
# hiwater_rss into the process's maxrss at exec), so a child of bench.py (torch imported, ~0.4 GB)
# would never report a peak below that. The launcher (python -S -I, ~10 MB) forks the command,
# reaps it with os.wait4 and writes the command's own rusage and wall time as JSON.
LAUNCHER = r"""
import json, os, sys, time
out, argv = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(out, "w") as f:
    json.dump({"wall_s": wall, "user_s": ru.ru_utime, "sys_s": ru.ru_stime, "maxrss_kib": ru.ru_maxrss,
               "major_faults": ru.ru_majflt, "fs_in_blocks": ru.ru_inblock, "fs_out_blocks": ru.ru_oublock,
               "status": status}, f)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_measured(cmd: list[str], env: dict[str, str], log_path: Path, timeout: float) -> dict[str, Any]:
    """Run cmd under LAUNCHER; wall time, CPU and peak RSS of that command from os.wait4."""
    lines: list[tuple[float, str]] = []
    log_path.parent.mkdir(parents=True, exist_ok=True)
    rusage_path = log_path.with_suffix(".rusage.json")
    rusage_path.unlink(missing_ok=True)
    busy0 = proc_stat_busy()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-S", "-I", "-c", LAUNCHER, str(rusage_path), *cmd],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )

    def reader() -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            t = time.perf_counter() - t0
            for part in raw.decode(errors="replace").replace("\r", "\n").splitlines():
                if part.strip():
                    lines.append((t, part))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, kill) if timeout > 0 else None
    if timer:
        timer.start()
    try:
        rc = proc.wait()
    except BaseException:
        kill()
        raise
    outer_wall = time.perf_counter() - t0
    busy1 = proc_stat_busy()
    if timer:
        timer.cancel()
    # Stray grandchildren (a killed mpirun's ranks) would keep the pipe open: do not wait forever.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    thread.join(timeout=10)
    try:
        ru = json.loads(rusage_path.read_text())
    except (OSError, ValueError):  # launcher killed (timeout): no rusage, outer numbers only
        ru = {"wall_s": outer_wall, "user_s": float("nan"), "sys_s": float("nan"), "maxrss_kib": float("nan")}
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        for t, line in lines:
            log.write(f"{t:9.3f} {line}\n")
        log.write(f"# rc={rc} wall={ru['wall_s']:.3f}s (with launcher {outer_wall:.3f}s)\n")
    cpu = ru["user_s"] + ru["sys_s"]
    return {
        "rc": rc,
        "timed_out": killed.is_set(),
        "wall_s": ru["wall_s"],
        "wall_with_launcher_s": outer_wall,
        "user_s": ru["user_s"],
        "sys_s": ru["sys_s"],
        "cpu_s": cpu,
        "peak_rss_mb": ru["maxrss_kib"] * 1024 / 1e6,  # Linux reports KiB
        "major_faults": ru.get("major_faults"),
        "fs_in_blocks": ru.get("fs_in_blocks"),
        "fs_out_blocks": ru.get("fs_out_blocks"),
        "other_cpu_s": busy1 - busy0 - cpu,
        "lines": lines,
    }


def bigmerge_details(lines: list[tuple[float, str]], wall: float) -> dict[str, Any]:
    """Phases from the arrival times of bigmerge's own lines, and its summary line."""
    out: dict[str, Any] = {}
    t_merge = t_export = t_done = None
    for t, line in lines:
        if line.startswith("bigmerge: merging") and t_merge is None:
            t_merge = t
        elif line.startswith("bigmerge: exporting"):
            t_export = t
        elif line.startswith("bigmerge: done:"):
            t_done = t
            out["summary_line"] = line
            m = re.search(r"([\d.]+) GB read in ([\d.]+) s", line)
            if m:
                out["bytes_read"] = float(m.group(1)) * 1e9
                out["reported_wall_s"] = float(m.group(2))
            m = re.search(r"peak RSS (\d+) MiB/rank", line)
            if m:
                out["reported_peak_rss_mb_per_rank"] = int(m.group(1)) * 2**20 / 1e6
    if t_merge is not None and t_export is not None and t_done is not None:
        out["phases_s"] = {
            "startup_catalog_plan": t_merge,
            "merge": t_export - t_merge,
            "export": t_done - t_export,
            "exit": wall - t_done,
        }
    return out


_PLAN_ESTIMATE = re.compile(r"^estimate\s+~([\d.]+) s", re.M)


def plan_estimate(bm_cmd: list[str], cfg: Path, ranks: int, bm_args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """`bigmerge plan`'s estimated wall time for this merge on this machine (headers only, no tensor data)."""
    plan_args = [a for a in bm_args if not a.startswith("--buffered")]
    proc = subprocess.run(
        [*bm_cmd, "plan", str(cfg), "-n", str(ranks), *plan_args], env=env, capture_output=True, text=True, timeout=300
    )
    m = _PLAN_ESTIMATE.search(proc.stdout)
    return {"estimate_s": float(m.group(1)) if m else None, "rc": proc.returncode}


def tail(lines: list[tuple[float, str]], n: int = 15) -> str:
    return "\n".join(line for _, line in lines[-n:])


def compare_outputs(bm: Path, mk: Path) -> dict[str, Any]:
    """Tensor by tensor: names, dtypes, shapes, bit-identical tensors, differing elements, max |diff|."""
    import torch
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        where: dict[str, Path] = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    where[k] = f
        return where

    ia, ib = index(bm), index(mk)
    common = sorted(set(ia) & set(ib))
    res: dict[str, Any] = {
        "tensors": len(common),
        "only_bigmerge": sorted(set(ia) - set(ib)),
        "only_mergekit": sorted(set(ib) - set(ia)),
        "mismatched_dtype_or_shape": [],
        "bit_identical_tensors": 0,
        "differing_elements": 0,
        "total_elements": 0,
        "max_abs_diff": 0.0,
    }
    handles: dict[Path, Any] = {}
    try:
        for name in common:
            ha = handles.setdefault(ia[name], safe_open(str(ia[name]), framework="pt"))
            hb = handles.setdefault(ib[name], safe_open(str(ib[name]), framework="pt"))
            a, b = ha.get_tensor(name), hb.get_tensor(name)
            if a.dtype != b.dtype or a.shape != b.shape:
                res["mismatched_dtype_or_shape"].append(
                    f"{name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
                )
                continue
            res["total_elements"] += a.numel()
            ua = a.view(torch.uint8).view(a.numel(), -1)
            ub = b.view(torch.uint8).view(b.numel(), -1)
            ndiff = int((ua != ub).any(dim=1).sum())
            res["differing_elements"] += ndiff
            if ndiff == 0:
                res["bit_identical_tensors"] += 1
            else:
                res["max_abs_diff"] = max(res["max_abs_diff"], float((a.float() - b.float()).abs().max()))
    finally:
        handles.clear()
    return res


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


# --------------------------------------------------------------------------- summary and table


def spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(samples: list[dict[str, Any]], methods: list[str], tool_order: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for method in methods:
        ms = [s for s in samples if s["method"] == method]
        by_tool: dict[str, dict[int, dict[str, Any]]] = {}
        for s in ms:
            if s["rc"] == 0:
                by_tool.setdefault(s["tool"], {})[s["round"]] = s
        entry: dict[str, Any] = {}
        for tool in tool_order:
            ok = by_tool.get(tool, {})
            failed = [s for s in ms if s["tool"] == tool and s["rc"] != 0]
            if not ok and not failed:
                continue
            row: dict[str, Any] = {
                "ok": len(ok),
                "failed": len(failed),
                "wall_s": spread([s["wall_s"] for s in ok.values()]),
                "cpu_s": spread([s["cpu_s"] for s in ok.values()]),
                "peak_rss_mb": spread([s["peak_rss_mb"] for s in ok.values()]),
                "other_cpu_s": spread([max(0.0, s["other_cpu_s"]) for s in ok.values()]),
                "written_gb": spread(
                    [s["fs_out_blocks"] * 512 / 1e9 for s in ok.values() if s.get("fs_out_blocks") is not None]
                ),
            }
            for ref in ("mergekit", "floor"):
                if tool != ref and tool != "floor" and ref in by_tool:
                    pairs = [ok[r]["wall_s"] / by_tool[ref][r]["wall_s"] for r in ok if r in by_tool[ref]]
                    row[f"wall_ratio_vs_{ref}"] = spread(pairs)
            read = [s["bigmerge"]["bytes_read"] for s in ok.values() if "bytes_read" in s.get("bigmerge", {})]
            if read:
                row["bytes_read"] = spread(read)
            phases = [s["bigmerge"]["phases_s"] for s in ok.values() if "phases_s" in s.get("bigmerge", {})]
            if phases:
                row["phases_s"] = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
            floors = [s["floor"] for s in ok.values() if "floor" in s]
            if floors:
                row["floor_read_s"] = spread([f["read_s"] for f in floors])
                row["floor_write_s"] = spread([f["write_s"] for f in floors])
            entry[tool] = row
        summary[method] = entry
    return summary


def fmt_spread(sp: dict[str, float] | None, digits: int = 1, unit: str = "") -> str:
    if not sp:
        return "–"
    f = f"{{:.{digits}f}}"
    med = f.format(sp["median"]) + unit
    if sp["n"] == 1:
        return med
    return f"{med} ({f.format(sp['min'])}–{f.format(sp['max'])})"


def fmt_ratio(sp: dict[str, float] | None) -> str:
    if not sp:
        return "–"
    digits = 2 if sp["median"] < 10 else 1
    return fmt_spread(sp, digits, "×")


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def render_markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    st = doc["settings"]
    mk = m.get("mergekit_env", {})
    out: list[str] = []
    out.append(
        f"### bigmerge vs mergekit vs I/O floor — preset `{st['preset']}`, {doc['started'][:16].replace('T', ' ')}"
    )
    out.append("")
    mem = m["mem_total_bytes"] / 2**30
    out.append(
        f"Machine: {m['cpu_count']} CPUs ({m['cpu_model'] or 'unknown CPU'}), {mem:.1f} GiB RAM, Linux {m['kernel']}; "
        f"Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads); bigmerge {m['bigmerge']} "
        f"(git {m['git_commit']}); mergekit {mk.get('mergekit', '?')} (torch {mk.get('torch', '?')}, "
        f"transformers {mk.get('transformers', '?')}). Load average at start {m['loadavg_start'][0]:.2f}, "
        f"at end {doc.get('loadavg_end', [float('nan')])[0]:.2f}."
    )
    fx = doc["fixtures"]
    out.append(
        f"Fixtures: base + {N_FINETUNES.get(st['preset'], 3)} fine-tunes, bfloat16, sharded ({fx['shards_per_model']} shards), "
        f"{gb(fx['weight_bytes_per_model'])} of weights per model; configs with `dtype: float32`, "
        f"`out_dtype: bfloat16`. {st['repeats']} rounds per method, order rotated each round; warm page cache, "
        f"outputs deleted and `sync` between runs. bigmerge args: `{st['bigmerge_args'] or '(defaults)'}`."
    )
    out.append("")
    out.append(
        "| method | tool | n | wall s | CPU s (user+sys) | peak RSS MB | written GB | other CPU s | ×mergekit (wall) | ×floor (wall) |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for method, entry in doc["summary"].items():
        info = doc["methods"][method]
        for tool in doc["tool_order"]:
            if tool.startswith("bigmerge") and not info["bigmerge_supported"]:
                if tool == "bigmerge":
                    out.append(
                        f"| {method} | bigmerge | – | not supported by bigmerge (`bigmerge.ops.REGISTRY`) | | | | | | |"
                    )
                continue
            row = entry.get(tool)
            if row is None:
                continue
            n = f"{row['ok']}" + (f" (+{row['failed']} failed)" if row["failed"] else "")
            out.append(
                f"| {method} | {tool} | {n} | {fmt_spread(row['wall_s'])} | {fmt_spread(row['cpu_s'])} | "
                f"{fmt_spread(row['peak_rss_mb'], 0)} | {fmt_spread(row['written_gb'], 2)} | {fmt_spread(row['other_cpu_s'])} | "
                f"{fmt_ratio(row.get('wall_ratio_vs_mergekit'))} | {fmt_ratio(row.get('wall_ratio_vs_floor'))} |"
            )
    out.append("")
    out.append(
        "Median (min–max) over rounds. Ratios are per round (the run ÷ the mergekit or floor run of the same round), "
        "then median (min–max). CPU, peak RSS and *written* come from `os.wait4` of the command, reaped by a small "
        "launcher so that its RSS is its own (under mpirun: CPU summed over ranks, RSS of the largest process). "
        "*written*: `ru_oublock` × 512 B, the bytes the command dirtied in files (files it deleted itself included). "
        "*other CPU*: CPU seconds the rest of the machine used during the run (contention from other users). "
        "Floor: read every input byte, write one fresh file of the output's size "
        f"({'with' if st['fsync_floor'] else 'no'} fsync; neither tool fsyncs; "
        f"{'through the page cache' if st.get('buffered_floor') else 'with O_DIRECT where the file system takes it, as bigmerge writes'})."
    )
    est_rows = []
    for method, entry in doc["summary"].items():
        info = doc["methods"][method]
        for tool, row in entry.items():
            if not tool.startswith("bigmerge"):
                continue
            n = 1 if tool == "bigmerge" else int(tool.rsplit("n", 1)[1])
            plan = (info.get("plan") or {}).get(n) or (info.get("plan") or {}).get(str(n)) or {}
            est = plan.get("estimate_s")
            wall = row["wall_s"]["median"] if row.get("wall_s") else None
            read = row.get("bytes_read")
            est_rows.append(
                f"| {method} | {tool} | {gb(info['input_bytes'])} | "
                + (f"{gb(read['median'])} ({read['median'] / info['input_bytes']:.2f}×)" if read else "–")
                + f" | {f'{est:.1f}' if est is not None else '–'} | {f'{wall:.1f}' if wall else '–'} | "
                + (f"{wall / est:.2f}×" if est and wall else "–")
                + " |"
            )
    if est_rows:
        out += [
            "",
            "| method | tool | input | bytes read (× input) | `bigmerge plan` estimate s | measured wall s (median) | measured ÷ estimate |",
            "|---|---|---|---|---|---|---|",
            *est_rows,
        ]
    notes: list[str] = []
    for method, entry in doc["summary"].items():
        info = doc["methods"][method]
        fl = entry.get("floor")
        if fl and fl.get("floor_read_s"):
            notes.append(
                f"- {method}: floor reads {gb(info['input_bytes'])} in {fmt_spread(fl['floor_read_s'], 3)} s and writes "
                f"{gb(info['output_bytes'])} in {fmt_spread(fl['floor_write_s'], 3)} s."
            )
        for tool, row in entry.items():
            if "phases_s" in row:
                ph = row["phases_s"]
                notes.append(
                    f"- {method}, {tool}: phases (median, from its progress lines) start-up+catalog+plan "
                    f"{ph['startup_catalog_plan']:.1f} s, merge {ph['merge']:.1f} s, export {ph['export']:.1f} s, "
                    f"exit {ph['exit']:.1f} s."
                )
        for line in info.get("bigmerge_summary_lines", [])[:1]:
            notes.append(f"- {method}, bigmerge summary (round 1): `{line}`")
        chk = info.get("check")
        if chk:
            notes.append(
                f"- {method}, bigmerge vs mergekit output: {chk['tensors']} common tensors, "
                f"{chk['bit_identical_tensors']} bit-identical, {chk['differing_elements']:,} of "
                f"{chk['total_elements']:,} elements differ (max |diff| {chk['max_abs_diff']:.3g})"
                + (f"; only in bigmerge: {len(chk['only_bigmerge'])}" if chk["only_bigmerge"] else "")
                + (f"; only in mergekit: {len(chk['only_mergekit'])}" if chk["only_mergekit"] else "")
                + (
                    f"; dtype/shape mismatches: {len(chk['mismatched_dtype_or_shape'])}"
                    if chk["mismatched_dtype_or_shape"]
                    else ""
                )
                + "."
            )
        for fail in info.get("failures", []):
            notes.append(f"- {method}, {fail}")
    if notes:
        out.append("")
        out += notes
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Benchmark bigmerge against mergekit 0.1.5 and the I/O floor (interleaved, one process).",
        epilog="Example: python tools/bench.py --preset medium --repeats 3 --methods linear ties --ranks 1 2",
    )
    ap.add_argument(
        "--preset", choices=PRESETS, default="medium", help="fixture size (default medium, ~1 GB per model)"
    )
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="merge methods (default: all)")
    ap.add_argument(
        "--repeats", type=int, default=3, help="rounds per method (default 3; fewer is only for smoke tests)"
    )
    ap.add_argument(
        "--ranks", nargs="+", type=int, default=[1], help="bigmerge world sizes; >1 runs under mpirun (default 1)"
    )
    ap.add_argument(
        "--tools", nargs="+", choices=("floor", "bigmerge", "mergekit"), default=["floor", "bigmerge", "mergekit"]
    )
    ap.add_argument("--out", type=Path, default=REPO / "bench-out", help="results directory (default bench-out/)")
    ap.add_argument(
        "--fixtures",
        type=Path,
        default=None,
        help="fixture cache (default bench-out/fixtures/PRESET in the repository)",
    )
    ap.add_argument(
        "--work", type=Path, default=None, help="where merge outputs go, deleted after each run (default OUT/work)"
    )
    ap.add_argument("--mergekit", default=None, help="mergekit-yaml to use (default: as tools/make_golden.py finds it)")
    ap.add_argument("--no-setup", action="store_true", help="do not create .mkvenv when mergekit is not found")
    ap.add_argument("--bigmerge-args", default="", help="extra arguments for `bigmerge merge`, e.g. '--block-size 64M'")
    ap.add_argument("--mergekit-args", default="", help="extra arguments for mergekit-yaml")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds before a run is killed (default 3600)")
    ap.add_argument(
        "--no-warmup", action="store_true", help="no untimed bigmerge run per method first (numba's kernel cache)"
    )
    ap.add_argument("--no-check", action="store_true", help="skip comparing bigmerge's and mergekit's outputs")
    ap.add_argument("--fsync-floor", action="store_true", help="fsync the floor's output file (the tools do not)")
    ap.add_argument(
        "--buffered-floor",
        action="store_true",
        help="the floor writes through the page cache (default: with O_DIRECT where the file system takes it, "
        "as bigmerge's direct writer does)",
    )
    ap.add_argument("--allow-gpu", action="store_true", help="do not hide GPUs (default: both tools on CPU)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if any(n < 1 for n in args.ranks):
        ap.error("--ranks must be >= 1")
    args.ranks = sorted(dict.fromkeys(args.ranks))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_project_env()
    sys.path.insert(0, str(TOOLS))
    from bigmerge.ops import REGISTRY

    if args.repeats < 3:
        print(
            f"bench: --repeats {args.repeats}: fewer than 3 rounds, a smoke test rather than a measurement",
            file=sys.stderr,
        )
    out_dir = args.out.resolve()
    fixtures = (args.fixtures or REPO / "bench-out" / "fixtures" / args.preset).resolve()
    work = (args.work or out_dir / "work").resolve()
    logs = out_dir / "logs"
    out_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    env = child_env(args.allow_gpu)

    mergekit = locate_mergekit(args.mergekit, setup=not args.no_setup) if "mergekit" in args.tools else None
    import make_golden

    mk_args = [a for a in make_golden.MERGEKIT_ARGS if not (args.allow_gpu and a == "--no-cuda")] + shlex.split(
        args.mergekit_args
    )
    bm_args = shlex.split(args.bigmerge_args)
    bm_cmd = bigmerge_command()
    mpirun = mpirun_path() if any(n > 1 for n in args.ranks) and "bigmerge" in args.tools else None

    fam = build_fixtures(fixtures, args.preset)
    # Untimed: import each tool's packages once, so no run pays for a cold page cache of site-packages.
    warmups = []
    if "bigmerge" in args.tools:
        warmups.append([sys.executable, "-c", "import bigmerge.cli, bigmerge.merge, torch, zarr, safetensors"])
    if mergekit is not None:
        warmups.append(
            [str(mergekit.parent / "python"), "-c", "import mergekit.merge, mergekit.scripts.run_yaml, torch"]
        )
    for cmd in warmups:
        subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
    started = dt.datetime.now().astimezone()
    stamp = started.strftime("%Y%m%d-%H%M%S")
    json_path = out_dir / f"bench-{args.preset}-{stamp}.json"
    md_path = out_dir / f"bench-{args.preset}-{stamp}.md"

    tool_order = (
        (["floor"] if "floor" in args.tools else [])
        + ([("bigmerge" if n == 1 else f"bigmerge-n{n}") for n in args.ranks] if "bigmerge" in args.tools else [])
        + (["mergekit"] if mergekit else [])
    )
    base_weights = weight_files(fam["base"])
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "started": started.isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "settings": {
            "preset": args.preset,
            "methods": args.methods,
            "repeats": args.repeats,
            "ranks": args.ranks,
            "tools": args.tools,
            "bigmerge_cmd": bm_cmd,
            "bigmerge_args": shlex.join(bm_args),
            "mergekit_args": shlex.join(mk_args),
            "fsync_floor": args.fsync_floor,
            "buffered_floor": args.buffered_floor,
            "allow_gpu": args.allow_gpu,
            "timeout_s": args.timeout,
        },
        "machine": machine_info(mergekit),
        "fixtures": {
            "dir": str(fixtures),
            "models": {k: str(v) for k, v in fam.items()},
            "shards_per_model": len(base_weights),
            "weight_bytes_per_model": sum(f.stat().st_size for f in base_weights),
        },
        "tool_order": tool_order,
        "methods": {},
        "samples": [],
    }

    def save() -> None:
        doc["summary"] = summarize(doc["samples"], list(doc["methods"]), tool_order)
        json_path.write_text(json.dumps(doc, indent=1) + "\n")

    for method in args.methods:
        supported = method in REGISTRY
        cfg_text = render_config(method, fam)
        cfg_path = out_dir / "configs" / f"{method}.yaml"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(cfg_text)
        inputs = config_inputs(method, fam)
        info: dict[str, Any] = {
            "config": cfg_text,
            "config_path": str(cfg_path),
            "bigmerge_supported": supported,
            "input_bytes": sum(f.stat().st_size for f in inputs),
            "output_bytes": sum(f.stat().st_size for f in base_weights),
            "bigmerge_summary_lines": [],
            "failures": [],
        }
        doc["methods"][method] = info
        if supported and "bigmerge" in args.tools:
            info["plan"] = {n: plan_estimate(bm_cmd, cfg_path, n, bm_args, env) for n in args.ranks}
        if not supported:
            print(
                f"bench: {method}: not in bigmerge.ops.REGISTRY {sorted(REGISTRY)}; mergekit and floor only",
                file=sys.stderr,
            )
        tools = [t for t in tool_order if supported or not t.startswith("bigmerge")]
        if supported and any(t.startswith("bigmerge") for t in tools) and not args.no_warmup:
            # numba compiles the kernels on first use and caches them on disk (as any merge after
            # the first finds them): one untimed run, so no timed run pays the compilation
            warm = work / f"{method}-warmup"
            remove(warm)
            t_w = time.perf_counter()
            subprocess.run(
                [*bm_cmd, "merge", str(cfg_path), str(warm), "--quiet", *bm_args],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=args.timeout,
                check=False,
            )
            remove(warm)
            print(f"bench: {method}: untimed warm-up run in {time.perf_counter() - t_w:.1f} s", file=sys.stderr)
        for rnd in range(args.repeats):
            k = rnd % len(tools)
            order = tools[k:] + tools[:k]
            kept: dict[str, Path] = {}
            for tool in order:
                target = work / f"{method}-{tool}"
                remove(target)
                os.sync()
                t_warm = time.perf_counter()
                warm_bytes = read_files(inputs)
                warm_s = time.perf_counter() - t_warm
                if tool == "floor":
                    cmd = [
                        sys.executable,
                        str(TOOLS / "bench_floor.py"),
                        "--write",
                        str(target),
                        "--size",
                        str(info["output_bytes"]),
                    ]
                    cmd += (["--fsync"] if args.fsync_floor else []) + ([] if args.buffered_floor else ["--direct"])
                    cmd += [str(f) for f in inputs]
                elif tool == "mergekit":
                    assert mergekit is not None
                    cmd = [str(mergekit), str(cfg_path), str(target), *mk_args]
                else:
                    n = 1 if tool == "bigmerge" else int(tool.rsplit("n", 1)[1])
                    cmd = [*bm_cmd, "merge", str(cfg_path), str(target), *bm_args]
                    if n > 1:  # as users run it on one node: launch/mpirun.sh (its mpirun settings)
                        assert mpirun is not None
                        cmd = [str(REPO / "launch" / "mpirun.sh"), "-n", str(n), str(cfg_path), str(target), *bm_args]
                loadavg = os.getloadavg()[0]
                res = run_measured(cmd, env, logs / f"{method}-{tool}-r{rnd + 1}.log", args.timeout)
                lines = res.pop("lines")
                sample: dict[str, Any] = {
                    "method": method,
                    "tool": tool,
                    "round": rnd,
                    "position": order.index(tool),
                    "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "loadavg_1m_before": loadavg,
                    "warm_read_s": warm_s,
                    "warm_read_bytes": warm_bytes,
                    **res,
                    "cmd": shlex.join(cmd),
                }
                if tool.startswith("bigmerge"):
                    sample["bigmerge"] = bigmerge_details(lines, res["wall_s"])
                    if rnd == 0 and "summary_line" in sample["bigmerge"]:
                        info["bigmerge_summary_lines"].append(sample["bigmerge"]["summary_line"])
                if tool == "floor" and res["rc"] == 0:
                    for _, line in reversed(lines):
                        if line.startswith("{"):
                            sample["floor"] = json.loads(line)
                            break
                if res["rc"] != 0:
                    sample["output_tail"] = tail(lines)
                    why = "timed out" if res["timed_out"] else f"exit {res['rc']}"
                    info["failures"].append(f"{tool} round {rnd + 1} failed ({why}): {tail(lines, 3)}")
                    print(f"bench: {method} {tool} round {rnd + 1} FAILED ({why}):\n{tail(lines)}", file=sys.stderr)
                doc["samples"].append(sample)
                print(
                    f"bench: {method:<16} round {rnd + 1}/{args.repeats} {tool:<12} wall {res['wall_s']:7.2f} s  "
                    f"CPU {res['cpu_s']:7.2f} s  peak RSS {res['peak_rss_mb']:6.0f} MB  other CPU {res['other_cpu_s']:5.1f} s"
                    + ("" if res["rc"] == 0 else f"  rc={res['rc']}"),
                    file=sys.stderr,
                    flush=True,
                )
                if rnd == 0 and not args.no_check and tool in ("bigmerge", "mergekit") and res["rc"] == 0:
                    kept[tool] = target
                else:
                    remove(target)
                os.sync()
                save()
            if len(kept) == 2:
                t_chk = time.perf_counter()
                info["check"] = compare_outputs(kept["bigmerge"], kept["mergekit"])
                print(
                    f"bench: {method}: outputs compared in {time.perf_counter() - t_chk:.1f} s: {info['check']['bit_identical_tensors']}/"
                    f"{info['check']['tensors']} tensors bit-identical",
                    file=sys.stderr,
                )
            for p in kept.values():
                remove(p)
            os.sync()
            floors = [
                x["floor"]
                for x in doc["samples"]
                if x["method"] == method and x["tool"] == "floor" and x.get("floor", {}).get("read_s")
            ]
            if supported and "bigmerge" in args.tools and floors:
                # the plan's estimate again, with this machine's bandwidths as the floor measured them
                r_gbps = info["input_bytes"] / 1e9 / statistics.median(f["read_s"] for f in floors)
                w_gbps = info["output_bytes"] / 1e9 / max(1e-9, statistics.median(f["write_s"] for f in floors))
                measured = ["--read-gbps", f"{r_gbps:.3f}", "--write-gbps", f"{w_gbps:.3f}"]
                info["plan_bandwidths_gbps"] = {"read": r_gbps, "write": w_gbps}
                info["plan"] = {n: plan_estimate(bm_cmd, cfg_path, n, [*bm_args, *measured], env) for n in args.ranks}
            save()

    doc["finished"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    doc["loadavg_end"] = list(os.getloadavg())
    save()
    md = render_markdown(doc)
    md_path.write_text(md)
    for suffix, src in (("json", json_path), ("md", md_path)):
        shutil.copyfile(src, out_dir / f"bench-{args.preset}-latest.{suffix}")
    try:
        work.rmdir()
    except OSError:
        pass
    print(md)
    print(f"bench: wrote {json_path} and {md_path}", file=sys.stderr)
    failed = sum(1 for s in doc["samples"] if s["rc"] != 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
