"""DAM's data: per source model, a jsonl file with, per line, a `text` field or a chat as `messages`
([{"role": ..., "content": ...}, ...]), which the model's own chat template turns into text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bigmerge.errors import ConfigError
from bigmerge.planning.config import read_jsonl


def read_texts(path: str, limit: int | None = None) -> list[Any]:
    """Each line's `text` (a str) or `messages` (a list of dicts), at most `limit`; errors name file and line."""
    p = Path(path)
    texts: list[Any] = []
    for n, obj in read_jsonl(p):
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            texts.append(obj["text"])
        elif isinstance(obj, dict) and _is_chat(obj.get("messages")):
            texts.append(obj["messages"])
        else:
            raise ConfigError(
                f"{p}:{n}: expected an object with a string 'text' field or 'messages' "
                "(a list of {role, content} strings)"
            )
        if limit is not None and len(texts) >= limit:
            break
    if not texts:
        raise ConfigError(f"{p}: no examples (one JSON object with a 'text' or 'messages' field per line)")
    return texts


def model_name(ref: str) -> str:
    """A model's path's last component (names its coefficients file)."""
    return ref.rstrip("/").rsplit("/", 1)[-1] or "model"


def _is_chat(m: Any) -> bool:
    return (
        isinstance(m, list)
        and bool(m)
        and all(isinstance(x, dict) and isinstance(x.get("role"), str) and isinstance(x.get("content"), str) for x in m)
    )


def as_text(example: Any, tokenizer: Any, model: str, path: str) -> str:
    """A text example as it is; a chat through the model's chat template."""
    if isinstance(example, str):
        return example
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{path}: chat examples ('messages'), but the tokenizer of {model} has no chat template")
    return str(tokenizer.apply_chat_template(example, tokenize=False))
