"""mergekit-yaml's command line on `bigmerge merge`: its scripts run unchanged (docs/mergekit-cli.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_bit_identical, bigmerge, load_output
from toy_models import make_family

from bigmerge.cli import MERGEKIT_IGNORED, build_parser, mergekit_options

# mergekit 0.1.5's MergeOptions fields (mergekit/options.py), each a --flag (bools also --no-flag)
MERGEKIT_BOOLS = [
    "allow-crimes",
    "unsafe-truncate-embeddings",
    "cuda",
    "low-cpu-memory",
    "copy-tokenizer",
    "clone-tensors",
    "trust-remote-code",
    "lazy-unpickle",
    "write-model-card",
    "safe-serialization",
    "quiet",
    "read-to-gpu",
    "multi-gpu",
    "async-write",
]
MERGEKIT_VALUES = {
    "transformers-cache": "/tmp/hf",
    "lora-merge-cache": "/tmp/lora",
    "lora-merge-dtype": "bfloat16",
    "device": "cpu",
    "out-shard-size": "5B",
    "random-seed": "3",
    "num-threads": "2",
    "write-threads": "2",
}

CONFIG = "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.6, density: 0.5}}\n  - model: {ft2}\n    parameters: {{weight: 0.4, density: 0.5}}\ndtype: float32\n"


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("mk") / "fam", preset="tiny", n_finetunes=2)


def _parse(*argv: str) -> tuple[object, list[str]]:
    args = build_parser().parse_args(["merge", "c.yml", "out", *argv])
    return args, mergekit_options(args)


def test_every_mergekit_option_is_accepted() -> None:
    for name in MERGEKIT_BOOLS:
        for form in (f"--{name}", f"--no-{name}"):
            if form in ("--no-quiet",):
                continue  # mergekit's --quiet has a --no- form; bigmerge's is a plain flag (the default)
            _parse(form)
    for name, value in MERGEKIT_VALUES.items():
        _parse(f"--{name}", value)
    _parse("--gpu-rich")
    _parse("-v", "-v")
    _parse("-j", "2")


def test_options_map_onto_bigmerge_settings() -> None:
    args, notes = _parse("--no-cuda", "--random-seed", "7", "--out-shard-size", "20K")
    assert args.device == "cpu" and args.seed == 7 and args.out_shard_size == 20_000  # type: ignore[attr-defined]
    assert notes == []
    args, notes = _parse("--cuda")
    assert args.device == "auto"  # type: ignore[attr-defined]
    if not torch.cuda.is_available():
        assert notes == ["--cuda: no CUDA GPU is visible here; computing on the CPU (the same tensors)"]
    args, notes = _parse("--allow-crimes", "--lazy-unpickle", "-v", "--lora-merge-cache", "/tmp/x")
    assert [n.split(" means")[0] for n in notes] == [
        "mergekit option --allow-crimes",
        "mergekit option --lora-merge-cache",
        "mergekit option --lazy-unpickle",
        "mergekit option -v",
    ]
    assert all(n.endswith("; ignored") and "\n" not in n for n in notes)
    assert len(MERGEKIT_IGNORED) == 16
    _, notes = _parse("--no-allow-crimes", "--no-trust-remote-code", "--safe-serialization")
    assert notes == []  # asking for what bigmerge does anyway says nothing
    _, notes = _parse("--no-safe-serialization")
    assert notes == [
        "mergekit option --no-safe-serialization means nothing here (the output is always safetensors); ignored"
    ]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--no-cuda", "--device", "cuda"], "--no-cuda and --device cuda disagree"),
        (["--seed", "1", "--random-seed", "2"], "--seed 1 and --random-seed 2 disagree"),
        (["--shard-size", "1G", "--out-shard-size", "5B"], "--shard-size (bytes) and --out-shard-size (parameters)"),
    ],
)
def test_contradictions_are_one_clear_error(argv: list[str], message: str) -> None:
    from bigmerge.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _parse(*argv)


def test_mergekit_command_line_runs_unchanged(toy: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "config.yml"
    cfg.write_text(CONFIG.format(**{k: str(v) for k, v in toy.items()}))
    bigmerge("merge", str(cfg), str(tmp_path / "plain"), "--quiet", check=True)
    proc = bigmerge(
        "merge",
        str(cfg),
        str(tmp_path / "out"),
        "--cuda",
        "--copy-tokenizer",
        "--out-shard-size",
        "5B",
        "--allow-crimes",
        "--lazy-unpickle",
        "--trust-remote-code",
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    notes = [ln for ln in proc.stderr.splitlines() if "mergekit option" in ln or ln.startswith("bigmerge: --cuda")]
    assert [n.split(" means")[0] for n in notes if "mergekit option" in n] == [
        "bigmerge: mergekit option --allow-crimes",
        "bigmerge: mergekit option --trust-remote-code",
        "bigmerge: mergekit option --lazy-unpickle",
    ]
    if not torch.cuda.is_available():
        assert "bigmerge: --cuda: no CUDA GPU is visible here; computing on the CPU (the same tensors)" in notes
    assert_bit_identical(load_output(tmp_path / "plain"), load_output(tmp_path / "out"))
    assert (tmp_path / "out" / "tokenizer.json").exists() and (tmp_path / "out" / "README.md").exists()


def test_shard_size_in_parameters_tokenizer_and_card_off(toy: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "config.yml"
    cfg.write_text(CONFIG.format(**{k: str(v) for k, v in toy.items()}))
    proc = bigmerge(
        "merge",
        str(cfg),
        str(tmp_path / "out"),
        "--out-shard-size",
        "40K",
        "--no-copy-tokenizer",
        "--no-write-model-card",
        "--random-seed",
        "5",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    per_file: dict[str, int] = {}
    got = load_output(out)
    for name, f in index["weight_map"].items():
        per_file[f] = per_file.get(f, 0) + got[name].numel()
    # 40K parameters of float32 per file (a tensor larger than that gets a file of its own)
    biggest = max(t.numel() for t in got.values())
    assert all(n <= max(40_000, biggest) for n in per_file.values())
    assert not (out / "tokenizer.json").exists() and not (out / "README.md").exists()
    assert (out / "bigmerge_config.yaml").exists() and (out / "bigmerge-manifest.json").exists()
    v = bigmerge("verify", str(out))
    assert v.returncode == 0, v.stderr
