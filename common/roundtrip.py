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
from common.postprocess import crossct_instances, distance_watershed, mt2_instances
from common.targets import cell_distance_map, mt2_heatmaps, neighbor_distance_map, three_class_map

__all__ = ["ROUND_TRIPS", "mt2_roundtrip", "crossct_roundtrip", "crossct_distance_roundtrip", "roundtrip_scores"]


def mt2_roundtrip(label: np.ndarray, dark_field: bool = False, **settings) -> np.ndarray:
    """MT² cell and boundary heat-maps, and the 3-class map's foreground (one-hot) -> MT²'s shipped post-processing
    (:func:`common.postprocess.mt2_instances`, ``settings`` with its inference config's names), as
    ``MT2Watershedd`` applies it to an image that is dark-field or not (``dark_field``); (H, W) int32 instances."""
    cell, boundary = mt2_heatmaps(label)
    foreground = (three_class_map(label) > 0).astype(np.float32)
    return mt2_instances(cell, boundary, dark_field, foreground, **settings)


def crossct_roundtrip(
    label: np.ndarray,
    interior_threshold: float = 0.5,
    expand_px: float = 0,
    dark_field_neck_depth: float | None = None,
    dark_field: bool = False,
    foreground_threshold: float | None = None,
    foreground_min_size: int | None = None,
) -> np.ndarray:
    """CrossCT 3-class map -> its classes as probabilities (one-hot) -> CrossCT's shipped post-processing
    (:func:`common.postprocess.crossct_instances`, with its inference config's names for the settings), as
    ``InteriorComponentsd`` applies it to an image that is dark-field or not (``dark_field``); (H, W) int32
    instances."""
    classes = np.eye(3, dtype=np.float32)[three_class_map(label)].transpose(2, 0, 1)
    return crossct_instances(
        classes, dark_field, interior_threshold, expand_px=expand_px, dark_field_neck_depth=dark_field_neck_depth,
        foreground_threshold=foreground_threshold, foreground_min_size=foreground_min_size,
    )


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
