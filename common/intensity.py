"""Channel handling and percentile intensity normalization of CellSeg images.

Two normalizations are offered because the two methods differ (see notes/methods.md, "Pre-processing"):

- :func:`normalize_per_channel` -- the challenge organizers' and CrossCT's: each channel on its own, with
  percentiles of its non-zero pixels. The organizers map to [0, 255] uint8; here the result stays float in
  [0, 1] (their value / 255 without the 8-bit rounding).
- :func:`normalize_whole` -- MT²'s: one pair of percentiles over the whole array.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type

__all__ = [
    "FLAT_RANGE",
    "NormalizeIntensityPercentiled",
    "ToThreeChannelsd",
    "normalize_per_channel",
    "normalize_whole",
    "to_three_channels",
]

# A channel whose percentile range is below this (in the image's own units) is flat: stretching it would
# only amplify noise, so the organizers leave it as it is.
FLAT_RANGE = 1e-3


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] == 0:
        raise ValueError(f"expected a (C, H, W) image with C >= 1, got shape {image.shape}")
    if image.dtype.kind not in "buif":
        raise ValueError(f"unsupported pixel type {image.dtype}")
    return image


def _check_finite(image: np.ndarray) -> None:
    # A NaN would turn every percentile, and so the whole output, into NaN.
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ValueError("image holds NaN or infinite values; percentile normalization needs finite intensities")


def _check_percentiles(lower: float, upper: float) -> None:
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got lower={lower}, upper={upper}")


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly to [0, 1] and clip; float32 out."""
    stretched = (values.astype(np.float64) - low) / (high - low)
    return np.clip(stretched, 0.0, 1.0).astype(np.float32)


def _as_is(channel: np.ndarray) -> np.ndarray:
    """A flat channel's own values in [0, 1]: integer types over their full range, float clipped to [0, 1]."""
    if channel.dtype.kind in "ui":
        info = np.iinfo(channel.dtype)
        scaled = channel.astype(np.float64) / info.max
    else:
        scaled = channel.astype(np.float64)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def to_three_channels(image: np.ndarray) -> np.ndarray:
    """Make an image 3-channel the way every method here feeds its network.

    Args:
        image: (C, H, W) array, C >= 1.

    Returns:
        (3, H, W) float32: a 1-channel image repeated 3 times; a 2-channel image followed by a zero channel;
        a 3-channel image unchanged; channels beyond the 3rd (e.g. alpha) dropped.
    """
    image = _check_image(image)
    channels = image.shape[0]
    if channels == 1:
        return np.repeat(image, 3, axis=0).astype(np.float32)
    if channels == 2:
        return np.concatenate([image, np.zeros_like(image[:1])], axis=0).astype(np.float32)
    return np.ascontiguousarray(image[:3], dtype=np.float32)


def normalize_per_channel(image: np.ndarray, lower: float = 1.0, upper: float = 99.0) -> np.ndarray:
    """Per-channel percentile normalization (challenge organizers, CrossCT).

    For each channel, the ``lower``/``upper`` percentiles of its NON-ZERO pixels map to 0/1 and every pixel
    (zeros included) is mapped linearly and clipped to [0, 1].

    - An all-zero channel stays zero.
    - A flat channel (percentile range < FLAT_RANGE in the image's units) is left "as is": its values are
      expressed in [0, 1] through the input dtype's range -- uint8 / 255 (what the organizers' uint8 cast
      divided by 255 gives), uint16 / 65535, other integers / their dtype max, float clipped to [0, 1]
      (scikit-image's convention for float images). :func:`common.io.read_image` returns float32, so for
      images read from disk a flat channel becomes ``clip(value, 0, 1)``.

    Args:
        image: (C, H, W) array of any real type.
        lower, upper: percentiles, 0 <= lower < upper <= 100.

    Returns:
        (C, H, W) float32 in [0, 1].
    """
    image = _check_image(image)
    _check_percentiles(lower, upper)
    _check_finite(image)
    out = np.zeros(image.shape, dtype=np.float32)
    for index, channel in enumerate(image):
        non_zero = channel[channel != 0]
        if non_zero.size == 0:
            continue
        low, high = np.percentile(non_zero, [lower, upper])
        if high - low < FLAT_RANGE:
            out[index] = _as_is(channel)
        else:
            out[index] = _stretch(channel, low, high)
    return out


def normalize_whole(image: np.ndarray, lower: float = 1.0, upper: float = 99.0) -> np.ndarray:
    """Whole-array percentile normalization (MT²).

    One pair of percentiles over all channels and all pixels (zeros included) maps to 0/1, clipped.

    Args:
        image: (C, H, W) array of any real type.
        lower, upper: percentiles, 0 <= lower < upper <= 100.

    Returns:
        (C, H, W) float32 in [0, 1]; all zeros when the two percentiles are equal (e.g. a constant image).
    """
    image = _check_image(image)
    _check_percentiles(lower, upper)
    _check_finite(image)
    low, high = np.percentile(image, [lower, upper])
    if high <= low:
        return np.zeros(image.shape, dtype=np.float32)
    return _stretch(image, low, high)


def _apply(function, value, **kwargs):
    """Run a numpy image function on a numpy array or (Meta)Tensor and return the input's kind, float32."""
    if isinstance(value, torch.Tensor):
        result = function(value.detach().cpu().numpy(), **kwargs)
        # convert_to_dst_type keeps a MetaTensor's meta (affine, filename, ...) and the tensor's device.
        converted, *_ = convert_to_dst_type(result, dst=value, dtype=torch.float32)
        return converted
    return function(np.asarray(value), **kwargs)


class ToThreeChannelsd(MapTransform):
    """Dictionary wrapper of :func:`to_three_channels` (numpy in -> numpy out, tensor in -> tensor out)."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _apply(to_three_channels, d[key])
        return d


class NormalizeIntensityPercentiled(MapTransform):
    """Dictionary wrapper of :func:`normalize_per_channel` (``per_channel=True``) or :func:`normalize_whole`."""

    def __init__(
        self,
        keys: KeysCollection,
        per_channel: bool = True,
        lower: float = 1.0,
        upper: float = 99.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        _check_percentiles(lower, upper)
        self.function = normalize_per_channel if per_channel else normalize_whole
        self.lower, self.upper = lower, upper

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _apply(self.function, d[key], lower=self.lower, upper=self.upper)
        return d
