"""The package's layers, bottom to top, and a check that no import runs upward.

Every module of bigmerge/ is parsed (ast, nothing imported): each `import` and `from ... import`
inside it, at any depth (functions and TYPE_CHECKING blocks included), must name a module of its
own layer or of a layer below. A module imports no private name (`_x`) of another module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bigmerge"

# Bottom to top. A module belongs to the layer of the longest prefix that names it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("bigmerge", "bigmerge.errors", "bigmerge.log")),  # __version__, the error types, the log
    ("storage", ("bigmerge.storage",)),  # URLs and byte ranges, safetensors headers, CRC-32C
    ("operators", ("bigmerge.ops",)),  # pure: tensors in, tensors out; statistics reduced by a given function
    ("planning", ("bigmerge.planning",)),  # config, catalogs, vocab, the plan (resolves the operators' Params)
    ("engine", ("bigmerge.engine",)),  # MPI comm, reader, executor, faults; the BlockWriter protocol
    ("output", ("bigmerge.output",)),  # layout, the writers, export
    ("driver", ("bigmerge.merge", "bigmerge.stats")),
    ("applications", ("bigmerge.eval", "bigmerge.search", "bigmerge.dam")),  # beside each other
    ("cli", ("bigmerge.cli", "bigmerge.__main__")),
]


def layer_of(module: str) -> int | None:
    """Index in LAYERS of a bigmerge module (or of a name inside one), None outside bigmerge."""
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                if best is None or len(p) > best[0]:
                    best = (len(p), i)
    return None if best is None else best[1]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(module: str, source: str, is_package: bool = False) -> list[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every import in source."""
    out: list[tuple[str, str, int]] = []
    here = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = here.split(".")
                parent = parent[: len(parent) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            for a in node.names:
                # `from pkg import mod` imports a module: judge the most specific name
                out.append((f"{base}.{a.name}" if a.name != "*" else base, a.name, node.lineno))
    return out


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Upward imports and private-name imports across modules, as readable lines.

    sources: module name -> (source text, is a package __init__)."""
    found = []
    for module, (source, is_package) in sorted(sources.items()):
        mine = layer_of(module)
        assert mine is not None, f"{module} belongs to no layer: add it to LAYERS"
        for target, name, line in imports_of(module, source, is_package):
            theirs = layer_of(target)
            if theirs is None:
                continue
            if theirs > mine:
                found.append(
                    f"{module}:{line} imports {target} ({LAYERS[theirs][0]}), above its own layer ({LAYERS[mine][0]})"
                )
            owner = target.rpartition(".")[0]
            if name.startswith("_") and not name.startswith("__") and owner != module:
                found.append(f"{module}:{line} imports the private name {name} of {owner}")
    return found


def package_sources() -> dict[str, tuple[str, bool]]:
    return {
        module_name(p, PACKAGE): (p.read_text(), p.name == "__init__.py")
        for p in sorted(PACKAGE.rglob("*.py"))
        if "__pycache__" not in p.parts
    }


def test_no_import_runs_upward_and_no_private_name_crosses_a_module() -> None:
    assert violations(package_sources()) == []


def test_every_folder_of_the_package_has_a_layer() -> None:
    for module in package_sources():
        assert layer_of(module) is not None, module


@pytest.mark.parametrize(
    "module, source, expected",
    [
        # an operator importing the engine: the import this test exists to stop
        ("bigmerge.ops.spherical", "from bigmerge.engine.comm import reduce_stats\n", "above its own layer"),
        # the same, lazily inside a function, and relatively
        ("bigmerge.storage.fs", "def f():\n    from ..output import export\n", "above its own layer"),
        ("bigmerge.planning.plan", "import bigmerge.engine.executor as ex\n", "above its own layer"),
        # another module's private name
        ("bigmerge.ops.geometric", "from bigmerge.ops.spherical import _SEG\n", "private name _SEG"),
    ],
)
def test_the_check_catches_an_added_upward_import(module: str, source: str, expected: str) -> None:
    clean = package_sources()
    assert violations(clean) == []
    bad = dict(clean)
    bad[module] = (clean.get(module, ("", False))[0] + source, False)
    found = violations(bad)
    assert len(found) == 1 and expected in found[0], found


def test_downward_and_same_layer_imports_pass() -> None:
    sources = {
        "bigmerge.engine.executor": ("from bigmerge.ops.base import Block\nfrom bigmerge.engine import comm\n", False),
        "bigmerge.search.run": ("from bigmerge.eval import Evaluator\nfrom bigmerge.merge import run_merge\n", False),
    }
    assert violations(sources) == []
