"""Targets computed from each real label, passed through the matching post-processing with the settings the
bundles ship, give the label back (challenge F1)."""

import statistics
from pathlib import Path

import pytest

import bundle_runs as runs
from common.roundtrip import roundtrip_scores
from common.workflows import config_values

roundtrip_tool = runs.tool_module("roundtrip")

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
MT2_INFERENCE = BUNDLES / "mt2_cell_segmentation" / "configs" / "inference.yaml"
CROSSCT_INFERENCE = BUNDLES / "crossct_cell_segmentation" / "configs" / "inference.yaml"


@pytest.mark.parametrize(
    "method, settings",
    [
        ("mt2", config_values(MT2_INFERENCE, ("cell_threshold", "seed_threshold", "min_seed_size", "neck_depth"))),
        ("crossct", config_values(CROSSCT_INFERENCE, ("interior_threshold", "expand_px"))),
        ("crossct_distance", {}),
    ],
)
def test_targets_then_postprocessing_give_back_the_labels(method, settings, dev_pairs, dev_modalities):
    scores = roundtrip_scores([label for _, label in dev_pairs], method, **settings)
    f1s = [score.counts.f1 for score in scores]
    per_modality = {}
    for score in scores:
        per_modality.setdefault(dev_modalities[score.name], []).append(score.counts.f1)
    summary = {modality: round(statistics.fmean(values), 3) for modality, values in per_modality.items()}
    assert len(scores) == len(dev_pairs)
    assert statistics.fmean(f1s) >= 0.90, summary
    # no modality is left behind: each keeps most of its cells
    assert min(summary.values()) >= 0.75, summary


@pytest.mark.parametrize(
    "method, settings, deep_depth",
    [
        ("mt2", config_values(MT2_INFERENCE, ("cell_threshold", "seed_threshold", "min_seed_size", "neck_depth")), 2.0),
        ("crossct", config_values(CROSSCT_INFERENCE, ("interior_threshold", "expand_px")), 10.0),
    ],
)
def test_the_round_trips_split_dark_field_images_at_their_own_depth(method, settings, deep_depth, dev_dir, dev_pairs, dev_modalities):
    labels = [label for _, label in dev_pairs]
    names = [Path(label).name.removesuffix("_label.tiff") for label in labels]
    dark = roundtrip_tool.dark_fields(dev_dir, names)
    # the tool reads each label's image as MT² preprocesses it: exactly the fluorescence images are dark-field
    assert {name for name in names if dark[name]} == {name for name in names if dev_modalities[name].startswith("fluorescence")}
    deep = roundtrip_scores(labels, method, dark_field_of=dark.get, dark_field_neck_depth=deep_depth, **settings)
    shallow = roundtrip_scores(labels, method, dark_field_of=dark.get, dark_field_neck_depth=0.25, **settings)
    changed = {a.name for a, b in zip(deep, shallow) if a.counts != b.counts}
    assert changed and all(dark[name] for name in changed)  # a shallower dark-field depth moves dark images only
    assert statistics.fmean(score.counts.f1 for score in shallow) < statistics.fmean(score.counts.f1 for score in deep)


def test_the_round_trip_tool_names_a_label_without_its_image(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match=r"1 labels have no image in .*images \(e.g. lonely\)"):
        roundtrip_tool.dark_fields(tmp_path, ["lonely"])


def test_the_crossct_foreground_growth_moves_only_images_that_are_not_dark_field(dev_dir, dev_pairs, dev_modalities):
    """On the targets of the real dev labels, CrossCT's growth into the foreground changes images that are not
    dark-field only. It costs cells there: components under foreground_min_size are dropped and their neighbours
    may grow over them (he_image01: 49 of 325 cells), so the shipped round trip is 0.886 against 0.939 with the
    fixed growth, grayscale brightfield (0.733) and H&E (0.804) the lowest; the network's fragments it removes are
    worth more on the validation split (CrossCT's docs/README.md, "Grown into the foreground")."""
    labels = [label for _, label in dev_pairs]
    dark = roundtrip_tool.dark_fields(dev_dir, [Path(label).name.removesuffix("_label.tiff") for label in labels])
    settings = config_values(CROSSCT_INFERENCE, ("interior_threshold", "expand_px", "dark_field_neck_depth"))
    growth = config_values(CROSSCT_INFERENCE, ("foreground_threshold", "foreground_min_size"))
    assert growth["foreground_threshold"] is not None
    fixed = roundtrip_scores(labels, "crossct", dark_field_of=dark.get, **settings)
    grown = roundtrip_scores(labels, "crossct", dark_field_of=dark.get, **settings, **growth)
    changed = {a.name for a, b in zip(fixed, grown) if a.counts != b.counts}
    assert changed and not any(dark[name] for name in changed)
    per_modality = {}
    for score in grown:
        per_modality.setdefault(dev_modalities[score.name], []).append(score.counts.f1)
    summary = {modality: round(statistics.fmean(values), 3) for modality, values in per_modality.items()}
    assert statistics.fmean(score.counts.f1 for score in grown) >= 0.85, summary
    assert min(summary.values()) >= 0.7, summary


def test_the_mt2_foreground_growth_moves_only_images_that_are_not_dark_field(dev_dir, dev_pairs):
    """On the targets of the real dev labels, MT²'s growth into the 3-class foreground changes images that are not
    dark-field only and gives their instances back the boundary band the energy mask leaves out: the mean rises
    (0.918 -> 0.925), most on the phase-contrast fields. It costs where a small cell has no seed of min_seed_size
    px: a neighbour grows over it (dsb_c395870ad9f5 0.86 -> 0.77), as CrossCT's growth does."""
    labels = [label for _, label in dev_pairs]
    dark = roundtrip_tool.dark_fields(dev_dir, [Path(label).name.removesuffix("_label.tiff") for label in labels])
    settings = config_values(MT2_INFERENCE, ("cell_threshold", "seed_threshold", "min_seed_size", "neck_depth",
                                             "dark_field_neck_depth"))
    growth = config_values(MT2_INFERENCE, ("foreground_threshold",))
    assert growth["foreground_threshold"] is not None
    thin = roundtrip_scores(labels, "mt2", dark_field_of=dark.get, **settings)
    grown = roundtrip_scores(labels, "mt2", dark_field_of=dark.get, **settings, **growth)
    changed = {a.name for a, b in zip(thin, grown) if a.counts != b.counts}
    assert changed and not any(dark[name] for name in changed)
    assert statistics.fmean(b.counts.f1 for b in grown) > statistics.fmean(a.counts.f1 for a in thin)
