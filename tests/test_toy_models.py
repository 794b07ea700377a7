"""The toy model generator (tools/toy_models.py) and the golden fixtures it feeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from toy_models import (
    DTYPES,
    PRESETS,
    STAMP,
    VOCAB_SIZE,
    family_files,
    make_family,
    plan_shards,
    sha256_file,
    tensor_specs,
)

from bigmerge.ops import REGISTRY

pytestmark = pytest.mark.slow  # builds every fixture family

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"


def hashes(paths: dict[str, Path]) -> dict[str, str]:
    return {rel: sha256_file(p) for rel, p in family_files(paths)}


def load_model(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_tiny_family_is_bit_identical_across_builds_and_processes(tmp_path: Path) -> None:
    a = make_family(tmp_path / "a")
    b = make_family(tmp_path / "b")
    # A separate interpreter (through the CLI) catches anything seeded by the per-process hash salt.
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "toy_models.py"), str(tmp_path / "c")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "base:" in proc.stdout and "ft2:" in proc.stdout
    c = {name: tmp_path / "c" / name for name in a}
    ha, hb, hc = hashes(a), hashes(b), hashes(c)
    assert set(a) == {"base", "ft1", "ft2"}
    assert "base/model.safetensors" in ha and "ft1/tokenizer.json" in ha
    assert ha == hb == hc


def test_finetune_stream_does_not_depend_on_family_size(tmp_path: Path) -> None:
    two = make_family(tmp_path / "two", n_finetunes=2)
    three = make_family(tmp_path / "three", n_finetunes=3)
    for name in ("base", "ft1", "ft2"):
        assert sha256_file(two[name] / "model.safetensors") == sha256_file(three[name] / "model.safetensors")


def test_tiny_base_loads_and_generates(tmp_path: Path) -> None:
    import transformers

    paths = make_family(tmp_path / "fam", n_finetunes=1)
    tok = transformers.AutoTokenizer.from_pretrained(str(paths["base"]))
    assert len(tok) == VOCAB_SIZE
    model = transformers.AutoModelForCausalLM.from_pretrained(str(paths["base"]))
    assert model.config.vocab_size == VOCAB_SIZE
    # Every weight came from the file (none left randomly initialised).
    on_disk = load_model(paths["base"])
    state = model.state_dict()
    assert set(on_disk) <= set(state)
    for name, tensor in on_disk.items():
        assert torch.equal(state[name], tensor), name
    ids = tok("12+34=", return_tensors="pt")
    assert ids["input_ids"][0, 0].item() == tok.bos_token_id
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, ids["input_ids"].shape[1] + 5)
    assert tok.decode(out[0, 1 : ids["input_ids"].shape[1]]) == "12+34="


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sharded_index_covers_every_tensor(tmp_path: Path, dtype: str) -> None:
    paths = make_family(tmp_path / "fam", dtype=dtype, n_finetunes=3, sharded=True)
    expected = {s.name: s.shape for s in tensor_specs("tiny")}
    for path in paths.values():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        weight_map = index["weight_map"]
        shards = sorted(set(weight_map.values()))
        assert len(shards) >= 2
        assert sorted(p.name for p in path.glob("*.safetensors")) == shards
        seen: dict[str, str] = {}
        total = 0
        for shard in shards:
            with safe_open(str(path / shard), "pt") as fh:
                assert fh.metadata() == {"format": "pt"}
                for key in fh.keys():
                    assert key not in seen, f"{key} in two shards"
                    seen[key] = shard
                    t = fh.get_tensor(key)
                    assert t.dtype == DTYPES[dtype]
                    assert tuple(t.shape) == expected[key]
                    total += t.numel() * t.element_size()
        assert seen == weight_map
        assert set(seen) == set(expected)
        assert index["metadata"]["total_size"] == total


def test_finetunes_differ_from_base_with_conflicting_signs(tmp_path: Path) -> None:
    paths = make_family(tmp_path / "fam", n_finetunes=2)
    base, ft1, ft2 = (load_model(paths[n]) for n in ("base", "ft1", "ft2"))
    assert set(base) == set(ft1) == set(ft2)
    for name in base:
        d1, d2 = ft1[name] - base[name], ft2[name] - base[name]
        assert (d1 != 0).float().mean() > 0.9, name  # dense noise touches (almost) everything
        assert not torch.equal(d1, d2), name
        if name.endswith("norm.weight"):
            assert (base[name] - 1).abs().max() < 0.5 and (ft1[name] - 1).abs().max() < 0.5
    # Where both fine-tunes make their largest changes, they disagree in sign often enough for
    # TIES sign election to matter, but not mostly.
    name = "model.layers.1.mlp.up_proj.weight"
    d1, d2 = ft1[name] - base[name], ft2[name] - base[name]
    top = (d1.abs() > d1.abs().quantile(0.9)) & (d2.abs() > d2.abs().quantile(0.9))
    conflict = ((d1.sign() != d2.sign()) & top).sum() / top.sum()
    assert top.sum() > 50 and 0.15 < conflict < 0.5


def test_tied_family_has_no_lm_head(tmp_path: Path) -> None:
    paths = make_family(tmp_path / "fam", tied=True, n_finetunes=1)
    cfg = json.loads((paths["base"] / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_model(paths["ft1"])


def test_cache_reuses_matching_family_and_rebuilds_otherwise(tmp_path: Path) -> None:
    out = tmp_path / "fam"
    paths = make_family(out)
    weights = paths["ft1"] / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert make_family(out) == paths
    assert weights.stat().st_mtime_ns == mtime  # cached: nothing rewritten

    make_family(out, dtype="bfloat16")  # other arguments: rebuilt in place
    assert json.loads((out / STAMP).read_text())["args"]["dtype"] == "bfloat16"
    assert load_model(paths["ft1"])["model.norm.weight"].dtype == torch.bfloat16

    before = sha256_file(weights)
    weights.write_bytes(b"truncated")  # a damaged file invalidates the cache
    make_family(out, dtype="bfloat16")
    assert sha256_file(weights) == before

    make_family(out, dtype="bfloat16", sharded=True)  # no stale single file beside the shards
    assert not weights.exists() and (paths["ft1"] / "model.safetensors.index.json").exists()


def test_preset_sizes() -> None:
    def nbytes(preset: str, dtype: str) -> int:
        return sum(s.numel for s in tensor_specs(preset)) * DTYPES[dtype].itemsize

    assert nbytes("tiny", "float32") < 1_000_000
    assert 40e6 < nbytes("small", "bfloat16") < 60e6
    assert 0.9e9 < nbytes("medium", "bfloat16") < 1.1e9
    assert 2.3e9 < nbytes("large", "bfloat16") < 2.7e9
    assert 5.8e9 < nbytes("70b-slice", "bfloat16") < 6.0e9  # Llama-3-70B's tensors, one layer
    for preset, p in PRESETS.items():
        assert p.hidden % p.heads == 0 and p.heads % p.kv_heads == 0, preset
        for dtype in DTYPES:
            itemsize = DTYPES[dtype].itemsize
            shards = plan_shards(tensor_specs(preset), itemsize, sharded=p.always_sharded)
            # a shard holds <= 500 MB, or one tensor that alone is larger
            assert all(sum(s.numel for s in sh) * itemsize <= 500e6 or len(sh) == 1 for sh in shards)
            assert [s.name for sh in shards for s in sh] == [s.name for s in tensor_specs(preset)]


def test_chunked_tensors_match_their_rows() -> None:
    """A tensor above CHUNK_ELEMENTS is drawn chunk by chunk: each chunk equals a direct draw of its rows."""
    import toy_models

    spec = toy_models.TensorSpec("w", (10, 4), "linear")
    old = toy_models.CHUNK_ELEMENTS
    try:
        toy_models.CHUNK_ELEMENTS = 12  # 3 rows per chunk: chunks start at rows 0, 3, 6, 9
        chunked = toy_models.generate_tensors(spec, 0, ["ft1"], torch.float32)
    finally:
        toy_models.CHUNK_ELEMENTS = old
    whole = toy_models.generate_tensors(spec, 0, ["ft1"], torch.float32)
    assert not torch.equal(chunked["base"], whole["base"])  # other streams
    for start in (0, 3, 6, 9):
        rows = toy_models._generate_rows(spec, 0, ["ft1"], torch.float32, "cpu", (start, min(start + 3, 10)))
        for name in ("base", "ft1"):
            assert torch.equal(chunked[name][start : start + 3], rows[name])


def golden_manifest() -> dict:
    path = GOLDEN / "MANIFEST.json"
    assert path.exists(), "tests/golden/MANIFEST.json is missing: it is committed; rerun tools/make_golden.py"
    return json.loads(path.read_text())


def test_golden_fixtures_are_current(tmp_path: Path) -> None:
    """The goldens were made from exactly the fixtures make_family builds today."""
    manifest = golden_manifest()
    for fam, info in manifest["families"].items():
        paths = make_family(tmp_path / fam, **info["args"])
        assert hashes(paths) == info["sha256"], (
            f"fixture family {fam} changed since the golden files were made: rerun tools/make_golden.py"
        )


def test_golden_configs_render_and_match_manifest(tmp_path: Path) -> None:
    manifest = golden_manifest()
    for name, entry in manifest["configs"].items():
        text = (GOLDEN / entry["config"]).read_text()
        fam = manifest["families"][entry["family"]]["args"]
        models = ["base"] + [f"ft{i}" for i in range(1, fam["n_finetunes"] + 1)]
        rendered = text.format(**{m: str(tmp_path / m) for m in models})  # what tests/helpers.write_config does
        cfg = yaml.safe_load(rendered)
        assert cfg["merge_method"] in REGISTRY, name
        golden = GOLDEN / entry["output"]["file"]
        assert sha256_file(golden) == entry["output"]["sha256"], name
        with safe_open(str(golden), "pt") as fh:
            assert len(list(fh.keys())) == entry["output"]["n_tensors"], name


def test_golden_cases_file_is_what_the_manifest_was_made_from() -> None:
    """tools/make_golden.py reads its cases from tests/golden/cases.yaml and configs/: they are
    the families and configs the committed goldens came from."""
    from make_golden import load_cases, sha256_bytes

    manifest = golden_manifest()
    families, cases = load_cases()
    assert families == {name: fam["args"] for name, fam in manifest["families"].items()}
    assert {c.name: c.family for c in cases} == {name: e["family"] for name, e in manifest["configs"].items()}
    for c in cases:
        assert sha256_bytes(c.yaml.encode()) == manifest["configs"][c.name]["config_sha256"], c.name
