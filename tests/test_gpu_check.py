"""tools/gpu_check.py: the dry run of the GPU check (issue 19) on the CPU, end to end, as CI runs it.

With --device cpu the "device" side is the CPU with the numba kernels switched off, so the ops,
stats, dam and slice parts compare every operator's torch statements with its fused kernels.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def test_compare_counts_ulps_and_treats_signed_zeros_as_equal(tmp_path: Path) -> None:
    sys.path.insert(0, str(TOOLS))
    from gpu_check import compare_dirs

    a = torch.tensor([1.0, -2.0, 0.0, 3.0], dtype=torch.bfloat16)
    b = a.clone()
    b[1] = torch.tensor(-2.0, dtype=torch.bfloat16).view(torch.int16).add(2).view(torch.bfloat16)  # 2 ulps away
    b[2] = -0.0
    for d, t in (("a", a), ("b", b)):
        (tmp_path / d).mkdir()
        save_file({"w": t, "same": torch.ones(3)}, str(tmp_path / d / "model.safetensors"))
    res = compare_dirs(tmp_path / "a", tmp_path / "b")
    assert res["tensors"] == 2 and res["identical"] == 1
    assert res["max_ulp"] == 2 and res["differ"][0]["elements"] == 1, res  # -0.0 vs 0.0 is no difference
    save_file({"w": a}, str(tmp_path / "b" / "model.safetensors"))
    assert compare_dirs(tmp_path / "a", tmp_path / "b")["name_mismatch"] == ["same"]


@pytest.mark.slow
def test_dry_run_runs_every_part_and_the_torch_path_matches_the_kernels(tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = subprocess.run(
        [
            sys.executable,
            str(TOOLS / "gpu_check.py"),
            str(out),
            "--device",
            "cpu",
            "--quick",
            "--work",
            str(tmp_path / "w"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["parts"]) == {"fixtures", "warmup", "dam", "eval", "ops", "slice", "scaling", "stats"}
    assert all(p["status"] == "ok" for p in rep["parts"].values()), {k: p.get("error") for k, p in rep["parts"].items()}
    ops = {r["method"]: r for r in rep["parts"]["ops"]["rows"]}
    assert len(ops) == 17
    for part in ("ops", "stats", "dam", "slice"):
        for row in rep["parts"][part]["rows"]:
            if "method" in row:  # a merge on each side: both ran, and gave the same bytes
                assert row["device"]["rc"] == 0 and row["cpu"]["rc"] == 0, row
                assert row["identical"], (part, row["method"], row["compare"])
    dam = rep["parts"]["dam"]["rows"][0]
    assert dam["rc"] == 0 and dam["steps"] == 2 and dam["loss_falls"] and len(dam["coefficient_files"]) == 2
    assert rep["parts"]["eval"]["rows"][-1]["equal"] is True
    scaling = rep["parts"]["scaling"]["rows"]
    assert [(r["method"], r["ranks"], r["rc"]) for r in scaling] == [
        ("linear", 1, 0),
        ("linear", 2, 0),
        ("ties", 1, 0),
        ("ties", 2, 0),
    ]
    md = (out / "report.md").read_text()
    for title in ("Every operator", "DAM", "Evaluation", "Llama-3-70B", "CPU scaling"):
        assert title in md
    assert (out / "log.txt").stat().st_size > 0
