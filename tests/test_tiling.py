"""Tile grids and the merge of tiles' instances: known answers on generated maps."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from common.tiling import InstanceStitcher, Tile, segment_in_tiles, tile_grid


@pytest.mark.parametrize("shape, tile_size, halo", [((700, 900), 128, 40), ((37, 1000), 300, 0), ((64, 64), 100, 16)])
def test_cores_partition_the_image_and_contexts_add_the_halo(shape, tile_size, halo):
    tiles = tile_grid(*shape, tile_size=tile_size, halo=halo)
    cover = np.zeros(shape, np.int32)
    for index, tile in enumerate(tiles):
        assert tile.index == index
        cover[tile.core] += 1
        for core, context, side in zip(tile.core, tile.context, shape):
            assert 0 < core.stop - core.start <= tile_size
            assert context.start == max(0, core.start - halo) and context.stop == min(side, core.stop + halo)
        core = np.zeros(shape, bool)
        core[tile.core] = True
        assert core[tile.context][tile.core_in_context].all()
    assert (cover == 1).all()
    sides = [tile.core[1].stop - tile.core[1].start for tile in tiles]
    assert max(sides) - min(sides) <= 1  # near-equal tiles, no thin last one


def test_aligned_contexts_start_and_end_on_multiples_of_the_step():
    for tile in tile_grid(703, 911, tile_size=200, halo=33, align=5):
        for core, context, side in zip(tile.core, tile.context, (703, 911)):
            assert context.start % 5 == 0 and (context.stop % 5 == 0 or context.stop == side)
            assert context.start <= max(0, core.start - 33) and context.stop >= min(side, core.stop + 33)
            assert core.start - context.start < 33 + 5 and context.stop - core.stop < 33 + 5


def test_an_image_smaller_than_a_tile_is_one_tile():
    assert tile_grid(50, 60, 2048, 128) == [Tile(0, (slice(0, 50), slice(0, 60)), (slice(0, 50), slice(0, 60)))]


def test_bad_grid_arguments_are_refused():
    for args in ((0, 5, 10, 1), (5, 5, 0, 1), (5, 5, 10, -1), (5, 5, 10, 1, 0)):
        with pytest.raises(ValueError):
            tile_grid(*args)


def blobs(shape, seed, sigma=2.0, share=0.3):
    noise = ndi.gaussian_filter(np.random.default_rng(seed).random(shape), sigma)
    return noise > np.quantile(noise, 1 - share)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tile_size", [64, 100, 257])
def test_components_merged_across_seams_equal_the_whole_image_components(seed, tile_size):
    mask = blobs((500, 700), seed)
    truth, count = ndi.label(mask)
    widest = max(max(s.stop - s.start for s in box) for box in ndi.find_objects(truth))
    merged = segment_in_tiles(mask.shape, lambda region: ndi.label(mask[region])[0], tile_size, widest)
    assert merged.dtype == np.int32 and merged.max() == count
    # the same partition of the pixels: every pair of ids occurs once
    pairs = np.unique(truth.astype(np.int64) * (count + 1) + merged)
    assert pairs.size == count + 1


def two_tiles():
    """A 30 x 40 image cut into a left and a right tile at column 20, with a 12 px halo."""
    left, right = tile_grid(30, 40, tile_size=30, halo=12)
    assert left.core[1] == slice(0, 20) and right.core[1] == slice(20, 40)
    return left, right


def tile_map(tile, pixels):
    """Instance map of a tile's context with instance 1 on the given global (rows, cols) box."""
    labels = np.zeros(tile.context_shape, np.int32)
    (rows, cols) = pixels
    labels[rows.start - tile.context[0].start : rows.stop - tile.context[0].start,
           cols.start - tile.context[1].start : cols.stop - tile.context[1].start] = 1  # fmt: skip
    return labels


@pytest.mark.parametrize(
    "left_columns, right_columns",
    [((15, 25), (16, 26)), ((16, 26), (14, 24))],
    # centroids at columns 19.5 (left core) and 20.5 (right core); then 20.5 seen from the left tile and 18.5
    # seen from the right one, so neither tile owns its reading and both are deferred to finish()
    ids=["each-tile-owns-its-reading", "neither-tile-owns-its-reading"],
)
def test_a_seam_cell_read_slightly_differently_by_both_tiles_is_placed_once(left_columns, right_columns):
    left, right = two_tiles()
    stitcher = InstanceStitcher((30, 40))
    stitcher.add(left, tile_map(left, (slice(10, 20), slice(*left_columns))))
    stitcher.add(right, tile_map(right, (slice(10, 20), slice(*right_columns))))
    merged = stitcher.finish()
    assert merged.max() == 1 and (merged == 1).sum() == 100
    assert merged[10:20, slice(*left_columns)].all()  # the first reading placed is kept


def test_cells_of_different_tiles_that_overlap_little_keep_their_own_pixels():
    left, right = two_tiles()
    stitcher = InstanceStitcher((30, 40))
    stitcher.add(left, tile_map(left, (slice(10, 20), slice(10, 20))))  # centre column 14.5: left core
    stitcher.add(right, tile_map(right, (slice(10, 20), slice(18, 30))))  # centre 23.5: right core, 2 columns shared
    merged = stitcher.finish()
    assert merged.max() == 2
    assert (merged == 1).sum() == 100 and (merged == 2).sum() == 100  # the second keeps only its free pixels


def test_an_object_wider_than_the_halo_is_cut_at_the_seam_but_not_lost():
    mask = np.zeros((30, 200), bool)
    mask[10:20, 20:180] = True  # 160 px long, halo 12
    merged = segment_in_tiles(mask.shape, lambda region: ndi.label(mask[region])[0], tile_size=50, halo=12)
    assert np.array_equal(merged > 0, mask)
    assert merged.max() == 4  # one piece per tile core it crosses
    assert np.array_equal(np.unique(merged), np.arange(5))


def test_wrong_tile_maps_are_refused():
    (tile,) = tile_grid(10, 10, 10, 0)
    stitcher = InstanceStitcher((10, 10))
    with pytest.raises(ValueError, match="shape"):
        stitcher.add(tile, np.zeros((9, 10), np.int32))
    with pytest.raises(ValueError, match="integers"):
        stitcher.add(tile, np.zeros((10, 10), np.float32))
    with pytest.raises(ValueError, match="negative"):
        stitcher.add(tile, -np.ones((10, 10), np.int32))
