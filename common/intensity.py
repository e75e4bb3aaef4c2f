"""Channel handling and percentile intensity normalization of CellSeg images.

Two normalizations are offered because the two methods differ (see notes/methods.md, "Pre-processing"):

- :func:`normalize_per_channel` -- the challenge organizers' and CrossCT's: each channel on its own, with
  percentiles of its non-zero pixels. The organizers map to [0, 255] uint8; here the result stays float in
  [0, 1] (their value / 255 without the 8-bit rounding).
- :func:`normalize_whole` -- MT²'s: one pair of percentiles over the whole array; with ``ignore_zeros`` (the
  bundle's setting) over its non-zero values, as the organizers count them.

Both take ``max_noise``, a ceiling on the noise the stretch may give the result. On a mostly dark image with a few
cells, the 1st and 99th percentiles both fall in the background, and the stretch spreads the camera's noise over
the whole [0, 1] range: the networks, trained on images whose noise after normalization is a few hundredths, see
texture everywhere. With ``max_noise`` the stretch is widened (its upper end raised) until the noise, estimated
by :func:`noise_sigma`, is ``max_noise``; images whose noise is already below it are not changed at all.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type

__all__ = [
    "DARK_FIELD_MEDIAN",
    "FLAT_RANGE",
    "NormalizeIntensityPercentiled",
    "ToThreeChannelsd",
    "ceiled_high",
    "is_dark_field",
    "noise_sigma",
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


def _check_max_noise(max_noise: float | None) -> None:
    if max_noise is not None and not max_noise > 0:
        raise ValueError(f"max_noise must be positive or None, got {max_noise}")


# Rows per band of noise_sigma: bounds its float64 working memory on big images (about 20 MB a band for a
# 10,000 px wide image), and the whole-slide path sums the same bands, so both give the same estimate to the bit.
NOISE_BAND_ROWS = 256


def noise_sigma(channel: np.ndarray) -> float:
    """Standard deviation of a channel's white noise, by Immerkaer's estimator.

    J. Immerkaer, "Fast noise variance estimation", Computer Vision and Image Understanding 64(2), 1996: the mean
    absolute response to the 3 x 3 difference of two Laplacians, which cancels (locally) linear intensity, times
    sqrt(pi / 2) / 6. Edges and fine texture add to it, so it over- rather than under-estimates.

    Args:
        channel: (H, W) array of any real type; read as float32 (what :func:`common.io.read_image` returns), summed
            in float64 over bands of ``NOISE_BAND_ROWS`` rows.

    Returns:
        sigma in the channel's own units; 0.0 for a channel under 3 x 3 px.
    """
    channel = np.asarray(channel)
    height, width = channel.shape
    if height < 3 or width < 3:
        return 0.0
    total = 0.0
    for top in range(0, height - 2, NOISE_BAND_ROWS):
        rows = channel[top : min(top + NOISE_BAND_ROWS + 2, height)].astype(np.float32).astype(np.float64)
        above, middle, below = rows[:-2], rows[1:-1], rows[2:]
        response = (
            above[:, :-2] - 2 * above[:, 1:-1] + above[:, 2:]
            - 2 * (middle[:, :-2] - 2 * middle[:, 1:-1] + middle[:, 2:])
            + below[:, :-2] - 2 * below[:, 1:-1] + below[:, 2:]
        )
        total += float(np.abs(response).sum())
    return float(np.sqrt(np.pi / 2) * total / (6 * (height - 2) * (width - 2)))


def ceiled_high(low: float, high: float, sigma: float, max_noise: float | None) -> float:
    """The stretch's upper end raised, where needed, so that noise ``sigma`` becomes at most ``max_noise`` of it.

    Args:
        low, high: the stretch [low, high] -> [0, 1], in the image's units.
        sigma: the image's noise (:func:`noise_sigma`), same units.
        max_noise: the ceiling, or None for none.

    Returns:
        ``max(high, low + sigma / max_noise)``; ``high`` itself when ``max_noise`` is None.
    """
    if max_noise is None:
        return high
    return max(high, low + sigma / max_noise)


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


def normalize_per_channel(
    image: np.ndarray, lower: float = 1.0, upper: float = 99.0, max_noise: float | None = None
) -> np.ndarray:
    """Per-channel percentile normalization (challenge organizers, CrossCT).

    For each channel, the ``lower``/``upper`` percentiles of its NON-ZERO pixels map to 0/1 and every pixel
    (zeros included) is mapped linearly and clipped to [0, 1].

    - An all-zero channel stays zero.
    - A flat channel (percentile range < FLAT_RANGE in the image's units) is left "as is": its values are
      expressed in [0, 1] through the input dtype's range -- uint8 / 255 (what the organizers' uint8 cast
      divided by 255 gives), uint16 / 65535, other integers / their dtype max, float clipped to [0, 1]
      (scikit-image's convention for float images). :func:`common.io.read_image` returns float32, so for
      images read from disk a flat channel becomes ``clip(value, 0, 1)``.
    - With ``max_noise``, a channel whose stretch would make its noise (:func:`noise_sigma`) larger than
      ``max_noise`` is stretched over a wider range instead (:func:`ceiled_high`).

    Args:
        image: (C, H, W) array of any real type.
        lower, upper: percentiles, 0 <= lower < upper <= 100.
        max_noise: ceiling on each channel's noise after the stretch, or None (the organizers' normalization).

    Returns:
        (C, H, W) float32 in [0, 1].
    """
    image = _check_image(image)
    _check_percentiles(lower, upper)
    _check_max_noise(max_noise)
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
            sigma = noise_sigma(channel) if max_noise is not None else 0.0
            out[index] = _stretch(channel, low, ceiled_high(low, high, sigma, max_noise))
    return out


def normalize_whole(
    image: np.ndarray,
    lower: float = 1.0,
    upper: float = 99.0,
    max_noise: float | None = None,
    ignore_zeros: bool = False,
) -> np.ndarray:
    """Whole-array percentile normalization (MT²).

    One pair of percentiles over all channels and all pixels maps to 0/1, clipped. With ``max_noise``, the upper
    end is raised where the noisiest channel's noise (:func:`noise_sigma`) would exceed ``max_noise`` after the
    stretch (:func:`ceiled_high`); this also rescues an image so sparse that both percentiles are its background
    value.

    With ``ignore_zeros`` the percentiles are those of the array's non-zero values, as the per-channel
    normalization counts them. A field whose background is clipped to exactly 0, or which is padded with zeros
    (dsb_f4c4db3df4ff: 86 % zeros), otherwise has its 99th percentile in the dim glow around the cells, and the
    stretch turns most nuclei into flat white blobs; images without zeros are not changed.

    Args:
        image: (C, H, W) array of any real type.
        lower, upper: percentiles, 0 <= lower < upper <= 100.
        max_noise: ceiling on the noise after the stretch, or None (the paper's normalization).
        ignore_zeros: take the percentiles over the non-zero values only (the paper: over all of them).

    Returns:
        (C, H, W) float32 in [0, 1]; all zeros when the stretch is empty (e.g. a constant image, or an all-zero
        one with ``ignore_zeros``).
    """
    image = _check_image(image)
    _check_percentiles(lower, upper)
    _check_max_noise(max_noise)
    _check_finite(image)
    counted = image[image != 0] if ignore_zeros else image
    if counted.size == 0:
        return np.zeros(image.shape, dtype=np.float32)
    low, high = np.percentile(counted, [lower, upper])
    if max_noise is not None:
        high = ceiled_high(low, high, max(noise_sigma(channel) for channel in image), max_noise)
    if high <= low:
        return np.zeros(image.shape, dtype=np.float32)
    return _stretch(image, low, high)


# Median of a normalized image below which it is dark-field: bright objects on a dark background. After MT²'s
# preprocessing the 498 fluorescence images of cellseg-train have medians 0.000-0.219, its 132 phase-contrast,
# stained-tissue and grayscale brightfield images 0.357-0.961 (MT²'s card, "Dark-field images").
DARK_FIELD_MEDIAN = 0.25
# Pixels sampled for the median of a large image (a regular subsample: the median of a few million pixels is as
# good a judge of the background as that of a whole slide's).
_DARK_FIELD_SAMPLE = 4_000_000


def is_dark_field(image, threshold: float = DARK_FIELD_MEDIAN) -> bool:
    """Whether a normalized image shows bright objects on a dark background, as fluorescence does.

    Most of a microscopy field is background, so the median pixel is the background's level: near 0 for
    fluorescence (and for dark phase-contrast or quantitative-phase fields), mid-grey for phase contrast, near 1
    for brightfield.

    Args:
        image: (C, H, W) or (H, W) intensities normalized to about [0, 1] (:func:`normalize_whole` or
            :func:`normalize_per_channel`), numpy array or tensor of any float dtype.
        threshold: the median below which the image is dark-field.

    Returns:
        True when the median of all its values (all channels) is below ``threshold``.
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float().numpy()
    values = np.asarray(image).reshape(-1)
    if values.size == 0:
        raise ValueError("is_dark_field: the image is empty")
    step = -(-values.size // _DARK_FIELD_SAMPLE)
    return bool(np.median(values[::step]) < threshold)


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
    """Dictionary wrapper of :func:`normalize_per_channel` (``per_channel=True``) or :func:`normalize_whole`,
    with their ``lower``, ``upper`` and ``max_noise``, and ``ignore_zeros`` for the whole-array one (the
    per-channel one always counts non-zero pixels only)."""

    def __init__(
        self,
        keys: KeysCollection,
        per_channel: bool = True,
        lower: float = 1.0,
        upper: float = 99.0,
        max_noise: float | None = None,
        ignore_zeros: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        _check_percentiles(lower, upper)
        _check_max_noise(max_noise)
        self.function = normalize_per_channel if per_channel else normalize_whole
        self.lower, self.upper, self.max_noise = lower, upper, max_noise
        self.ignore_zeros = bool(ignore_zeros) or per_channel
        # the per-channel function always counts non-zero pixels and takes no such option
        self._options = {} if per_channel else {"ignore_zeros": self.ignore_zeros}

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _apply(
                self.function, d[key], lower=self.lower, upper=self.upper, max_noise=self.max_noise, **self._options
            )
        return d
