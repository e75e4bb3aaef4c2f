"""tools/tune_thresholds.py on real dev images with a small random network: every valid combination is scored
once, the reported best is the best line within the objects-per-cell bound, and each line's F1 is the mean of its
per-image F1s."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from common.networks import MultiHeadUNetPlusPlus

_spec = importlib.util.spec_from_file_location("tune_thresholds", os.path.join(os.path.dirname(__file__), "..", "tools", "tune_thresholds.py"))
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)

IMAGES = ["dsb_9774c8239632.png", "dsb_52a6b8ae4c8e.png"]
FEATURES = [4, 4, 8, 8, 16, 4]


def test_every_combination_is_scored_and_the_best_is_the_highest(tmp_path, dev_dir, capsys):
    for sub in ("images", "labels"):
        (tmp_path / "val" / sub).mkdir(parents=True)
    for name in IMAGES:
        stem = name.rsplit(".", 1)[0]
        os.symlink(dev_dir / "images" / name, tmp_path / "val" / "images" / name)
        os.symlink(dev_dir / "labels" / f"{stem}_label.tiff", tmp_path / "val" / "labels" / f"{stem}_label.tiff")
    torch.manual_seed(0)
    torch.save(MultiHeadUNetPlusPlus(features=FEATURES).state_dict(), tmp_path / "model.pt")
    overrides = {"features": FEATURES, "roi_size": [64, 64], "scales": [1.0]}
    best = tool.tune(
        str(tmp_path / "val"), str(tmp_path / "model.pt"), "[0.0, 0.3]", "[0.2, 0.5]", "[16]", "[0, 2]", json.dumps(overrides)
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    combos = [line for line in lines if "best" not in line]
    # (0.3, 0.2) is skipped: a seed threshold below the mask threshold makes seeds outside the mask
    settings = [(c["cell_threshold"], c["seed_threshold"], c["neck_depth"]) for c in combos]
    assert settings == [(0.0, 0.2, 0), (0.0, 0.2, 2), (0.0, 0.5, 0), (0.0, 0.5, 2), (0.3, 0.5, 0), (0.3, 0.5, 2)]
    for line in combos:
        assert set(line["per_image_f1"]) == {name.rsplit(".", 1)[0] for name in IMAGES}
        assert line["mean_f1"] == pytest.approx(sum(line["per_image_f1"].values()) / len(IMAGES), abs=1e-4)
        assert line["max_objects_per_cell"] >= line["mean_objects_per_cell"]
    within = [line for line in combos if line["max_objects_per_cell"] <= 1.5]
    assert best == (max(within, key=lambda line: line["mean_f1"]) if within else None)
    assert lines[-1] == {"best": best}
