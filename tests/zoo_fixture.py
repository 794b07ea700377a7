"""The small zoo, built once per test session (make_zoo's stamp makes a second call instant)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from make_zoo import make_zoo

    out = tmp_path_factory.getbasetemp() / "zoo-small"
    make_zoo(out, preset="small")
    return out
