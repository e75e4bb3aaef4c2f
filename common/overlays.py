"""Overlay pictures: instance contours drawn in colour over the normalized image, to see a segmentation.

One colour per instance, chosen from its id alone, so the same id has the same colour in every picture.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from PIL import Image
from skimage.segmentation import find_boundaries

from common.io import atomic_output, image_name

__all__ = ["instance_colours", "overlay_contours", "write_png", "SaveOverlayd"]

GOLDEN_RATIO_CONJUGATE = 0.6180339887498949


def instance_colours(ids: np.ndarray) -> np.ndarray:
    """Bright, well-separated RGB colours for instance ids (hues stepped by the golden ratio).

    Args:
        ids: integer ids of any shape.

    Returns:
        uint8 array of shape ``ids.shape + (3,)``.
    """
    hue = (np.asarray(ids, dtype=np.float64) * GOLDEN_RATIO_CONJUGATE) % 1.0
    sector = hue * 6.0
    # HSV -> RGB at full saturation and value: each channel is a clipped triangle wave of the hue.
    red = np.clip(np.abs(sector - 3.0) - 1.0, 0.0, 1.0)
    green = np.clip(2.0 - np.abs(sector - 2.0), 0.0, 1.0)
    blue = np.clip(2.0 - np.abs(sector - 4.0), 0.0, 1.0)
    return np.round(np.stack([red, green, blue], axis=-1) * 255).astype(np.uint8)


def _display_rgb(image: np.ndarray) -> np.ndarray:
    """(C, H, W) float image in [0, 1] -> (H, W, 3) uint8: three channels as RGB, else the mean as grey."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise ValueError(f"image must be (C, H, W) or (H, W), got shape {image.shape}")
    rgb = image if image.shape[0] == 3 else np.repeat(image.mean(axis=0, keepdims=True), 3, axis=0)
    return np.round(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8).transpose(1, 2, 0)


def overlay_contours(image: np.ndarray, label: np.ndarray, max_pixels: int = 25_000_000) -> np.ndarray:
    """Draw each instance's inner contour in its colour over the image.

    Args:
        image: (C, H, W) or (H, W) float image with values in [0, 1] (the normalized network input).
        label: (H, W) or (1, H, W) integer instance ids, 0 = background.
        max_pixels: larger pictures are drawn from every k-th row and column (the smallest k that fits), so a
            whole-slide overlay stays a viewable PNG.

    Returns:
        (H', W', 3) uint8 RGB picture, H' = ceil(H / k), W' = ceil(W / k).

    Raises:
        ValueError: image and label sizes differ.
    """
    label = np.asarray(label)
    if label.ndim == 3 and label.shape[0] == 1:
        label = label[0]
    image = np.asarray(image)
    if image.shape[-2:] != label.shape:
        raise ValueError(f"image of size {image.shape[-2:]} and label of size {label.shape} differ")
    step = 1
    while (label.shape[0] // step) * (label.shape[1] // step) > max_pixels:
        step += 1
    label = label[::step, ::step]
    picture = _display_rgb(image[..., ::step, ::step])
    contours = find_boundaries(label, mode="inner") & (label > 0)
    picture[contours] = instance_colours(label[contours])
    return picture


def write_png(path: str | os.PathLike, picture: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 picture as PNG atomically (temporary file, then rename); returns the path."""
    with atomic_output(path) as temporary:
        Image.fromarray(np.ascontiguousarray(picture)).save(temporary, format="PNG")
    return Path(path)


def _numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


class SaveOverlayd(MapTransform):
    """Write ``output_dir/<name>_overlay.png``: the label under each key drawn over ``image_key``'s image.

    ``<name>`` comes from the image's ``filename_or_obj`` metadata, as for :class:`common.folders.SaveInstanceLabeld`.

    Args:
        keys: instance-label key(s), (1, H, W) or (H, W).
        output_dir: destination folder, created when missing.
        image_key: key of the (C, H, W) normalized image in [0, 1].
        enabled: False writes nothing (so a config can switch overlays off).
        max_pixels: see :func:`overlay_contours`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        image_key: str = "image",
        enabled: bool = True,
        max_pixels: int = 25_000_000,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.image_key = image_key
        self.enabled = enabled
        self.max_pixels = max_pixels

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if not self.enabled:
            return d
        image = d[self.image_key]
        meta = getattr(image, "meta", None) or {}
        if "filename_or_obj" not in meta:
            raise ValueError(f"'{self.image_key}' carries no filename_or_obj metadata to name the overlay")
        name = image_name(meta["filename_or_obj"])
        for key in self.key_iterator(d):
            picture = overlay_contours(_numpy(image), _numpy(d[key]), self.max_pixels)
            write_png(self.output_dir / f"{name}_overlay.png", picture)
        return d
