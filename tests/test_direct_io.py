"""The direct writer's O_DIRECT path: page-aligned large tensors, the same bytes either way."""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from helpers import assert_bit_identical, load_output, write_checkpoint

from bigmerge.engine.comm import SerialComm
from bigmerge.merge import MergeOptions, run_merge
from bigmerge.ops.base import Scratch
from bigmerge.output.export import verify
from bigmerge.storage.fs import location
from bigmerge.storage.safetensors import PAGE

LARGE = "model.layers.0.mlp.up_proj.weight"  # 1280 x 2048 bf16: 5 MiB, a large tensor


def family(root: Path) -> dict[str, Path]:
    g = torch.Generator().manual_seed(3)
    out = {}
    for k in ("ft1", "ft2"):
        out[k] = write_checkpoint(
            root / k,
            {
                "model.norm.weight": torch.randn(8, generator=g).bfloat16(),  # small, 16 bytes
                "model.layers.0.input_layernorm.weight": torch.randn(24, generator=g).bfloat16(),
                LARGE: torch.randn(1280, 2048, generator=g).bfloat16(),
                "model.layers.0.mlp.down_proj.weight": torch.randn(2048, 1280, generator=g).bfloat16(),
            },
        )
    return out


def merge(f: dict[str, Path], tmp: Path, name: str, **opts: object) -> dict[str, object]:
    cfg = tmp / "c.yaml"
    cfg.write_text(
        f"merge_method: linear\nmodels:\n  - model: {f['ft1']}\n    parameters: {{weight: 0.3}}\n"
        f"  - model: {f['ft2']}\n    parameters: {{weight: 0.7}}\n"
    )
    return run_merge(str(cfg), str(tmp / name), SerialComm(), MergeOptions(quiet=True, block_bytes=1 << 20, **opts))


def test_large_tensors_start_on_a_page_and_go_out_with_o_direct(tmp_path: Path) -> None:
    f = family(tmp_path / "m")
    summary = merge(f, tmp_path, "direct")
    ref = merge(f, tmp_path, "zarr", writer="zarr")
    out = tmp_path / "direct"
    assert_bit_identical(load_output(tmp_path / "zarr"), load_output(out))
    # the two large tensors (10 MiB of 10 MiB + 64 bytes) were written with direct I/O
    assert summary["direct_io_bytes"] == 2 * 1280 * 2048 * 2, summary
    assert ref.get("direct_io_bytes", 0) == 0
    assert verify(location(str(out))) == 4
    shard = next(out.glob("model-*.safetensors"))
    raw = shard.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    assert raw[8 : 8 + n].rstrip(b" ") != raw[8 : 8 + n]  # padded with spaces, which the format allows
    starts = {k: 8 + n + v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    assert starts[LARGE] % PAGE == 0 and starts["model.layers.0.mlp.down_proj.weight"] % PAGE == 0
    # and any safetensors reader takes the file
    from safetensors import safe_open

    with safe_open(str(shard), "pt") as sf:
        assert sf.get_tensor(LARGE).shape == (1280, 2048)


def test_buffered_writes_and_a_file_system_without_o_direct_give_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = family(tmp_path / "m")
    merge(f, tmp_path, "direct")
    assert merge(f, tmp_path, "buffered", direct_io=False)["direct_io_bytes"] == 0
    real_open = os.open

    def no_direct(path: str, flags: int, *a: object, **kw: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", no_direct)
    assert merge(f, tmp_path, "refused")["direct_io_bytes"] == 0
    monkeypatch.undo()
    a = {p.name: p.read_bytes() for p in (tmp_path / "direct").glob("model-*.safetensors")}
    for other in ("buffered", "refused"):
        b = {p.name: p.read_bytes() for p in (tmp_path / other).glob("model-*.safetensors")}
        assert a == b, other


def test_scratch_buffers_can_start_on_pages() -> None:
    sc = Scratch(align=PAGE)
    for dtype in (torch.bfloat16, torch.float32, torch.uint8):
        for n in (1, 1000, 4097, 1 << 20):
            x = sc.get(f"b{n}", (n,), dtype)
            assert x.data_ptr() % PAGE == 0 and x.numel() == n
            x.fill_(1)  # the whole view is writable memory


def test_a_merge_stopped_midway_resumes_its_direct_io_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after 4 blocks (the first ones O_DIRECT blocks of the large tensors), the rerun
    re-checks what the journal says against the bytes on disk, resumes them, merges the rest
    and ends byte-identical to an uninterrupted merge."""
    from bigmerge.engine.faults import FAULT_ENV
    from bigmerge.output.direct import PARTIAL_DIR
    from bigmerge.output.export import MANIFEST_NAME

    f = family(tmp_path / "m")
    merge(f, tmp_path, "whole")
    monkeypatch.setenv(FAULT_ENV, "0:4:error")
    with pytest.raises(RuntimeError, match="injected fault"):
        merge(f, tmp_path, "stopped")
    monkeypatch.delenv(FAULT_ENV)
    out = tmp_path / "stopped"
    assert not (out / MANIFEST_NAME).exists()
    journal = next((out / PARTIAL_DIR).glob("journal-*")).read_text().splitlines()
    assert len(journal) == 4
    plan = json.loads((out / PARTIAL_DIR / "bigmerge-plan.json").read_text())
    assert plan["writer"] == "direct"
    large = {i for i, line in enumerate(_plan_tensors(f, tmp_path)) if line >= 1 << 20}
    assert any(int(line.split()[0]) in large for line in journal), journal  # O_DIRECT blocks among them
    again = merge(f, tmp_path, "stopped")
    assert again["blocks_resumed"] == 4 and again["blocks_computed"] > 0
    assert again["direct_io_bytes"] > 0
    a = {p.name: p.read_bytes() for p in (tmp_path / "whole").glob("model-*.safetensors")}
    b = {p.name: p.read_bytes() for p in out.glob("model-*.safetensors")}
    assert a == b
    assert verify(location(str(out))) == 4


def _plan_tensors(f: dict[str, Path], tmp: Path) -> list[int]:
    """Output bytes of each tensor, in plan order."""
    from bigmerge.merge import plan_merge
    from bigmerge.planning.config import load_config

    plan, _ = plan_merge(load_config(str(tmp / "c.yaml")), 1, MergeOptions(block_bytes=1 << 20))
    return [t.out_bytes() for t in plan.tensors]
