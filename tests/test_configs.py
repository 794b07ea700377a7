"""Every example in configs/ parses, and those on the local toy zoo run."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import REPO, load_output
from toy_models import make_family

from bigmerge.cli import main
from bigmerge.planning.config import load_config

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
LOCAL = [p for p in CONFIGS if "zoo/tiny" in p.read_text()]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_parses(path: Path) -> None:
    import yaml

    if "merge" in (yaml.safe_load(path.read_text()) or {}):  # a search: a merge config plus a space to search
        from bigmerge.search.config import load_search_config

        assert load_search_config(path).merge["models"]
        return
    cfg = load_config(path)
    assert cfg.model_refs()


@pytest.mark.parametrize("path", LOCAL, ids=lambda p: p.name)
def test_example_runs_on_the_tiny_zoo(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_family(tmp_path / "zoo" / "tiny", preset="tiny", dtype="bfloat16", n_finetunes=2)
    monkeypatch.chdir(tmp_path)
    assert main(["merge", str(path), "out", "--quiet"]) == 0
    assert load_output(tmp_path / "out")
    assert main(["verify", "out", "--quiet"]) == 0


def test_there_are_local_examples() -> None:
    assert len(LOCAL) >= 3
