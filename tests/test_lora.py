"""LoRA adapters as sources (`BASE+ADAPTER`, PEFT adapter directories), against PEFT itself.

The reference: checkpoints into which PEFT's own `merge_and_unload` folded each adapter, merged
by bigmerge as plain sources. bigmerge builds W + scale * B @ A per block, for the block's rows
only, in PEFT's order and dtypes (the product and the scale in float32, then `W += delta`, one
rounding to bf16), so the results are bit-identical, on 1 and 2 ranks, local and on S3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_bit_identical, bigmerge, load_output
from safetensors.torch import save_file
from test_mpi import mpirun
from test_s3 import s3_env  # noqa: F401 - the moto server fixture
from toy_models import make_family

from bigmerge.errors import ConfigError, SourceError
from bigmerge.planning.catalog import catalog_model

# PEFT and transformers build the adapters and the folded references (~30 s once per module)
slow = pytest.mark.slow

BLOCK = "2K"  # several blocks per matrix: each block's rows of B @ A are computed on their own


def _peft_adapter(base: Path, out: Path, seed: int, **lora: object) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))  # type: ignore[arg-type]
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(0.05)  # an update of a fine-tune's size, not of the weights' own
            if "modules_to_save" in name:
                p.add_(0.01 * torch.randn_like(p))  # a saved module that differs from the base's
    peft_model.save_pretrained(str(out))


def _folded(base: Path, adapter: Path, out: Path) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(out))


@pytest.fixture(scope="module")
def lora_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    fam = make_family(root / "fam", preset="tiny", dtype="bfloat16", n_finetunes=1)
    base = fam["base"]
    paths = {"base": base, "ft1": fam["ft1"], "ad1": root / "ad1", "ad2": root / "ad2"}
    # ad1: linear and embedding LoRA, a module saved whole (lm_head)
    _peft_adapter(
        base,
        paths["ad1"],
        1,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
    )
    # ad2: rsLoRA, with a rank and an alpha per module (rank_pattern, alpha_pattern)
    _peft_adapter(
        base,
        paths["ad2"],
        2,
        r=8,
        lora_alpha=16,
        target_modules=["k_proj", "o_proj", "up_proj"],
        rank_pattern={"layers.1.mlp.up_proj": 2},
        alpha_pattern={"o_proj": 3},
        use_rslora=True,
    )
    for k in ("ad1", "ad2"):
        fold = paths[f"fold{k[-1]}"] = root / f"fold{k[-1]}"
        _folded(base, paths[k], fold)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (base / f).exists():
                (fold / f).write_bytes((base / f).read_bytes())  # as the base's (tokenizer_source reads them)
    # a fine-tune of the same base with tokens of its own: embeddings permuted onto a union vocabulary
    paths["ft_tok"] = make_family(
        root / "fam_tok", preset="tiny", dtype="bfloat16", n_finetunes=1, extra_tokens={"ft1": ["<|a|>", "<|b|>"]}
    )["ft1"]
    return paths


CONFIGS = {
    "linear": "merge_method: linear\nmodels:\n  - model: {m1}\n    parameters: {{weight: 0.5}}\n"
    "  - model: {m2}\n    parameters: {{weight: 0.3}}\n  - model: {ft1}\n    parameters: {{weight: 0.2}}\n",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {m1}\n    parameters: {{weight: 0.7, density: 0.5}}\n"
    "  - model: {m2}\n    parameters: {{weight: 0.5, density: 0.4}}\ndtype: float32\nout_dtype: bfloat16\n",
    # the adapted model is the base here: base_model names it too
    "slerp": "merge_method: slerp\nbase_model: {m1}\nmodels:\n  - model: {m1}\n  - model: {ft1}\n"
    "parameters: {{t: [0.2, 0.7]}}\n",
    # embedding LoRA on rows that the union vocabulary moves (the reader's vocabulary path)
    "union": "merge_method: linear\ntokenizer_source: union\nbase_model: {m1}\nmodels:\n  - model: {m1}\n"
    "    parameters: {{weight: 0.6}}\n  - model: {ft_tok}\n    parameters: {{weight: 0.4}}\n",
    "slices": "merge_method: passthrough\nslices:\n  - sources:\n      - model: {m1}\n        layer_range: [0, 2]\n"
    "  - sources:\n      - model: {m2}\n        layer_range: [1, 4]\n",
}


def _configs(tmp: Path, method: str, paths: dict[str, Path], base: str = "") -> tuple[Path, Path]:
    """(config with BASE+ADAPTER sources, config with the folded checkpoints)."""
    base = base or str(paths["base"])
    lora = CONFIGS[method].format(
        m1=f"{base}+{paths['ad1']}", m2=f"{base}+{paths['ad2']}", base=base, ft1=paths["ft1"], ft_tok=paths["ft_tok"]
    )
    folded = CONFIGS[method].format(
        m1=paths["fold1"], m2=paths["fold2"], base=paths["base"], ft1=paths["ft1"], ft_tok=paths["ft_tok"]
    )
    (tmp / "lora.yaml").write_text(lora)
    (tmp / "folded.yaml").write_text(folded)
    return tmp / "lora.yaml", tmp / "folded.yaml"


@slow
@pytest.mark.parametrize("method", ["linear", "ties", "slerp", "slices", "union"])
def test_adapter_source_equals_peft_merge_and_unload(lora_models: dict[str, Path], tmp_path: Path, method: str) -> None:
    c_lora, c_folded = _configs(tmp_path, method, lora_models)
    bigmerge("merge", str(c_folded), str(tmp_path / "ref"), "--block-size", BLOCK, "--quiet", check=True)
    bigmerge("merge", str(c_lora), str(tmp_path / "got"), "--block-size", BLOCK, "--quiet", check=True)
    ref, got = load_output(tmp_path / "ref"), load_output(tmp_path / "got")
    assert_bit_identical(ref, got)
    base = load_output(lora_models["base"])
    # the adapters did change what they target, and left the rest alone
    if method == "linear":
        assert not torch.equal(
            got["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
        )
    if method == "union":
        assert got["model.embed_tokens.weight"].shape[0] == base["model.embed_tokens.weight"].shape[0] + 2
    if method == "slices":
        assert torch.equal(got["model.layers.0.mlp.gate_proj.weight"], base["model.layers.0.mlp.gate_proj.weight"])
        assert not torch.equal(
            got["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
        )


@slow
def test_adapter_files_are_pinned_and_recorded(lora_models: dict[str, Path], tmp_path: Path) -> None:
    from bigmerge.merge import MergeOptions, plan_merge
    from bigmerge.planning.config import load_config

    c_lora, c_folded = _configs(tmp_path, "linear", lora_models)
    p_lora, _ = plan_merge(load_config(str(c_lora)), 1, MergeOptions())
    p_fold, _ = plan_merge(load_config(str(c_folded)), 1, MergeOptions())
    # ad1: q, v, down in 4 layers and the embedding; ad2: k, o, up in 4 layers
    assert sum(1 for t in p_lora.tensors for s in t.sources if s.lora) == 13 + 12
    assert p_lora.peak_memory_estimate() > p_fold.peak_memory_estimate()  # the factors and the delta count
    assert '"lora"' not in p_fold.to_json()  # a plan without adapters is the plan it always was
    bigmerge("merge", str(c_lora), str(tmp_path / "out"), "--quiet", "--verify-sources", "hash", check=True)
    manifest = json.loads((tmp_path / "out" / "bigmerge-manifest.json").read_text())
    pinned = " ".join(manifest["source_files"])
    for ad in ("ad1", "ad2"):
        assert f"{ad}/adapter_model.safetensors" in pinned
        assert f"{ad}/adapter_config.json" in pinned
    assert any("adapter:adapter_model.safetensors" in h for h in manifest["sources"].values())
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- base+ad1" in card and str(lora_models["ad1"]) not in card  # each part by its last component
    # an adapter that changes is another merge: the rerun without --overwrite is refused
    cfg = json.loads((lora_models["ad1"] / "adapter_config.json").read_text())
    changed = tmp_path / "ad1b"
    changed.mkdir()
    (changed / "adapter_model.safetensors").write_bytes((lora_models["ad1"] / "adapter_model.safetensors").read_bytes())
    (changed / "adapter_config.json").write_text(json.dumps(dict(cfg, lora_alpha=4)))
    a = catalog_model(f"{lora_models['base']}+{lora_models['ad1']}")
    b = catalog_model(f"{lora_models['base']}+{changed}")
    assert a.header_sha256 != b.header_sha256  # the plan's fingerprint covers the adapter's config
    q = "model.layers.0.self_attn.q_proj.weight"
    assert a.lora[q]["scale"] == 2.0 and b.lora[q]["scale"] == 1.0


@slow
def test_bare_peft_directory_names_its_base(lora_models: dict[str, Path], tmp_path: Path) -> None:
    ad = tmp_path / "bare"
    ad.mkdir()
    cfg = json.loads((lora_models["ad1"] / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps(dict(cfg, base_model_name_or_path=str(lora_models["base"]))))
    (ad / "adapter_model.safetensors").write_bytes((lora_models["ad1"] / "adapter_model.safetensors").read_bytes())
    cat = catalog_model(str(ad))
    ref = catalog_model(f"{lora_models['base']}+{lora_models['ad1']}")
    assert cat.root.url == ref.root.url and set(cat.lora) == set(ref.lora)
    assert "model.embed_tokens.weight" in cat.lora and cat.lora["model.embed_tokens.weight"]["embedding"]
    # rank_pattern and alpha_pattern, with rsLoRA: alpha / sqrt(r) per module
    two = catalog_model(f"{lora_models['base']}+{lora_models['ad2']}")
    assert two.lora["model.layers.1.mlp.up_proj.weight"]["scale"] == pytest.approx(16 / 2**0.5)
    assert two.lora["model.layers.0.self_attn.o_proj.weight"]["scale"] == pytest.approx(3 / 8**0.5)
    assert two.lora["model.layers.0.self_attn.k_proj.weight"]["scale"] == pytest.approx(16 / 8**0.5)


@slow
@pytest.mark.mpi
@pytest.mark.parametrize("method", ["linear", "ties", "slerp"])
def test_adapter_sources_on_two_ranks(lora_models: dict[str, Path], tmp_path: Path, method: str) -> None:
    c_lora, c_folded = _configs(tmp_path, method, lora_models)
    bigmerge("merge", str(c_folded), str(tmp_path / "ref"), "--block-size", BLOCK, "--quiet", check=True)
    proc = mpirun(2, "merge", str(c_lora), str(tmp_path / "got"), "--block-size", BLOCK, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert_bit_identical(load_output(tmp_path / "ref"), load_output(tmp_path / "got"))


@slow
@pytest.mark.s3
@pytest.mark.mpi
def test_adapter_sources_on_s3(
    s3_env: dict[str, str],  # noqa: F811
    lora_models: dict[str, Path],
    tmp_path: Path,
) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_env["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    fs.mkdir("lora-bkt")
    remote = dict(lora_models)
    for k in ("base", "ad1", "ad2"):
        fs.put(str(lora_models[k]), f"lora-bkt/{k}", recursive=True)
        remote[k] = f"s3://lora-bkt/{k}"  # type: ignore[assignment]
    c_lora, c_folded = _configs(tmp_path, "ties", remote, base="s3://lora-bkt/base")  # type: ignore[arg-type]
    bigmerge("merge", str(c_folded), str(tmp_path / "ref"), "--block-size", BLOCK, "--quiet", check=True)
    proc = mpirun(2, "merge", str(c_lora), str(tmp_path / "got"), "--block-size", BLOCK, "--quiet", env=s3_env)
    assert proc.returncode == 0, proc.stderr
    assert_bit_identical(load_output(tmp_path / "ref"), load_output(tmp_path / "got"))


# -- bad adapters: one clear line naming the file and what was expected ------------------------------


def _adapter(path: Path, tensors: dict[str, torch.Tensor], **cfg: object) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    conf = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    conf.update(cfg)
    (path / "adapter_config.json").write_text(json.dumps(conf))
    if tensors:
        save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_family(tmp_path_factory.mktemp("base"), preset="tiny", n_finetunes=0)["base"]


@pytest.mark.parametrize(
    "case,expected",
    [
        (
            "rank",
            r"adapter_model.safetensors: rank mismatch in 'model.layers.0.self_attn.q_proj': lora_A has 4 rows, lora_B has 3",
        ),
        (
            "config_rank",
            r"rank mismatch in 'model.layers.0.self_attn.q_proj': .*adapter_config.json gives r=2 \(rank_pattern 'q_proj'\), lora_A has rank 4",
        ),
        (
            "shape",
            r"adapter_model.safetensors: 'model.layers.0.self_attn.q_proj''s adapter makes a \[64, 32\] update, but .* has shape \[64, 64\]",
        ),
        ("no_config", r"adapter_config.json: not found; a LoRA adapter is a PEFT directory"),
        ("no_weights", r"adapter_model.safetensors: not found; only adapter_model.bin \(pickle\)"),
        (
            "target",
            r"target module 'model.layers.9.self_attn.q_proj' has no tensor 'model.layers.9.self_attn.q_proj.weight' in the base model",
        ),
        ("type", r"adapter_config.json: peft_type 'IA3' is not supported; only LoRA adapters"),
        ("dora", r"adapter_config.json: use_dora is set; not supported \(DoRA"),
        ("half", r"module 'model.layers.0.self_attn.q_proj' has lora_A but no lora_B"),
        ("saved", r"tensor 'base_model.model.lm_head.weight' has shape \[10, 64\], expected \[260, 64\]"),
    ],
)
def test_bad_adapter_is_one_clear_error(tiny_base: Path, tmp_path: Path, case: str, expected: str) -> None:
    a4, b4 = torch.zeros(4, 64), torch.zeros(64, 4)
    ad = tmp_path / "ad"
    if case == "rank":
        _adapter(ad, {f"{Q}.lora_A.weight": a4, f"{Q}.lora_B.weight": torch.zeros(64, 3)})
    elif case == "config_rank":
        _adapter(ad, {f"{Q}.lora_A.weight": a4, f"{Q}.lora_B.weight": b4}, rank_pattern={"q_proj": 2})
    elif case == "shape":
        _adapter(ad, {f"{Q}.lora_A.weight": torch.zeros(4, 32), f"{Q}.lora_B.weight": b4})
    elif case == "no_config":
        ad.mkdir()
        save_file({f"{Q}.lora_A.weight": a4, f"{Q}.lora_B.weight": b4}, str(ad / "adapter_model.safetensors"))
    elif case == "no_weights":
        _adapter(ad, {})
        (ad / "adapter_model.bin").write_bytes(b"\x80\x04")
    elif case == "target":
        q9 = Q.replace("layers.0", "layers.9")
        _adapter(ad, {f"{q9}.lora_A.weight": a4, f"{q9}.lora_B.weight": b4})
    elif case == "type":
        _adapter(ad, {f"{Q}.lora_A.weight": a4, f"{Q}.lora_B.weight": b4}, peft_type="IA3")
    elif case == "dora":
        _adapter(ad, {f"{Q}.lora_A.weight": a4, f"{Q}.lora_B.weight": b4}, use_dora=True)
    elif case == "half":
        _adapter(ad, {f"{Q}.lora_A.weight": a4})
    elif case == "saved":
        _adapter(ad, {"base_model.model.lm_head.weight": torch.zeros(10, 64)})
    with pytest.raises(SourceError, match=expected) as info:
        catalog_model(f"{tiny_base}+{ad}")
    assert "\n" not in str(info.value)


def test_bad_adapter_at_the_command_line(tiny_base: Path, tmp_path: Path) -> None:
    ad = _adapter(tmp_path / "ad", {f"{Q}.lora_A.weight": torch.zeros(4, 64), f"{Q}.lora_B.weight": torch.zeros(64, 3)})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {tiny_base}+{ad}\n  - model: {tiny_base}\n")
    proc = bigmerge("merge", str(cfg), str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bigmerge: error: {ad}/adapter_model.safetensors: rank mismatch")
    assert not (tmp_path / "out" / "bigmerge-manifest.json").exists()
    with pytest.raises(ConfigError, match="BASE\\+ADAPTER"):
        catalog_model(f"{tiny_base}+{ad}+{ad}")


def test_out_inside_the_base_of_a_bare_adapter_is_refused(tiny_base: Path, tmp_path: Path) -> None:
    q = torch.zeros(4, 64)
    ads = [
        _adapter(
            tmp_path / f"ad{k}",
            {f"{Q}.lora_A.weight": q, f"{Q}.lora_B.weight": q.T.contiguous()},
            base_model_name_or_path=str(tiny_base),
        )
        for k in (1, 2)
    ]
    cfg = tmp_path / "c.yaml"
    # the base is named nowhere in the config, only in the adapters' adapter_config.json
    cfg.write_text(
        f"merge_method: linear\nmodels:\n  - model: {ads[0]}\n  - model: {ads[1]}\nparameters: {{weight: 0.5}}\n"
    )
    before = sorted(p.name for p in tiny_base.iterdir())
    proc = bigmerge("merge", str(cfg), str(tiny_base / "merged"))
    assert proc.returncode != 0
    assert (
        proc.stderr.strip().splitlines()[-1].startswith(f"bigmerge: error: OUT {tiny_base / 'merged'} lies inside")
    ), proc.stderr
    assert sorted(p.name for p in tiny_base.iterdir()) == before
