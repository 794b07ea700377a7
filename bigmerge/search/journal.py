"""The search's journal: one JSON line per finished evaluation, appended and fsynced.

A rerun reads it back and takes every evaluation it already holds instead of redoing it; a
line cut short by a kill (the last one) is ignored. The journal is also the full history.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bigmerge.errors import ConfigError


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[dict[str, Any]] = []
        self.by_key: dict[str, dict[str, Any]] = {}
        if path.exists():
            data = path.read_bytes()
            lines = data.split(b"\n")
            good = 0  # bytes of whole, valid lines
            for i, line in enumerate(lines):
                last = i == len(lines) - 1
                try:
                    entry = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:
                    if i >= len(lines) - 2 and not any(x.strip() for x in lines[i + 1 :]):
                        break  # the last line, cut short by a kill
                    raise ConfigError(f"{path}: line {i + 1} is not JSON; the journal is damaged") from None
                if last and line:  # no newline after it: written but not finished
                    break
                if entry is not None:
                    self._index(entry)
                good += len(line) + (0 if last else 1)
            if good < len(data):
                with open(path, "r+b") as f:  # drop the partial line: appends start on a fresh line
                    f.truncate(good)
        self.resumed = len(self.entries)

    def _index(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)
        self.by_key[entry["key"]] = entry

    def get(self, key: str) -> dict[str, Any] | None:
        return self.by_key.get(key)

    def append(self, entry: dict[str, Any]) -> dict[str, Any]:
        entry = {"n": len(self.entries), **entry}
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._index(entry)
        return entry
