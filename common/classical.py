"""The classical baseline the bundles are compared with: Otsu threshold, then a distance-transform watershed.

No learning: a global Otsu threshold of the smoothed grey image gives the foreground (the minority side of the
threshold, so bright nuclei on dark fluorescence and dark nuclei on bright brightfield both work), and maxima
of its Euclidean distance transform seed a watershed that splits touching cells.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import gaussian, threshold_otsu
from skimage.morphology import remove_small_objects
from skimage.segmentation import watershed

from common.intensity import normalize_whole

__all__ = ["otsu_foreground", "otsu_distance_watershed"]


def otsu_foreground(image: np.ndarray, sigma: float = 1.0, min_size: int = 16) -> np.ndarray:
    """Foreground mask of a microscopy image by a global Otsu threshold.

    Args:
        image: (C, H, W) or (H, W) image of any numeric dtype.
        sigma: Gaussian smoothing (px) before thresholding.
        min_size: connected components smaller than this (px) are dropped; holes are filled.

    Returns:
        (H, W) bool mask; the side of the threshold holding fewer pixels is taken as foreground.
    """
    image = np.asarray(image, dtype=np.float32)
    grey = normalize_whole(image[None] if image.ndim == 2 else image).mean(axis=0)
    smooth = gaussian(grey, sigma=sigma, preserve_range=True)
    if float(smooth.max()) <= float(smooth.min()):
        return np.zeros(grey.shape, dtype=bool)
    above = smooth > threshold_otsu(smooth)
    foreground = above if np.count_nonzero(above) <= above.size / 2 else ~above
    foreground = ndi.binary_fill_holes(foreground)
    return remove_small_objects(foreground, max_size=min_size - 1) if min_size > 1 else foreground


def otsu_distance_watershed(
    image: np.ndarray, sigma: float = 1.0, min_size: int = 16, min_distance: int = 4
) -> np.ndarray:
    """Instances from :func:`otsu_foreground` split by a watershed on the negated distance transform.

    Args:
        image: (C, H, W) or (H, W) image.
        sigma, min_size: see :func:`otsu_foreground`.
        min_distance: smallest distance (px) between two seeds (maxima of the smoothed distance transform).

    Returns:
        (H, W) int32 instance ids 1..n, 0 = background.
    """
    foreground = otsu_foreground(image, sigma=sigma, min_size=min_size)
    if not foreground.any():
        return np.zeros(foreground.shape, dtype=np.int32)
    distance = gaussian(ndi.distance_transform_edt(foreground), sigma=1.0, preserve_range=True)
    components, _ = ndi.label(foreground)
    peaks = peak_local_max(distance, min_distance=min_distance, labels=components, exclude_border=False)
    markers = np.zeros(foreground.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    # a component without a peak (flat distance) still becomes one cell
    ids, first_pixel = np.unique(components.ravel(), return_index=True)
    unseeded = np.isin(ids, components[markers > 0], invert=True) & (ids > 0)
    markers.flat[first_pixel[unseeded]] = np.arange(len(peaks) + 1, len(peaks) + 1 + np.count_nonzero(unseeded))
    return watershed(-distance, markers, mask=foreground).astype(np.int32)
