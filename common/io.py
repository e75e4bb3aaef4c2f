"""Reading and writing CellSeg images and instance labels, and the loader transform the bundles use.

Images are returned channel-first, ``(C, H, W)`` float32 with their raw intensities (no normalization);
labels are ``(H, W)`` int32 instance ids with 0 = background. Every read error is an :class:`ImageReadError`
whose message names the file, so a bad file in a data set of thousands is found at once.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from PIL import Image

from common.labels import label_image

__all__ = [
    "SUPPORTED_IMAGE_SUFFIXES",
    "atomic_output",
    "ImageReadError",
    "image_name",
    "LoadMicroscopyd",
    "label_path_for",
    "list_images",
    "read_image",
    "read_label",
    "write_label",
]

SUPPORTED_IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")
TIFF_SUFFIXES = (".tif", ".tiff")
LABEL_SUFFIXES = (*TIFF_SUFFIXES, ".png")
MAX_CHANNELS = 4
MIN_SIDE = 2
INT32_MAX = int(np.iinfo(np.int32).max)
UINT32_MAX = int(np.iinfo(np.uint32).max)

logger = logging.getLogger(__name__)

# PIL modes whose pixels numpy can take as they are; any other mode is converted to RGB(A) first.
_PIL_DIRECT_MODES = {"L", "LA", "RGB", "RGBA", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}


class ImageReadError(ValueError):
    """An image or label file that cannot be used; the message always names the file."""


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: file not found")
    if not path.is_file():
        raise ImageReadError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: file is empty (0 bytes)")
    return path


def _check_tiff_extent(tif: tifffile.TiffFile, series: tifffile.TiffPageSeries, path: Path) -> None:
    # A truncated TIFF can still parse (its directory sits before the pixel data); refuse it rather than
    # let a decoder fill the missing part with zeros.
    size = path.stat().st_size
    for page in series.pages:
        if page is None:
            continue
        ends = [offset + count for offset, count in zip(page.dataoffsets, page.databytecounts) if count]
        if ends and max(ends) > size:
            raise ImageReadError(f"{path}: file is truncated (pixel data ends at byte {max(ends)}, file has {size})")


class _Collected(logging.Filter):
    """A logger filter that keeps each record's message instead of letting it through."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.messages.append(record.getMessage())
        return False


@contextmanager
def _tifffile_messages() -> Iterator[list[str]]:
    """What tifffile logs while a file is read, kept from its logger. It logs metadata it then works around at
    ERROR level and without the path (a description whose shape is not the pages': "<tifffile.TiffFile 'x.tif'>
    shaped series shape does not match page shape"); the reader reports them as warnings that name the file."""
    collected = _Collected()
    tifffile_logger = logging.getLogger("tifffile")
    tifffile_logger.addFilter(collected)
    try:
        yield collected.messages
    finally:
        tifffile_logger.removeFilter(collected)


def _read_tiff(path: Path) -> tuple[np.ndarray, str]:
    with _tifffile_messages() as messages, tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise ImageReadError(f"{path}: TIFF holds no image data")
        # The first series at full resolution is the image; later series are thumbnails or pyramid levels.
        series = tif.series[0]
        _check_tiff_extent(tif, series, path)
        array, axes = series.asarray(), series.axes
    for message in messages:
        logger.warning("%s: tifffile says: %s; read as %s %s", path, message.split("> ", 1)[-1], axes,
                       "x".join(map(str, array.shape)))
    return array, axes


def _read_png(path: Path) -> tuple[np.ndarray, str]:
    # libpng through imagecodecs, because Pillow silently truncates 16-bit RGB(A) and gray+alpha PNGs to 8 bits.
    array = imagecodecs.png_decode(path.read_bytes())
    return array, "YX" if array.ndim == 2 else "YXS"


def _read_with_pil(path: Path) -> tuple[np.ndarray, str]:
    with Image.open(path) as image:
        if image.mode not in _PIL_DIRECT_MODES:
            if image.mode == "1":
                target = "L"
            elif image.mode in ("P", "PA") and image.has_transparency_data:
                target = "RGBA"
            else:
                target = "RGB"
            image = image.convert(target)
        array = np.asarray(image)  # forces the decode, so truncation is detected here
    return array, "YX" if array.ndim == 2 else "YXS"


def _squeeze(array: np.ndarray, axes: str) -> tuple[np.ndarray, str]:
    """Drop singleton axes other than the spatial ones (OME/ImageJ files carry T=1, Z=1, C=1, ...)."""
    keep = [i for i, (size, axis) in enumerate(zip(array.shape, axes)) if size != 1 or axis in "YX"]
    if len(keep) == array.ndim:
        return array, axes
    return array.reshape([array.shape[i] for i in keep]), "".join(axes[i] for i in keep)


def _channel_axis(shape: tuple[int, ...], axes: str, path: Path) -> int:
    """Channel axis of a 3-D array: from the file's metadata where it says so, else by shape."""
    explicit = [i for i, axis in enumerate(axes) if axis in "CS"]
    if len(explicit) == 1:
        return explicit[0]
    planes = [axis for axis in axes if axis in "ZT"]
    if planes:
        raise ImageReadError(
            f"{path}: is a 3-D volume or time series (shape {shape}, axes {axes}); expected a 2-D image"
        )
    # The channel axis is the short one: at most MAX_CHANNELS long and shorter than both spatial sides.
    candidates = [
        i for i in range(3) if shape[i] <= MAX_CHANNELS and all(shape[i] < shape[j] for j in range(3) if j != i)
    ]
    if len(candidates) != 1:
        raise ImageReadError(
            f"{path}: cannot tell the channel axis of shape {shape}: expected a 2-D image with at most "
            f"{MAX_CHANNELS} channels, not a stack or volume"
        )
    return candidates[0]


def _check_side(shape: tuple[int, ...], path: Path) -> None:
    if min(shape) < MIN_SIDE:
        raise ImageReadError(
            f"{path}: image of {shape[0]} x {shape[1]} px is too small (at least {MIN_SIDE} px per side)"
        )


def _check_dtype(array: np.ndarray, path: Path) -> None:
    if array.dtype.kind not in "buif":
        raise ImageReadError(f"{path}: unsupported pixel type {array.dtype}")


def _read_any(path: Path, suffixes: Sequence[str]) -> tuple[np.ndarray, str]:
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise ImageReadError(f"{path}: unsupported file type {path.suffix!r} (supported: {', '.join(suffixes)})")
    try:
        if suffix in TIFF_SUFFIXES:
            array, axes = _read_tiff(path)
        elif suffix == ".png":
            array, axes = _read_png(path)
        else:
            array, axes = _read_with_pil(path)
    except (ImageReadError, MemoryError):
        raise
    except Exception as error:  # every decoder has its own exception types; all mean "this file is bad"
        raise ImageReadError(f"{path}: cannot read ({type(error).__name__}: {error})") from error
    _check_dtype(array, path)
    return _squeeze(array, axes)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a microscopy image as channel-first float32 with its raw intensities.

    Args:
        path: a .png, .tif/.tiff, .bmp or .jpg/.jpeg file holding one 2-D image with 1 to 4 channels,
            channel-first or channel-last, of any integer, boolean or float pixel type.

    Returns:
        (C, H, W) float32 array, 1 <= C <= 4, with the file's values (uint8 stays 0..255, uint16 0..65535).
        RGBA keeps its 4th channel; :func:`common.intensity.to_three_channels` drops it.

    Raises:
        ImageReadError: missing, empty, unreadable or truncated file, more than 4 channels, a side shorter
            than 2 px, or a stack/volume. The message names the file.
    """
    path = _existing_file(path)
    array, axes = _read_any(path, SUPPORTED_IMAGE_SUFFIXES)
    if array.ndim == 2:
        array = array[np.newaxis]
    elif array.ndim == 3:
        channel = _channel_axis(array.shape, axes, path)
        array = np.moveaxis(array, channel, 0)
    else:
        raise ImageReadError(f"{path}: has shape {array.shape} (axes {axes}); expected a 2-D image, not a volume")
    if array.shape[0] > MAX_CHANNELS:
        raise ImageReadError(f"{path}: has {array.shape[0]} channels; at most {MAX_CHANNELS} are supported")
    _check_side(array.shape[1:], path)
    return np.ascontiguousarray(array, dtype=np.float32)


def _checked_ids(array: np.ndarray, name: object, upper: int) -> tuple[int, int]:
    """(min, max) of integral ``array`` after checking ids are whole numbers in [0, upper]; errors name ``name``."""
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise ValueError(f"{name}: label holds NaN or infinite values")
        if not np.array_equal(array, np.round(array)):
            raise ValueError(f"{name}: float label holds non-integral values; instance ids must be whole numbers")
    elif array.dtype.kind not in "bui":
        raise ValueError(f"{name}: unsupported label type {array.dtype}")
    if array.size == 0:
        return 0, 0
    low, high = array.min(), array.max()
    if low < 0:
        raise ValueError(f"{name}: label holds negative ids (min {low}); ids must be >= 0")
    if high > upper:
        raise ValueError(f"{name}: label id {high} exceeds the largest supported id {upper}")
    return int(low), int(high)


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Read an instance label map.

    Args:
        path: a .tif/.tiff (or .png) file holding a 2-D map of instance ids (0 = background), of an unsigned
            or signed integer type, or float with whole-number values; a leading or trailing singleton axis
            ((1, H, W), (H, W, 1)) is dropped.

    Returns:
        (H, W) int32 array of the file's ids (not relabelled).

    Raises:
        ImageReadError: missing/empty/unreadable file, not 2-D, negative, non-integral or > int32-max ids.
    """
    path = _existing_file(path)
    array, axes = _read_any(path, LABEL_SUFFIXES)
    array = np.squeeze(array)  # labels have no channels: any singleton axis is dropped
    if array.ndim != 2:
        raise ImageReadError(f"{path}: label has shape {array.shape} (axes {axes}); expected a 2-D (H, W) map")
    _check_side(array.shape, path)
    try:
        _checked_ids(array, path, INT32_MAX)
    except ValueError as error:
        raise ImageReadError(str(error)) from None
    return np.ascontiguousarray(array, dtype=np.int32)


def write_label(path: str | os.PathLike, label: np.ndarray) -> Path:
    """Write an instance label map as a zlib-compressed TIFF, atomically.

    The data go to a temporary file in the target folder which then replaces ``path``, so readers never see
    a half-written label and a failed write leaves nothing behind.

    Args:
        path: target .tif/.tiff file; missing parent folders are created.
        label: (H, W) instance ids >= 0 of an integer or boolean type (or float with whole-number values).

    Returns:
        ``path`` as a Path. The file is uint16, or uint32 when the largest id exceeds 65535.

    Raises:
        ValueError: ``label`` not 2-D, negative/non-integral ids, ids beyond uint32, or a non-TIFF suffix.
    """
    path = Path(path)
    if path.suffix.lower() not in TIFF_SUFFIXES:
        raise ValueError(f"{path}: labels are written as TIFF; use a .tif or .tiff suffix")
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"{path}: label must be 2-D (H, W), got shape {label.shape}")
    _checked_ids(label, path, UINT32_MAX)  # errors that name the file
    data = label_image(label)
    with atomic_output(path) as temporary:
        tifffile.imwrite(temporary, data, photometric="minisblack", compression="zlib")
    return path


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file name beside ``path``: write it inside the block; on success it replaces ``path``, on
    failure it is removed, so readers never see a half-written file. Missing parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Hidden and unique, so list_images skips it and concurrent writers do not collide.
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files of a data folder, sorted by name.

    Args:
        folder: a folder of images, or a data set folder with an ``images/`` subfolder (used when present).

    Returns:
        Files whose suffix (any case) is in SUPPORTED_IMAGE_SUFFIXES; hidden files are skipped.

    Raises:
        FileNotFoundError: ``folder`` does not exist or is not a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist or is not a folder")
    source = folder / "images" if (folder / "images").is_dir() else folder
    return sorted(
        entry
        for entry in source.iterdir()
        if entry.is_file() and not entry.name.startswith(".") and entry.suffix.lower() in SUPPORTED_IMAGE_SUFFIXES
    )


_DOUBLE_SUFFIXES = (".ome.tif", ".ome.tiff")


def image_name(path: str | os.PathLike) -> str:
    """An image's name without its extension (``.ome.tif`` counts as one extension): the ``<name>`` of
    ``<name>_label.tiff``."""
    path = Path(path)
    for suffix in _DOUBLE_SUFFIXES:
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def label_path_for(image_path: str | os.PathLike, label_dir: str | os.PathLike) -> Path:
    """The CellSeg label file of an image: ``<label_dir>/<image name>_label.tiff``."""
    return Path(label_dir) / f"{image_name(image_path)}_label.tiff"


def _meta_tensor(array: np.ndarray, source: str | os.PathLike) -> MetaTensor:
    meta = {
        "filename_or_obj": str(source),
        "spatial_shape": np.asarray(array.shape[1:]),
        # The array is already channel-first, so a later EnsureChannelFirstd leaves it as it is.
        "original_channel_dim": 0,
    }
    return MetaTensor(array, meta=meta)


class LoadMicroscopyd(MapTransform):
    """Load an image and its label(s) from file paths, for bundle configs.

    The first key is the image: it becomes a (C, H, W) float32 MetaTensor (raw intensities). Every other key
    is a label: a (1, H, W) int32 MetaTensor of instance ids. Meta: ``filename_or_obj``, ``spatial_shape``
    (H, W), ``original_channel_dim`` = 0. Works with MONAI's default (list_data_collate) collation.

    Raises:
        ValueError: a label whose (H, W) differs from the image's (the message names both files).
        ImageReadError: any file that cannot be read (see :func:`read_image`, :func:`read_label`).
    """

    def __init__(self, keys: KeysCollection = ("image", "label"), allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        image_key = self.keys[0]
        image_source, image_shape = None, None
        for key in self.key_iterator(d):
            source = d[key]
            if not isinstance(source, (str, os.PathLike)):
                raise TypeError(f"LoadMicroscopyd expects a file path under key {key!r}, got {type(source).__name__}")
            if key == image_key:
                image = read_image(source)
                image_source, image_shape = source, image.shape[1:]
                d[key] = _meta_tensor(image, source)
                continue
            label = read_label(source)
            if image_shape is not None and label.shape != image_shape:
                raise ValueError(
                    f"label {source} is {label.shape[0]} x {label.shape[1]} px but its image {image_source} is "
                    f"{image_shape[0]} x {image_shape[1]} px"
                )
            d[key] = _meta_tensor(label[np.newaxis], source)
        return d
