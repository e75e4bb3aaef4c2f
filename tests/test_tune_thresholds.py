"""tools/tune_thresholds.py on real dev images with small random networks (MT² and CrossCT): every valid combination
is scored once, the reported best is the best line within the objects-per-cell bound, and each line's F1 is the mean
of its per-image F1s. Each bundle's train.yaml validates with the watershed or interior settings its inference.yaml
ships."""

from __future__ import annotations

import json
import os

import pytest
import yaml
import torch

from bundle_runs import tool_module
from common.classical import otsu_distance_watershed
from common.io import read_image, read_label
from common.metrics import challenge_counts, f1_from_counts
from common.networks import MultiHeadUNetPlusPlus
from common.workflows import inference_config

tool = tool_module("tune_thresholds")

IMAGES = ["dsb_9774c8239632.png", "dsb_52a6b8ae4c8e.png"]
FEATURES = [4, 4, 8, 8, 16, 4]
CROSSCT = {"unet_features": [4, 4, 8, 8, 16, 4], "swin_feature_size": 12, "roi_size": [64, 64]}


def _validation_folder(root, dev_dir):
    for sub in ("images", "labels"):
        (root / "val" / sub).mkdir(parents=True)
    for name in IMAGES:
        stem = name.rsplit(".", 1)[0]
        os.symlink(dev_dir / "images" / name, root / "val" / "images" / name)
        os.symlink(dev_dir / "labels" / f"{stem}_label.tiff", root / "val" / "labels" / f"{stem}_label.tiff")
    return root / "val"


def _printed_lines(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_every_combination_is_scored_and_the_best_is_the_highest(tmp_path, dev_dir, capsys):
    _validation_folder(tmp_path, dev_dir)
    torch.manual_seed(0)
    torch.save(MultiHeadUNetPlusPlus(features=FEATURES).state_dict(), tmp_path / "model.pt")
    overrides = {"features": FEATURES, "roi_size": [64, 64], "scales": [1.0]}
    best = tool.tune(
        str(tmp_path / "val"), str(tmp_path / "model.pt"), "[0.0, 0.3]", "[0.2, 0.5]", "[16]", "[0, 2]", json.dumps(overrides),
        dark_field_neck_depths="[null, 0.5]", foreground_thresholds="[null, 0.5]",
    )
    lines = _printed_lines(capsys)
    combos = [line for line in lines if "best" not in line]
    # (0.3, 0.2) is skipped: a seed threshold below the mask threshold makes seeds outside the mask
    settings = [(c["cell_threshold"], c["seed_threshold"], c["neck_depth"], c["dark_field_neck_depth"],
                 c["foreground_threshold"]) for c in combos]
    assert settings == [
        (cell, seed, neck, dark, grow)
        for cell, seed in ((0.0, 0.2), (0.0, 0.5), (0.3, 0.5)) for neck in (0, 2) for dark in (None, 0.5)
        for grow in (None, 0.5)
    ]
    by_setting = {setting: line for setting, line in zip(settings, combos)}
    for (cell, seed, neck, dark, grow), line in by_setting.items():
        # dsb_52a6b8ae4c8e is stained tissue, not dark-field: its neck depth is neck_depth whatever the dark-field one
        twin = by_setting[(cell, seed, neck, 0.5 if dark is None else None, grow)]
        assert line["per_image_f1"]["dsb_52a6b8ae4c8e"] == twin["per_image_f1"]["dsb_52a6b8ae4c8e"]
    for line in combos:
        assert set(line["per_image_f1"]) == {name.rsplit(".", 1)[0] for name in IMAGES}
        assert line["mean_f1"] == pytest.approx(sum(line["per_image_f1"].values()) / len(IMAGES), abs=1e-4)
        assert line["max_objects_per_cell"] >= line["mean_objects_per_cell"]
    within = [line for line in combos if line["max_objects_per_cell"] <= 1.5]
    assert best == (max(within, key=lambda line: line["mean_f1"]) if within else None)
    assert lines[-1] == {"best": best}


def test_mt2_foreground_growth_moves_only_the_image_that_is_not_dark_field(tmp_path, dev_dir, capsys):
    """With the shipped network and watershed (one scale, to be quick), growing into the 3-class foreground changes
    the stained-tissue tile's F1 and leaves the dark-field fluorescence tile's as it is."""
    val = _validation_folder(tmp_path, dev_dir)
    tool.tune(
        str(val), None, "[0.45]", "[0.8]", "[32]", "[2]", json.dumps({"scales": [1.0]}),
        dark_field_neck_depths="[0.75]", foreground_thresholds="[null, 0.5]",
    )
    thin, grown = (line for line in _printed_lines(capsys) if "best" not in line)
    assert (thin["foreground_threshold"], grown["foreground_threshold"]) == (None, 0.5)
    assert grown["per_image_f1"]["dsb_9774c8239632"] == thin["per_image_f1"]["dsb_9774c8239632"] > 0.5
    assert grown["per_image_f1"]["dsb_52a6b8ae4c8e"] != thin["per_image_f1"]["dsb_52a6b8ae4c8e"]


def test_with_modalities_the_best_reaches_the_classical_baseline_on_every_modality(tmp_path, dev_dir, capsys):
    val = _validation_folder(tmp_path, dev_dir)
    (tmp_path / "modalities.csv").write_text(
        "name,modality\ndsb_9774c8239632,fluorescence (nuclei)\ndsb_52a6b8ae4c8e,brightfield (stained tissue)\n"
    )
    torch.manual_seed(0)
    torch.save(MultiHeadUNetPlusPlus(features=FEATURES).state_dict(), tmp_path / "model.pt")
    overrides = {"features": FEATURES, "roi_size": [64, 64], "scales": [1.0]}
    best = tool.tune(
        str(val), str(tmp_path / "model.pt"), "[0.0, 0.3]", "[0.5]", "[16]", "[0, 2]", json.dumps(overrides),
        max_objects_per_cell=None, modalities=str(tmp_path / "modalities.csv"), dark_field_neck_depths="[null]",
        foreground_thresholds="[null]",
    )
    lines = _printed_lines(capsys)
    floor = lines[0]["classical_per_modality_f1"]
    # the baseline's own figures, scored here independently of the tool
    for name in IMAGES:
        stem = name.rsplit(".", 1)[0]
        label = read_label(val / "labels" / f"{stem}_label.tiff")
        counts = challenge_counts(label, otsu_distance_watershed(read_image(val / "images" / name)))
        modality = "fluorescence (nuclei)" if stem == "dsb_9774c8239632" else "brightfield (stained tissue)"
        assert floor[modality] == pytest.approx(f1_from_counts(counts), abs=1e-4)
    combos = [line for line in lines[1:] if "best" not in line]
    assert len(combos) == 4
    for line in combos:
        assert line["below_baseline"] == [m for m, f1 in line["per_modality_f1"].items() if f1 < floor[m]]
    above = [line for line in combos if not line["below_baseline"]]
    assert best == max(above or combos, key=lambda line: line["mean_f1"])
    assert lines[-1] == {"best": best}


def test_crossct_grid_is_its_interior_threshold_expansion_dark_field_neck_depth_and_foreground_growth(tmp_path, dev_dir, capsys):
    val = _validation_folder(tmp_path, dev_dir)
    torch.manual_seed(0)
    pair = inference_config(tool.TUNINGS["crossct"].bundle_dir, None, **CROSSCT).get_parsed_content("network_def")
    torch.save(pair.state_dict(), tmp_path / "model.pt")
    best = tool.tune(
        str(val), str(tmp_path / "model.pt"), overrides=json.dumps(CROSSCT), max_objects_per_cell=None,
        bundle="crossct", interior_thresholds="[0.3, 0.5]", expand_pxs="[0, 2]", dark_field_neck_depths="[null, 0.5]",
        foreground_thresholds="[null, 0.5]", foreground_min_sizes="[null, 64]",
    )
    lines = _printed_lines(capsys)
    combos = [line for line in lines if "best" not in line]
    keys = ("interior_threshold", "expand_px", "dark_field_neck_depth", "foreground_threshold", "foreground_min_size")
    # a minimum size for the foreground growth only with the growth: 3 of the 4 (threshold, size) pairs
    assert [tuple(c[k] for k in keys) for c in combos] == [
        (t, e, d, f, m) for t in (0.3, 0.5) for e in (0, 2) for d in (None, 0.5) for f, m in
        ((None, None), (0.5, None), (0.5, 64))
    ]
    for line in combos:
        assert line["mean_f1"] == pytest.approx(sum(line["per_image_f1"].values()) / len(IMAGES), abs=1e-4)
    assert best == max(combos, key=lambda line: line["mean_f1"])
    assert lines[-1] == {"best": best}


def test_an_unknown_bundle_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="crossct"):
        tool.tune(str(tmp_path), bundle="cellpose")


@pytest.mark.parametrize(
    "bundle, settings",
    [
        ("mt2", ("cell_threshold", "seed_threshold", "min_seed_size", "neck_depth", "dark_field_neck_depth")),
        ("crossct", ("interior_threshold", "expand_px", "dark_field_neck_depth", "foreground_threshold", "foreground_min_size")),
    ],
)
def test_training_validation_post_processes_like_the_shipped_inference(bundle, settings):
    # The tuned settings are written into inference.yaml and, by hand, into train.yaml's validation: a checkpoint
    # chosen during training is then chosen by the same post-processing the user gets.
    bundle_dir = tool.TUNINGS[bundle].bundle_dir / "configs"
    train, inference = (yaml.safe_load((bundle_dir / name).read_text()) for name in ("train.yaml", "inference.yaml"))
    assert {key: train[key] for key in settings} == {key: inference[key] for key in settings}


@pytest.mark.parametrize(
    "bundle, train_to_inference",
    [
        ("mt2", {"val_scales": "scales", "val_roi_size": "roi_size", "val_overlap": "overlap", "val_blend_mode": "blend_mode"}),
        ("crossct", {"val_output": "network_output", "val_flips": "test_time_flips", "val_roi_size": "roi_size",
                     "val_overlap": "overlap", "val_blend_mode": "blend_mode"}),
    ],
)  # fmt: skip
def test_training_validation_infers_like_the_shipped_inference(bundle, train_to_inference):
    # The in-training score selects model.pt: it is the shipped inference's score only with the same windows,
    # scales, network output and flips (tests/test_*_bundle.py checks the F1 itself on two images).
    bundle_dir = tool.TUNINGS[bundle].bundle_dir / "configs"
    train, inference = (yaml.safe_load((bundle_dir / name).read_text()) for name in ("train.yaml", "inference.yaml"))
    assert {key: train[key] for key in train_to_inference} == {
        key: inference[name] for key, name in train_to_inference.items()
    }


def test_grids_take_json_and_what_fire_makes_of_it():
    assert tool._numbers("[null, 0.5, 16]") == [None, 0.5, 16]
    assert tool._numbers(["null", "None", 0.75, 2]) == [None, None, 0.75, 2]
    assert isinstance(tool._numbers("[16]")[0], int) and isinstance(tool._numbers("[0.5]")[0], float)
