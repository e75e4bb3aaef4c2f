"""Instance label maps in memory: the one check-and-convert every consumer of labels uses, and the label image a
bundle's post-processing ends with."""

from __future__ import annotations

from typing import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

__all__ = ["as_instance_label", "label_image", "LabelImaged", "ToMonaiSpatialOrderd"]


def as_instance_label(label, what: str = "label") -> np.ndarray:
    """Validate an instance map and return it as a 2-D numpy integer array.

    Args:
        label: (H, W) or (1, H, W) numpy array or torch tensor (incl. MetaTensor) of instance ids, 0 = background;
            integer, bool, or float holding whole numbers (MONAI transforms hand labels over as floats).
        what: the name used in error messages.

    Returns:
        (H, W) int32 array, or int64 when an id does not fit in int32.

    Raises:
        ValueError: wrong shape, non-integral or non-finite values, negative ids, or ids beyond int64.
    """
    if isinstance(label, torch.Tensor):
        label = label.detach().cpu().numpy()
    array = np.asarray(label)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"{what} must be an (H, W) or (1, H, W) instance map, got shape {array.shape}")
    if array.dtype == bool:
        return array.astype(np.int32)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.rint(array)):
            raise ValueError(f"{what} holds non-integer values: an instance map of integer ids is expected")
    elif array.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integer instance ids, got dtype {array.dtype}")
    if not array.size:
        return array.astype(np.int32)
    low, high = array.min(), array.max()
    if low < 0:
        raise ValueError(f"{what} holds negative ids; instance ids must be >= 0 (0 = background)")
    if high > np.iinfo(np.int64).max:
        raise ValueError(f"{what} holds ids beyond the int64 range")
    return array.astype(np.int32 if high <= np.iinfo(np.int32).max else np.int64, copy=False)


def label_image(label) -> np.ndarray:
    """An instance map as the 2-D label image every writer takes; ``common.io.write_label`` stores exactly this.

    Image writers such as ITK's (MONAI Label writes results with it, in the study's own format) take a 2-D
    unsigned image: a (1, H, W) map would be written as a 3-D image, and int32 is not a PNG type.

    Args:
        label: (H, W) or (1, H, W) instance ids, as :func:`as_instance_label` accepts them.

    Returns:
        (H, W) uint16, or uint32 when an id exceeds 65535 (PNG holds 16 bits; TIFF both).

    Raises:
        ValueError: as :func:`as_instance_label`, or an id beyond the uint32 range.
    """
    array = as_instance_label(label)
    high = int(array.max()) if array.size else 0
    if high > np.iinfo(np.uint32).max:
        raise ValueError(f"label id {high} does not fit a uint32 label image")
    return array.astype(np.uint16 if high <= np.iinfo(np.uint16).max else np.uint32)


class LabelImaged(MapTransform):
    """Dictionary wrapper of :func:`label_image`: ``{key: (1, H, W) or (H, W) instance ids}`` becomes an (H, W)
    uint16/uint32 numpy label image (torch has no uint16 arithmetic; image writers take numpy). The last step of
    each bundle's ``postprocessing``, so that MONAI Label can write the result in the format of any study."""

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = label_image(d[key])
        return d


class ToMonaiSpatialOrderd(MapTransform):
    """The last step of a bundle's ``postprocessing`` for MONAI Label: its restore step and writer assume MONAI's
    (x, y) array order of 2-D images (MONAI's readers give (W, H) arrays; the writer transposes to ITK's order),
    while this project's arrays are (H, W). The (H, W) label images under ``keys`` become (W, H) numpy arrays, and
    ``ref_image``'s ``spatial_shape`` is given in the same order (on a new MetaTensor sharing the pixels), so that
    MONAI Label neither resizes the label nor writes it transposed.

    Args:
        keys: (H, W) label images (:class:`LabelImaged` output).
        ref_image: the key of the (C, H, W) image MetaTensor whose metadata MONAI Label restores the label to.
    """

    def __init__(self, keys: KeysCollection, ref_image: str = "image", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.ref_image = ref_image

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label = np.asarray(d[key])
            if label.ndim != 2:
                raise ValueError(f"'{key}' must be an (H, W) label image, got shape {label.shape}")
            d[key] = np.ascontiguousarray(label.T)
        image = d.get(self.ref_image)
        if isinstance(image, MetaTensor):
            height, width = image.shape[-2:]
            d[self.ref_image] = MetaTensor(image.as_tensor(), meta={**image.meta, "spatial_shape": np.asarray([width, height])})
        return d
