"""Keys mergekit 0.1.5 accepts and ignores are accepted with one warning; typos stay errors.

mergekit resolves only its method's declared parameters and drops unknown top-level keys, so
configs written for it carry parameters that do nothing (`lambda`/`weight` under sce,
`normalize` under multislerp, `int8_mask` at the top level). bigmerge merges those configs
as mergekit does, with one warning line per ignored name, once per run (rank 0); a name no
mergekit method knows is refused, since a typo must not silently change a merge.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_bit_identical, load_output, merge_tensors, synthetic_family

from bigmerge.errors import ConfigError

SCE = """merge_method: sce
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
parameters:
  select_topk: 0.5
"""
MULTISLERP = """merge_method: multislerp
models:
  - model: {ft1}
    parameters: {{weight: 0.3}}
  - model: {ft2}
    parameters: {{weight: 0.7}}
"""
TIES = """merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.4, density: 0.5}}
"""


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return synthetic_family(tmp_path_factory.mktemp("fam"), n=2, dtype=torch.bfloat16)


def _merge(tmp: Path, name: str, text: str, fam: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> list[str]:
    """Merge in this process (one rank); the warning lines about ignored keys it printed."""
    capsys.readouterr()
    merge_tensors(text.format(**{k: str(v) for k, v in fam.items()}), tmp / name, quiet=False)
    return _warnings(capsys.readouterr().err)


def _warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if "is ignored" in line]


@pytest.mark.parametrize(
    ("name", "plain", "extra", "ignored"),
    [
        # sce takes neither lambda nor weight (task arithmetic's parameters): mergekit never reads them
        (
            "sce",
            SCE,
            SCE.replace("  select_topk: 0.5", "  select_topk: 0.5\n  lambda: 0.5").replace(
                "  - model: {ft1}\n", "  - model: {ft1}\n    parameters: {{weight: 0.3}}\n"
            ),
            ["'lambda'", "'weight'"],
        ),
        # multislerp's switch is normalize_weights; `normalize` is linear's
        ("multislerp", MULTISLERP, MULTISLERP + "parameters:\n  normalize: true\n", ["'normalize'"]),
        # a method parameter at the top level: mergekit's config model drops it
        ("ties_top", TIES, TIES + "int8_mask: true\n", ["top-level key 'int8_mask'"]),
        # the base model's own weight and density under ties: read for the other models only
        (
            "ties_base",
            TIES,
            TIES + "  - model: {base}\n    parameters: {{weight: 0.9, density: 0.2}}\n",
            ["'density' of the base model", "'weight' of the base model"],
        ),
    ],
)
def test_mergekit_ignored_keys_warn_once_and_change_nothing(
    family: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    plain: str,
    extra: str,
    ignored: list[str],
) -> None:
    assert not _merge(tmp_path, "plain", plain, family, capsys)
    lines = _merge(tmp_path, "extra", extra, family, capsys)
    assert len(lines) == len(ignored), lines  # one line per ignored name
    for what in ignored:
        assert sum(what in line for line in lines) == 1, (what, lines)
    assert all("mergekit 0.1.5 ignores it too" in line for line in lines)
    assert_bit_identical(load_output(tmp_path / "plain"), load_output(tmp_path / "extra"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (TIES.replace("density: 0.5}}\n  - model: {ft2}", "densty: 0.5}}\n  - model: {ft2}"), "'densty'"),
        (TIES + "parameters:\n  lamda: 0.5\n", "'lamda'"),
        (TIES + "int8mask: true\n", "'int8mask'"),
        (SCE + "  select_top_k: 0.2\n", "'select_top_k'"),
    ],
)
def test_misspelt_keys_stay_errors(family: dict[str, Path], tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "typo.yaml"
    cfg.write_text(text.format(**{k: str(v) for k, v in family.items()}))
    with pytest.raises(ConfigError) as exc:
        merge_tensors(cfg.read_text(), tmp_path / "out")
    msg = str(exc.value)
    assert "\n" not in msg and message in msg and "unknown" in msg, msg
    assert not list((tmp_path / "out").glob("*.safetensors"))


MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")


@pytest.mark.mpi
def test_ignored_key_warning_once_on_two_ranks(family: dict[str, Path], tmp_path: Path) -> None:
    assert MPIRUN, "mpirun not found"
    cfg = tmp_path / "c.yaml"
    cfg.write_text((MULTISLERP + "parameters:\n  normalize: true\nint8_mask: false\n").format(**family))
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    env.update(PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe")
    cmd = [
        MPIRUN,
        "-n",
        "2",
        "--oversubscribe",
        sys.executable,
        "-m",
        "bigmerge",
        "merge",
        str(cfg),
        str(tmp_path / "o"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    lines = _warnings(proc.stdout + proc.stderr)
    assert len(lines) == 2, lines  # normalize and int8_mask, each once, from rank 0 alone
