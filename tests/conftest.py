"""Shared test fixtures: where the real data lives, and a CPU-only torch set-up."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# CI puts ../shared beside the clone; METAPORTRAIT_SHARED overrides it.
SHARED = Path(os.environ.get("METAPORTRAIT_SHARED", REPO.parent / "shared"))
SHARED_DATA = SHARED / "data"
OFFICIAL_REFERENCE = SHARED / "reference" / "official"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "MANIFEST.tsv").exists():
        pytest.fail(f"real data not found at {SHARED_DATA} (set METAPORTRAIT_SHARED)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def official_reference() -> Path:
    if not OFFICIAL_REFERENCE.exists():
        pytest.fail(f"official reference listings not found at {OFFICIAL_REFERENCE}")
    return OFFICIAL_REFERENCE


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
