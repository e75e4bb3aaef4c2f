"""Targets computed from each real label, passed through the matching post-processing with the settings the
bundles ship, give the label back (challenge F1)."""

import statistics
from pathlib import Path

import pytest

from common.roundtrip import roundtrip_scores
from common.workflows import config_values

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
