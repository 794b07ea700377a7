"""Bad input: one line naming file/tensor/key, a non-zero exit, no traceback, no index or manifest."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from helpers import bigmerge, synthetic_family, write_checkpoint

from bigmerge.cli import main
from bigmerge.merge import MergeOptions

TIES = """merge_method: {method}
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.5, density: {density}}}
  - model: {ft2}
    parameters: {{weight: 0.5, density: 0.5}}
"""


def run(capsys: pytest.CaptureFixture[str], cfg: Path, out: Path) -> tuple[int, str]:
    code = main(["merge", str(cfg), str(out), "--quiet"])
    err = capsys.readouterr().err
    return code, err


def write(tmp: Path, f: dict[str, Path], method: str = "ties", density: float = 0.5) -> Path:
    p = tmp / "c.yaml"
    p.write_text(TIES.format(method=method, density=density, **{k: str(v) for k, v in f.items()}))
    return p


def assert_clean_failure(code: int, err: str, out: Path, *needles: str) -> None:
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("bigmerge: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not (out / "model.safetensors.index.json").exists()
    assert not (out / "bigmerge-manifest.json").exists()


def test_truncated_safetensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = synthetic_family(tmp_path / "m")
    p = f["ft1"] / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    code, err = run(capsys, write(tmp_path, f), tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", str(p), "out of range")


def test_corrupt_header(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = synthetic_family(tmp_path / "m")
    p = f["ft2"] / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[10:14] = b"\xff\xfe{]"
    p.write_bytes(bytes(data))
    code, err = run(capsys, write(tmp_path, f), tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", str(p), "JSON")


def test_header_length_past_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = synthetic_family(tmp_path / "m")
    p = f["ft2"] / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[:8] = struct.pack("<Q", 10**7)
    p.write_bytes(bytes(data))
    code, err = run(capsys, write(tmp_path, f), tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", str(p), "past the end")


def test_shape_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = synthetic_family(tmp_path / "m")
    from safetensors.torch import load_file

    t = load_file(str(f["ft1"] / "model.safetensors"))
    t["model.layers.1.mlp.up_proj.weight"] = torch.zeros(5, 8)
    write_checkpoint(f["ft1"], t)
    code, err = run(capsys, write(tmp_path, f), tmp_path / "out")
    assert_clean_failure(
        code,
        err,
        tmp_path / "out",
        str(f["ft1"]),
        "model.layers.1.mlp.up_proj.weight",
        "shape [5, 8]",
        "expected [24, 8]",
    )


def test_missing_tensor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = synthetic_family(tmp_path / "m")
    from safetensors.torch import load_file

    t = load_file(str(f["ft2"] / "model.safetensors"))
    del t["model.norm.weight"]
    write_checkpoint(f["ft2"], t)
    code, err = run(capsys, write(tmp_path, f), tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", str(f["ft2"]), "'model.norm.weight' is missing")


def test_missing_shard_in_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = synthetic_family(tmp_path / "m", shards=2)
    (f["ft1"] / "model-00002-of-00002.safetensors").unlink()
    code, err = run(capsys, write(tmp_path, f), tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "model-00002-of-00002.safetensors", "does not exist")


def test_index_with_path_escape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = synthetic_family(tmp_path / "m", shards=2)
    idx = f["ft1"] / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "../../etc/passwd"
    idx.write_text(json.dumps(data))
    code, err = run(capsys, write(tmp_path, f), tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "not a plain file name")


def test_unknown_method(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = synthetic_family(tmp_path / "m")
    code, err = run(capsys, write(tmp_path, f, method="tiez"), tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "unknown merge_method 'tiez'", "ties")


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_out_of_range_density(tmp_path: Path, capsys: pytest.CaptureFixture[str], density: float) -> None:
    f = synthetic_family(tmp_path / "m")
    code, err = run(capsys, write(tmp_path, f, density=density), tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "'density'", "(0, 1]")
    assert not (tmp_path / "out").exists()  # known before any write: nothing written


def test_unknown_parameter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = synthetic_family(tmp_path / "m")
    p = tmp_path / "c.yaml"
    p.write_text(f"merge_method: linear\nmodels:\n  - model: {f['ft1']}\n    parameters: {{wieght: 1}}\n")
    code, err = run(capsys, p, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "unknown parameter 'wieght'", "models[0].parameters")


def test_missing_model_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = synthetic_family(tmp_path / "m")
    f["ft2"] = tmp_path / "nope"
    code, err = run(capsys, write(tmp_path, f), tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", str(tmp_path / "nope"), "not found")


def test_cli_subprocess_prints_no_traceback(tmp_path: Path) -> None:
    f = synthetic_family(tmp_path / "m")
    cfg = write(tmp_path, f, method="nonsense")
    proc = bigmerge("merge", str(cfg), str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("bigmerge: error: unknown merge_method")
    assert "Traceback" not in proc.stderr


def test_plan_reads_no_tensor_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from bigmerge.storage.fs import Location

    f = synthetic_family(tmp_path / "m")
    reads: list[tuple[int, int | None]] = []
    real = Location.read_bytes

    def spy(self: Location, start: int | None = None, end: int | None = None) -> bytes:
        reads.append((start or 0, end))
        return real(self, start, end)

    def boom(*_a: object) -> None:
        raise AssertionError("plan read tensor data")

    monkeypatch.setattr(Location, "read_into", boom)
    monkeypatch.setattr(Location, "read_bytes", spy)
    cfg = write(tmp_path, f)
    assert main(["plan", str(cfg), "-n", "2", "--block-size", "256"]) == 0
    out = capsys.readouterr().out
    assert "rank 1" in out and "peak memory" in out and "imbalance" in out
    assert all(start == 0 or end is None for start, end in reads)  # header prefixes and JSON files only


def test_tokenizer_source_without_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = synthetic_family(tmp_path / "m")
    p = write(tmp_path, f)
    p.write_text(p.read_text() + f"tokenizer_source: {tmp_path / 'empty'}\n")
    (tmp_path / "empty").mkdir()
    code, err = run(capsys, p, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "tokenizer_source holds none")
    assert not (tmp_path / "out").exists()


def test_pickle_checkpoints_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No pickle by default: a .bin-only model is an error, and the file is never unpickled."""
    f = synthetic_family(tmp_path / "m")
    (f["ft1"] / "model.safetensors").unlink()
    (f["ft1"] / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle: must never be loaded")
    code, err = run(capsys, write(tmp_path, f), tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", str(f["ft1"]), "pickle", "safetensors")


def test_device_cuda_without_a_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = synthetic_family(tmp_path / "m")
    code = main(["merge", str(write(tmp_path, f)), str(tmp_path / "out"), "--quiet", "--device", "cuda"])
    err = capsys.readouterr().err
    if torch.cuda.is_available():
        assert code == 0
        return
    assert_clean_failure(code, err, tmp_path / "out", "--device cuda", "no CUDA device")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_source_is_an_error_unless_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: float
) -> None:
    f = synthetic_family(tmp_path / "m", dtype=torch.bfloat16)
    from safetensors.torch import load_file, save_file

    p = f["ft2"] / "model.safetensors"
    tensors = load_file(str(p))
    tensors["model.layers.1.mlp.up_proj.weight"][5, 3] = bad
    save_file(tensors, str(p), metadata={"format": "pt"})
    code, err = run(capsys, write(tmp_path, f), tmp_path / "out")
    assert_clean_failure(
        code, err, tmp_path / "out", str(p), "'model.layers.1.mlp.up_proj.weight'", "row 5", "--allow-nonfinite"
    )
    code = main(["merge", str(write(tmp_path, f)), str(tmp_path / "out2"), "--quiet", "--allow-nonfinite"])
    assert code == 0
    assert (tmp_path / "out2" / "bigmerge-manifest.json").exists()


OP_CHECKED = {
    "linear": "merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.0}}\n"
    "  - model: {ft1}\n    parameters: {{weight: 1.0}}\n  - model: {ft2}\n    parameters: {{weight: 1.0}}\n",
    "slerp": "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {ft2}\n"
    "parameters: {{t: 0.3}}\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {ft1}\n"
    "    parameters: {{weight: 0.0}}\n  - model: {ft2}\n    parameters: {{weight: 0.5}}\n",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n"
    "    parameters: {{weight: 0.0, density: 0.5}}\n  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.4}}\n",
}


# per method: the model with weight 0 (slerp: the base) and another
WHERE = {
    "linear": ("base", "ft2"),
    "slerp": ("base", "ft2"),
    "task_arithmetic": ("ft1", "base"),
    "ties": ("ft1", "base"),
}


@pytest.mark.slow  # the heaviest property tests: CI runs them, --fast does not
@pytest.mark.parametrize("method", sorted(OP_CHECKED))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("where", [0, 1])
@pytest.mark.parametrize("blocks", ["one", "many"])
def test_nonfinite_caught_by_the_operators_own_check(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    dtype: torch.dtype,
    where: int,
    blocks: str,
) -> None:
    """linear, slerp and task_arithmetic see NaN/Inf in their own sums, ties in its high-bits
    histograms (the reader does not scan their tensors):
    the same one-line error names the file, tensor and row, for a weight of 0 too (0 * Inf is
    NaN), in a tensor of one block or of many, and nothing is written."""
    from safetensors.torch import load_file, save_file

    import bigmerge.engine.reader as reader_mod

    scans: list[int] = []
    real = reader_mod.first_nonfinite
    monkeypatch.setattr(reader_mod, "first_nonfinite", lambda x: scans.append(1) or real(x))
    f = synthetic_family(tmp_path / "m", dtype=dtype)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(OP_CHECKED[method].format(**{k: str(v) for k, v in f.items()}))
    extra = ["--block-size", "64"] if blocks == "many" else []
    assert main(["merge", str(cfg), str(tmp_path / "clean"), "--quiet", *extra]) == 0
    assert scans == [], "the reader scanned tensors the operator checks"
    p = f[WHERE[method][where]] / "model.safetensors"
    tensors = load_file(str(p))
    for bad in (float("nan"), float("-inf")):
        tensors["model.layers.1.mlp.up_proj.weight"][17, 6] = bad
        save_file(tensors, str(p), metadata={"format": "pt"})
        out = tmp_path / f"out-{bad}"
        code = main(["merge", str(cfg), str(out), "--quiet", *extra])
        err = capsys.readouterr().err
        assert_clean_failure(code, err, out, str(p), "'model.layers.1.mlp.up_proj.weight'", "row 17", str(bad))
        assert main(["merge", str(cfg), str(tmp_path / f"ok-{bad}"), "--quiet", "--allow-nonfinite", *extra]) == 0


def test_an_overflow_of_finite_sources_is_merged(tmp_path: Path) -> None:
    """Finite sources whose weighted sum overflows are not an input error: the operator's own
    check sees the Inf, the scan of the sources finds none, and the merge goes on (as mergekit)."""
    from safetensors.torch import load_file

    f = synthetic_family(tmp_path / "m")
    for k in ("ft1", "ft2"):
        write_checkpoint(f[k], {"model.norm.weight": torch.full((8,), 3e38)})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"merge_method: linear\nmodels:\n  - model: {f['ft1']}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {f['ft2']}\n    parameters: {{weight: 1.0}}\nparameters: {{normalize: false}}\n"
    )
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 0
    got = load_file(str(tmp_path / "out" / "model-00001-of-00001.safetensors"))["model.norm.weight"]
    assert torch.isinf(got).all()


def test_a_block_read_again_is_not_scanned_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor larger than the cache is read again by later passes (local sources, no spill):
    its blocks are scanned for NaN/Inf once, when first read, not once per pass."""
    import bigmerge.engine.reader as reader_mod
    from bigmerge.merge import plan_merge
    from bigmerge.planning.config import load_config

    scans: list[int] = []
    real = reader_mod.first_nonfinite
    monkeypatch.setattr(reader_mod, "first_nonfinite", lambda x: scans.append(1) or real(x))
    f = synthetic_family(tmp_path / "m", rows=96)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"merge_method: model_stock\nbase_model: {f['base']}\nmodels:\n  - model: {f['ft1']}\n  - model: {f['ft2']}\n"
    )
    args = ["--block-size", "256", "--cache-size", "512", "--spill", "never"]
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--quiet", *args]) == 0
    plan = plan_merge(load_config(str(cfg)), 1, MergeOptions(block_bytes=256))[0]
    assert any(t.n_blocks > 1 for t in plan.tensors)
    assert len(scans) == sum(t.n_blocks * len(t.sources) for t in plan.tensors)


def test_weights_summing_to_zero_with_normalize(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = synthetic_family(tmp_path / "m")
    p = tmp_path / "c.yaml"
    p.write_text(
        f"merge_method: linear\nmodels:\n  - model: {f['ft1']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {f['ft2']}\n    parameters: {{weight: -0.5}}\n"
    )
    code, err = run(capsys, p, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "sum to 0", "normalize")
    assert not (tmp_path / "out").exists()


def test_gradient_on_a_model_without_layers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flat = {"embed.weight": torch.randn(6, 4), "head.weight": torch.randn(6, 4)}
    a = write_checkpoint(tmp_path / "a", flat)
    b = write_checkpoint(tmp_path / "b", {k: v + 1 for k, v in flat.items()})
    p = tmp_path / "c.yaml"
    p.write_text(
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: [0.1, 0.9]}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"
    )
    code, err = run(capsys, p, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "parameter 'weight' is a gradient", "no layers")


def test_filter_that_matches_nothing_is_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = synthetic_family(tmp_path / "m")
    p = tmp_path / "c.yaml"
    p.write_text(
        f"merge_method: linear\nmodels:\n  - model: {f['ft1']}\n    parameters:\n      weight:\n"
        "        - {filter: mpl, value: 0.9}\n        - {value: 0.5}\n"
        f"  - model: {f['ft2']}\n    parameters: {{weight: 0.5}}\n"
    )
    code = main(["merge", str(p), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0
    assert "warning: parameter 'weight': filter 'mpl' matches no tensor" in err


def test_mismatched_architectures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = synthetic_family(tmp_path / "m")
    cfg = json.loads((f["ft2"] / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (f["ft2"] / "config.json").write_text(json.dumps(cfg))
    cfg["architectures"] = ["LlamaForCausalLM"]
    for k in ("base", "ft1"):
        (f[k] / "config.json").write_text(json.dumps(cfg))
    code, err = run(capsys, write(tmp_path, f), tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", str(f["ft2"]), "MistralForCausalLM", "LlamaForCausalLM")


def test_duplicate_tensor_name_in_header(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = synthetic_family(tmp_path / "m")
    p = f["ft1"] / "model.safetensors"
    data = p.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8 : 8 + n].decode()
    entry = header[header.index('"model.norm.weight"') :]
    entry = entry[: entry.index("}") + 1]
    doubled = header.rstrip()[:-1] + "," + entry + "}"
    doubled += " " * ((8 - len(doubled) % 8) % 8)
    p.write_bytes(struct.pack("<Q", len(doubled)) + doubled.encode() + data[8 + n :])
    code, err = run(capsys, write(tmp_path, f), tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", str(p), "'model.norm.weight'", "more than once")


@pytest.mark.slow  # the heaviest property tests: CI runs them, --fast does not
@pytest.mark.parametrize("writer", ["direct", "zarr"])
def test_disk_full_keeps_the_journal_and_a_rerun_resumes(tmp_path: Path, writer: str) -> None:
    f = synthetic_family(tmp_path / "m")
    cfg = write(tmp_path, f)
    out = tmp_path / "out"
    args = ("--block-size", "128", "--writer", writer)
    proc = bigmerge("merge", str(cfg), str(out), *args, env={"BIGMERGE_FAULT_DISK_FULL": "5"})
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "no space left on device" in line and "rerun" in line, proc.stderr
    assert not (out / "model.safetensors.index.json").exists() and not (out / "bigmerge-manifest.json").exists()
    assert not list(out.glob("model-*.safetensors"))  # nothing that looks like a finished file
    if writer == "zarr":
        shards = [p for p in (out / ".bigmerge-store.zarr").rglob("*") if p.is_file() and "/c/" in str(p)]
        assert len(shards) == 5 and not [p for p in shards if ".tmp" in p.name]  # the journal: 5 whole blocks
    else:
        lines = [ln for j in (out / ".bigmerge-partial").glob("journal-*") for ln in j.read_text().splitlines()]
        assert len(lines) == 5  # the journal: 5 blocks written whole
    again = bigmerge("merge", str(cfg), str(out), *args)
    assert again.returncode == 0, again.stderr
    assert "resum" in again.stderr.lower() or "skipped" in again.stderr.lower(), again.stderr
    fresh = tmp_path / "fresh"
    bigmerge("merge", str(cfg), str(fresh), "--block-size", "128", "--quiet", check=True)
    from helpers import assert_bit_identical, load_output

    assert_bit_identical(load_output(out), load_output(fresh))


def test_nul_in_a_tensor_name_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = {"model.layers.0.mlp.up_proj.weight": torch.randn(4, 4), "a\x00b.weight": torch.randn(4, 4)}
    a = write_checkpoint(tmp_path / "m" / "a", tensors)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n")
    code, err = run(capsys, cfg, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", str(a / "model.safetensors"), "invalid tensor name")


@pytest.mark.parametrize("name", ["../../escape.weight", "/abs/path.weight", "..\\win\\path.weight"])
def test_tensor_names_never_become_paths(tmp_path: Path, name: str) -> None:
    """A tensor name is data: it is stored in headers only, never joined into a file path."""
    tensors = {"model.layers.0.mlp.up_proj.weight": torch.randn(4, 4), name: torch.randn(4, 4)}
    a = write_checkpoint(tmp_path / "m" / "a", tensors)
    b = write_checkpoint(tmp_path / "m" / "b", {k: v + 1 for k, v in tensors.items()})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"
    )
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "work" / "out"
    assert main(["merge", str(cfg), str(out), "--quiet"]) == 0
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(out in p.parents or p == out or p == out.parent for p in created), sorted(map(str, created))
    merged = {}
    from safetensors.torch import load_file

    for f in out.glob("*.safetensors"):
        merged.update(load_file(str(f)))
    torch.testing.assert_close(merged[name], tensors[name] + 0.5)
    assert main(["verify", str(out), "--quiet"]) == 0


class _Payload:
    """A pickle that would run code when unpickled by a plain pickle.load."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os

        return (os.system, (f"touch {self.marker}",))


def test_bin_checkpoints_with_allow_bin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--allow-bin: pytorch_model.bin is read with torch.load(weights_only=True) and gives the
    same merge as its safetensors twin; a pickle with code in it is refused, never run."""
    from safetensors.torch import load_file

    f = synthetic_family(tmp_path / "m")
    twin = synthetic_family(tmp_path / "twin")
    sd = load_file(str(f["ft1"] / "model.safetensors"))
    sd["tied.copy"] = sd["model.norm.weight"]  # shared storage, as tied weights are
    (f["ft1"] / "model.safetensors").unlink()
    torch.save(sd, f["ft1"] / "pytorch_model.bin")
    twin_sd = load_file(str(twin["ft1"] / "model.safetensors"))
    twin_sd["tied.copy"] = twin_sd["model.norm.weight"].clone()
    from safetensors.torch import save_file

    save_file(twin_sd, str(twin["ft1"] / "model.safetensors"))
    code, err = run(capsys, write(tmp_path, f), tmp_path / "refused")
    assert_clean_failure(code, err, tmp_path / "refused", str(f["ft1"]), "pickle", "--allow-bin")
    out = tmp_path / "out"
    assert main(["merge", str(write(tmp_path, f)), str(out), "--quiet", "--allow-bin"]) == 0
    assert not (out / ".bigmerge-bin-cache").exists()  # converted files are removed after the merge
    assert main(["merge", str(write(tmp_path, twin)), str(tmp_path / "twin_out"), "--quiet"]) == 0
    from helpers import assert_bit_identical, load_output

    assert_bit_identical(load_output(out), load_output(tmp_path / "twin_out"))

    marker = tmp_path / "pwned"
    torch.save({"model.norm.weight": _Payload(str(marker))}, f["ft2"] / "pytorch_model.bin")
    (f["ft2"] / "model.safetensors").unlink()
    capsys.readouterr()
    code = main(["merge", str(write(tmp_path, f)), str(tmp_path / "evil"), "--quiet", "--allow-bin"])
    err = capsys.readouterr().err
    assert_clean_failure(code, err, tmp_path / "evil", "refused by torch.load(weights_only=True)")
    assert not marker.exists()


def _rewrite_header(p: Path, edit) -> None:  # type: ignore[no-untyped-def]
    """Rewrite a safetensors file's JSON header in place with edit(header) (data bytes kept)."""
    data = p.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _offsets_out_of_range(h: dict) -> None:
    h["model.norm.weight"]["data_offsets"][1] += 10**6


def _overlapping(h: dict) -> None:
    h["model.norm.weight"]["data_offsets"] = list(h["model.embed_tokens.weight"]["data_offsets"][:1]) * 2
    h["model.norm.weight"]["data_offsets"][1] += 32


def _dtype_vs_bytes(h: dict) -> None:
    h["model.norm.weight"]["dtype"] = "F64"


def _shape_vs_bytes(h: dict) -> None:
    h["model.norm.weight"]["shape"] = [9]


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (_offsets_out_of_range, "out of range"),
        (_overlapping, "overlap"),
        (_dtype_vs_bytes, "'model.norm.weight'"),
        (_shape_vs_bytes, "'model.norm.weight'"),
    ],
    ids=["offsets-out-of-range", "overlapping", "dtype-vs-bytes", "shape-vs-bytes"],
)
def test_bad_safetensors_headers_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit, needle: str
) -> None:  # type: ignore[no-untyped-def]
    f = synthetic_family(tmp_path / "m")
    p = f["ft2"] / "model.safetensors"
    _rewrite_header(p, edit)
    code, err = run(capsys, write(tmp_path, f), tmp_path / "out")
    assert code == 2
    assert_clean_failure(code, err, tmp_path / "out", str(p), needle)


def test_index_naming_a_tensor_no_shard_has(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = synthetic_family(tmp_path / "m", shards=2)
    idx = f["ft1"] / "model.safetensors.index.json"
    doc = json.loads(idx.read_text())
    doc["weight_map"]["model.layers.7.ghost.weight"] = "model-00001-of-00002.safetensors"
    idx.write_text(json.dumps(doc))
    code, err = run(capsys, write(tmp_path, f), tmp_path / "out")
    assert code == 2
    assert_clean_failure(code, err, tmp_path / "out", "'model.layers.7.ghost.weight'", "not in that shard")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_nonfinite_scan_finds_the_first_bad_value_at_any_position(dtype: torch.dtype) -> None:
    """The reader's bit scan works in pieces of 4096: bad values at piece edges, several bad
    values, and the largest finite value (all exponent bits but one set) must come out right."""
    from bigmerge.engine.finite import first_nonfinite

    biggest = torch.finfo(dtype).max
    for n in (1, 4095, 4096, 4097, 10000):
        x = torch.full((n,), biggest, dtype=dtype)
        assert first_nonfinite(x) == -1
        for pos in sorted({0, 4095 % n, 4096 % n, n // 2, n - 1}):
            for bad in (float("nan"), float("inf"), float("-inf")):
                y = x.clone()
                y[pos] = bad
                y[n - 1] = bad
                assert first_nonfinite(y) == pos, (n, pos, bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_nonfinite_word_scan_agrees_with_torch(dtype: torch.dtype) -> None:
    """The scan reads several values per 64-bit word (finite.py): against torch.isfinite, over
    lengths and offsets that split words (a view starting off a word boundary falls back to one
    value at a time), lanes of zeros, the largest finite values of both signs and subnormals
    beside a bad value (a borrow out of a zero lane must not flag its neighbour)."""
    from bigmerge.engine.finite import first_nonfinite

    g = torch.Generator().manual_seed(4)
    fi = torch.finfo(dtype)
    specials = torch.tensor([0.0, -0.0, fi.max, -fi.max, fi.tiny, fi.tiny / 4, 1.0], dtype=dtype)
    for trial in range(60):
        n = int(torch.randint(1, 9000, (1,), generator=g))
        x = specials[torch.randint(0, len(specials), (n + 3,), generator=g)]
        x[torch.rand(n + 3, generator=g) < 0.5] = torch.randn(1, generator=g).to(dtype)
        for _ in range(int(torch.randint(0, 3, (1,), generator=g))):
            x[int(torch.randint(0, n + 3, (1,), generator=g))] = [float("nan"), float("inf"), -float("inf")][trial % 3]
        for off in (0, 1, 3):
            y = x[off : off + n]
            bad = (~torch.isfinite(y)).nonzero()
            assert first_nonfinite(y) == (int(bad[0, 0]) if len(bad) else -1), (trial, off, n)


@pytest.mark.parametrize(
    "method, model_params, shared, needle",
    [
        ("linear", "{weight: .nan}", "{}", "parameter 'weight' of model"),
        ("linear", "{weight: -.inf}", "{}", "parameter 'weight' of model"),
        ("linear", "{weight: 1.0e+300}", "{}", "1e+300"),  # inf in float32
        ("linear", "{weight: [0.5, .nan]}", "{}", "parameter 'weight' of model"),  # a gradient
        ("task_arithmetic", "{weight: 1}", "{lambda: .inf}", "parameter 'lambda'"),
        ("ties", "{weight: 1, density: 0.5}", "{lambda: '-inf'}", "parameter 'lambda'"),  # a string YAML keeps
        ("slerp", "{}", "{t: .nan}", "parameter 't'"),
    ],
)
def test_a_parameter_that_is_not_a_finite_number_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], method: str, model_params: str, shared: str, needle: str
) -> None:
    """YAML's .nan and .inf (and numbers float32 holds as inf) are floats pydantic takes: a
    weight of .nan merged into a model of NaN, exit 0. Now one line naming the parameter, and
    nothing written."""
    f = synthetic_family(tmp_path / "m")
    base_line = f"base_model: {f['base']}\n" if method != "linear" else ""
    models = f"  - model: {f['ft1']}\n    parameters: {model_params}\n"
    models += (
        f"  - model: {f['base']}\n" if method == "slerp" else f"  - model: {f['ft2']}\n    parameters: {{weight: 1}}\n"
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"merge_method: {method}\n{base_line}models:\n{models}parameters: {shared}\n")
    code, err = run(capsys, cfg, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", needle, "finite number")
    assert not (tmp_path / "out").exists()
