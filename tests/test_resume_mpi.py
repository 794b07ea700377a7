"""A rank dies (SIGKILL) partway through a real `mpirun -n 2` merge; the same command again resumes.

The reruns go through launch/mpirun.sh, the one-node launcher, so it is tested for real too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, assert_bit_identical, load_output, synthetic_family
from test_mpi import mpirun

from bigmerge.engine.comm import SerialComm
from bigmerge.merge import STORE_DIR, MergeOptions, run_merge
from bigmerge.output.direct import PARTIAL_DIR
from bigmerge.output.export import MANIFEST_NAME
from bigmerge.output.zarr_store import SHARD_KEY

pytestmark = pytest.mark.mpi  # real mpirun runs, killed and resumed

WRITERS = ["direct", "zarr"]  # the resume path of each writer

BLOCK = "256"  # bytes per source per block: 230 blocks on this fixture
DONE = re.compile(r"bigmerge: done: .* \((\d+) blocks computed, (\d+) resumed")
TOTAL = re.compile(r"bigmerge: merging \d+ tensors \((\d+) blocks")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    """Sources, a config, and the output of an uninterrupted run (one process) to compare with."""
    root = tmp_path_factory.mktemp("resume")
    fam = synthetic_family(root / "src", n=2, rows=600, shards=2)
    cfg = root / "linear.yaml"
    # linear: the resume path does not depend on the operator, and linear needs no JIT warm-up.
    cfg.write_text(
        f"merge_method: linear\nmodels:\n  - model: {fam['ft1']}\n    parameters: {{weight: 0.7}}\n  - model: {fam['ft2']}\n    parameters: {{weight: 0.4}}\n"
    )
    run_merge(str(cfg), str(root / "ref"), SerialComm(), MergeOptions(block_bytes=int(BLOCK), quiet=True))
    return cfg, load_output(root / "ref")


def shards_in_store(out: Path, writer: str) -> int:
    """Blocks the journal holds: the zarr shards present in the store (temporary names
    excluded), or the direct writer's journal lines."""
    if writer == "direct":
        lines = [ln for j in (out / PARTIAL_DIR).glob("journal-*") for ln in j.read_text().splitlines()]
        return len(set(tuple(ln.split()[:2]) for ln in lines))
    store = out / STORE_DIR
    return sum(1 for p in store.rglob("*") if p.is_file() and SHARD_KEY.fullmatch(p.relative_to(store).as_posix()))


def launcher(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "PRTE_"))}
    env["BIGMERGE_PYTHON"] = sys.executable
    return subprocess.run(
        [str(REPO / "launch" / "mpirun.sh"), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def killed_merge(cfg: Path, out: Path, writer: str, fault: str) -> subprocess.CompletedProcess[str]:
    """`mpirun -n 2 bigmerge merge` with a fault injected (BIGMERGE_FAULT_INJECT=fault)."""
    args = ("merge", str(cfg), str(out), "--block-size", BLOCK, "--writer", writer)
    return mpirun(2, *args, env={"BIGMERGE_FAULT_INJECT": fault}, timeout=120)


def assert_unfinished(out: Path) -> None:
    assert not (out / MANIFEST_NAME).exists()
    assert not (out / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("writer", WRITERS)
def test_sigkill_of_one_rank_then_rerun_resumes_bit_identical(
    setup: tuple[Path, dict[str, object]], tmp_path: Path, writer: str
) -> None:
    cfg, ref = setup
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = killed_merge(cfg, out, writer, "1:20:kill")
    assert proc.returncode != 0, proc.stderr
    assert time.monotonic() - t0 < 60  # rank 0 did not hang waiting for the dead rank
    assert "signal 9" in proc.stderr, proc.stderr  # a real SIGKILL, not a Python error
    assert_unfinished(out)
    total = int(TOTAL.search(proc.stderr).group(1))  # type: ignore[union-attr]
    done = shards_in_store(out, writer)
    assert 20 <= done < total

    again = launcher("-n", "2", str(cfg), str(out), "--block-size", BLOCK, "--writer", writer)
    assert again.returncode == 0, again.stderr
    assert f"resuming: {done} blocks already done" in again.stderr
    computed, resumed = map(int, DONE.search(again.stderr).groups())  # type: ignore[union-attr]
    assert (computed, resumed) == (total - done, done)  # finished blocks were not recomputed
    assert (out / MANIFEST_NAME).exists() and not (out / STORE_DIR).exists() and not (out / PARTIAL_DIR).exists()
    assert_bit_identical(ref, load_output(out))  # type: ignore[arg-type]


@pytest.mark.parametrize("writer", WRITERS)
def test_crash_during_export_rerun_only_exports(
    setup: tuple[Path, dict[str, object]], tmp_path: Path, writer: str
) -> None:
    cfg, ref = setup
    out = tmp_path / "out"
    # Rank 0 dies after writing its output files, before the index and the manifest.
    proc = killed_merge(cfg, out, writer, "0:export:kill")
    assert proc.returncode != 0, proc.stderr
    assert "signal 9" in proc.stderr, proc.stderr
    assert_unfinished(out)
    done = shards_in_store(out, writer)
    assert done == int(TOTAL.search(proc.stderr).group(1))  # type: ignore[union-attr]

    # One rank this time: the world size is not part of what a resume must match.
    again = launcher("-n", "1", str(cfg), str(out), "--block-size", BLOCK, "--writer", writer)
    assert again.returncode == 0, again.stderr
    assert DONE.search(again.stderr).groups() == ("0", str(done))  # type: ignore[union-attr]
    assert (out / MANIFEST_NAME).exists()
    assert_bit_identical(ref, load_output(out))  # type: ignore[arg-type]
