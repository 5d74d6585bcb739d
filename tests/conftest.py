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


@pytest.fixture(scope="session")
def lpips_weight_files(tmp_path_factory) -> tuple[Path, Path]:
    """Random stand-ins for torchvision's ``alexnet-owt-7be5be79.pth`` and lpips' ``weights/v0.1/alex.pth``,
    with the official keys and shapes (the real files are not available offline). The classifier tensors are
    1-element placeholders: the loader ignores ``classifier.*`` by name, and the real ones are 230 MB."""
    import torch

    generator = torch.Generator().manual_seed(1)
    trunk = {}
    for index, (cin, cout, kernel) in {0: (3, 64, 11), 3: (64, 192, 5), 6: (192, 384, 3), 8: (384, 256, 3),
                                       10: (256, 256, 3)}.items():
        fan_in = cin * kernel * kernel
        trunk[f"features.{index}.weight"] = torch.randn(cout, cin, kernel, kernel, generator=generator) * (
            2.0 / fan_in
        ) ** 0.5
        trunk[f"features.{index}.bias"] = 0.01 * torch.randn(cout, generator=generator)
    for index in (1, 4, 6):
        trunk[f"classifier.{index}.weight"] = torch.zeros(1)
        trunk[f"classifier.{index}.bias"] = torch.zeros(1)
    # lpips clamps its heads to be non-negative while training, so the real weights are >= 0
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator) / c
             for i, c in enumerate((64, 192, 384, 256, 256))}
    folder = tmp_path_factory.mktemp("lpips_weights")
    torch.save(trunk, folder / "alexnet-owt-7be5be79.pth")
    torch.save(heads, folder / "alex.pth")
    return folder / "alexnet-owt-7be5be79.pth", folder / "alex.pth"
