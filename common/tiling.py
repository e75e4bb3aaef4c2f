"""Segmenting an image tile by tile, so that memory follows the tile and not the image.

The image is cut into a grid of tiles (the *cores*, which partition the image); each tile is segmented on its
*context*, the core grown by a halo on every side (clipped to the image), and its instances are merged into one
(H, W) label map by :class:`InstanceStitcher`:

1. A tile's instance is **complete** when it does not touch a side of the context that lies inside the image
   (a cut). A complete instance is **owned** by the tile whose core holds its centroid: every point of the image
   lies in exactly one core, so a cell that two tiles both see whole is placed once.
2. Owned complete instances are placed at once. Where one lands on pixels already labelled (two tiles read a
   seam cell a little differently), it is the same cell when the IoU with the placed one is >= 0.5 and is
   skipped; otherwise it takes only the free pixels, and is dropped when less than half of it is free.
3. After the last tile, complete instances that reach into a core without being owned by it (a cell whose
   centroid fell in a neighbour's core in this tile's reading but whose owner did not place it) are placed
   by the same rule, so a cell is lost only when no tile sees it whole; then the core parts of incomplete
   instances (objects wider than the halo) are placed the same way, so such objects are cut at the seams
   rather than lost.

Ids are unique and sequential (1..n) in placement order. With a halo at least as wide as the largest cell (plus
what the network needs to see around it), no cell is split at a seam and none is placed twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
from scipy import ndimage as ndi

__all__ = ["Tile", "tile_grid", "InstanceStitcher", "segment_in_tiles"]

Region = tuple[slice, slice]


@dataclass(frozen=True)
class Tile:
    """One tile of a :func:`tile_grid`.

    Attributes:
        index: position in the grid, row-major from 0.
        core: (rows, cols) slices of the image that this tile is responsible for; the cores partition the image.
        context: (rows, cols) slices that are segmented: the core grown by the halo, clipped to the image.
    """

    index: int
    core: Region
    context: Region

    @property
    def core_in_context(self) -> Region:
        """The core as slices of the context."""
        return tuple(slice(c.start - x.start, c.stop - x.start) for c, x in zip(self.core, self.context))

    @property
    def context_shape(self) -> tuple[int, int]:
        return tuple(s.stop - s.start for s in self.context)


def _splits(length: int, tile_size: int) -> list[int]:
    """Boundaries of ceil(length / tile_size) pieces of (almost) equal length: no thin last tile."""
    count = max(1, math.ceil(length / tile_size))
    return [round(i * length / count) for i in range(count + 1)]


def _context(start: int, stop: int, halo: int, length: int, align: int) -> slice:
    """``[start - halo, stop + halo)`` widened to multiples of ``align`` and clipped to ``[0, length)``."""
    return slice(max(0, (start - halo) // align * align), min(length, -(-(stop + halo) // align) * align))


def tile_grid(height: int, width: int, tile_size: int = 2048, halo: int = 128, align: int = 1) -> list[Tile]:
    """Row-major tiles whose cores, at most ``tile_size`` px a side and of near-equal sizes, partition the image.

    Args:
        height, width: image size (px).
        tile_size: largest core side (px).
        halo: context added on each side of a core (px), clipped to the image.
        align: contexts start and end on multiples of this (widening the halo by less than ``align``), except at
            the image's far edges: an inferer that resizes by a factor s with ``s * align`` whole then samples
            each tile on the whole image's grid.

    Returns:
        The tiles; one tile (core = context = image) when the image fits in ``tile_size``.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height} x {width}")
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    if halo < 0:
        raise ValueError(f"halo must be >= 0, got {halo}")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    rows, cols = _splits(height, tile_size), _splits(width, tile_size)
    tiles = []
    for top, bottom in zip(rows[:-1], rows[1:]):
        for left, right in zip(cols[:-1], cols[1:]):
            core = (slice(top, bottom), slice(left, right))
            context = (_context(top, bottom, halo, height, align), _context(left, right, halo, width, align))
            tiles.append(Tile(len(tiles), core, context))
    return tiles


def _shifted(region: Region, origin: Iterable[int]) -> Region:
    return tuple(slice(s.start + o, s.stop + o) for s, o in zip(region, origin))


@dataclass
class _Deferred:
    region: Region  # global slices of the mask's bounding box
    mask: np.ndarray  # (h, w) bool


class InstanceStitcher:
    """Merges the instance maps of the tiles of a :func:`tile_grid` into one label map (module docstring).

    Args:
        shape: (H, W) of the image.

    Use ``add(tile, labels)`` for every tile (any order), then ``finish()`` for the (H, W) int32 map.
    """

    def __init__(self, shape: tuple[int, int]):
        self.labels = np.zeros(shape, dtype=np.int32)
        self._areas = np.zeros(1024, dtype=np.int64)  # area of each placed id; index 0 unused
        self._count = 0
        self._unowned: list[_Deferred] = []
        self._pieces: list[_Deferred] = []

    @property
    def count(self) -> int:
        """Instances placed so far."""
        return self._count

    def _new_ids(self, areas: np.ndarray) -> np.ndarray:
        """Reserve ids for instances of the given areas; returns the ids."""
        needed = self._count + 1 + areas.size
        if needed > self._areas.size:
            self._areas = np.resize(self._areas, max(needed, 2 * self._areas.size))
        ids = np.arange(self._count + 1, self._count + 1 + areas.size, dtype=np.int64)
        self._areas[ids] = areas
        self._count += areas.size
        if self._count > np.iinfo(np.int32).max:
            raise OverflowError("more than 2**31 - 1 instances")
        return ids

    def _place(self, region: Region, mask: np.ndarray) -> bool:
        """Place one instance (``mask`` over the global ``region``) by the overlap rule; True when placed."""
        view = self.labels[region]
        under = view[mask]
        claimed = under[under != 0]
        area = int(mask.sum())
        if claimed.size:
            ids, overlap = np.unique(claimed, return_counts=True)
            union = area + self._areas[ids] - overlap
            if np.any(2 * overlap >= union):  # IoU >= 0.5 with a placed instance: the same cell
                return False
            mask = mask & (view == 0)
            free = int(mask.sum())
            if 2 * free < area:  # mostly claimed: another reading of cells that are already there
                return False
            area = free
        if area == 0:
            return False
        view[mask] = self._new_ids(np.array([area]))[0]
        return True

    def add(self, tile: Tile, labels: np.ndarray) -> None:
        """Merge one tile's instances.

        Args:
            tile: the tile, from the grid of this image.
            labels: (h, w) instance ids of ``tile.context`` (0 = background, any non-negative integers).
        """
        labels = np.asarray(labels)
        if labels.shape != tile.context_shape:
            raise ValueError(f"tile {tile.index}: labels of shape {labels.shape}, expected {tile.context_shape}")
        if labels.dtype.kind not in "biu":
            raise ValueError(f"tile {tile.index}: labels must be integers, got {labels.dtype}")
        if labels.size == 0 or not labels.any():
            return
        if labels.min() < 0:
            raise ValueError(f"tile {tile.index}: labels hold negative ids")
        if labels.max() > labels.size:  # sparse ids: compress so that per-id tables stay small
            labels = np.unique(labels, return_inverse=True)[1].reshape(labels.shape)
        labels = labels.astype(np.int32, copy=False)
        n = int(labels.max())
        height, width = labels.shape
        flat = labels.ravel()
        areas = np.bincount(flat, minlength=n + 1)
        present = areas > 0
        present[0] = False
        safe_areas = np.maximum(areas, 1)
        (top, bottom), (left, right) = ((s.start, s.stop) for s in tile.core)
        row_origin, col_origin = tile.context[0].start, tile.context[1].start
        row_of_pixel = np.repeat(np.arange(height, dtype=np.float64), width)
        centre_rows = row_origin + np.bincount(flat, row_of_pixel, n + 1) / safe_areas
        del row_of_pixel
        col_of_pixel = np.tile(np.arange(width, dtype=np.float64), height)
        centre_cols = col_origin + np.bincount(flat, col_of_pixel, n + 1) / safe_areas
        del col_of_pixel
        owned = (top <= centre_rows) & (centre_rows < bottom) & (left <= centre_cols) & (centre_cols < right)

        cut = np.zeros(n + 1, dtype=bool)
        image_height, image_width = self.labels.shape
        (row_start, row_stop), (col_start, col_stop) = ((s.start, s.stop) for s in tile.context)
        for inside, edge in (
            (row_start > 0, labels[0]),
            (row_stop < image_height, labels[-1]),
            (col_start > 0, labels[:, 0]),
            (col_stop < image_width, labels[:, -1]),
        ):
            if inside:
                cut[edge] = True
        cut[0] = False
        in_core = np.bincount(labels[tile.core_in_context].ravel(), minlength=n + 1) > 0
        in_core[0] = False

        complete = present & ~cut
        self._place_owned(tile, labels, complete & owned, areas)
        boxes = ndi.find_objects(labels)
        for index in np.flatnonzero(complete & ~owned & in_core):
            box = boxes[index - 1]
            self._unowned.append(_Deferred(_shifted(box, (row_origin, col_origin)), labels[box] == index))
        core_labels = labels[tile.core_in_context]
        core_boxes = ndi.find_objects(np.where(cut[core_labels], core_labels, 0)) if (cut & in_core).any() else []
        for index, box in enumerate(core_boxes, start=1):
            if box is not None:
                self._pieces.append(_Deferred(_shifted(box, (top, left)), core_labels[box] == index))

    def _place_owned(self, tile: Tile, labels: np.ndarray, chosen: np.ndarray, areas: np.ndarray) -> None:
        """Place the owned complete instances: those on free pixels all at once, the others one by one."""
        if not chosen.any():
            return
        view = self.labels[tile.context]
        wanted = chosen[labels]
        clashing = np.zeros_like(chosen)
        clashing[labels[wanted & (view != 0)]] = True
        clean = chosen & ~clashing
        lookup = np.zeros(chosen.size, dtype=np.int32)
        clean_ids = np.flatnonzero(clean)
        lookup[clean_ids] = self._new_ids(areas[clean_ids])
        new = lookup[labels]
        written = new != 0
        view[written] = new[written]
        if clashing.any():
            boxes = ndi.find_objects(labels)
            origin = (tile.context[0].start, tile.context[1].start)
            for index in np.flatnonzero(clashing & chosen):
                box = boxes[index - 1]
                self._place(_shifted(box, origin), labels[box] == index)

    def finish(self) -> np.ndarray:
        """Place the deferred instances (unowned complete ones, then pieces of objects wider than the halo).

        Returns:
            (H, W) int32 instance ids 1..n, 0 = background.
        """
        for deferred in (*self._unowned, *self._pieces):
            self._place(deferred.region, deferred.mask)
        self._unowned, self._pieces = [], []
        return self.labels


def segment_in_tiles(
    shape: tuple[int, int],
    segment_region: Callable[[Region], np.ndarray],
    tile_size: int = 2048,
    halo: int = 128,
    on_tile_done: Callable[[int, int], None] | None = None,
    align: int = 1,
) -> np.ndarray:
    """Segment an image tile by tile and merge the tiles' instances (module docstring).

    Args:
        shape: (H, W) of the image.
        segment_region: given (rows, cols) slices of the image, returns the (h, w) integer instance map of that
            region; it is called once per tile with the tile's context.
        tile_size: largest core side (px).
        halo: context on each side of a core (px); at least the largest cell diameter.
        on_tile_done: called with (tiles done, tiles in all) after every tile, e.g. to report progress.
        align: see :func:`tile_grid`.

    Returns:
        (H, W) int32 instance ids 1..n, 0 = background.
    """
    tiles = tile_grid(*shape, tile_size=tile_size, halo=halo, align=align)
    stitcher = InstanceStitcher(shape)
    for tile in tiles:
        stitcher.add(tile, segment_region(tile.context))
        if on_tile_done is not None:
            on_tile_done(tile.index + 1, len(tiles))
    return stitcher.finish()
