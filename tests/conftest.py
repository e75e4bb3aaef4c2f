"""Shared fixtures: the real images under ``../shared/data`` (skipped with a reason where absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CELLSEG_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
DEV_DIR = SHARED_DATA / "cellseg-dev"
UNLABELED_DIR = SHARED_DATA / "cellseg-unlabeled"


def _require(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set CELLSEG_SHARED_DATA to the shared/data folder)")
    return path


@pytest.fixture(scope="session")
def dev_dir() -> Path:
    """The labeled dev set: ``images/<name>.<ext>`` and ``labels/<name>_label.tiff``."""
    return _require(DEV_DIR)


@pytest.fixture(scope="session")
def unlabeled_dir() -> Path:
    """The unlabeled pool: ``images/<name>.<ext>``."""
    return _require(UNLABELED_DIR)


@pytest.fixture(scope="session")
def dev_pairs(dev_dir: Path) -> list[tuple[Path, Path]]:
    """(image path, label path) for every labeled dev image, sorted by name."""
    pairs = []
    for image in sorted((dev_dir / "images").iterdir()):
        label = dev_dir / "labels" / f"{image.stem}_label.tiff"
        assert label.exists(), f"dev image {image.name} has no label {label.name}"
        pairs.append((image, label))
    return pairs


@pytest.fixture(scope="session")
def dev_modalities(dev_dir: Path) -> dict[str, str]:
    """name -> modality, from ``modalities.csv``."""
    import csv

    with open(dev_dir / "modalities.csv", newline="") as handle:
        return {row["name"]: row["modality"] for row in csv.DictReader(handle)}
