"""`bigmerge methods` lists every operator; docs/methods.md's table is its --markdown output."""

from __future__ import annotations

import re
from pathlib import Path

from helpers import bigmerge

from bigmerge.cli import methods_markdown
from bigmerge.ops import REGISTRY

README = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def test_readme_table_matches_the_registry() -> None:
    text = README.read_text()
    m = re.search(r"<!-- methods:[^>]*-->\n(.*?)\n<!-- /methods -->", text, re.S)
    assert m, "docs/methods.md lacks the <!-- methods --> table"
    assert m.group(1).strip() == methods_markdown().strip(), "regenerate it: bigmerge methods --markdown"


def test_methods_lists_every_operator_with_documented_parameters() -> None:
    proc = bigmerge("methods")
    assert proc.returncode == 0, proc.stderr
    for name, op in REGISTRY.items():
        assert f"\n{name}: " in "\n" + proc.stdout, name
        assert op.__doc__ and op.__doc__.strip(), f"{name} has no summary"
        for p in op.params:
            assert p.doc, f"{name}.{p.name} has no doc"
            assert p.name in proc.stdout


# mergekit 0.1.5's merge methods (mergekit.merge_methods.registry.registered_methods()).
MERGEKIT_METHODS = (
    "arcee_fusion",
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "karcher",
    "linear",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "passthrough",
    "ram",
    "ramplus_tl",
    "sce",
    "slerp",
    "task_arithmetic",
    "ties",
)


def test_methods_lists_all_of_mergekits_and_bigmerges_own() -> None:
    assert len(MERGEKIT_METHODS) == 20
    proc = bigmerge("methods")
    assert proc.returncode == 0, proc.stderr
    listed = {line.split(":", 1)[0] for line in proc.stdout.splitlines() if line and not line[0].isspace()}
    missing = [m for m in MERGEKIT_METHODS if m not in listed]
    assert not missing, f"mergekit 0.1.5 methods missing from `bigmerge methods`: {missing}"
    own = listed - set(MERGEKIT_METHODS)
    assert {"fisher", "regmean", "dam"} <= own, own
