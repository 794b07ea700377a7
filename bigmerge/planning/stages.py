"""Multi-document configs (mergekit-multi): several merges in one YAML file, where a later merge
names an earlier one as a source.

As mergekit-multi reads such a file: every document is one merge config plus a `name`; at most
one document has no name; names are unique; a string that equals a merge's name where a model is
expected (`model`, `base_model`, `tokenizer_source`, a tokenizer `source`) means that merge's
output. The merges run in dependency order (file order among independent ones); a cycle is an
error. The final output is the unnamed merge, else the last one in the file; it runs last and goes
to OUT.
The others go to the intermediate directory (`--intermediate-dir`, kept, as mergekit-multi's
`-I`), or to scratch beside OUT (`OUT.bigmerge-stages/NAME`, removed once the final merge is
done); without `--intermediate-dir`, a named merge the final one does not need is skipped.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from bigmerge.errors import ConfigError

MODEL_KEYS = ("model", "base_model", "tokenizer_source", "source")
SCRATCH_SUFFIX = ".bigmerge-stages"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Stage:
    name: str | None
    config: dict[str, Any]  # the document, `name` removed, merge names replaced by their outputs
    out: str  # where this merge is written
    final: bool

    @property
    def label(self) -> str:
        return f"merge {self.name!r}" if self.name else "the final merge"


def scratch_dir(out_url: str) -> str:
    return out_url.rstrip("/") + SCRATCH_SUFFIX


def _refs(doc: Any, names: set[str], key: str | None = None) -> set[str]:
    if isinstance(doc, dict):
        return set().union(*(_refs(v, names, k) for k, v in doc.items())) if doc else set()
    if isinstance(doc, list):
        return set().union(*(_refs(v, names, key) for v in doc)) if doc else set()
    return {doc} if isinstance(doc, str) and key in MODEL_KEYS and doc in names else set()


def _patch(doc: Any, outs: dict[str, str], key: str | None = None) -> Any:
    if isinstance(doc, dict):
        return {k: _patch(v, outs, k) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_patch(v, outs, key) for v in doc]
    if isinstance(doc, str) and key in MODEL_KEYS and doc in outs:
        return outs[doc]
    return doc


def plan_stages(docs: list[Any], source: str, out_url: str, intermediate_dir: str | None) -> list[Stage]:
    """The merges of a multi-document config in the order they run (see the module docstring)."""
    named: dict[str | None, dict[str, Any]] = {}
    for k, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise ConfigError(f"{source}: document {k + 1}: expected a mapping, got {type(doc).__name__}")
        doc = copy.deepcopy(doc)
        name = doc.pop("name", None)
        if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
            raise ConfigError(
                f"{source}: document {k + 1}: name {name!r} must be letters, digits, '.', '_' or '-' (it names a directory)"
            )
        if name in named:
            if name is None:
                raise ConfigError(
                    f"{source}: more than one document without a name (only the final merge may have none)"
                )
            raise ConfigError(f"{source}: two merges are named {name!r}")
        named[name] = doc
    names = {n for n in named if n is not None}
    deps = {n: _refs(doc, names) for n, doc in named.items()}
    for n, d in deps.items():
        if n in d:
            raise ConfigError(f"{source}: merge {n!r} names itself as a source")
    final = None if None in named else list(named)[-1]
    for n, d in deps.items():
        if final in d:
            raise ConfigError(f"{source}: merge {n!r} names {final!r}, the final merge (the last one), as a source")
    needed: set[str | None] = {final}
    frontier: list[str | None] = [final]
    while frontier:
        for dep in deps[frontier.pop()]:
            if dep not in needed:
                needed.add(dep)
                frontier.append(dep)
    order: list[str | None] = []
    pending = list(named)
    while pending:
        ready = [n for n in pending if deps[n] <= set(order) and (n != final or len(pending) == 1)]
        if not ready:
            raise ConfigError(f"{source}: merges {', '.join(repr(n) for n in pending)} name each other in a cycle")
        order.append(ready[0])
        pending.remove(ready[0])
    base = intermediate_dir.rstrip("/") if intermediate_dir else scratch_dir(out_url)
    outs = {n: out_url if n == final else f"{base}/{n}" for n in names}
    stages = []
    for n in order:
        if intermediate_dir is None and n not in needed:
            continue  # its output would be scratch, removed unread
        stages.append(Stage(n, _patch(named[n], outs), out_url if n == final else outs[str(n)], n == final))
    return stages


def skipped_stages(docs: list[Any], stages: list[Stage]) -> list[str]:
    """Names of the merges plan_stages left out (the final merge does not need them)."""
    ran = {s.name for s in stages}
    return [d["name"] for d in docs if isinstance(d, dict) and d.get("name") not in ran and d.get("name")]
