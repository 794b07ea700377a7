"""The launchers in launch/: they parse, and they build the command a user expects.

launch/mpirun.sh also starts real merges in tests/test_resume_mpi.py.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO

LAUNCH = REPO / "launch"
SECRET = "launcher-secret-value"


@pytest.mark.parametrize("script", ["mpirun.sh", "slurm.sbatch", "quickstart.sh"])
def test_launch_scripts_parse(script: str) -> None:
    proc = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def fake_command(tmp_path: Path, name: str) -> Path:
    """A stand-in for mpirun or srun that prints its arguments, one a line, and two env vars."""
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(
        '#!/bin/sh\nprintf "%s\\n" "$@"\necho "env OMPI_ALLOW_RUN_AS_ROOT=$OMPI_ALLOW_RUN_AS_ROOT OMP_NUM_THREADS=$OMP_NUM_THREADS"\n'
    )
    path.chmod(0o755)
    return path


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "PRTE_", "AWS_", "SLURM_"))}
    env.update(extra)
    return env


def test_mpirun_wrapper_passes_arguments_and_forwards_secrets_by_name(tmp_path: Path) -> None:
    fake = fake_command(tmp_path, "mpirun")
    env = clean_env(
        MPIRUN=str(fake),
        BIGMERGE_PYTHON="/opt/py/bin/python",
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_ENDPOINT_URL="http://s3.local:9000",
    )
    proc = subprocess.run(
        [str(LAUNCH / "mpirun.sh"), "-n", "3", "c.yaml", "s3://b/out", "--block-size", "64M"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.splitlines()
    assert args[:6] == ["-n", "3", "--oversubscribe", "--bind-to", "none", "-x"]
    assert {"AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= {args[i + 1] for i, a in enumerate(args) if a == "-x"}
    assert args[-9:-1] == [
        "/opt/py/bin/python",
        "-m",
        "bigmerge",
        "merge",
        "c.yaml",
        "s3://b/out",
        "--block-size",
        "64M",
    ]
    assert SECRET not in proc.stdout  # by name only: values never reach a command line
    if os.geteuid() == 0:
        assert "OMPI_ALLOW_RUN_AS_ROOT=1" in args[-1]


def test_mpirun_wrapper_usage(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(LAUNCH / "mpirun.sh"), "-n", "2", "only-a-config.yaml"], capture_output=True, text=True, env=clean_env()
    )
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_slurm_script_runs_bigmerge_on_every_task(tmp_path: Path) -> None:
    fake = fake_command(tmp_path, "srun")
    env = clean_env(
        PATH=f"{fake.parent}:{os.environ['PATH']}",
        BIGMERGE_PYTHON="/shared/venv/bin/python",
        SLURM_NTASKS_PER_NODE="8",
        SLURM_NTASKS="64",
        SLURM_JOB_NUM_NODES="8",
        SLURM_CPUS_PER_TASK="16",
    )
    proc = subprocess.run(
        ["bash", str(LAUNCH / "slurm.sbatch"), "c.yaml", "s3://b/out", "--quiet"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.splitlines()
    assert args[:3] == ["--mpi=pmix", "--kill-on-bad-exit=1", "--cpu-bind=cores"]
    assert args[3:-1] == ["/shared/venv/bin/python", "-m", "bigmerge", "merge", "c.yaml", "s3://b/out", "--quiet"]
    assert "OMP_NUM_THREADS=16" in args[-1]
    assert "8 nodes x 8 ranks = 64 ranks" in proc.stderr


@pytest.mark.slow
def test_quickstart_merges_real_skills_and_prints_a_table_a_person_can_judge(tmp_path: Path) -> None:
    """The README's first command: the zoo's domain pair from the local S3 server, 2 ranks, then
    the table. Model Stock of the pair scores above both sources on the four skills' average (the
    zoo is deterministic, so these are the README's numbers)."""
    env = {**os.environ, "BIGMERGE_QUICKSTART_DIR": str(tmp_path / "qs")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "quickstart.py")], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 6 and parts[0] in ("instruct", "instruct_fin", "merged"):
            rows[parts[0]] = [float(x) for x in parts[1:]]
    assert set(rows) == {"instruct", "instruct_fin", "merged"}, proc.stdout[-2000:]
    avg = {k: v[-1] for k, v in rows.items()}
    assert avg["merged"] > max(avg["instruct"], avg["instruct_fin"]), rows
    assert rows["merged"][2] > rows["instruct_fin"][2] and rows["merged"][3] > rows["instruct"][3]  # sort, fin
    assert proc.stdout.count(" right") >= 1 and "checksums verified" in proc.stdout


def _quickstart_module() -> Any:
    spec = importlib.util.spec_from_file_location("quickstart_under_test", REPO / "launch" / "quickstart.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quickstart_waits_for_the_background_warm_up_only_while_it_runs(tmp_path: Path) -> None:
    """The quickstart's merge starts once the warm-up has cached its method's kernels (warm.first),
    and at once when no warm-up runs or the one that ran has died without the marker."""
    wait = _quickstart_module().wait_for_warm_kernels
    t0 = time.perf_counter()
    wait(tmp_path)  # no warm.pid: an install without a background warm-up
    assert time.perf_counter() - t0 < 1.0
    # a live process that looks like the warm-up (its command line names warm_kernels)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "warm_kernels"])
    try:
        (tmp_path / "warm.pid").write_text(str(proc.pid))
        timer = threading.Timer(1.0, (tmp_path / "warm.first").touch)
        timer.start()
        t0 = time.perf_counter()
        wait(tmp_path, limit_s=30)
        waited = time.perf_counter() - t0
        timer.join()
        assert 0.9 < waited < 10, waited  # until the marker appeared, not the limit
        (tmp_path / "warm.first").unlink()
        threading.Timer(0.5, proc.kill).start()
        t0 = time.perf_counter()
        wait(tmp_path, limit_s=30)  # the warm-up dies without the marker: no waiting for it
        assert time.perf_counter() - t0 < 5
    finally:
        proc.kill()
        proc.wait()
