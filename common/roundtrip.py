"""Label -> targets -> post-processing round trips: how faithfully a pair of (training target, instance
post-processing) can give back the instances it was made from, with the defaults the bundles ship."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from common.evaluation import ImageScore
from common.io import read_label
from common.metrics import challenge_counts
from common.postprocess import distance_watershed, mt2_watershed
from common.targets import cell_distance_map, mt2_heatmaps, neighbor_distance_map

__all__ = ["ROUND_TRIPS", "mt2_roundtrip", "crossct_roundtrip", "roundtrip_scores"]


def mt2_roundtrip(label: np.ndarray, **watershed_settings) -> np.ndarray:
    """MT² cell and boundary heat-maps -> MT² watershed (``watershed_settings`` passed to
    :func:`common.postprocess.mt2_watershed`); (H, W) int32 instances."""
    cell, boundary = mt2_heatmaps(label)
    return mt2_watershed(cell, boundary, **watershed_settings)


def crossct_roundtrip(label: np.ndarray, **watershed_settings) -> np.ndarray:
    """CrossCT cell- and neighbor-distance maps -> distance-map watershed (``watershed_settings`` passed to
    :func:`common.postprocess.distance_watershed`); (H, W) int32 instances."""
    return distance_watershed(cell_distance_map(label), neighbor_distance_map(label), **watershed_settings)


ROUND_TRIPS: dict[str, Callable[..., np.ndarray]] = {"mt2": mt2_roundtrip, "crossct": crossct_roundtrip}


def roundtrip_scores(label_files: Iterable[str | Path], method: str, **watershed_settings) -> list[ImageScore]:
    """Challenge counts of ``ROUND_TRIPS[method]`` (with ``watershed_settings``) on each ``<name>_label.tiff``."""
    convert = partial(ROUND_TRIPS[method], **watershed_settings)
    scores = []
    for path in label_files:
        label = read_label(path)
        name = Path(path).name.removesuffix("_label.tiff")
        scores.append(ImageScore(name, challenge_counts(label, convert(label))))
    return scores
