"""DAM's data: per source model, a jsonl file with a `text` field per line."""

from __future__ import annotations

import json
from pathlib import Path

from bigmerge.errors import ConfigError


def read_texts(path: str, limit: int | None = None) -> list[str]:
    """The `text` fields of a jsonl file (at most `limit`); errors name the file and line."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"{p}: data file not found") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read data: {exc.strerror}") from None
    texts: list[str] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}:{n}: not valid JSON: {exc.msg}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ConfigError(f"{p}:{n}: expected an object with a string 'text' field")
        texts.append(obj["text"])
        if limit is not None and len(texts) >= limit:
            break
    if not texts:
        raise ConfigError(f"{p}: no examples (one JSON object with a 'text' field per line)")
    return texts


def model_name(ref: str) -> str:
    """A model's path's last component (names its coefficients file)."""
    return ref.rstrip("/").rsplit("/", 1)[-1] or "model"
