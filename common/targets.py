"""Training targets derived from instance labels: the 3-class map, MT² heat-maps and CrossCT distance maps.

Each target is an array function on an (H, W) instance label (0 = background, ids need not be contiguous)
plus a MONAI dictionary wrapper that reads a (1, H, W) label and writes the target under ``output_key``.

The per-instance targets are computed on the instance's bounding box, padded by exactly the reach of the
algorithm (1 px for a distance transform, the blur radius + 1 for a Gaussian, the search radius for the
neighbour distance), so the result is identical to running the same per-instance code on the whole image;
``crop=False`` does precisely that (whole image as the window), which ``tools/benchmark.py targets`` uses to
measure the speed-up.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type, convert_to_numpy, ensure_tuple_rep
from scipy import ndimage as ndi
from skimage.morphology import disk
from skimage.segmentation import find_boundaries

from common.labels import as_instance_label

__all__ = [
    "three_class_map",
    "mt2_heatmaps",
    "cell_distance_map",
    "neighbor_distance_map",
    "ThreeClassMapd",
    "MT2Heatmapsd",
    "CellDistanced",
    "NeighborDistanced",
]

Window = tuple[slice, slice]

# Above this id, find_objects would allocate one list entry per possible id, so ids are made sequential first.
_MAX_DIRECT_ID = 1 << 20


def _instances(label: np.ndarray) -> tuple[np.ndarray, Iterator[tuple[int, Window]]]:
    """(label to index into, iterator of (instance id in that label, bounding box)), background excluded."""
    if label.size and label.max() > _MAX_DIRECT_ID:
        values, inverse = np.unique(label, return_inverse=True)
        # keep 0 as background: shift when the label has no background pixel at all
        label = (inverse + (values[0] != 0)).reshape(label.shape).astype(np.int32)
    boxes = ndi.find_objects(label)
    return label, ((index, box) for index, box in enumerate(boxes, start=1) if box is not None)


def _window(box: Window, pad: int, shape: tuple[int, int], crop: bool) -> Window:
    """The bounding box padded by ``pad`` and clipped to the image, or the whole image when not cropping."""
    if not crop:
        return slice(0, shape[0]), slice(0, shape[1])
    return tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(box, shape))


def _inner_distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of each mask pixel to the nearest pixel outside the mask (float64, 0 outside).

    A mask with no outside pixel (an instance covering the whole image) has no boundary in the image; its
    distance is taken as 1 everywhere rather than scipy's distance to a point beyond the array.
    """
    if mask.all():
        return np.ones(mask.shape)
    return ndi.distance_transform_edt(mask)


def _inner_boundary(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask; the image border does not count as outside."""
    return mask & ~ndi.binary_erosion(mask, border_value=1)


def _odd_kernel_size(length: float) -> int:
    """Odd kernel size (>= 1) for a nominal kernel length: ``2 * floor(length / 2) + 1``."""
    return 2 * int(np.floor(length / 2.0)) + 1


def _opencv_sigma(size: int) -> float:
    """OpenCV's sigma for a kernel size (``cv2.getGaussianKernel`` with sigma <= 0)."""
    return 0.3 * ((size - 1) / 2.0 - 1.0) + 0.8


def _blur_into(out: np.ndarray, target: np.ndarray, target_window: Window, box: Window, size: int, crop: bool,
               normalize_peak: bool) -> None:
    """Blur one instance's binary ``target`` (given on ``target_window``) with an odd kernel and add it to ``out``.

    The blur runs on the box padded by radius + 1: with OpenCV's reflect-101 border (scipy "mirror") the
    output at the window edge reads the input up to ``radius`` pixels back inside the window, so one pixel
    more than the radius keeps those reads on zeros, exactly as on the whole image.
    """
    half = size // 2
    window = _window(box, half + 1, out.shape, crop)
    canvas = np.zeros(tuple(s.stop - s.start for s in window))
    inner = tuple(slice(t.start - w.start, t.stop - w.start) for t, w in zip(target_window, window))
    canvas[inner] = target
    blurred = ndi.gaussian_filter(canvas, _opencv_sigma(size), radius=half, mode="mirror")
    if normalize_peak:
        peak = blurred.max()
        if peak > 0:
            blurred /= peak
    else:
        np.clip(blurred, 0.0, 1.0, out=blurred)
    out[window] += blurred


def three_class_map(label) -> np.ndarray:
    """Background / interior / boundary classes, as the challenge organizers build them.

    Boundary = every instance's inner boundary (``find_boundaries(mode="inner")``) dilated by ``disk(1)``, so
    it also reaches one pixel into the background; interior = foreground that is not boundary.

    Args:
        label: (H, W) or (1, H, W) integer instance label, 0 = background.

    Returns:
        (H, W) uint8 array: 0 background, 1 interior, 2 boundary.
    """
    label = as_instance_label(label)
    boundary = ndi.binary_dilation(find_boundaries(label, mode="inner"), structure=disk(1))
    classes = np.zeros(label.shape, np.uint8)
    classes[label > 0] = 1
    classes[boundary] = 2
    return classes


def mt2_heatmaps(label, core_fraction: float = 0.2, crop: bool = True) -> np.ndarray:
    """MT² cell and boundary heat-maps.

    Per instance, with d the distance of each of its pixels to the nearest pixel outside it and r = max d:
    the cell target is ``d > core_fraction * r``, blurred with a Gaussian of kernel size
    ``k = 2 * floor(r / 10) + 1`` (about r/5, odd) and clipped to [0, 1]; the boundary target is the instance's
    inner boundary (pixels with a 4-neighbour outside it) blurred with ``k = 2 * floor(r / 20) + 1`` (about
    r/10) and divided by its own maximum. Sigma follows OpenCV's rule ``0.3 * ((k - 1) / 2 - 1) + 0.8``, the
    kernel radius is ``(k - 1) / 2`` and the image border is mirrored (OpenCV's default). Instances are summed
    and each map is clipped to [0, 1].

    Args:
        label: (H, W) or (1, H, W) integer instance label, 0 = background.
        core_fraction: share of r above which a pixel belongs to the cell core. The default 0.2 is the
            paper's r/5; the authors' code uses 0.1 (r/10).
        crop: compute each instance on its padded bounding box (fast); False uses the whole image as the
            window, with the same result.

    Returns:
        (2, H, W) float32 array in [0, 1]: [cell heat-map, boundary heat-map].
    """
    label, instances = _instances(as_instance_label(label))
    heat = np.zeros((2,) + label.shape)
    for index, box in instances:
        window = _window(box, 1, label.shape, crop)
        mask = label[window] == index
        distance = _inner_distance(mask)
        radius = distance.max()
        core = distance > core_fraction * radius
        _blur_into(heat[0], core, window, box, _odd_kernel_size(radius / 5), crop, normalize_peak=False)
        _blur_into(heat[1], _inner_boundary(mask), window, box, _odd_kernel_size(radius / 10), crop,
                   normalize_peak=True)
    np.clip(heat, 0.0, 1.0, out=heat)
    return heat.astype(np.float32)


def cell_distance_map(label, crop: bool = True) -> np.ndarray:
    """CrossCT cell-distance map: per instance, the distance to its outside divided by its own maximum.

    Args:
        label: (H, W) or (1, H, W) integer instance label, 0 = background.
        crop: compute each instance on its bounding box padded by 1 px (fast); False uses the whole image.

    Returns:
        (H, W) float32 array in [0, 1], 1 at each instance's innermost pixels, 0 on the background.
    """
    label, instances = _instances(as_instance_label(label))
    out = np.zeros(label.shape)
    for index, box in instances:
        # 1 px of padding is enough: the nearest outside pixel of any box pixel is at worst on that ring.
        window = _window(box, 1, label.shape, crop)
        mask = label[window] == index
        distance = _inner_distance(mask)
        out[window][mask] = distance[mask] / distance.max()
    return out.astype(np.float32)


def neighbor_distance_map(label, search_radius: float = 64.0, crop: bool = True) -> np.ndarray:
    """CrossCT neighbour-distance map (Scherr et al. 2020): high where an instance is close to another one.

    Per instance: d = distance of each of its pixels to the nearest pixel of ANOTHER instance, clipped at
    ``search_radius`` (``search_radius`` everywhere when no other instance is that close); the instance gets
    ``1 - d / max(d within the instance)``. Over the image: 5x5 grey closing (fills the gaps between
    neighbours), cube, min-max normalization to [0, 1]; all zeros when the range before normalization is
    below 0.5 (no pair of instances close enough to matter).

    Args:
        label: (H, W) or (1, H, W) integer instance label, 0 = background.
        search_radius: distance (px) beyond which neighbours are ignored. 64 px is about the diameter of the
            largest cells of the dev labels (99% have an inscribed radius <= 28 px): every cell sees the
            neighbours around it, while a huge cell keeps a band of absolute width near its neighbours instead
            of one that scales with its size. It also bounds the crop, hence the cost.
        crop: compute each instance on its bounding box padded by ``search_radius`` (fast); False uses the
            whole image, with the same result.

    Returns:
        (H, W) float32 array in [0, 1].
    """
    if search_radius <= 0:
        raise ValueError(f"search_radius must be positive, got {search_radius}")
    label, instances = _instances(as_instance_label(label))
    pad = int(np.ceil(search_radius))
    raw = np.zeros(label.shape)
    for index, box in instances:
        # The clip at search_radius is what makes the crop exact: a neighbour pixel within search_radius of a
        # box pixel differs from it by at most search_radius along each axis, so it lies inside the box
        # padded by search_radius; farther neighbours (inside or outside the crop) all clip to search_radius.
        window = _window(box, pad, label.shape, crop)
        region = label[window]
        mask = region == index
        others = (region != 0) & ~mask
        if others.any():
            distance = np.minimum(ndi.distance_transform_edt(~others), search_radius)[mask]
        else:
            distance = np.full(np.count_nonzero(mask), float(search_radius))
        raw[window][mask] = 1.0 - distance / distance.max()
    cubed = ndi.grey_closing(raw, size=(5, 5)) ** 3
    low, high = cubed.min(), cubed.max()
    if high - low < 0.5:
        return np.zeros(label.shape, np.float32)
    return ((cubed - low) / (high - low)).astype(np.float32)


class _LabelTargetd(MapTransform):
    """Base of the dictionary wrappers: (1, H, W) label under each key -> (C, H, W) target under its output key.

    Subclasses name the array function in ``function``; ``params`` are passed to it as keyword arguments.
    """

    function: Callable[..., np.ndarray]

    def __init__(self, keys: KeysCollection, output_key: str | Sequence[str], allow_missing_keys: bool = False,
                 **params):
        super().__init__(keys, allow_missing_keys)
        self.output_keys = ensure_tuple_rep(output_key, len(self.keys))
        if len(set(self.output_keys)) != len(self.output_keys):
            raise ValueError(f"{type(self).__name__}: give one distinct output_key per key, got {output_key!r}")
        self.params = params

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key, output_key in self.key_iterator(d, self.output_keys):
            label = convert_to_numpy(d[key])
            if label.ndim != 3 or label.shape[0] != 1:
                raise ValueError(f"{type(self).__name__}: '{key}' must have shape (1, H, W), got {label.shape}")
            target = self.function(label[0], **self.params)
            if target.ndim == 2:
                target = target[None]
            # numpy in -> numpy out, tensor / MetaTensor in -> the same type (meta kept), as MONAI transforms do
            d[output_key] = convert_to_dst_type(target, d[key], dtype=np.float32)[0]
        return d


class ThreeClassMapd(_LabelTargetd):
    """Dictionary wrapper of :func:`three_class_map`: writes a (1, H, W) float32 class-index map.

    float32 rather than uint8 so that MONAI's spatial transforms and CutMix treat it like the other targets;
    ``DiceCELoss(to_onehot_y=True)`` casts the class indices to long itself.
    """

    function = staticmethod(three_class_map)

    def __init__(self, keys: KeysCollection = "label", output_key: str | Sequence[str] = "class_map",
                 allow_missing_keys: bool = False):
        super().__init__(keys, output_key, allow_missing_keys)


class MT2Heatmapsd(_LabelTargetd):
    """Dictionary wrapper of :func:`mt2_heatmaps`: writes (2, H, W) float32 [cell, boundary] heat-maps."""

    function = staticmethod(mt2_heatmaps)

    def __init__(self, keys: KeysCollection = "label", output_key: str | Sequence[str] = "heatmaps",
                 core_fraction: float = 0.2, crop: bool = True, allow_missing_keys: bool = False):
        super().__init__(keys, output_key, allow_missing_keys, core_fraction=core_fraction, crop=crop)


class CellDistanced(_LabelTargetd):
    """Dictionary wrapper of :func:`cell_distance_map`: writes a (1, H, W) float32 map."""

    function = staticmethod(cell_distance_map)

    def __init__(self, keys: KeysCollection = "label", output_key: str | Sequence[str] = "cell_distance",
                 crop: bool = True, allow_missing_keys: bool = False):
        super().__init__(keys, output_key, allow_missing_keys, crop=crop)


class NeighborDistanced(_LabelTargetd):
    """Dictionary wrapper of :func:`neighbor_distance_map`: writes a (1, H, W) float32 map."""

    function = staticmethod(neighbor_distance_map)

    def __init__(self, keys: KeysCollection = "label", output_key: str | Sequence[str] = "neighbor_distance",
                 search_radius: float = 64.0, crop: bool = True, allow_missing_keys: bool = False):
        super().__init__(keys, output_key, allow_missing_keys, search_radius=search_radius, crop=crop)
