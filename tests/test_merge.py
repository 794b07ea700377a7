"""End-to-end merges in one process: identities, block-size independence, resume, refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_bit_identical, load_output, merge_tensors, synthetic_family, write_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bigmerge.engine.comm import SerialComm
from bigmerge.errors import OutputExistsError
from bigmerge.merge import MergeOptions, plan_merge, run_merge
from bigmerge.output.export import MANIFEST_NAME, verify
from bigmerge.planning.config import load_config
from bigmerge.storage.fs import location


def merge(cfg_text: str, tmp: Path, out_name: str = "out", **opts) -> dict[str, torch.Tensor]:
    return merge_tensors(cfg_text, tmp / out_name, **opts)


def linear_cfg(f: dict[str, Path], w1: float, w2: float, extra: str = "") -> str:
    return f"""
merge_method: linear
models:
  - model: {f["ft1"]}
    parameters: {{weight: {w1}}}
  - model: {f["ft2"]}
    parameters: {{weight: {w2}}}
{extra}"""


def ties_cfg(f: dict[str, Path], method: str = "ties", extra: str = "", d1: float = 0.5, d2: float = 0.3) -> str:
    return f"""
merge_method: {method}
base_model: {f["base"]}
models:
  - model: {f["ft1"]}
    parameters: {{weight: 0.6, density: {d1}}}
  - model: {f["ft2"]}
    parameters: {{weight: 0.5, density: {d2}}}
{extra}"""


def test_one_hot_linear_returns_that_model(family: dict[str, Path], tmp_path: Path) -> None:
    out = merge(linear_cfg(family, 0.0, 1.0), tmp_path)
    assert_bit_identical(out, load_output(family["ft2"]))


def test_output_is_a_checkpoint_with_manifest(family: dict[str, Path], tmp_path: Path) -> None:
    merge(linear_cfg(family, 0.3, 0.7), tmp_path, shard_bytes=1500)
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert (out / "config.json").exists()
    assert not (out / ".bigmerge-store.zarr").exists() and not (out / ".bigmerge-partial").exists()
    assert verify(location(str(out))) == 6


def test_manifest_checksums_are_each_tensors_crc32c_and_verify_catches_a_flipped_bit(
    family: dict[str, Path], tmp_path: Path
) -> None:
    """The manifest's per-tensor CRC-32C is combined from block checksums at export; it must be
    the CRC-32C of the tensor's bytes as written (multi-block tensors included), and verify
    must notice one flipped bit."""
    import crc32c
    from safetensors.torch import load_file

    from bigmerge.errors import VerifyError

    merge(linear_cfg(family, 0.3, 0.7), tmp_path, block_bytes=96)
    out = tmp_path / "out"
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    multi = 0
    for f in out.glob("model-*.safetensors"):
        for name, t in load_file(str(f)).items():
            raw = t.contiguous().view(torch.uint8).numpy() if t.numel() else b""
            assert manifest["tensors"][name]["crc32c"] == f"{crc32c.crc32c(raw):08x}", name
            multi += t.numel() * t.element_size() > 96
    assert multi >= 2  # tensors cut into several blocks are covered
    assert verify(location(str(out))) == 6
    shard = sorted(out.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # one bit in the last tensor's data
    shard.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match="does not match its checksum"):
        verify(location(str(out)))


@pytest.mark.slow  # the heaviest property tests: CI runs them, --fast does not
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    block=st.sampled_from([64, 96, 200, 512, 1000, 4096]),
    method=st.sampled_from(["linear", "task_arithmetic", "ties", "ties_rescale"]),
)
def test_output_never_depends_on_block_size(
    family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, block: int, method: str
) -> None:
    tmp = tmp_path_factory.mktemp("blk")
    if method == "linear":
        text = linear_cfg(family, 0.3, 0.9)
    elif method == "ties_rescale":
        text = ties_cfg(family, extra="parameters: {rescale: true}")
    else:
        text = ties_cfg(family, method)
    ref = merge(text, tmp, "ref", block_bytes=1 << 20)
    got = merge(text, tmp, "got", block_bytes=block)
    assert_bit_identical(ref, got)


def test_ties_density_one_without_conflicts_is_task_arithmetic(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    base = {"model.layers.0.w": torch.randn(12, 6, generator=g), "model.layers.1.w": torch.randn(12, 6, generator=g)}
    sign = {k: torch.where(torch.rand(v.shape, generator=g) > 0.5, 1.0, -1.0) for k, v in base.items()}
    f = {"base": write_checkpoint(tmp_path / "base", base)}
    for i in (1, 2):
        f[f"ft{i}"] = write_checkpoint(
            tmp_path / f"ft{i}", {k: v + sign[k] * (0.05 + torch.rand(v.shape, generator=g)) for k, v in base.items()}
        )
    ties = merge(ties_cfg(f, "ties", d1=1.0, d2=1.0), tmp_path, "ties")
    ta = merge(ties_cfg(f, "task_arithmetic", "parameters: {normalize: true}", d1=1.0, d2=1.0), tmp_path, "ta")
    assert_bit_identical(ties, ta)


@pytest.mark.slow  # the heaviest property tests: CI runs them, --fast does not
def test_ties_keeps_density_fraction_of_each_delta(tmp_path: Path) -> None:
    f = synthetic_family(tmp_path / "m", n=1, rows=200)
    out = merge(
        f"merge_method: ties\nbase_model: {f['base']}\nmodels:\n  - model: {f['ft1']}\n    parameters: {{weight: 1.0, density: 0.25}}\n",
        tmp_path,
        block_bytes=256,
    )
    base = load_output(f["base"])
    ft = load_output(f["ft1"])
    for k in out:
        kept = (out[k] != base[k]).sum().item()
        assert kept == max(1, int(0.25 * base[k].numel())), k
        changed = out[k] != base[k]
        assert torch.equal(out[k][changed], ft[k][changed])  # weight 1, normalize: the delta itself


def test_resume_recomputes_only_missing_blocks(family: dict[str, Path], tmp_path: Path) -> None:
    """zarr writer: the shards present are the journal."""
    text = ties_cfg(family)
    ref = merge(text, tmp_path, "ref", block_bytes=256)
    cfg = tmp_path / "r.yaml"
    cfg.write_text(text)
    out = tmp_path / "res"
    opts = MergeOptions(block_bytes=256, quiet=True, keep_store=True, writer="zarr")
    first = run_merge(str(cfg), str(out), SerialComm(), opts)
    store = out / ".bigmerge-store.zarr"
    entries = sorted(p for p in store.glob("t*/c/**/*") if p.is_file())  # the shards are the journal
    for e in entries[::2]:
        e.unlink()
    (out / MANIFEST_NAME).unlink()
    (out / "model.safetensors.index.json").unlink()
    second = run_merge(str(cfg), str(out), SerialComm(), opts)
    assert second["blocks_resumed"] == len(entries) - len(entries[::2])
    assert second["blocks_computed"] == len(entries[::2]) < first["blocks_computed"]
    assert_bit_identical(ref, load_output(out))


def test_direct_writer_resumes_from_its_journal_and_rechecks_what_it_resumes(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """direct writer, stopped after 7 blocks: the rerun takes the journaled blocks whose bytes
    still match their CRC-32C, merges the rest (a torn journal line and a block with a flipped
    bit included) and ends bit-identical, with nothing half-written in sight before that."""
    from bigmerge.engine.faults import FAULT_ENV
    from bigmerge.output.direct import PARTIAL_DIR
    from bigmerge.output.layout import Layout

    text = ties_cfg(family)
    ref = merge(text, tmp_path, "ref", block_bytes=256)
    cfg = tmp_path / "d.yaml"
    cfg.write_text(text)
    out = tmp_path / "dir"
    opts = MergeOptions(block_bytes=256, quiet=True)
    monkeypatch.setenv(FAULT_ENV, "0:7:error")
    with pytest.raises(RuntimeError, match="injected fault"):
        run_merge(str(cfg), str(out), SerialComm(), opts)
    monkeypatch.delenv(FAULT_ENV)
    assert not (out / MANIFEST_NAME).exists() and not list(out.glob("model-*.safetensors"))
    journal = next((out / PARTIAL_DIR).glob("journal-*"))
    lines = journal.read_text().splitlines()
    assert len(lines) == 7
    # the last line torn (as a crash mid-append leaves it), and one journaled block corrupted
    journal.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:3])
    ti, b, _ = map(int, lines[0].split())
    from bigmerge.merge import plan_merge
    from bigmerge.planning.config import load_config

    plan, _ = plan_merge(load_config(str(cfg)), 1, opts)
    layout = Layout.of(plan, opts.shard_bytes)
    t = plan.tensors[ti]
    f = out / PARTIAL_DIR / layout.places[ti].file
    data = bytearray(f.read_bytes())
    data[layout.block_offset(t, b)] ^= 0x10
    f.write_bytes(bytes(data))
    second = run_merge(str(cfg), str(out), SerialComm(), opts)
    assert second["blocks_resumed"] == 5  # 7 journaled, minus the torn line, minus the corrupt block
    assert not (out / PARTIAL_DIR).exists()
    assert_bit_identical(ref, load_output(out))
    assert verify(location(str(out))) == len(ref)


def test_finished_output_is_not_overwritten(family: dict[str, Path], tmp_path: Path) -> None:
    merge(linear_cfg(family, 0.5, 0.5), tmp_path)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        merge(linear_cfg(family, 0.5, 0.5), tmp_path)
    out = merge(linear_cfg(family, 1.0, 0.0), tmp_path, overwrite=True)
    assert_bit_identical(out, load_output(family["ft1"]))


@pytest.mark.parametrize("writer", ["direct", "zarr"])
def test_partial_store_of_another_config_is_refused(family: dict[str, Path], tmp_path: Path, writer: str) -> None:
    cfg = tmp_path / "a.yaml"
    cfg.write_text(linear_cfg(family, 0.5, 0.5))
    run_merge(str(cfg), str(tmp_path / "o"), SerialComm(), MergeOptions(quiet=True, keep_store=True, writer=writer))
    (tmp_path / "o" / MANIFEST_NAME).unlink()
    cfg.write_text(linear_cfg(family, 0.2, 0.5))
    with pytest.raises(OutputExistsError, match="different config"):
        run_merge(str(cfg), str(tmp_path / "o"), SerialComm(), MergeOptions(quiet=True, writer=writer))


def test_store_is_readable_by_zarr(family: dict[str, Path], tmp_path: Path) -> None:
    """Shards are encoded by bigmerge itself; zarr must read them as its own sharding codec."""
    import zarr

    text = ties_cfg(family, extra="dtype: float32\nout_dtype: bfloat16")
    cfg = tmp_path / "z.yaml"
    cfg.write_text(text)
    run_merge(
        str(cfg),
        str(tmp_path / "z"),
        SerialComm(),
        MergeOptions(quiet=True, keep_store=True, block_bytes=200, writer="zarr"),
    )
    out = load_output(tmp_path / "z")
    group = zarr.open_group(str(tmp_path / "z" / ".bigmerge-store.zarr"), mode="r")
    seen = 0
    for _, arr in group.arrays():
        name = arr.attrs["name"]
        assert arr.attrs["dtype"] == "BF16"
        got = torch.from_numpy(arr[:]).view(torch.bfloat16).reshape(out[name].shape)
        assert torch.equal(got, out[name]), name
        seen += 1
    assert seen == len(out)


def test_ties_keeps_exactly_k_when_magnitudes_tie(tmp_path: Path) -> None:
    """Many equal |delta| at the threshold: exactly k kept, the first ties in flat order."""
    base = {"model.layers.0.w": torch.zeros(40, 10), "model.layers.1.w": torch.zeros(40, 10)}
    ft = {k: torch.where(torch.arange(400).reshape(40, 10) % 3 == 0, 2.0, 1.0) for k in base}  # 134 twos, 266 ones
    f = {"base": write_checkpoint(tmp_path / "base", base), "ft1": write_checkpoint(tmp_path / "ft1", ft)}
    text = f"merge_method: ties\nbase_model: {f['base']}\nmodels:\n  - model: {f['ft1']}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
    outs = [merge(text, tmp_path, f"o{bs}", block_bytes=bs) for bs in (64, 160, 1 << 20)]
    for out in outs[1:]:
        assert_bit_identical(outs[0], out)
    for k, v in outs[0].items():
        flat = v.reshape(-1)
        assert int((flat != 0).sum()) == 200, k  # k = int(0.5 * 400)
        assert int((flat == 2.0).sum()) == 134  # every element above the threshold
        ones = (flat == 1.0).nonzero().reshape(-1)
        expected = (torch.arange(400) % 3 != 0).nonzero().reshape(-1)[:66]
        assert torch.equal(ones, expected)  # ties kept lowest index first


def test_tokenizer_source_outside_the_sources(family: dict[str, Path], tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"marker": 1}')
    merge(linear_cfg(family, 0.5, 0.5, f"tokenizer_source: {tok}"), tmp_path)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"marker": 1}'


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "ties_rescale", "ties_lambda"])
def test_fused_kernels_match_the_torch_code(tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The numba kernels and the torch statement of the arithmetic give the same bits."""
    from bigmerge.ops import kernels

    assert kernels.use_numba()
    f = synthetic_family(tmp_path / "m", n=3, dtype=torch.bfloat16, rows=64)
    extra = {
        "ties_rescale": "parameters: {rescale: true}",
        "ties_lambda": "parameters: {lambda: 0.7, normalize: false}",
    }.get(method, "")
    text = f"""merge_method: {method.split("_")[0] if method.startswith("ties") else method}
base_model: {f["base"]}
models:
  - model: {f["ft1"]}
    parameters: {{weight: 0.6, density: 0.4}}
  - model: {f["ft2"]}
    parameters: {{weight: 0.5, density: [0.2, 0.8]}}
  - model: {f["ft3"]}
    parameters: {{weight: 0.3, density: 0.6}}
{extra}
"""
    fused = merge(text, tmp_path, "fused", block_bytes=700)
    monkeypatch.setenv("BIGMERGE_NO_NUMBA", "1")
    plain = merge(text, tmp_path, "plain", block_bytes=700)
    assert_bit_identical(fused, plain)


@pytest.mark.parametrize(
    ("dtype", "extra"),
    [
        (torch.bfloat16, "dtype: float32\nout_dtype: bfloat16"),
        (torch.bfloat16, ""),
        (torch.bfloat16, "dtype: float32"),
        (torch.float32, "parameters: {normalize: false}"),
        (torch.float32, "out_dtype: bfloat16"),
    ],
)
def test_fused_linear_matches_the_torch_code(
    tmp_path: Path, dtype: torch.dtype, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bigmerge.ops import kernels

    assert kernels.use_numba()
    f = synthetic_family(tmp_path / "m", n=4, dtype=dtype, rows=64)
    text = "merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {f[k]}\n    parameters: {{weight: {w}}}\n"
        for k, w in zip(["base", "ft1", "ft2", "ft3", "ft4"], [0.1, 0.7, 0.3, -0.25, 0.45])
    )
    text += extra + "\n"
    fused = merge(text, tmp_path, "fused", block_bytes=700)
    monkeypatch.setenv("BIGMERGE_NO_NUMBA", "1")
    plain = merge(text, tmp_path, "plain", block_bytes=700)
    assert_bit_identical(fused, plain)


def test_store_shards_are_sized_to_their_tensor(family: dict[str, Path], tmp_path: Path) -> None:
    """A small tensor is one block of its own size: no padding to the block budget on disk."""
    cfg = tmp_path / "s.yaml"
    cfg.write_text(linear_cfg(family, 0.5, 0.5))
    run_merge(str(cfg), str(tmp_path / "s"), SerialComm(), MergeOptions(quiet=True, keep_store=True, writer="zarr"))
    store = tmp_path / "s" / ".bigmerge-store.zarr"
    shard_bytes = sum(p.stat().st_size for p in store.glob("t*/c/**/*") if p.is_file())
    out_bytes = sum(v.numel() * v.element_size() for v in load_output(tmp_path / "s").values())
    assert shard_bytes <= out_bytes + 28 * 6  # data, its two 4-byte crc32c and a 20-byte shard index per tensor


def test_device_auto_and_local_rank(family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bigmerge.engine.device import local_rank, pick_device

    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "3")
    assert local_rank() == 3
    want = pick_device("auto")
    assert want.type == ("cuda" if torch.cuda.is_available() else "cpu")
    ref = merge(linear_cfg(family, 0.3, 0.7), tmp_path, "cpu")
    got = merge(linear_cfg(family, 0.3, 0.7), tmp_path, "auto", device="auto")
    if want.type == "cpu":
        assert_bit_identical(ref, got)


def test_a_corrupt_block_in_the_store_is_caught_removed_and_recomputed(family: dict[str, Path], tmp_path: Path) -> None:
    from helpers import bigmerge

    cfg = tmp_path / "c.yaml"
    cfg.write_text(linear_cfg(family, 0.3, 0.7))
    out = tmp_path / "out"
    zarr = ("--writer", "zarr")
    bigmerge("merge", str(cfg), str(out), "--keep-store", "--quiet", "--block-size", "512", *zarr, check=True)
    good = load_output(out)
    shard = sorted(p for p in (out / ".bigmerge-store.zarr").rglob("*") if p.is_file() and "/c/" in str(p))[3]
    data = bytearray(shard.read_bytes())
    data[9] ^= 0x40  # one flipped bit in the block's data
    shard.write_bytes(bytes(data))
    (out / "bigmerge-manifest.json").unlink()  # as if export had not finished
    proc = bigmerge("merge", str(cfg), str(out), "--keep-store", "--quiet", "--block-size", "512", *zarr)
    assert proc.returncode == 2
    assert "does not match its checksum" in proc.stderr and "rerun" in proc.stderr
    assert not shard.exists() and not (out / "bigmerge-manifest.json").exists()
    proc = bigmerge("merge", str(cfg), str(out), "--block-size", "512", *zarr)
    assert proc.returncode == 0, proc.stderr
    assert "1 blocks computed" in proc.stderr, proc.stderr
    assert_bit_identical(load_output(out), good)


def test_auto_writer_resumes_an_interrupted_zarr_merge(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A merge stopped under the zarr writer is resumed by the default writer, not restarted
    beside its store (which would be left behind in OUT)."""
    from bigmerge.engine.faults import FAULT_ENV

    text = ties_cfg(family)
    ref = merge(text, tmp_path, "ref", block_bytes=256)
    cfg = tmp_path / "z.yaml"
    cfg.write_text(text)
    out = tmp_path / "zo"
    monkeypatch.setenv(FAULT_ENV, "0:6:error")
    with pytest.raises(RuntimeError, match="injected fault"):
        run_merge(str(cfg), str(out), SerialComm(), MergeOptions(block_bytes=256, quiet=True, writer="zarr"))
    monkeypatch.delenv(FAULT_ENV)
    again = run_merge(str(cfg), str(out), SerialComm(), MergeOptions(block_bytes=256, quiet=True))
    assert again["blocks_resumed"] == 6
    assert not (out / ".bigmerge-store.zarr").exists() and not (out / ".bigmerge-partial").exists()
    assert_bit_identical(ref, load_output(out))


SPILL_CONFIGS = {
    "ties_rescale": "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.6, density: 0.5}}\n  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.3}}\nparameters: {{rescale: true}}\n",
    "della": "merge_method: della\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.6, density: 0.5, epsilon: 0.1}}\n  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.3, epsilon: 0.2}}\n",
    "breadcrumbs": "merge_method: breadcrumbs\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.6, density: 0.8, gamma: 0.05}}\n  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.9, gamma: 0.01}}\n",
    "sce": "merge_method: sce\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\nparameters: {{select_topk: 0.5}}\n",
    "slerp": "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {ft1}\nparameters: {{t: 0.3}}\n",
    "model_stock": "merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n",
    "karcher": "merge_method: karcher\nmodels:\n  - model: {base}\n  - model: {ft1}\n  - model: {ft2}\n",
}


@pytest.mark.parametrize("method", sorted(SPILL_CONFIGS))
def test_statistics_read_every_source_byte_once(tmp_path: Path, method: str) -> None:
    """A tensor whose blocks exceed the cache is spilled to local scratch as the first statistics
    pass reads it (engine/spill.py): the later passes and apply read it back from there, so the
    sources are read once (they were read once per pass), and the bytes are those of a merge
    that keeps every block in memory."""
    f = synthetic_family(tmp_path / "m", n=2, rows=96)
    text = SPILL_CONFIGS[method].format(**{k: str(v) for k, v in f.items()})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    source_bytes = sum(p.stat().st_size for v in f.values() for p in v.glob("*.safetensors"))
    kept = merge(text, tmp_path, "kept", block_bytes=256, cache_bytes=1 << 30)
    opts = MergeOptions(block_bytes=256, cache_bytes=512, quiet=True, spill="always")
    summary = run_merge(str(cfg), str(tmp_path / "spilled"), SerialComm(), opts)
    assert_bit_identical(kept, load_output(tmp_path / "spilled"))
    assert summary["bytes_spilled"] > 0
    assert summary["bytes_read"] <= source_bytes  # every tensor byte once (headers are not counted)
    # auto on local sources: read again (a local re-read costs what reading the spill back costs)
    opts = dataclasses.replace(opts, spill="auto")
    summary = run_merge(str(cfg), str(tmp_path / "reread"), SerialComm(), opts)
    assert_bit_identical(kept, load_output(tmp_path / "reread"))
    assert summary["bytes_spilled"] == 0 and summary["bytes_read"] > source_bytes


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ties_reads_local_sources_twice_whatever_its_rounds(tmp_path: Path, dtype: str) -> None:
    """TIES over tensors larger than the cache, local sources, no spill: the high-bits round
    reads every block, the low-bits and ties rounds count from what each block kept of it
    (ops/task_vector/kept.py), apply reads it again: twice the tensor bytes, not four times,
    and the bits of a merge that keeps every block in memory."""
    f = synthetic_family(tmp_path / "m", n=2, rows=40000)  # blocks of 2048 rows: each guesses the bin well
    text = ties_cfg(f, extra=f"dtype: {dtype}")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    kept = merge(text, tmp_path, "kept", block_bytes=1 << 16, cache_bytes=1 << 30)
    opts = MergeOptions(block_bytes=1 << 16, cache_bytes=1 << 16, quiet=True, spill="never")
    summary = run_merge(str(cfg), str(tmp_path / "reread"), SerialComm(), opts)
    assert_bit_identical(kept, load_output(tmp_path / "reread"))
    plan = plan_merge(load_config(str(cfg)), 1, opts)[0]
    one_block = sum(t.in_bytes() for t in plan.tensors if t.n_blocks == 1)
    many = sum(t.in_bytes() for t in plan.tensors if t.n_blocks > 1)
    assert many > one_block
    assert summary["bytes_read"] == one_block + 2 * many


def test_a_pass_that_reads_again_reads_one_block_ahead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Local sources read again for apply (no spill): each block's read starts before the block
    before it is merged, as the first pass's stream reads ahead, and nothing is read beyond the
    two passes (a read-ahead is never wasted): the same bytes read, the same bits."""
    from bigmerge.engine.reader import BlockReader
    from bigmerge.ops.task_vector.task_arithmetic import TaskArithmeticOp

    f = synthetic_family(tmp_path / "m", n=2, rows=40000)
    text = ties_cfg(f)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    kept = merge(text, tmp_path, "kept", block_bytes=1 << 16, cache_bytes=1 << 30)
    events: list[tuple[str, str, int]] = []
    real_ahead, real_apply = BlockReader.read_ahead, TaskArithmeticOp.apply

    def read_ahead(self: Any, t: Any, b: int) -> Any:
        events.append(("read", t.name, b))
        return real_ahead(self, t, b)

    def apply(self: Any, task: Any, block: Any, stats: Any) -> Any:
        events.append(("apply", task.name, block.index))
        return real_apply(self, task, block, stats)

    monkeypatch.setattr(BlockReader, "read_ahead", read_ahead)
    monkeypatch.setattr(TaskArithmeticOp, "apply", apply)
    opts = MergeOptions(block_bytes=1 << 16, cache_bytes=1 << 16, quiet=True, spill="never")
    summary = run_merge(str(cfg), str(tmp_path / "reread"), SerialComm(), opts)
    assert_bit_identical(kept, load_output(tmp_path / "reread"))
    plan = plan_merge(load_config(str(cfg)), 1, opts)[0]
    many = [t for t in plan.tensors if t.n_blocks > 1]
    assert many and summary["bytes_read"] == sum(t.in_bytes() for t in plan.tensors) + sum(t.in_bytes() for t in many)
    for t in many:
        mine = [(kind, b) for kind, name, b in events if name == t.name]
        assert [b for kind, b in mine if kind == "read"] == list(range(t.n_blocks)), t.name  # each block once
        for b in range(t.n_blocks - 1):
            assert mine.index(("read", b + 1)) < mine.index(("apply", b)), (t.name, b, mine)


def test_far_sources_are_object_storage_and_network_file_systems(monkeypatch: pytest.MonkeyPatch) -> None:
    """--spill auto's test: a local path is far when the mount holding it is a network or FUSE
    file system (the longest mount point that contains it decides), and every object store is."""
    from bigmerge.storage import fs

    table = [("/mnt/lustre", "lustre"), ("/mnt/sshfs", "fuse.sshfs"), ("/mnt/usb", "fuseblk"), ("/", "ext4")]
    monkeypatch.setattr(fs, "_mounts", sorted(table, key=lambda m: len(m[0]), reverse=True))
    assert fs.network_filesystem("/mnt/lustre/models/a.safetensors") == "lustre"
    assert fs.network_filesystem("/mnt/lustre") == "lustre"
    assert fs.network_filesystem("/mnt/lustreish/a") is None  # a sibling, not inside the mount
    assert fs.network_filesystem("/mnt/sshfs/a") == "fuse.sshfs"
    assert fs.network_filesystem("/mnt/usb/a") is None  # a local disk through FUSE (ntfs-3g)
    assert fs.network_filesystem("/home/me/a") is None
    assert location("/mnt/lustre/m").is_far and not location("/home/me/m").is_far
    assert location("s3://bucket/m").is_far and location("memory://m").is_far


def test_an_unusable_spill_directory_costs_re_reads_not_the_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """BIGMERGE_SPILL_DIR naming a directory that does not exist: the merge warns once, reads
    the sources again instead, and gives the same bytes."""
    f = synthetic_family(tmp_path / "m", n=2, rows=96)
    text = SPILL_CONFIGS["ties_rescale"].format(**{k: str(v) for k, v in f.items()})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    kept = merge(text, tmp_path, "kept", block_bytes=256, cache_bytes=1 << 30)
    monkeypatch.setenv("BIGMERGE_SPILL_DIR", str(tmp_path / "no" / "such" / "dir"))
    capsys.readouterr()
    opts = MergeOptions(block_bytes=256, cache_bytes=512, spill="always")
    summary = run_merge(str(cfg), str(tmp_path / "out"), SerialComm(), opts)
    assert_bit_identical(kept, load_output(tmp_path / "out"))
    assert summary["bytes_spilled"] == 0
    err = capsys.readouterr().err
    assert err.count("cannot spill to") == 1 and "no/such/dir" in err, err
