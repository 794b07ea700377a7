"""A config's data checked by its pydantic model, and a failure told in one line.

Merge, search and DAM configs all go through `validate()`: the line names the config, the key
(`models[1].parameters.density`) and what was wrong; an unknown key (a typo) and a missing one
are named as such, before any other complaint about the same data.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from bigmerge.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

# pydantic's names for the branches of a union, which are not keys of the user's data
_BRANCH_PREFIXES = ("list[", "dict[", "tuple[", "function-", "tagged-union")
_BRANCH_NAMES = frozenset({"str", "int", "float", "bool"})


def validate(cls: type[M], data: Any, source: str, *, branches: Collection[str] = ()) -> M:
    """`cls` built from `data`, or a ConfigError line. `branches`: names of the config's own
    union members (e.g. a tagged union's tags), left out of the key path like pydantic's."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(one_line(exc, source, branches)) from None


def one_line(exc: ValidationError, source: str, branches: Collection[str] = ()) -> str:
    err = most_relevant(exc.errors())
    where = key_path(tuple(err["loc"]), branches)
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown key {where!r}"
    if err["type"] == "missing":
        return f"{source}: missing required key {where!r}"
    return f"{source}: bad value for {where!r}: {err['msg'].removeprefix('Value error, ')}"


def most_relevant(errors: list[Any]) -> Any:
    """Unions report one error per branch; an unknown key or a missing key says the most."""
    for kind in ("extra_forbidden", "missing", "value_error"):
        for e in errors:
            if e["type"] == kind:
                return e
    return errors[0]


def key_path(loc: tuple[Any, ...], branches: Collection[str] = ()) -> str:
    """pydantic's error location as the user writes it: `slices[0].sources[1].model`."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str) and not (
            item.startswith(_BRANCH_PREFIXES) or item in _BRANCH_NAMES or item in branches
        ):
            parts.append(("." if parts else "") + item)
    return "".join(parts) or "(top level)"
