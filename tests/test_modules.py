"""mergekit's `modules:` form on multimodal models (stand-ins of Gemma 3 and Qwen2.5-VL: text
decoder, vision tower, projector). Their tensors against mergekit's are in test_vs_mergekit
(the *_gemma3 and *_qwen2_5_vl goldens); here: the module tables, layer surgery in one module,
stand-ins that transformers loads, the same bytes on 2 ranks, resume, and every bad input in one
line before anything is written."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_bit_identical, load_output
from safetensors.torch import load_file, save_file
from toy_models import make_family

from bigmerge.cli import main
from bigmerge.errors import SourceError
from bigmerge.planning.modules import ARCHITECTURES, ModuleTable, module_tables, split_by_module

SLERP = """merge_method: slerp
base_model: {base}
parameters: {{t: 0.5}}
modules:
  text_decoder:
    slices:
      - sources: [{{model: {base}, layer_range: [0, 2]}}, {{model: {ft1}, layer_range: [0, 2]}}]
        parameters: {{t: [0.2, 0.8]}}
      - sources: [{{model: {base}, layer_range: [2, 4]}}, {{model: {ft2}, layer_range: [2, 4]}}]
  vision_tower:
    models: [{{model: {ft1}}}]
    parameters: {{t: [0.0, 1.0]}}
  multi_modal_projector:
    models: [{{model: {ft2}}}, {{model: {base}}}]
"""

PASSTHROUGH = """merge_method: passthrough
modules:
  text_decoder:
    slices:
      - sources: [{{model: {ft1}, layer_range: [0, 3]}}]
      - sources: [{{model: {ft2}, layer_range: [2, 4]}}]
  vision_tower:
    models: [{{model: {ft2}}}]
  multi_modal_projector:
    models: [{{model: {ft1}}}]
"""


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("gemma3"), preset="gemma3-micro", dtype="bfloat16", tied=True)


def _write(tmp: Path, text: str, fam: dict[str, Path], name: str = "c.yaml") -> Path:
    p = tmp / name
    p.write_text(text.format(**{k: str(v) for k, v in fam.items()}))
    return p


# Tensor names of each architecture's hub checkpoints (config.json `architectures[0]`), one or
# two per module, as mergekit 0.1.5's architecture files name them.
HUB_NAMES = {
    "Gemma3ForConditionalGeneration": {
        "text_decoder": [
            "language_model.model.embed_tokens.weight",
            "language_model.model.layers.3.mlp.up_proj.weight",
        ],
        "vision_tower": [
            "vision_tower.vision_model.embeddings.patch_embedding.weight",
            "vision_tower.vision_model.encoder.layers.26.self_attn.q_proj.bias",
        ],
        "multi_modal_projector": ["multi_modal_projector.mm_input_projection_weight"],
    },
    "Mistral3ForConditionalGeneration": {
        "text_decoder": ["language_model.model.layers.0.self_attn.q_proj.weight", "language_model.lm_head.weight"],
        "vision_tower": ["vision_tower.patch_conv.weight", "vision_tower.transformer.layers.5.attention.k_proj.weight"],
        "multi_modal_projector": ["multi_modal_projector.patch_merger.merging_layer.weight"],
    },
    "Llama4ForConditionalGeneration": {
        "text_decoder": [
            "language_model.model.layers.1.feed_forward.router.weight",
            "language_model.model.norm.weight",
        ],
        "vision_model": ["vision_model.class_embedding", "vision_model.model.layers.2.mlp.fc1.weight"],
        "multi_modal_projector": ["multi_modal_projector.linear_1.weight"],
    },
    "Qwen2VLForConditionalGeneration": {
        "text_decoder": ["model.embed_tokens.weight", "model.layers.7.self_attn.q_proj.bias", "lm_head.weight"],
        "vision_tower": ["visual.patch_embed.proj.weight", "visual.blocks.31.mlp.fc2.bias"],
        "multi_modal_projector": ["visual.merger.ln_q.weight", "visual.merger.mlp.2.bias"],
    },
    "Qwen2_5_VLForConditionalGeneration": {
        "text_decoder": ["model.norm.weight"],
        "vision_tower": ["visual.blocks.0.mlp.gate_proj.weight"],
        "multi_modal_projector": ["visual.merger.mlp.0.weight"],
    },
    "Qwen3VLForConditionalGeneration": {
        "text_decoder": ["model.language_model.layers.0.self_attn.q_norm.weight", "lm_head.weight"],
        "vision_tower": ["model.visual.pos_embed.weight", "model.visual.blocks.3.attn.qkv.weight"],
        "multi_modal_projector": [
            "model.visual.merger.linear_fc1.weight",
            "model.visual.deepstack_merger_list.2.norm.bias",
        ],
    },
}


@pytest.mark.parametrize("arch", sorted(HUB_NAMES))
def test_every_hub_tensor_name_falls_in_its_one_module(arch: str) -> None:
    table = module_tables(arch, list(ARCHITECTURES[arch]), "m")
    names = [n for ns in HUB_NAMES[arch].values() for n in ns]
    assert split_by_module(table, names, "m") == HUB_NAMES[arch]


def test_layers_and_layer_counts_per_module() -> None:
    qwen = ARCHITECTURES["Qwen2VLForConditionalGeneration"]
    assert qwen["vision_tower"].layer_of("visual.blocks.12.attn.qkv.weight") == 12
    assert qwen["text_decoder"].layer_of("visual.blocks.12.attn.qkv.weight") is None
    assert (
        qwen["text_decoder"].with_layer("model.layers.7.mlp.up_proj.weight", 2) == "model.layers.2.mlp.up_proj.weight"
    )
    assert qwen["vision_tower"].num_layers({"vision_config": {"depth": 32}}, []) == 32
    # Qwen2-VL's hub config.json: the text sizes at the top level (Qwen2.5-VL's: in text_config)
    text = qwen["text_decoder"]
    assert text.layers_key({"num_hidden_layers": 28}) == "num_hidden_layers"
    assert text.layers_key({"text_config": {"num_hidden_layers": 36}, "num_hidden_layers": 36}) == (
        "text_config.num_hidden_layers"
    )
    assert text.num_layers({}, ["model.layers.0.mlp.up_proj.weight", "model.layers.2.mlp.up_proj.weight"]) == 3
    # no config key (mergekit's fixed count of Qwen3-VL's deepstack mergers): from the names
    proj = ARCHITECTURES["Qwen3VLForConditionalGeneration"]["multi_modal_projector"]
    names = [f"model.visual.deepstack_merger_list.{i}.norm.weight" for i in range(3)]
    assert proj.num_layers({}, names) == 3


def test_a_tensor_in_no_module_or_in_two_is_one_line() -> None:
    table = {"a": ModuleTable(prefixes=("x.",)), "b": ModuleTable(prefixes=("x.y.",))}
    with pytest.raises(SourceError, match=r"m: tensor 'x\.y\.w' belongs to two modules \(a, b\)"):
        split_by_module(table, ["x.y.w"], "m")
    with pytest.raises(SourceError, match=r"m: tensor 'z\.w' belongs to no module of the architecture"):
        split_by_module(table, ["z.w"], "m")


def test_the_gemma3_stand_in_and_a_relayered_merge_of_it_load_in_transformers(
    gemma3: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Passthrough in slices within the text decoder: layers renumbered from each slice's
    sources, the embeddings from the first slice's and the final norm from the last's, config.json's text_config.num_hidden_layers = 5 (as mergekit writes it), the other
    modules copied from their one model; the stand-in and the result load in transformers with
    no missing or unexpected tensor."""
    from transformers import Gemma3ForConditionalGeneration

    out = tmp_path / "out"
    assert main(["merge", str(_write(tmp_path, PASSTHROUGH, gemma3)), str(out), "--quiet"]) == 0
    ours = load_output(out)
    ft1, ft2 = load_file(str(gemma3["ft1"] / "model.safetensors")), load_file(str(gemma3["ft2"] / "model.safetensors"))
    text = "language_model.model.layers"
    assert sorted({int(k.split(".")[3]) for k in ours if k.startswith(text)}) == [0, 1, 2, 3, 4]
    for k, v in ours.items():
        if k.startswith(text):
            i = int(k.split(".")[3])
            src, j = (ft1, i) if i < 3 else (ft2, i - 1)
            assert torch.equal(v, src[k.replace(f"layers.{i}.", f"layers.{j}.")]), k
        else:
            # the final norm comes after the layers: from the last slice's source, as in mergekit
            want = ft2 if k.startswith(("vision_tower.", "language_model.model.norm.")) else ft1
            assert torch.equal(v, want[k]), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 5 and cfg["vision_config"]["num_hidden_layers"] == 2
    for path in (gemma3["base"], out):
        model, info = Gemma3ForConditionalGeneration.from_pretrained(str(path), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        logits = model(input_ids=torch.tensor([[1, 40, 41, 42]])).logits
        assert logits.shape == (1, 4, 260) and torch.isfinite(logits).all()


def _sha(paths: list[Path]) -> dict[str, str]:
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for p in paths for f in sorted(p.iterdir())}


BAD = {
    "module the architecture lacks": (
        "merge_method: linear\nmodules:\n  text_decoder: {{models: [{{model: {ft1}}}]}}\n"
        "  vision_tower: {{models: [{{model: {ft1}}}]}}\n  multi_modal_projector: {{models: [{{model: {ft1}}}]}}\n"
        "  audio_tower: {{models: [{{model: {ft1}}}]}}\n",
        "modules.audio_tower: architecture Gemma3ForConditionalGeneration has no module 'audio_tower' "
        "(its modules: multi_modal_projector, text_decoder, vision_tower)",
    ),
    "module not given": (
        "merge_method: linear\nmodules:\n  text_decoder: {{models: [{{model: {ft1}}}, {{model: {ft2}}}]}}\n",
        "module(s) 'multi_modal_projector', 'vision_tower' not given",
    ),
    "module with no models": (
        "merge_method: linear\nmodules:\n  text_decoder: {{models: [{{model: {ft1}}}]}}\n  vision_tower: {{models: []}}\n",
        "modules.vision_tower names no models",
    ),
    "plain slices on several modules": (
        "merge_method: passthrough\nslices:\n  - sources: [{{model: {ft1}, layer_range: [0, 2]}}]\n",
        "architecture Gemma3ForConditionalGeneration has several modules",
    ),
    "plain form, base not used": (
        "merge_method: linear\nbase_model: {base}\nmodels: [{{model: {ft1}}}, {{model: {ft2}}}]\n",
        "merge_method 'linear' does not use base_model; list it under models or drop it",
    ),
    "base required in a module": (
        "merge_method: slerp\nparameters: {{t: 0.5}}\nmodules:\n  text_decoder: {{models: [{{model: {ft1}}}, {{model: {ft2}}}]}}\n"
        "  vision_tower: {{models: [{{model: {ft1}}}, {{model: {ft2}}}]}}\n"
        "  multi_modal_projector: {{models: [{{model: {ft1}}}, {{model: {ft2}}}]}}\n",
        "modules.text_decoder: merge_method 'slerp' needs a base_model",
    ),
    "layer range outside the module": (
        "merge_method: passthrough\nmodules:\n  text_decoder: {{models: [{{model: {ft1}}}]}}\n"
        "  vision_tower: {{slices: [{{sources: [{{model: {ft1}, layer_range: [0, 3]}}]}}]}}\n"
        "  multi_modal_projector: {{models: [{{model: {ft1}}}]}}\n",
        "modules.vision_tower.slices[0].sources[0]: layer_range [0, 3] is not a non-empty range inside",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_modules_configs_are_one_line_before_any_write(
    case: str, gemma3: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, needle = BAD[case]
    before = _sha(list(gemma3.values()))
    out = tmp_path / "out"
    code = main(["merge", str(_write(tmp_path, text, gemma3)), str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and err.startswith("bigmerge: error: "), err
    assert needle in err, err
    assert not out.exists()
    assert _sha(list(gemma3.values())) == before


def test_unknown_architecture_and_unowned_tensor_are_one_line(
    gemma3: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    llama = make_family(tmp_path / "llama", preset="micro", n_finetunes=1)
    modules = "merge_method: linear\nmodules:\n  text_decoder: {{models: [{{model: {ft1}}}]}}\n  vision_tower: {{models: [{{model: {base}}}]}}\n"
    code = main(["merge", str(_write(tmp_path, modules, llama)), str(tmp_path / "o1"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1, err
    assert (
        "does not know the modules of architecture 'LlamaForCausalLM' (it knows those of Gemma3ForConditionalGeneration"
        in err
    )
    assert not (tmp_path / "o1").exists()

    # a checkpoint with a tensor of no module (mergekit would drop it from the output)
    extra = tmp_path / "ft1x"
    shutil.copytree(gemma3["ft1"], extra)
    tensors = load_file(str(extra / "model.safetensors"))
    tensors["image_newline"] = torch.zeros(8, dtype=torch.bfloat16)
    save_file(tensors, str(extra / "model.safetensors"), metadata={"format": "pt"})
    cfg = PASSTHROUGH.replace("{ft1}", str(extra))
    code = main(["merge", str(_write(tmp_path, cfg, gemma3)), str(tmp_path / "o2"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1, err
    assert f"{extra}: tensor 'image_newline' belongs to no module of the architecture" in err
    assert not (tmp_path / "o2").exists()


def test_a_modules_own_merge_method_and_base_are_ignored_as_mergekit_ignores_them(
    gemma3: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """mergekit 0.1.5 drops a module's merge_method and base_model (one method and base merge
    every module): a published config carrying them gives the checkpoint it gave, with one
    warning per key."""
    plain = (
        "merge_method: linear\nparameters: {{weight: 0.5}}\nmodules:\n  text_decoder: {{models: [{{model: {ft1}}}, {{model: {ft2}}}]}}\n"
        "  vision_tower: {{models: [{{model: {ft1}}}, {{model: {ft2}}}]}}\n"
        "  multi_modal_projector: {{models: [{{model: {ft1}}}, {{model: {ft2}}}]}}\n"
    )
    extra = plain.replace("  vision_tower: {{", "  vision_tower: {{merge_method: slerp, base_model: {ft1}, ")
    assert extra != plain
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["merge", str(_write(tmp_path, plain, gemma3, "a.yaml")), str(a), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["merge", str(_write(tmp_path, extra, gemma3, "b.yaml")), str(b)]) == 0
    err = capsys.readouterr().err
    assert "modules.vision_tower.merge_method ('slerp') is ignored" in err, err
    assert "modules.vision_tower.base_model (" in err and "top-level base_model (None)" in err, err
    got, want = load_output(b), load_output(a)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.mpi
def test_modules_merge_same_bytes_on_1_and_2_ranks(gemma3: dict[str, Path], tmp_path: Path) -> None:
    from test_mpi import MPIRUN, mpi_env

    assert MPIRUN
    cfg = _write(tmp_path, SLERP, gemma3)
    outs = []
    for n in (1, 2):
        out = tmp_path / f"out{n}"
        cmd = [MPIRUN, "-n", str(n), "--oversubscribe", sys.executable, "-m", "bigmerge", "merge", str(cfg), str(out)]
        proc = subprocess.run(
            [*cmd, "--quiet", "--block-size", "256"], capture_output=True, text=True, env=mpi_env(), timeout=300
        )
        assert proc.returncode == 0, proc.stderr
        outs.append(out)
    assert_bit_identical(load_output(outs[0]), load_output(outs[1]))
    files = sorted(p.name for p in outs[0].glob("*.safetensors"))
    assert files and files == sorted(p.name for p in outs[1].glob("*.safetensors"))
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f
    assert json.loads((outs[1] / "config.json").read_text())["text_config"]["num_hidden_layers"] == 4


MULTI = """name: spherical
merge_method: slerp
base_model: {base}
models: [{{model: {base}}}, {{model: {ft1}}}]
parameters: {{t: 0.3}}
---
name: averaged
merge_method: linear
models: [{{model: {ft1}}}, {{model: {ft2}}}]
parameters: {{weight: 0.5}}
---
merge_method: passthrough
modules:
  text_decoder: {{models: [{{model: spherical}}]}}
  vision_tower: {{models: [{{model: averaged}}]}}
  multi_modal_projector: {{models: [{{model: averaged}}]}}
"""


def test_modules_with_different_methods_through_a_multi_document_config(
    gemma3: dict[str, Path], tmp_path: Path
) -> None:
    """The documented way to a method per module (mergekit 0.1.5 has one for all): merge once
    per method, then take each module from its merge with passthrough."""
    inter, out = tmp_path / "inter", tmp_path / "out"
    cfg = _write(tmp_path, MULTI, gemma3)
    assert main(["merge", str(cfg), str(out), "--quiet", "--intermediate-dir", str(inter)]) == 0
    final, spherical, averaged = load_output(out), load_output(inter / "spherical"), load_output(inter / "averaged")
    assert sorted(final) == sorted(spherical) == sorted(averaged)
    for k, v in final.items():
        want = spherical if k.startswith("language_model.") else averaged
        assert torch.equal(v, want[k]), k
    assert not torch.equal(
        spherical["multi_modal_projector.mm_input_projection_weight"],
        final["multi_modal_projector.mm_input_projection_weight"],
    )


def test_a_padded_vocabulary_sets_the_text_configs_vocab_size(gemma3: dict[str, Path], tmp_path: Path) -> None:
    """Gemma 3 keeps its vocabulary size in text_config (mergekit's vocab_size_config_key):
    the padded size goes there, where transformers reads it, not to a new top-level key."""
    text = "merge_method: linear\nparameters: {{weight: 0.5}}\nmodels: [{{model: {ft1}}}, {{model: {ft2}}}]\n"
    text += "tokenizer: {{source: union, pad_to_multiple_of: 64}}\n"
    out = tmp_path / "out"
    assert main(["merge", str(_write(tmp_path, text, gemma3)), str(out), "--quiet"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["vocab_size"] == 320 and "vocab_size" not in cfg
    assert load_output(out)["language_model.model.embed_tokens.weight"].shape == (320, 16)


def test_an_interrupted_modules_merge_resumes_to_the_same_bytes(gemma3: dict[str, Path], tmp_path: Path) -> None:
    """The zarr writer's journal (its shards) after half of them are lost: the rerun of the same
    modules config resumes the rest and ends bit-identical to an uninterrupted merge."""
    from bigmerge.engine.comm import SerialComm
    from bigmerge.merge import MergeOptions, run_merge
    from bigmerge.output.outdir import MANIFEST_NAME

    cfg = _write(tmp_path, SLERP, gemma3)
    opts = MergeOptions(block_bytes=256, quiet=True, keep_store=True, writer="zarr")
    run_merge(str(cfg), str(tmp_path / "ref"), SerialComm(), MergeOptions(block_bytes=256, quiet=True))
    out = tmp_path / "res"
    first = run_merge(str(cfg), str(out), SerialComm(), opts)
    entries = sorted(p for p in (out / ".bigmerge-store.zarr").glob("t*/c/**/*") if p.is_file())
    for e in entries[::2]:
        e.unlink()
    (out / MANIFEST_NAME).unlink()
    (out / "model.safetensors.index.json").unlink()
    second = run_merge(str(cfg), str(out), SerialComm(), opts)
    assert second["blocks_resumed"] == len(entries) - len(entries[::2])
    assert second["blocks_computed"] == len(entries[::2]) < first["blocks_computed"]
    assert_bit_identical(load_output(tmp_path / "ref"), load_output(out))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("qwen"), preset="qwen2.5-vl-micro", dtype="bfloat16", tied=True)


def test_the_qwen2_5_vl_stand_in_loads_in_transformers(qwen: dict[str, Path]) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(qwen["ft1"]), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 40, 41]])).logits).all()


def test_a_gradient_on_tensors_mergekit_plans_twice_is_merged_at_t0_with_a_warning(qwen: dict[str, Path]) -> None:
    """Qwen2.5-VL's merger MLP: mergekit plans each tensor at t = 0 and at t = 1 and keeps
    either (it varies from tensor to tensor); bigmerge takes t = 0 and says so once."""
    import yaml

    from bigmerge.merge import MergeOptions, plan_merge
    from bigmerge.planning.config import parse_config

    text = (
        "merge_method: slerp\nbase_model: {base}\nparameters: {{t: 0.5}}\nmodules:\n"
        "  text_decoder: {{models: [{{model: {ft1}}}]}}\n  vision_tower: {{models: [{{model: {ft1}}}]}}\n"
        "  multi_modal_projector: {{models: [{{model: {ft2}}}], parameters: {{t: [0.2, 0.7]}}}}\n"
    ).format(**{k: str(v) for k, v in qwen.items()})
    plan, _ = plan_merge(parse_config(yaml.safe_load(text), "c.yaml"), 1, MergeOptions(block_bytes=256))
    t = {tp.name: tp.shared["t"] for tp in plan.tensors if tp.name.startswith("visual.merger.")}
    assert t == dict.fromkeys(t, 0.2) and len(t) == 5
    said = [w for w in plan.warnings if "plans twice" in w]
    assert len(said) == 1 and said[0].startswith("modules.multi_modal_projector: a gradient reaches 4 tensor(s)")
    # no gradient there: nothing to say
    plan, _ = plan_merge(
        parse_config(yaml.safe_load(text.replace("[0.2, 0.7]", "0.7")), "c.yaml"), 1, MergeOptions(block_bytes=256)
    )
    assert not [w for w in plan.warnings if "plans twice" in w]
