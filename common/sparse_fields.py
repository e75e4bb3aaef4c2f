"""Sparse fields made from real labeled images: a few real cells on a dark, noisy, JPEG-compressed background.

Users' images of sparse nuclei look like this, and on them the 1-99 percentile stretch spreads the camera's
noise over the whole intensity range (:mod:`common.intensity`, ``max_noise``). None of the project's labeled
images is that sparse, so :func:`sparse_field` makes such a case from a real one, with a known answer: the
cells it keeps.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

__all__ = ["sparse_field"]

BACKGROUND_LEVEL = 8.0  # 8-bit grey of the dark background
CELL_LEVEL = 200.0  # 8-bit grey of the kept cells' 99.9th percentile


def _grey(image: np.ndarray) -> np.ndarray:
    return np.asarray(image, dtype=np.float64).mean(axis=0)


def _chosen_cells(label: np.ndarray, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Ids of ``cells`` cells drawn at random among those that do not touch the image border."""
    border = np.unique(np.concatenate([label[0], label[-1], label[:, 0], label[:, -1]]))
    inner = np.setdiff1d(np.unique(label), np.concatenate([[0], border]))
    if inner.size < cells:
        raise ValueError(f"the label has {inner.size} cells away from the border; {cells} were asked for")
    return np.sort(rng.choice(inner, size=cells, replace=False))


def sparse_field(
    image: np.ndarray,
    label: np.ndarray,
    cells: int = 7,
    noise_std: float = 4.0,
    jpeg_quality: int | None = 70,
    margin: int = 3,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Keep a few real cells of a labeled image and replace everything else by a flat dark background, then add
    camera noise and JPEG compression.

    The kept cells carry their own pixels and ``margin`` px of their surroundings (other cells' pixels excepted). The grey image (mean of the
    channels) is mapped linearly so that the background (median of the pixels more than ``2 * margin`` px from any
    labeled cell) becomes 8 and the kept cells' 99.9th percentile 200; Gaussian noise of ``noise_std`` grey levels
    is added, the result rounded to uint8 and, with ``jpeg_quality``, compressed and decoded.

    Args:
        image: (C, H, W) image of any real type, cells brighter than the background (fluorescence).
        label: (H, W) instance label of the image.
        cells: how many cells to keep.
        noise_std: standard deviation of the added noise, in 8-bit grey levels.
        jpeg_quality: JPEG quality 1-95, or None for no compression.
        margin: px of each kept cell's surroundings kept with it.
        seed: seed of the cell choice and the noise.

    Returns:
        (1, H, W) uint8 image and (H, W) int32 label of the kept cells, numbered 1..cells.

    Raises:
        ValueError: fewer than ``cells`` cells away from the border, or shapes that do not match.
    """
    image, label = np.asarray(image), np.asarray(label)
    if image.ndim != 3 or image.shape[1:] != label.shape:
        raise ValueError(f"expected a (C, H, W) image and an (H, W) label, got {image.shape} and {label.shape}")
    rng = np.random.default_rng(seed)
    kept_ids = _chosen_cells(label, cells, rng)
    kept_cells = np.isin(label, kept_ids)
    grey = _grey(image)
    far_from_cells = ndi.distance_transform_edt(label == 0) > 2 * margin
    background = float(np.median(grey[far_from_cells])) if far_from_cells.any() else float(grey.min())
    bright = float(np.percentile(grey[kept_cells], 99.9))
    if bright <= background:
        raise ValueError("the kept cells are not brighter than the background; sparse_field expects fluorescence")
    other_cells = (label > 0) & ~kept_cells
    kept_region = ndi.binary_dilation(kept_cells, iterations=margin) & ~other_cells
    field = np.where(kept_region, grey, background)
    field = BACKGROUND_LEVEL + (field - background) * (CELL_LEVEL - BACKGROUND_LEVEL) / (bright - background)
    field = field + rng.normal(0.0, noise_std, field.shape)
    field = np.clip(np.rint(field), 0, 255).astype(np.uint8)
    if jpeg_quality is not None:
        buffer = io.BytesIO()
        Image.fromarray(field).save(buffer, format="JPEG", quality=int(jpeg_quality))
        field = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"), dtype=np.uint8)
    sparse_label = np.zeros(label.shape, dtype=np.int32)
    for number, cell in enumerate(kept_ids, start=1):
        sparse_label[label == cell] = number
    return field[np.newaxis], sparse_label
