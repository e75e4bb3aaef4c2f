"""Label -> targets -> post-processing round trips: how faithfully a pair of (training target, instance
post-processing) can give back the instances it was made from, with the settings the bundles ship."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from common.evaluation import ImageScore
from common.io import read_label
from common.metrics import challenge_counts
from common.postprocess import distance_watershed, interior_components, mt2_watershed, neck_depth_for
from common.targets import cell_distance_map, mt2_heatmaps, neighbor_distance_map, three_class_map

__all__ = ["ROUND_TRIPS", "mt2_roundtrip", "crossct_roundtrip", "crossct_distance_roundtrip", "roundtrip_scores"]


def mt2_roundtrip(
    label: np.ndarray,
    neck_depth: float = 0.0,
    dark_field_neck_depth: float | None = None,
    dark_field: bool = False,
    **watershed_settings,
) -> np.ndarray:
    """MT² cell and boundary heat-maps -> MT² watershed (``watershed_settings`` passed to
    :func:`common.postprocess.mt2_watershed`), its seeds split at ``dark_field_neck_depth`` when ``dark_field``
    (the label's image is dark-field) and that is set, else at ``neck_depth``, as ``MT2Watershedd`` does;
    (H, W) int32 instances."""
    cell, boundary = mt2_heatmaps(label)
    depth = neck_depth_for(dark_field, neck_depth, dark_field_neck_depth)
    return mt2_watershed(cell, boundary, neck_depth=depth, **watershed_settings)


def crossct_roundtrip(
    label: np.ndarray,
    interior_threshold: float = 0.5,
    expand_px: float = 0,
    dark_field_neck_depth: float | None = None,
    dark_field: bool = False,
) -> np.ndarray:
    """CrossCT 3-class map -> its interior class as a probability -> interior components (CrossCT's shipped
    post-processing, with its inference config's names for the settings), split at ``dark_field_neck_depth`` when
    ``dark_field`` and that is set, as ``InteriorComponentsd`` does; (H, W) int32 instances."""
    interior = (three_class_map(label) == 1).astype(np.float32)
    neck_depth = neck_depth_for(dark_field, 0.0, dark_field_neck_depth)
    return interior_components(interior, threshold=interior_threshold, expand_px=expand_px, neck_depth=neck_depth)


def crossct_distance_roundtrip(label: np.ndarray, **watershed_settings) -> np.ndarray:
    """CrossCT cell- and neighbor-distance maps -> distance-map watershed (``watershed_settings`` passed to
    :func:`common.postprocess.distance_watershed`); (H, W) int32 instances."""
    return distance_watershed(cell_distance_map(label), neighbor_distance_map(label), **watershed_settings)


_READ_DARK_FIELD = ("mt2", "crossct")  # the round trips whose post-processing depends on the image

ROUND_TRIPS: dict[str, Callable[..., np.ndarray]] = {
    "mt2": mt2_roundtrip,
    "crossct": crossct_roundtrip,
    "crossct_distance": crossct_distance_roundtrip,
}


def roundtrip_scores(
    label_files: Iterable[str | Path],
    method: str,
    dark_field_of: Callable[[str], bool] | None = None,
    **watershed_settings,
) -> list[ImageScore]:
    """Challenge counts of ``ROUND_TRIPS[method]`` (with ``watershed_settings``) on each ``<name>_label.tiff``.

    ``dark_field_of(name)`` tells the MT² and CrossCT interior round trips whether the label's image is dark-field
    (labels alone cannot say); without it every image is taken as not dark-field. The distance round trip ignores
    it."""
    convert = partial(ROUND_TRIPS[method], **watershed_settings)
    scores = []
    for path in label_files:
        label = read_label(path)
        name = Path(path).name.removesuffix("_label.tiff")
        image_settings = {"dark_field": dark_field_of(name)} if method in _READ_DARK_FIELD and dark_field_of else {}
        scores.append(ImageScore(name, challenge_counts(label, convert(label, **image_settings))))
    return scores
