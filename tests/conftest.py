from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"):
    os.environ.pop(var, None)


@pytest.fixture
def family(tmp_path: Path) -> dict[str, Path]:
    from helpers import synthetic_family

    return synthetic_family(tmp_path / "models", n=2)
