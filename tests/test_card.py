"""The model card (README.md) written beside every merge: hub front matter and the recipe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from bigmerge.output.card import hub_id, public_name, render_card


def test_sources_in_the_card_are_hub_ids_or_last_components(tmp_path: Path) -> None:
    local = tmp_path / "alice" / "ckpt-7"
    local.mkdir(parents=True)
    assert hub_id("meta-llama/Meta-Llama-3-70B") == "meta-llama/Meta-Llama-3-70B"
    assert (
        hub_id("s3://bucket/team/alice/sec-cpt") is None and public_name("s3://bucket/team/alice/sec-cpt") == "sec-cpt"
    )
    assert hub_id(str(local)) is None and public_name(str(local) + "/") == "ckpt-7"
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    import os

    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert hub_id("org/name") is None  # a relative path that exists here is a path, not a hub id
    finally:
        os.chdir(cwd)


def test_card_front_matter_parses_and_never_shows_a_path(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    cfg = (
        "merge_method: ties\nbase_model: meta-llama/Meta-Llama-3-70B\nmodels:\n"
        "  - model: s3://acme-private/users/alice/llama3-sec-cpt\n    parameters: {weight: 0.5, density: 0.5}\n"
        "  - model: meta-llama/Meta-Llama-3-70B-Instruct\n    parameters: {weight: 0.5, density: 0.5}\n"
    )
    text = render_card(
        method="ties",
        base="meta-llama/Meta-Llama-3-70B",
        sources=["s3://acme-private/users/alice/llama3-sec-cpt", "meta-llama/Meta-Llama-3-70B-Instruct"],
        config_text=cfg,
        pins={"meta-llama/Meta-Llama-3-70B-Instruct": "etag 9f2c"},
        version="0.1.0",
    )
    (tmp_path / "README.md").write_text(text)
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == ["meta-llama/Meta-Llama-3-70B", "meta-llama/Meta-Llama-3-70B-Instruct"]
    assert data["library_name"] == "transformers" and {"merge", "bigmerge", "ties"} <= set(data["tags"])
    assert "acme-private" not in text and "alice" not in text and "llama3-sec-cpt" in text
    body_cfg = text.split("```yaml\n")[-1].split("```")[0]
    assert yaml.safe_load(body_cfg)["models"][0]["model"] == "llama3-sec-cpt"
    assert "etag 9f2c" in text


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bigmerge", *args], capture_output=True, text=True, timeout=300)


def test_every_merge_writes_its_card_and_config_and_loads(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard
    from toy_models import make_family
    from transformers import AutoModelForCausalLM

    fam = make_family(tmp_path / "fam", preset="tiny", n_finetunes=2)
    cfg = tmp_path / "cfg.yaml"
    text = (
        f"# my recipe\nmerge_method: ties\nbase_model: {fam['base']}\nmodels:\n"
        f"  - model: {fam['ft1']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        f"  - model: {fam['ft2']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
    )
    cfg.write_text(text)
    out = tmp_path / "out"
    proc = _cli("merge", str(cfg), str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert (out / "bigmerge_config.yaml").read_text() == text  # byte for byte
    card = ModelCard.load(out / "README.md")
    assert {"merge", "bigmerge", "ties"} <= set(card.data.to_dict()["tags"])
    assert "base_model" not in card.data.to_dict()  # local paths are no hub ids
    assert str(tmp_path) not in card.content and "ft1" in card.content
    AutoModelForCausalLM.from_pretrained(str(out))  # the weights load beside the card
    assert _cli("verify", str(out)).returncode == 0

    # a README.md that is not bigmerge's is never replaced: refused before the merge starts
    other = tmp_path / "other"
    other.mkdir()
    (other / "README.md").write_text("my notes\n")
    proc = _cli("merge", str(cfg), str(other), "--overwrite", "--quiet")
    assert proc.returncode != 0 and "README.md" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (other / "README.md").read_text() == "my notes\n" and sorted(p.name for p in other.iterdir()) == [
        "README.md"
    ]
