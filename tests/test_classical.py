"""common.classical: the Otsu + distance-watershed baseline on generated cases and a real image."""

from __future__ import annotations

import numpy as np
from skimage.draw import disk

from common.classical import otsu_distance_watershed, otsu_foreground
from common.io import read_image, read_label
from common.metrics import challenge_counts


def _touching_disks(bright_cells: bool) -> tuple[np.ndarray, int]:
    image = np.zeros((120, 160), dtype=np.float32)
    centres = [(30, 30), (30, 52), (80, 100), (90, 40)]  # the first two touch
    for row, col in centres:
        image[disk((row, col), 12, shape=image.shape)] = 1.0
    return (image if bright_cells else 1.0 - image), len(centres)


def test_bright_and_dark_cells_are_both_found_and_touching_ones_split():
    for bright in (True, False):
        image, count = _touching_disks(bright)
        label = otsu_distance_watershed(image)
        assert label.dtype == np.int32 and label.max() == count
        mask = otsu_foreground(image)
        assert mask.sum() < mask.size / 2  # the minority side is the foreground


def test_flat_image_has_no_cells():
    assert otsu_distance_watershed(np.full((1, 50, 50), 7.0)).max() == 0


def test_real_fluorescence_image_scores_like_a_baseline(dev_dir):
    image = read_image(dev_dir / "images" / "stardist_img2d.tif")
    truth = read_label(dev_dir / "labels" / "stardist_img2d_label.tiff")
    counts = challenge_counts(truth, otsu_distance_watershed(image))
    f1 = 2 * counts.tp / (2 * counts.tp + counts.fp + counts.fn)
    assert 0.5 < f1 < 0.95, f1
