"""The small zoo, built once per test session: every module's fixture calls this, and make_zoo's
stamp makes every call after the first instant."""

from __future__ import annotations

from pathlib import Path

import pytest


def small_zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from make_zoo import make_zoo

    out = tmp_path_factory.getbasetemp() / "zoo-small"
    make_zoo(out, preset="small")
    return out
