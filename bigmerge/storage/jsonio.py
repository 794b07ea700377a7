"""JSON from files bigmerge did not write (headers, indexes, configs, records), within bounds.

Python's json raises RecursionError on deep nesting (about a thousand levels), and data that
passes that can still overflow a later recursive walk (json.dumps, pickle): nesting is
bounded to MAX_DEPTH levels, far beyond any real header, index or config. Every failure is a
SourceError naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from bigmerge.errors import SourceError

MAX_DEPTH = 64


def depth_exceeds(doc: Any, limit: int) -> bool:
    """Whether doc nests lists/dicts deeper than limit (iterative: no recursion of our own)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if d > limit:
            return True
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return False


def loads_bounded(
    raw: bytes | str,
    url: str,
    what: str = "JSON",
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """Parse JSON, or raise one SourceError line: not UTF-8, not JSON, or nested too deeply."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray, memoryview)) else raw
        doc = json.loads(text, object_pairs_hook=object_pairs_hook)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{url}: {what} is not valid JSON ({exc.__class__.__name__}: {exc})") from None
    except RecursionError:
        raise SourceError(f"{url}: {what} nests more deeply than Python's JSON parser allows") from None
    if depth_exceeds(doc, max_depth):
        raise SourceError(f"{url}: {what} nests more than {max_depth} levels deep")
    return doc
