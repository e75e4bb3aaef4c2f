"""Whole-slide images: segmented tile by tile, so that memory follows the tile and not the image.

- :func:`image_size` — (H, W) from the file header, without decoding the pixels.
- :func:`read_raw_image` — the image in its file's pixel type (an 8-bit RGB image takes 1 byte a pixel and
  channel, not the 4 of float32).
- :class:`SlideImage` — such an image handed out one region at a time exactly as the plain path feeds the
  network: three channels, percentile-normalized with the percentiles of the WHOLE image, counted from
  histograms instead of sorted copies of the image.
- :class:`WholeSlideSegmenter` — the bundles' whole-slide mode: chosen by image size, it runs the bundle's own
  inferer and post-processing on each tile (:func:`common.tiling.segment_in_tiles`, which merges the instances
  across the seams) and writes the label with the bundle's writer.

Memory of a whole-slide run: the image in its pixel type, the (H, W) int32 label, and one tile's worth of network
input, probabilities and post-processing; the probability maps of the whole image never exist.
"""

from __future__ import annotations

import logging
import os
import struct
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import tifffile
import torch
from monai.data import MetaTensor
from PIL import Image

from common.inferers import MultiScaleInferer
from common.intensity import (
    FLAT_RANGE,
    NormalizeIntensityPercentiled,
    ToThreeChannelsd,
    ceiled_high,
    noise_sigma,
    normalize_per_channel,
)
from common.intensity import to_three_channels
from common.io import MAX_CHANNELS, SUPPORTED_IMAGE_SUFFIXES, TIFF_SUFFIXES, ImageReadError, LoadMicroscopyd
from common.labels import as_instance_label
from common.tiling import segment_in_tiles, tile_grid
from common.workflows import flag

# read_image's steps and the normalizations' arithmetic, reused so that a tile gets exactly what the plain path
# computes (read_image always converts to float32, which a whole-slide image cannot afford)
from common.intensity import _as_is, _stretch  # isort: skip
from common.io import _channel_axis, _check_side, _existing_file, _read_any  # isort: skip

__all__ = ["image_size", "read_raw_image", "SlideImage", "WholeSlideSegmenter"]

logger = logging.getLogger(__name__)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Pixels per bincount call when counting a channel's values: the int64 copy bincount makes stays small.
_CHUNK_PIXELS = 1 << 22


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(H, W) of an image file read from its header; None when the header cannot be read (the full read will
    then say what is wrong with the file)."""
    path = Path(path)
    try:
        suffix = path.suffix.lower()
        if suffix in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                return series.shape[series.axes.index("Y")], series.shape[series.axes.index("X")]
        if suffix == ".png":
            with open(path, "rb") as handle:
                header = handle.read(24)
            if header[:8] == _PNG_SIGNATURE and header[12:16] == b"IHDR":
                width, height = struct.unpack(">II", header[16:24])
                return height, width
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.height, image.width
    except Image.DecompressionBombError:
        return 2**31, 1  # larger than Pillow agrees to open: certainly a whole-slide image
    except Exception:  # any unreadable header: the plain path reads the file and reports the error
        return None


def read_raw_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as :func:`common.io.read_image` does, but keep the file's pixel type.

    Returns:
        (C, H, W) array, 1 <= C <= 4, of the file's dtype (uint8, uint16, ...), C-contiguous.

    Raises:
        ImageReadError: as :func:`common.io.read_image`; the message names the file.
    """
    path = _existing_file(path)
    array, axes = _read_any(path, SUPPORTED_IMAGE_SUFFIXES)
    if array.ndim == 2:
        array = array[np.newaxis]
    elif array.ndim == 3:
        array = np.moveaxis(array, _channel_axis(array.shape, axes, path), 0)
    else:
        raise ImageReadError(f"{path}: has shape {array.shape} (axes {axes}); expected a 2-D image, not a volume")
    if array.shape[0] > MAX_CHANNELS:
        raise ImageReadError(f"{path}: has {array.shape[0]} channels; at most {MAX_CHANNELS} are supported")
    _check_side(array.shape[1:], path)
    return np.ascontiguousarray(array)


def _value_counts(channel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of a channel as float32 (what the plain path normalizes) and how often each occurs."""
    if channel.dtype.kind in "biu" and channel.dtype.itemsize <= 2:
        offset = int(np.iinfo(channel.dtype).min) if channel.dtype.kind == "i" else 0
        counts = np.zeros(1 << (8 * channel.dtype.itemsize), dtype=np.int64)
        flat = channel.reshape(-1)
        for start in range(0, flat.size, _CHUNK_PIXELS):
            chunk = flat[start : start + _CHUNK_PIXELS].astype(np.int64)
            counts += np.bincount(chunk - offset, minlength=counts.size)
        values = np.flatnonzero(counts)
        return (values + offset).astype(np.float32), counts[values]
    values, counts = np.unique(channel.astype(np.float32), return_counts=True)
    return values, counts.astype(np.int64)


def _merged(histograms: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    values = np.concatenate([v for v, _ in histograms])
    counts = np.concatenate([c for _, c in histograms])
    merged, inverse = np.unique(values, return_inverse=True)
    return merged, np.bincount(inverse, weights=counts, minlength=merged.size).astype(np.int64)


def _percentiles(values: np.ndarray, counts: np.ndarray, percents: tuple[float, float]) -> tuple[float, float]:
    """``np.percentile(data, percents)`` (linear method) of the data whose sorted distinct ``values`` occur
    ``counts`` times, with numpy's arithmetic, so the plain path's bounds come out bit for bit."""
    total = int(counts.sum())
    ends = np.cumsum(counts)
    result = []
    for percent in percents:
        quantile = np.true_divide(percent, 100)
        virtual = total * quantile + (1 + quantile * (1 - 1 - 1)) - 1
        previous = min(max(int(np.floor(virtual)), 0), total - 1)
        following = min(previous + 1, total - 1)
        if virtual >= total - 1:
            previous = following = total - 1
        a, b = (values[np.searchsorted(ends, rank, side="right")] for rank in (previous, following))
        gamma = virtual - np.floor(virtual)
        difference = np.float64(b - a)  # float32 difference, as numpy takes it on a float32 array
        result.append(float(b - difference * (1 - gamma)) if gamma >= 0.5 else float(a + difference * gamma))
    return result[0], result[1]


class SlideImage:
    """A (C, H, W) image kept in its pixel type, normalized one region at a time with whole-image percentiles.

    ``region(rows, cols)`` equals the same region of ``normalize(to_three_channels(read_image(path)))`` (MT²'s
    whole-array or CrossCT's per-channel percentile normalization, :mod:`common.intensity`) to the last bit.

    Args:
        raw: (C, H, W) image of any real pixel type, 1 <= C <= 4.
        per_channel: normalize each channel with the percentiles of its non-zero pixels (else one pair of
            percentiles over all three channels).
        lower, upper: the percentiles.
        max_noise: the normalization's ceiling on the noise after the stretch, or None.
        ignore_zeros: whole-array percentiles of the non-zero values only (the per-channel ones always are).
    """

    def __init__(
        self,
        raw: np.ndarray,
        per_channel: bool,
        lower: float = 1.0,
        upper: float = 99.0,
        max_noise: float | None = None,
        ignore_zeros: bool = False,
    ):
        if raw.ndim != 3 or not 1 <= raw.shape[0] <= MAX_CHANNELS:
            raise ValueError(f"expected a (C, H, W) image with 1 to {MAX_CHANNELS} channels, got {raw.shape}")
        self.raw = raw
        self.per_channel = per_channel
        # where each of the three network channels comes from, as to_three_channels builds them
        self._sources = [0, 0, 0] if raw.shape[0] == 1 else [0, 1, None] if raw.shape[0] == 2 else [0, 1, 2]
        self._histograms: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.max_noise = max_noise
        self.ignore_zeros = ignore_zeros
        self._rules = self._per_channel_rules(lower, upper) if per_channel else self._whole_rules(lower, upper)

    @classmethod
    def read(
        cls,
        path: str | os.PathLike,
        per_channel: bool,
        lower: float = 1.0,
        upper: float = 99.0,
        max_noise: float | None = None,
        ignore_zeros: bool = False,
    ) -> SlideImage:
        return cls(read_raw_image(path), per_channel, lower, upper, max_noise, ignore_zeros)

    @property
    def shape(self) -> tuple[int, int]:
        return self.raw.shape[1], self.raw.shape[2]

    def _histogram(self, source: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Value counts of one network channel: a raw channel, or the zero channel of a 2-channel image."""
        if source is None:
            return np.zeros(1, np.float32), np.array([self.shape[0] * self.shape[1]], dtype=np.int64)
        if source not in self._histograms:
            self._histograms[source] = _value_counts(self.raw[source])
        return self._histograms[source]

    def _noise(self, source: int | None) -> float:
        """noise_sigma of one network channel (0 for the zero channel), only when a ceiling needs it."""
        if self.max_noise is None or source is None:
            return 0.0
        return noise_sigma(self.raw[source])

    def _whole_rules(self, lower: float, upper: float) -> list[tuple]:
        values, counts = _merged([self._histogram(source) for source in self._sources])
        if self.ignore_zeros:
            values, counts = values[values != 0], counts[values != 0]
            if values.size == 0:
                return [("zero",)] * 3
        low, high = _percentiles(values, counts, (lower, upper))
        high = ceiled_high(low, high, max(self._noise(source) for source in set(self._sources)), self.max_noise)
        return [("zero",) if high <= low else ("stretch", low, high)] * 3

    def _per_channel_rules(self, lower: float, upper: float) -> list[tuple]:
        rules = []
        for source in self._sources:
            values, counts = self._histogram(source)
            non_zero = values != 0
            if not non_zero.any():
                rules.append(("zero",))
                continue
            low, high = _percentiles(values[non_zero], counts[non_zero], (lower, upper))
            if high - low < FLAT_RANGE:
                rules.append(("as_is",))
            else:
                rules.append(("stretch", low, ceiled_high(low, high, self._noise(source), self.max_noise)))
        return rules

    @staticmethod
    def _apply(rule: tuple, channel: np.ndarray) -> np.ndarray:
        if rule[0] == "zero":
            return np.zeros(channel.shape, dtype=np.float32)
        if rule[0] == "as_is":
            return _as_is(channel)
        return _stretch(channel, rule[1], rule[2])

    def region(self, rows: slice, cols: slice) -> np.ndarray:
        """(3, h, w) float32 network input of the region, in [0, 1]."""
        three = to_three_channels(self.raw[:, rows, cols])
        return np.stack([self._apply(rule, channel) for rule, channel in zip(self._rules, three)])

    def first_channel_empty(self) -> bool:
        """Whether the normalized first channel is all zero (MT²'s sign of 2-channel fluorescence)."""
        rule, source = self._rules[0], self._sources[0]
        if rule[0] == "zero":
            return True
        threshold = rule[1] if rule[0] == "stretch" else 0.0
        band = max(1, _CHUNK_PIXELS // self.shape[1])
        bands = (self.raw[source, top : top + band] for top in range(0, self.shape[0], band))
        return not any(np.any(rows.astype(np.float32) > threshold) for rows in bands)


# Largest overview of a whole-slide image given to the post-processing (module ``WholeSlideSegmenter``).
OVERVIEW_PIXELS = 4_000_000


def _subsampling(shape: tuple[int, int], max_pixels: int) -> slice:
    """The slice taking every k-th row and column of an (H, W) image, k the smallest that keeps at most
    ``max_pixels``."""
    step = 1
    while -(-shape[0] // step) * -(-shape[1] // step) > max_pixels:
        step += 1
    return slice(None, None, step)


def _normalization_of(preprocessing) -> tuple[bool, float, float, float | None, bool]:
    """(per_channel, lower, upper, max_noise, ignore_zeros) of the bundle's preprocessing, after checking that it
    is the chain that :class:`SlideImage` reproduces (load, three channels, percentile normalization, type
    conversion)."""
    transforms = list(getattr(preprocessing, "transforms", [preprocessing]))
    normalizers = [t for t in transforms if isinstance(t, NormalizeIntensityPercentiled)]
    reproduced = (LoadMicroscopyd, ToThreeChannelsd, NormalizeIntensityPercentiled)
    others = [type(t).__name__ for t in transforms if not isinstance(t, reproduced) and type(t).__name__ != "EnsureTyped"]
    if len(normalizers) != 1 or not any(isinstance(t, ToThreeChannelsd) for t in transforms) or others:
        raise ValueError(
            "whole-slide mode reproduces LoadMicroscopyd, ToThreeChannelsd, one NormalizeIntensityPercentiled and "
            f"EnsureTyped; the preprocessing holds {[type(t).__name__ for t in transforms]}"
        )
    normalizer = normalizers[0]
    per_channel = normalizer.function is normalize_per_channel
    return per_channel, normalizer.lower, normalizer.upper, normalizer.max_noise, normalizer.ignore_zeros


class WholeSlideSegmenter:
    """The bundles' whole-slide mode: segment big images tile by tile with the bundle's own inferer and
    post-processing, merge the instances across the seams and write the label.

    Args:
        preprocessing: the bundle's preprocessing (a ``Compose`` of LoadMicroscopyd, ToThreeChannelsd,
            NormalizeIntensityPercentiled, EnsureTyped); its normalization is applied per tile with the
            whole image's percentiles, so each tile sees exactly what the plain path would feed the network.
        postprocessing: dictionary transform turning ``{pred_key: (C, h, w) network output, image_key: (3, h', w')
            normalized overview of the whole image}`` into an (h, w) or (1, h, w) instance map under
            ``pred_key`` (a bundle's ``postprocessing``). The overview (every k-th row and column, at most
            ``OVERVIEW_PIXELS``) is the same for every tile, so what the post-processing reads from the image
            (MT²'s dark-field rule) is decided once for the whole image, as the inferer's scales are.
        writer: ``common.folders.SaveInstanceLabeld`` (its ``write`` names and writes the label).
        overlay_writer: optional ``common.overlays.SaveOverlayd``; it is given the label and the normalized
            image subsampled to its ``max_pixels`` (every k-th row and column), never the full-size image.
        mode: "auto" (images of at least ``min_pixels`` px), true (every image) or false (none).
        min_pixels: size from which "auto" switches the mode on.
        tile_size: largest tile core side (px).
        halo: context around each tile (px): cells up to this size are never cut at a seam.
        pred_key: key the post-processing reads and writes.
        image_key: key under which the post-processing is given the overview.
    """

    def __init__(
        self,
        preprocessing,
        postprocessing: Callable[[dict], dict],
        writer,
        overlay_writer=None,
        mode: bool | str = "auto",
        min_pixels: int = 16_000_000,
        tile_size: int = 2048,
        halo: int = 128,
        pred_key: str = "pred",
        image_key: str = "image",
    ):
        self.mode = "auto" if str(mode).strip().lower() == "auto" else flag(mode)
        if min_pixels < 1:
            raise ValueError(f"min_pixels must be >= 1, got {min_pixels}")
        tile_grid(1, 1, tile_size, halo)  # checks tile_size and halo
        self.normalization = _normalization_of(preprocessing)
        self.postprocessing = postprocessing
        self.writer = writer
        self.overlay_writer = overlay_writer
        self.min_pixels = min_pixels
        self.tile_size = tile_size
        self.halo = halo
        self.pred_key = pred_key
        self.image_key = image_key

    def applies(self, path: str | os.PathLike) -> bool:
        """Whether the image at ``path`` is segmented in whole-slide mode."""
        if self.mode != "auto":
            return self.mode
        size = image_size(path)
        return size is not None and size[0] * size[1] >= self.min_pixels

    def segment(self, path: str | os.PathLike, inferer, network: Callable, device: torch.device | str | None = None):
        """Segment one image file tile by tile and write its label with the writer.

        Args:
            path: the image file.
            inferer: the bundle's inferer, called as ``inferer(inputs, network)`` on each (1, 3, h, w) tile.
            network: the network.
            device: where tiles are sent (the network's device); None = CPU.

        Returns:
            (H, W) int32 instance ids 1..n, 0 = background.

        Raises:
            ImageReadError: the image cannot be read (the message names the file).
        """
        start = time.perf_counter()
        slide = SlideImage.read(path, *self.normalization)
        height, width = slide.shape
        align = 1
        if isinstance(inferer, MultiScaleInferer):  # the scales are chosen once, for the whole image
            inferer = inferer.for_whole_image(first_channel_empty=slide.first_channel_empty())
            align = inferer.grid_step()
        tiles = len(tile_grid(height, width, self.tile_size, self.halo, align))
        every = _subsampling(slide.shape, OVERVIEW_PIXELS)
        overview = torch.from_numpy(slide.region(every, every))
        name = Path(path).name
        logger.info(
            "%s: %d x %d px, whole-slide mode: %d tiles of at most %d px with a %d px halo",
            name, height, width, tiles, self.tile_size, self.halo,
        )  # fmt: skip

        def segment_region(region):
            inputs = torch.from_numpy(slide.region(*region))[None].to(device or "cpu")
            with torch.no_grad():
                prediction = inferer(inputs, network)
            prediction = torch.as_tensor(prediction)[0].detach().float().cpu()
            data = {self.pred_key: prediction, self.image_key: overview}
            return as_instance_label(self.postprocessing(data)[self.pred_key])

        def report(done, total):
            elapsed = time.perf_counter() - start
            left = elapsed / done * (total - done)
            logger.info("%s: tiles done %d/%d (%.0f s, about %.0f s left)", name, done, total, elapsed, left)

        labels = segment_in_tiles(slide.shape, segment_region, self.tile_size, self.halo, report, align)
        self.writer.write(labels, path)
        if self.overlay_writer is not None:
            self._write_overlay(slide, labels, path)
        return labels

    def _write_overlay(self, slide: SlideImage, labels: np.ndarray, path: str | os.PathLike) -> None:
        every = _subsampling(slide.shape, getattr(self.overlay_writer, "max_pixels", 25_000_000))
        image = MetaTensor(torch.from_numpy(slide.region(every, every)), meta={"filename_or_obj": str(path)})
        image_key = getattr(self.overlay_writer, "image_key", "image")
        self.overlay_writer({image_key: image, self.pred_key: labels[every, every]})
