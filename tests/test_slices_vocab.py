"""Layer surgery (slices, passthrough) and vocabularies that differ (tokenizer_source, tokenizer:).

The tensors themselves are compared with mergekit in test_vs_mergekit (passthrough_*,
*_slices_*, union_*, tokenizer_base_*); here: that the outputs are usable models, that the
config says what the tensors are, that bad slices fail clearly, and world-size invariance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_bit_identical, bigmerge, load_output
from test_mpi import mpirun
from toy_models import make_family

from bigmerge.engine.comm import SerialComm
from bigmerge.merge import MergeOptions, run_merge

EXTRA = {"ft1": ["<|a|>", "<|b|>"], "ft2": ["<|a|>"]}


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("fam"), preset="tiny", n_finetunes=2)


@pytest.fixture(scope="module")
def vocab_fam(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("vfam"), preset="tiny", n_finetunes=2, extra_tokens=EXTRA)


def _merge(tmp_path: Path, text: str, paths: dict[str, Path], **opts: object) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text.format(**{k: str(v) for k, v in paths.items()}))
    out = tmp_path / "out"
    run_merge(str(cfg), str(out), SerialComm(), MergeOptions(quiet=True, **opts))  # type: ignore[arg-type]
    return out


FRANKEN = """\
merge_method: passthrough
slices:
  - sources:
      - model: {ft1}
        layer_range: [0, 2]
  - sources:
      - model: {base}
        layer_range: [1, 4]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
            - value: 1.0
"""


def test_frankenmerge_is_a_model_with_the_stacked_layers(fam: dict[str, Path], tmp_path: Path) -> None:
    import transformers

    out = _merge(tmp_path, FRANKEN, fam, block_bytes=1024)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 5
    merged = load_output(out)
    base, ft1 = load_output(fam["base"]), load_output(fam["ft1"])
    assert sorted(merged) == sorted(
        [n for n in base if ".layers." not in n]
        + [n.replace(".layers.0.", f".layers.{k}.") for k in range(5) for n in base if ".layers.0." in n]
    )
    # output layer 1 is ft1's layer 1; output layer 3 is the base's layer 2, o_proj halved
    assert torch.equal(merged["model.layers.1.mlp.up_proj.weight"], ft1["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(merged["model.layers.3.mlp.up_proj.weight"], base["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(
        merged["model.layers.3.self_attn.o_proj.weight"], base["model.layers.2.self_attn.o_proj.weight"] * 0.5
    )
    # embeddings from the first slice's model, final norm and head from the last slice's
    assert torch.equal(merged["model.embed_tokens.weight"], ft1["model.embed_tokens.weight"])
    assert torch.equal(merged["lm_head.weight"], base["lm_head.weight"])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert len(model.model.layers) == 5
    logits = model(torch.tensor([[1, 70, 71]])).logits
    assert logits.shape == (1, 3, 260) and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "merge_method: passthrough\nslices:\n  - sources:\n      - model: {ft1}\n        layer_range: [2, 9]\n",
            "slices[0].sources[0]: layer_range [2, 9] is not a non-empty range inside",
        ),
        (
            "merge_method: linear\nslices:\n  - sources:\n      - model: {ft1}\n        layer_range: [0, 2]\n"
            "      - model: {ft2}\n        layer_range: [0, 3]\nparameters: {{weight: 1.0}}\n",
            "slices[0]: every source must span the same number of layers, got [2, 3]",
        ),
        (
            "merge_method: passthrough\nslices:\n  - sources:\n      - model: {ft1}\n        layer_range: [0, 2]\n"
            "      - model: {ft2}\n        layer_range: [0, 2]\n",
            "merge_method 'passthrough' takes exactly one source per tensor, got 2",
        ),
        (
            "merge_method: ties\nbase_model: {base}\nslices:\n  - sources:\n      - model: {ft1}\n        layer_range: [0, 4]\n"
            "      - model: {ft2}\n        layer_range: [0, 4]\nparameters: {{weight: 1.0, density: 0.5}}\n",
            "slices[0]: merge_method 'ties' needs its base model among the slice's sources",
        ),
    ],
)
def test_bad_slices_fail_before_any_write(fam: dict[str, Path], tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text.format(**{k: str(v) for k, v in fam.items()}))
    proc = bigmerge("merge", str(cfg), str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


UNION = """\
merge_method: linear
tokenizer_source: union
models:
  - model: {base}
    parameters: {{weight: 0.2}}
  - model: {ft1}
    parameters: {{weight: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.3}}
"""


@pytest.mark.slow  # the heaviest property tests: CI runs them, --fast does not
def test_union_tokenizer_and_embedding_rows(vocab_fam: dict[str, Path], tmp_path: Path) -> None:
    import transformers

    out = _merge(tmp_path, UNION, vocab_fam, block_bytes=600)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 262 and tok.convert_tokens_to_ids(["<|a|>", "<|b|>"]) == [260, 261]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 262
    merged = load_output(out)
    src = {k: load_output(p) for k, p in vocab_fam.items()}
    emb = "model.embed_tokens.weight"
    assert merged[emb].shape == (262, 64)
    # <|b|> only in ft1: every model gets ft1's row, so the weighted mean is that row
    torch.testing.assert_close(merged[emb][261], src["ft1"][emb][261], rtol=1e-6, atol=1e-7)
    # <|a|> in ft1 and ft2 (260 in both): the base gets their mean
    filled = (src["ft1"][emb][260] + src["ft2"][emb][260]) / 2
    want = 0.2 * filled + 0.5 * src["ft1"][emb][260] + 0.3 * src["ft2"][emb][260]
    torch.testing.assert_close(merged[emb][260], want, rtol=1e-5, atol=1e-7)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    ids = tok("x<|b|>y", return_tensors="pt").input_ids
    assert 261 in ids[0].tolist()
    assert model(ids).logits.shape[-1] == 262


# mergekit's `tokenizer:` block: the union plus an added token, rows chosen per token, padding
TOKENS = """\
merge_method: linear
tokenizer:
  source: union
  tokens:
    <|c|>:
      source:
        kind: zero
    <|b|>:
      source:
        kind: model_token
        model: {ft1}
        token: </s>
      force: true
  pad_to_multiple_of: 16
models:
  - model: {base}
    parameters:
      weight: 0.25
  - model: {ft1}
    parameters:
      weight: 0.75
"""


def test_tokenizer_block_adds_tokens_and_pads(vocab_fam: dict[str, Path], tmp_path: Path) -> None:
    import transformers

    out = _merge(tmp_path, TOKENS, vocab_fam, block_bytes=600)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids(["<|a|>", "<|b|>", "<|c|>"]) == [260, 261, 262]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 272  # 263 padded to a multiple of 16
    merged = load_output(out)
    src = {k: load_output(p) for k, p in vocab_fam.items()}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        m = merged[name]
        assert m.shape == (272, 64)
        assert torch.equal(m[262], torch.zeros(64))  # <|c|>: no model has it, a zero row
        # <|b|> forced for every model to ft1's row of </s> (id 2), so the weighted sum is that row
        torch.testing.assert_close(m[261], src["ft1"][name][2], rtol=1e-6, atol=1e-7)
        # padding: each model's mean row over the 263 permuted rows, then merged
        assert torch.equal(m[263], m[271])
        assert not torch.equal(m[263], torch.zeros(64))


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        ("tokenizer_source: base\ntokenizer:\n  source: base\n", "give either 'tokenizer_source' or 'tokenizer'"),
        ("tokenizer:\n  pad_to_multiple_of: 0\n", "tokenizer.pad_to_multiple_of"),
        (
            "tokenizer:\n  tokens:\n    <|z|>:\n      source:\n        kind: model_token\n        model: {ft1}\n"
            "        token: <|nope|>\n",
            "token '<|nope|>' not found in",
        ),
        (
            "tokenizer:\n  tokens:\n    <|z|>:\n      source: {ft2}\n",
            "takes its row from",
        ),
        ("tokenizer:\n  tokens:\n    <|z|>:\n      force: true\n", "no source is given for its row"),
        ("tokenizer:\n  source: union\n  colour: red\n", "unknown key 'tokenizer.colour'"),
    ],
)
def test_bad_tokenizer_block_fails_before_any_write(
    vocab_fam: dict[str, Path], tmp_path: Path, tail: str, message: str
) -> None:
    cfg = tmp_path / "c.yaml"
    text = "merge_method: linear\nmodels:\n  - model: {base}\n  - model: {ft1}\nparameters:\n  weight: 0.5\n" + tail
    cfg.write_text(text.format(**{k: str(v) for k, v in vocab_fam.items()}))
    proc = bigmerge("merge", str(cfg), str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.mpi
def test_union_and_slices_same_bytes_on_1_and_2_ranks(vocab_fam: dict[str, Path], tmp_path: Path) -> None:
    texts = {  # slices and a union vocabulary in one config: two launches per world size cost seconds
        "slices": "merge_method: linear\ntokenizer_source: union\nslices:\n  - sources:\n"
        "      - model: {ft1}\n        layer_range: [0, 3]\n        parameters: {{weight: 0.7}}\n"
        "      - model: {ft2}\n        layer_range: [1, 4]\n        parameters: {{weight: [0.1, 0.9]}}\n"
        "  - sources:\n      - model: {base}\n        layer_range: [3, 4]\n        parameters: {{weight: 1.0}}\n"
        "      - model: {ft1}\n        layer_range: [0, 1]\n        parameters: {{weight: 0.5}}\n",
        "padded": TOKENS,  # added tokens and padding rows (each source's mean row; one rank owns the tensor)
    }
    for name, text in texts.items():
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(text.format(**{k: str(v) for k, v in vocab_fam.items()}))
        outs = []
        for n in (1, 2):
            out = tmp_path / f"{name}{n}"
            proc = mpirun(n, "merge", str(cfg), str(out), "--block-size", "4096", "--quiet")
            assert proc.returncode == 0, proc.stderr
            outs.append(load_output(out))
        assert_bit_identical(outs[0], outs[1])
        assert outs[0]["model.embed_tokens.weight"].shape[0] == (272 if name == "padded" else 262)
