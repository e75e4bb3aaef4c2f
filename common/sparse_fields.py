"""Sparse fields made from real labeled images: a few real cells on a flat, noisy background.

Users' images of sparse nuclei look like this, and on them the 1-99 percentile stretch spreads the camera's
noise over the whole intensity range (:mod:`common.intensity`, ``max_noise``). None of the project's labeled
images is that sparse, so this module makes such cases from real ones, with a known answer: the cells kept.

- :func:`sparse_field` builds a test image from a raw labeled image: a dark 8-bit field with camera noise and
  JPEG compression (``tools/normalization_check.py sparse``).
- :func:`thinned_patch` and its random dictionary wrapper :class:`RandSparseFieldd` do the same to a normalized
  training patch (a few cells, or none, on the patch's own background level plus noise), so that the networks
  learn that an empty noisy field holds no cells.
"""

from __future__ import annotations

import io

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type, convert_to_numpy
from PIL import Image
from scipy import ndimage as ndi

__all__ = ["RandSparseFieldd", "sparse_field", "thinned_patch"]

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


def _kept_region(label: np.ndarray, kept_cells: np.ndarray, margin: int) -> np.ndarray:
    """The kept cells and ``margin`` px of their surroundings, other cells' pixels excepted."""
    if margin <= 0:
        return kept_cells
    return ndi.binary_dilation(kept_cells, iterations=margin) & ~((label > 0) & ~kept_cells)


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
    kept_region = _kept_region(label, kept_cells, margin)
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


def thinned_patch(
    image: np.ndarray,
    label: np.ndarray,
    keep_ids: np.ndarray,
    noise_std: float,
    rng: np.random.Generator,
    margin: int = 2,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Keep the cells ``keep_ids`` of a normalized patch and paint everything else with the patch's background.

    The background level is the per-channel median of the pixels more than ``2 * margin`` px from every cell
    (of all unlabeled pixels when none is that far). The painted area gets Gaussian noise of ``noise_std``, one
    draw per pixel shared by the channels (a grey image read into 3 channels stays grey). Cells not kept leave
    the label.

    Args:
        image: (C, H, W) float image in [0, 1] (after :class:`common.intensity.NormalizeIntensityPercentiled`).
        label: (H, W) or (1, H, W) instance label of the patch, any real dtype.
        keep_ids: label values of the cells to keep (empty: an empty field).
        noise_std: standard deviation of the noise, in the image's [0, 1] units.
        rng: source of the noise.
        margin: px of each kept cell's surroundings kept with it.

    Returns:
        The (C, H, W) float32 image clipped to [0, 1] and the label with only the kept cells (same shape and dtype
        as ``label``), or None when the patch has no unlabeled pixel to take a background from.
    """
    image = np.asarray(image)
    label = np.asarray(label)
    cells = label.reshape(label.shape[-2:])
    if image.ndim != 3 or image.shape[1:] != cells.shape:
        raise ValueError(f"expected a (C, H, W) image and an (H, W) label, got {image.shape} and {label.shape}")
    unlabeled = cells == 0
    if not unlabeled.any():
        return None
    far_from_cells = ndi.distance_transform_edt(unlabeled) > 2 * margin
    background_pixels = image[:, far_from_cells] if far_from_cells.any() else image[:, unlabeled]
    background = np.median(background_pixels, axis=1).astype(np.float32)
    kept_cells = np.isin(cells, keep_ids)
    region = _kept_region(cells, kept_cells, margin)
    noise = rng.normal(0.0, noise_std, cells.shape).astype(np.float32)
    painted = background[:, None, None] + noise[None]
    thinned = np.clip(np.where(region[None], image, painted), 0.0, 1.0).astype(np.float32)
    thinned_label = np.where(kept_cells, cells, 0).astype(label.dtype).reshape(label.shape)
    return thinned, thinned_label


class RandSparseFieldd(RandomizableTransform, MapTransform):
    """Turn a training patch into a sparse field: at most ``max_cells`` of its cells (0 included, drawn uniformly)
    on its own flat background plus Gaussian noise of a std drawn uniformly from ``noise_std_range``
    (:func:`thinned_patch`). Patches without background pixels are left as they are.

    Runs after the geometry (the patch is final) and before the targets (the label is still an instance label).

    Args:
        keys: the image key and the instance-label key, in that order.
        prob: probability of thinning a patch.
        max_cells: most cells kept.
        noise_std_range: (low, high) noise std in [0, 1] units; the shipped ``max_noise`` ceiling (0.05) bounds
            the noise a sparse field keeps after normalization at inference.
        margin: px of each kept cell's surroundings kept with it.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        prob: float = 0.2,
        max_cells: int = 5,
        noise_std_range: tuple[float, float] = (0.005, 0.05),
        margin: int = 2,
    ):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        if len(self.keys) != 2:
            raise ValueError(f"keys must be the image key and the label key, got {self.keys}")
        if max_cells < 0:
            raise ValueError(f"max_cells must be >= 0, got {max_cells}")
        if not 0 <= noise_std_range[0] <= noise_std_range[1]:
            raise ValueError(f"noise_std_range must satisfy 0 <= low <= high, got {noise_std_range}")
        self.max_cells = int(max_cells)
        self.noise_std_range = tuple(float(value) for value in noise_std_range)
        self.margin = int(margin)

    def __call__(self, data):
        out = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return out
        image_key, label_key = self.keys
        image, label = convert_to_numpy(out[image_key]), convert_to_numpy(out[label_key])
        ids = np.unique(label)
        ids = ids[ids != 0]
        count = min(int(self.R.randint(0, self.max_cells + 1)), ids.size)
        keep_ids = self.R.choice(ids, size=count, replace=False) if count else ids[:0]
        noise_std = float(self.R.uniform(*self.noise_std_range))
        thinned = thinned_patch(image, label, keep_ids, noise_std, np.random.default_rng(self.R.randint(2**31)),
                                self.margin)
        if thinned is None:
            return out
        out[image_key] = convert_to_dst_type(thinned[0], out[image_key], dtype=thinned[0].dtype)[0]
        out[label_key] = convert_to_dst_type(thinned[1], out[label_key], dtype=thinned[1].dtype)[0]
        return out
