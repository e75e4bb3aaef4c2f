"""Post-processing: network probability maps -> (H, W) int32 instance labels.

Three recipes, each an array function plus a dictionary wrapper:

- :func:`mt2_watershed` — MT²: watershed of ``cell - boundary`` from thresholded seeds (optionally split where
  they narrow, :func:`split_at_necks`, and grown into the predicted foreground, :func:`grow_into_foreground`);
  :func:`mt2_instances` picks its settings by the kind of image.
- :func:`interior_components` — the organizers' baseline used by CrossCT: connected components of the
  thresholded interior probability (optionally grown into the predicted foreground, :func:`grow_into_foreground`);
  :func:`crossct_instances` picks its settings by the kind of image.
- :func:`distance_watershed` — the distance-map watershed of Scherr et al. for the CrossCT cell- and
  neighbor-distance outputs (CrossCT's own "future work").
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scipy import ndimage as ndi
from skimage.filters import gaussian
from skimage.morphology import local_maxima, reconstruction
from skimage.segmentation import expand_labels, relabel_sequential, watershed

from common.intensity import is_dark_field

__all__ = [
    "mt2_watershed",
    "mt2_instances",
    "split_at_necks",
    "neck_depth_for",
    "grow_into_foreground",
    "interior_components",
    "crossct_instances",
    "distance_watershed",
    "MT2Watershedd",
    "InteriorComponentsd",
    "DistanceWatershedd",
]

# 8-connectivity for objects, as skimage.measure.label does by default in 2-D.
_FULL_CONNECTIVITY = np.ones((3, 3), dtype=bool)


def _as_float_map(array, name: str) -> np.ndarray:
    """(H, W) or (1, H, W) array/tensor -> (H, W) float32 numpy array."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) map, got shape {array.shape}")
    return array


def _drop_small_labels(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Zero every labelled object with fewer than ``min_size`` pixels (in place) and return ``labels``."""
    if min_size > 1 and labels.any():
        sizes = np.bincount(labels.ravel())
        too_small = sizes < min_size
        too_small[0] = False
        labels[too_small[labels]] = 0
    return labels


def _sequential_int32(labels: np.ndarray) -> np.ndarray:
    return relabel_sequential(labels.astype(np.int32, copy=False))[0].astype(np.int32, copy=False)


def _seeds(seed_mask: np.ndarray, min_seed_size: int) -> np.ndarray:
    """(H, W) int32 connected components of ``seed_mask`` with at least ``min_seed_size`` px."""
    seeds, _ = ndi.label(seed_mask, structure=_FULL_CONNECTIVITY)
    return _drop_small_labels(seeds.astype(np.int32, copy=False), min_seed_size)


def _seeded_watershed(relief: np.ndarray, seeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Watershed of ``-relief`` from the labelled ``seeds`` (inside ``mask``), flooding only inside ``mask``;
    mask regions without a seed stay background."""
    if not seeds.any():
        return np.zeros(relief.shape, dtype=np.int32)
    return _sequential_int32(watershed(-relief, markers=seeds, mask=mask))


def _h_levelled(distance: np.ndarray, depth: float) -> np.ndarray:
    """``reconstruction(distance - depth, distance, method="dilation")`` for a non-negative ``distance`` that is
    zero between its islands, computed island by island: the same array, without sorting every pixel of the
    image (1.1 s against 0.07 s for a 1 Mpx map of 265 seeds).

    Between islands the mask is 0, so all that crosses from one island to another is ``min(0, highest marker)``:
    each island is reconstructed alone inside a 1-px frame of zeros and raised to that level, which is also the
    level of every pixel outside the islands."""
    islands, _ = ndi.label(distance > 0, structure=_FULL_CONNECTIVITY)
    level = min(0.0, float(distance.max()) - depth)
    levelled = np.full(distance.shape, level, dtype=distance.dtype)
    for index, box in enumerate(ndi.find_objects(islands), start=1):
        framed = tuple(slice(max(axis.start - 1, 0), axis.stop + 1) for axis in box)
        island = islands[framed] == index
        mask = np.where(island, distance[framed], 0)
        local = reconstruction(mask - depth, mask, method="dilation")
        levelled[framed][island] = np.maximum(local[island], level)
    return levelled


def split_at_necks(seeds: np.ndarray, depth: float, sigma: float = 1.0) -> np.ndarray:
    """Split labelled regions where they narrow: two cells whose seeds touch through a neck get one seed each.

    Each region's Euclidean distance to its outside (smoothed by a Gaussian of ``sigma`` px) has one maximum per
    lobe; maxima at least ``depth`` px above the saddle that joins them to a higher one (h-maxima) become
    markers, and a watershed of the negated distance divides the region between them. A region without such a
    maximum (one thinner than ``depth``) stays whole.

    Args:
        seeds: (H, W) integer labels, 0 = background, regions that do not touch one another (e.g. connected
            components).
        depth: h of the h-maxima, in pixels of distance; 0 returns ``seeds`` relabelled 1..n.
        sigma: smoothing of the distance map, in pixels, so that ragged outlines do not make maxima.

    Returns:
        (H, W) int32 labels 1..n covering the pixels of ``seeds``.
    """
    seeds = np.asarray(seeds)
    inside = seeds > 0
    if depth <= 0 or not inside.any():
        return _sequential_int32(seeds)
    distance = ndi.distance_transform_edt(inside)
    if sigma > 0:
        distance = gaussian(distance, sigma=sigma, preserve_range=True)
    # the h-maxima: plateaus of the reconstruction of (distance - depth) under distance; two lobes of one height
    # joined above that level share one plateau (skimage's h_maxima would mark both tops)
    levelled = _h_levelled(distance, depth)
    markers, count = ndi.label(local_maxima(levelled, connectivity=2) & inside, structure=_FULL_CONNECTIVITY)
    unmarked = np.isin(seeds, np.unique(seeds[markers > 0]), invert=True) & inside
    markers[unmarked] = count + _sequential_int32(np.where(unmarked, seeds, 0))[unmarked]
    # 4-connected flooding never crosses between regions that do not touch
    return _sequential_int32(watershed(-distance, markers=markers, mask=inside))


def neck_depth_for(dark_field: bool, neck_depth: float, dark_field_neck_depth: float | None) -> float:
    """The depth an image's seeds (MT²) or interior components (CrossCT) are cut at: ``dark_field_neck_depth`` on a
    dark-field image (:func:`common.intensity.is_dark_field`) when it is set, ``neck_depth`` otherwise."""
    return dark_field_neck_depth if dark_field and dark_field_neck_depth is not None else neck_depth


def mt2_watershed(
    cell_prob,
    boundary_prob,
    cell_threshold: float = 0.3,
    seed_threshold: float = 0.8,
    min_seed_size: int = 64,
    neck_depth: float = 0.0,
    foreground_prob=None,
    foreground_threshold: float | None = None,
) -> np.ndarray:
    """MT² post-processing (paper section 2.3).

    The energy ``cell_prob - boundary_prob`` is thresholded at ``cell_threshold`` for the foreground mask and at
    ``seed_threshold`` for seeds; seeds smaller than ``min_seed_size`` px are discarded as noise, the rest grow
    by watershed of ``-energy`` inside the mask. Foreground that no seed reaches is dropped. With
    ``neck_depth`` > 0, seeds are first split where they narrow (:func:`split_at_necks`): where the boundary
    head misses the contact between two touching cells their seeds merge into one, and the neck between them
    is what is left to cut. With ``foreground_threshold`` set the instances then grow into the predicted
    foreground (:func:`grow_into_foreground` of ``foreground_prob``): the energy mask leaves out the band where
    the boundary head fires, which is wide around cells unlike the training images', so the instances are
    thinner than the cells (MT²'s docs/README.md, "Grown into the foreground").

    Args:
        cell_prob: (H, W) cell heat-map probability in [0, 1] (sigmoid of the cell head), float.
        boundary_prob: (H, W) boundary heat-map probability in [0, 1], float.
        cell_threshold: T_cell, foreground threshold on the energy.
        seed_threshold: T_seed, seed threshold on the energy.
        min_seed_size: S_min, smallest seed kept, in pixels.
        neck_depth: depth (px of distance) of the necks at which seeds are split; 0, the paper's, splits none.
        foreground_prob: (H, W) probability of a cell pixel (MT²: 1 - background of the 3-class head), float;
            read only when ``foreground_threshold`` is set.
        foreground_threshold: foreground probability above which instances grow; None (the paper's): no growth.

    Returns:
        (H, W) int32 instance labels, 0 = background, ids 1..n.
    """
    if foreground_threshold is not None and foreground_prob is None:
        raise ValueError("mt2_watershed: foreground_threshold is set but no foreground_prob was given")
    cell = _as_float_map(cell_prob, "cell_prob")
    boundary = _as_float_map(boundary_prob, "boundary_prob")
    if cell.shape != boundary.shape:
        raise ValueError(f"cell and boundary maps differ in shape: {cell.shape} vs {boundary.shape}")
    energy = cell - boundary
    mask = energy > cell_threshold
    seeds = split_at_necks(_seeds((energy > seed_threshold) & mask, min_seed_size), neck_depth)
    labels = _seeded_watershed(energy, seeds, mask)
    if foreground_threshold is not None:
        labels = grow_into_foreground(labels, foreground_prob, foreground_threshold)
    return labels


def mt2_instances(
    cell_prob,
    boundary_prob,
    dark_field: bool = False,
    foreground_prob=None,
    cell_threshold: float = 0.3,
    seed_threshold: float = 0.8,
    min_seed_size: int = 64,
    neck_depth: float = 0.0,
    dark_field_neck_depth: float | None = None,
    foreground_threshold: float | None = None,
) -> np.ndarray:
    """MT²'s post-processing of one image: :func:`mt2_watershed` with the settings of its kind of image.

    - Dark-field images (:func:`common.intensity.is_dark_field`: fluorescence): seeds split at necks of
      ``dark_field_neck_depth`` (when set, else ``neck_depth``), instances end at the energy mask.
    - Other images: seeds split at ``neck_depth``; with ``foreground_threshold`` set the instances then grow into
      ``foreground_prob > foreground_threshold``. On the validation split's fluorescence images the growth lowered
      F1, so dark-field images keep the energy mask (MT²'s docs/README.md, "Grown into the foreground").

    Args:
        cell_prob, boundary_prob: (H, W) heat-map probabilities, as :func:`mt2_watershed`.
        dark_field: whether the image is dark-field.
        foreground_prob: (H, W) probability of a cell pixel (``1 - background`` of the 3-class head); read only
            when the image grows.
        the rest: as :func:`mt2_watershed`; ``dark_field_neck_depth`` as :func:`neck_depth_for`.

    Returns:
        (H, W) int32 instance labels, 0 = background, ids 1..n.
    """
    grow = foreground_threshold is not None and not dark_field
    return mt2_watershed(
        cell_prob, boundary_prob, cell_threshold, seed_threshold, min_seed_size,
        neck_depth_for(dark_field, neck_depth, dark_field_neck_depth),
        foreground_prob=foreground_prob if grow else None, foreground_threshold=foreground_threshold if grow else None,
    )


def grow_into_foreground(labels: np.ndarray, foreground_prob, threshold: float) -> np.ndarray:
    """Grow labelled objects into the predicted foreground: a watershed of ``-foreground_prob`` from ``labels``
    over the pixels where ``foreground_prob > threshold``. Each object keeps its own pixels; touching objects
    meet where the foreground probability is lowest between them; foreground that no object reaches stays
    background.

    Args:
        labels: (H, W) integer labels, 0 = background.
        foreground_prob: (H, W) probability that a pixel belongs to a cell, float (CrossCT: 1 - background).
        threshold: foreground probability above which an object may grow into a pixel.

    Returns:
        (H, W) int32 labels 1..n.
    """
    foreground = _as_float_map(foreground_prob, "foreground_prob")
    labels = np.asarray(labels)
    if foreground.shape != labels.shape:
        raise ValueError(f"labels and foreground_prob differ in shape: {labels.shape} vs {foreground.shape}")
    return _seeded_watershed(foreground, labels, (foreground > threshold) | (labels > 0))


def interior_components(
    interior_prob,
    threshold: float = 0.5,
    min_size: int = 16,
    max_hole_size: int = 64,
    expand_px: int = 0,
    neck_depth: float = 0.0,
    foreground_prob=None,
    foreground_threshold: float | None = None,
) -> np.ndarray:
    """The organizers' baseline post-processing, used by CrossCT.

    ``interior_prob > threshold``, holes smaller than ``max_hole_size`` px filled, objects smaller than
    ``min_size`` px removed, then 8-connected components. The boundary class is left out of the mask, so
    instances are thinner than the cells; ``expand_px`` > 0 grows each instance by that many pixels into the
    background (never into a neighbour) to give the boundary band back — 0 reproduces the baseline. With
    ``foreground_threshold`` set the instances first grow into the predicted foreground instead
    (:func:`grow_into_foreground` of ``foreground_prob``), as far as the network sees each cell. With
    ``neck_depth`` > 0 the components are first split where they narrow (:func:`split_at_necks`): where the
    boundary class misses the contact between two touching cells their interiors merge through a neck.

    Args:
        interior_prob: (H, W) probability of the interior class, float.
        threshold: probability above which a pixel is interior.
        min_size: smallest object kept, in pixels.
        max_hole_size: holes (4-connected background regions) smaller than this are filled, as
            ``skimage.morphology.remove_small_holes`` with its default 64.
        expand_px: pixels by which instances grow after labelling (and after the growth into the foreground).
        neck_depth: depth (px of distance) of the necks at which components are split; 0 splits none.
        foreground_prob: (H, W) probability of a cell pixel (CrossCT: 1 - background), float; read only when
            ``foreground_threshold`` is set.
        foreground_threshold: foreground probability above which instances grow; None: no such growth.

    Returns:
        (H, W) int32 instance labels, 0 = background, ids 1..n.
    """
    if foreground_threshold is not None and foreground_prob is None:
        raise ValueError("interior_components: foreground_threshold is set but no foreground_prob was given")
    mask = _as_float_map(interior_prob, "interior_prob") > threshold
    background, _ = ndi.label(~mask)
    hole_sizes = np.bincount(background.ravel())
    small_hole = hole_sizes < max_hole_size
    small_hole[0] = False
    mask |= small_hole[background]
    labels, _ = ndi.label(mask, structure=_FULL_CONNECTIVITY)
    labels = _drop_small_labels(labels.astype(np.int32, copy=False), min_size)
    if neck_depth > 0:
        labels = split_at_necks(labels, neck_depth)
    if foreground_threshold is not None:
        labels = grow_into_foreground(labels, foreground_prob, foreground_threshold)
    if expand_px > 0:
        labels = expand_labels(labels, distance=expand_px)
    return _sequential_int32(labels)


def crossct_instances(
    classes,
    dark_field: bool = False,
    threshold: float = 0.5,
    min_size: int = 16,
    max_hole_size: int = 64,
    expand_px: int = 0,
    neck_depth: float = 0.0,
    dark_field_neck_depth: float | None = None,
    foreground_threshold: float | None = None,
    foreground_min_size: int | None = None,
) -> np.ndarray:
    """CrossCT's post-processing of one image: :func:`interior_components` with the settings of its kind of image.

    - Dark-field images (:func:`common.intensity.is_dark_field`: fluorescence) and every image when
      ``foreground_threshold`` is None: components of at least ``min_size`` px, split at necks of
      ``dark_field_neck_depth`` (dark-field, when set) or ``neck_depth``, grown by ``expand_px``.
    - Other images, with ``foreground_threshold`` set: components of at least ``foreground_min_size`` px (None:
      ``min_size``), split at ``neck_depth``, grown into ``1 - background > foreground_threshold``
      (:func:`grow_into_foreground`) instead of by ``expand_px``. Around small fluorescence nuclei the background
      class is wider than the nuclei, so dark-field images keep the fixed growth (CrossCT's docs/README.md).

    Args:
        classes: (3, H, W) class probabilities [background, interior, boundary], float.
        dark_field: whether the image is dark-field.
        the rest: as :func:`interior_components`; ``dark_field_neck_depth`` as :func:`neck_depth_for`.

    Returns:
        (H, W) int32 instance labels, 0 = background, ids 1..n.
    """
    classes = np.asarray(classes, dtype=np.float32)
    if classes.ndim != 3 or classes.shape[0] < 2:
        raise ValueError(f"classes must be (3, H, W) probabilities [background, interior, boundary], got {classes.shape}")
    if foreground_threshold is not None and not dark_field:
        return interior_components(
            classes[1], threshold, min_size if foreground_min_size is None else foreground_min_size, max_hole_size,
            neck_depth=neck_depth, foreground_prob=1.0 - classes[0], foreground_threshold=foreground_threshold,
        )
    depth = neck_depth_for(dark_field, neck_depth, dark_field_neck_depth)
    return interior_components(classes[1], threshold, min_size, max_hole_size, expand_px, neck_depth=depth)


def distance_watershed(
    cell_distance,
    neighbor_distance,
    seed_threshold: float = 0.5,
    mask_threshold: float = 0.09,
    min_seed_size: int = 4,
) -> np.ndarray:
    """Distance-map watershed (Scherr et al. 2020) for the CrossCT distance outputs.

    Seeds are the components of ``cell - neighbor**2 > seed_threshold``: squaring the neighbor map keeps seeds
    apart where two cells touch while barely shrinking isolated ones. The mask is ``cell > mask_threshold``
    and the relief is ``-cell``.

    Args:
        cell_distance: (H, W) predicted cell-distance map, ~1 at cell centres, float.
        neighbor_distance: (H, W) predicted neighbor-distance map, ~1 near touching neighbours, float.
        seed_threshold: threshold on ``cell - neighbor**2`` for seeds.
        mask_threshold: threshold on ``cell`` for the foreground mask.
        min_seed_size: smallest seed kept, in pixels.

    Returns:
        (H, W) int32 instance labels, 0 = background, ids 1..n.
    """
    cell = _as_float_map(cell_distance, "cell_distance")
    neighbor = _as_float_map(neighbor_distance, "neighbor_distance")
    if cell.shape != neighbor.shape:
        raise ValueError(f"cell and neighbor maps differ in shape: {cell.shape} vs {neighbor.shape}")
    mask = cell > mask_threshold
    seeds = _seeds(((cell - neighbor**2) > seed_threshold) & mask, min_seed_size)
    return _seeded_watershed(cell, seeds, mask)


class _ChannelPostprocessd(MapTransform):
    """Reads channels of a (C, H, W) prediction, writes a (1, H, W) int32 instance label to ``output_key``
    (defaults to the input key), keeping MetaTensor metadata."""

    def __init__(self, keys: KeysCollection, output_key: str | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.output_key = output_key

    def instances(self, prediction: np.ndarray, data: Mapping[Hashable, object]) -> np.ndarray:
        """(H, W) int32 instances of one (C, H, W) float32 prediction; ``data`` is the whole dictionary."""
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            prediction = d[key]
            array = prediction.detach().cpu().numpy() if isinstance(prediction, torch.Tensor) else np.asarray(prediction)
            if array.ndim != 3:
                raise ValueError(f"'{key}' must be a (C, H, W) prediction, got shape {array.shape}")
            labels = torch.from_numpy(self.instances(array.astype(np.float32, copy=False), d)[None])
            if isinstance(prediction, MetaTensor):
                labels = MetaTensor(labels, meta=prediction.meta)
            d[self.output_key or key] = labels
        return d


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 0 of a (C, H, W) float array."""
    exp = np.exp(logits - logits.max(axis=0, keepdims=True))
    return exp / exp.sum(axis=0, keepdims=True)


class _NecksByImage:
    """Whether the image of one dictionary is dark-field, for the settings that depend on it
    (``dark_field_neck_depth``, ``foreground_threshold``): the normalized (C, H, W) image under ``image_key``
    (:func:`common.intensity.is_dark_field`), read only when one of them is set."""

    _IMAGE_SETTINGS = ("dark_field_neck_depth", "foreground_threshold")
    image_key: str

    def _dark_field(self, data: Mapping[Hashable, object], settings: Mapping[str, object]) -> bool:
        """Whether the image of ``data`` is dark-field; False without reading it when none of ``settings``'
        image-dependent entries is set. The error names the first one that is."""
        setting = next((name for name in self._IMAGE_SETTINGS if settings.get(name) is not None), None)
        if setting is None:
            return False
        if self.image_key not in data:
            raise KeyError(
                f"{type(self).__name__} with {setting} reads the normalized image under "
                f"'{self.image_key}', which the dictionary lacks (keys: {sorted(map(str, data))}); pass it, or set "
                f"{setting} to None"
            )
        return is_dark_field(data[self.image_key])


class MT2Watershedd(_NecksByImage, _ChannelPostprocessd):
    """Dictionary wrapper of :func:`mt2_watershed` for an MT² prediction (C, H, W) holding the cell and
    boundary probabilities at ``cell_channel`` and ``boundary_channel`` (logits when ``sigmoid`` is True).

    With ``dark_field_neck_depth`` set, images that :func:`common.intensity.is_dark_field` calls dark-field
    (fluorescence: small, round nuclei, whose touching pairs meet at shallow necks) are split at that depth and
    the others at ``neck_depth``; the normalized (C, H, W) image is then read from ``image_key`` of the same
    dictionary, which MONAI's evaluators and MONAI Label's post-processing hold. None: ``neck_depth`` for all.

    With ``foreground_threshold`` set, the instances of images that are not dark-field grow into the 3-class
    head's foreground, ``1 - background > foreground_threshold`` (:func:`mt2_watershed`; the background
    probability at ``class_channels[0]``, after a softmax over ``class_channels`` when ``sigmoid`` is True). Dark-field
    images keep the energy mask: on the validation split's fluorescence images the growth lowered F1
    (docs/README.md, "Grown into the foreground"). It reads the image as the neck depth does.
    """

    def __init__(
        self,
        keys: KeysCollection,
        cell_channel: int = 3,
        boundary_channel: int = 4,
        sigmoid: bool = False,
        cell_threshold: float = 0.3,
        seed_threshold: float = 0.8,
        min_seed_size: int = 64,
        neck_depth: float = 0.0,
        dark_field_neck_depth: float | None = None,
        foreground_threshold: float | None = None,
        class_channels: Sequence[int] = (0, 1, 2),
        image_key: str = "image",
        output_key: str | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, output_key, allow_missing_keys)
        self.channels = (cell_channel, boundary_channel)
        self.sigmoid = sigmoid
        self.class_channels = list(class_channels)
        self.params = dict(
            cell_threshold=cell_threshold, seed_threshold=seed_threshold, min_seed_size=min_seed_size,
            neck_depth=neck_depth, dark_field_neck_depth=dark_field_neck_depth, foreground_threshold=foreground_threshold,
        )
        self.image_key = image_key

    def instances(self, prediction: np.ndarray, data: Mapping[Hashable, object]) -> np.ndarray:
        cell, boundary = (prediction[c] for c in self.channels)
        if self.sigmoid:
            cell, boundary = 1.0 / (1.0 + np.exp(-cell)), 1.0 / (1.0 + np.exp(-boundary))
        dark_field = self._dark_field(data, self.params)
        foreground = None
        if self.params["foreground_threshold"] is not None and not dark_field:
            classes = prediction[self.class_channels]
            foreground = 1.0 - (_softmax(classes) if self.sigmoid else classes)[0]
        return mt2_instances(cell, boundary, dark_field, foreground, **self.params)


class InteriorComponentsd(_NecksByImage, _ChannelPostprocessd):
    """Dictionary wrapper of :func:`interior_components` for a 3-class prediction (C, H, W) whose channels
    ``class_channels`` are [background, interior, boundary] (logits when ``softmax`` is True).

    Components are split at necks of ``neck_depth`` px (0: none, the organizers'), or of
    ``dark_field_neck_depth`` on images that :func:`common.intensity.is_dark_field` calls dark-field when that is
    set. With ``foreground_threshold`` set, the components of the other images (of at least
    ``foreground_min_size`` px) grow into the predicted foreground, ``1 - background``, instead of by
    ``expand_px`` (:func:`crossct_instances`). Either setting reads the normalized (C, H, W) image from
    ``image_key`` of the same dictionary.
    """

    def __init__(
        self,
        keys: KeysCollection,
        class_channels: Sequence[int] = (0, 1, 2),
        softmax: bool = False,
        threshold: float = 0.5,
        min_size: int = 16,
        max_hole_size: int = 64,
        expand_px: int = 0,
        neck_depth: float = 0.0,
        dark_field_neck_depth: float | None = None,
        foreground_threshold: float | None = None,
        foreground_min_size: int | None = None,
        image_key: str = "image",
        output_key: str | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, output_key, allow_missing_keys)
        self.class_channels = list(class_channels)
        self.softmax = softmax
        self.params = dict(
            threshold=threshold, min_size=min_size, max_hole_size=max_hole_size, expand_px=expand_px,
            neck_depth=neck_depth, dark_field_neck_depth=dark_field_neck_depth,
            foreground_threshold=foreground_threshold, foreground_min_size=foreground_min_size,
        )
        self.image_key = image_key

    def instances(self, prediction: np.ndarray, data: Mapping[Hashable, object]) -> np.ndarray:
        classes = prediction[self.class_channels]
        if self.softmax:
            classes = _softmax(classes)
        return crossct_instances(classes, self._dark_field(data, self.params), **self.params)


class DistanceWatershedd(_ChannelPostprocessd):
    """Dictionary wrapper of :func:`distance_watershed` for a CrossCT prediction (C, H, W) holding the
    cell- and neighbor-distance maps at ``cell_channel`` and ``neighbor_channel``."""

    def __init__(
        self,
        keys: KeysCollection,
        cell_channel: int = 3,
        neighbor_channel: int = 4,
        seed_threshold: float = 0.5,
        mask_threshold: float = 0.09,
        min_seed_size: int = 4,
        output_key: str | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, output_key, allow_missing_keys)
        self.channels = (cell_channel, neighbor_channel)
        self.params = dict(seed_threshold=seed_threshold, mask_threshold=mask_threshold, min_seed_size=min_seed_size)

    def instances(self, prediction: np.ndarray, data: Mapping[Hashable, object]) -> np.ndarray:
        cell, neighbor = (prediction[c] for c in self.channels)
        return distance_watershed(cell, neighbor, **self.params)
