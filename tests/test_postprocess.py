"""Post-processing on generated maps with known answers."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage as ndi
from skimage.filters import gaussian
from skimage.morphology import reconstruction

from common.io import read_label
from common.postprocess import (
    DistanceWatershedd,
    InteriorComponentsd,
    MT2Watershedd,
    crossct_instances,
    distance_watershed,
    grow_into_foreground,
    interior_components,
    mt2_watershed,
    split_at_necks,
)
from common.postprocess import _h_levelled


def disc(shape, centre, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def two_touching_discs(shape=(80, 120)):
    """Two discs of radius 20 whose centres are 36 px apart, so they overlap in a lens; the lens goes to the
    left one. Returns the (H, W) int32 label."""
    left, right = disc(shape, (40, 40), 20), disc(shape, (40, 76), 20)
    label = np.zeros(shape, np.int32)
    label[right] = 2
    label[left] = 1
    return label


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_mt2_watershed_separates_touching_cells_along_the_boundary_ridge():
    label = two_touching_discs()
    cell = (label > 0).astype(np.float32)
    # the boundary heat-map is high on the contact line between the two cells
    contact = ndi.binary_dilation(label == 1) & (label == 2)
    boundary = ndi.binary_dilation(contact, iterations=2).astype(np.float32)
    result = mt2_watershed(cell, boundary)
    assert result.dtype == np.int32
    assert sorted(np.unique(result)) == [0, 1, 2]
    for instance in (1, 2):
        best = max(iou(result == k, label == instance) for k in (1, 2))
        assert best > 0.85


def test_mt2_watershed_drops_small_seeds_and_unseeded_foreground():
    shape = (64, 64)
    energy_cell = np.zeros(shape, np.float32)
    big = disc(shape, (20, 20), 8)  # ~200 px seed
    tiny = disc(shape, (48, 48), 3)  # ~29 px seed, below S_min = 64
    energy_cell[big] = 1.0
    energy_cell[tiny] = 1.0
    unseeded = np.zeros(shape, bool)
    unseeded[50:60, 5:20] = True  # foreground (0.5 > T_cell) that never reaches T_seed
    energy_cell[unseeded] = 0.5
    result = mt2_watershed(energy_cell, np.zeros(shape, np.float32))
    assert result.max() == 1
    assert np.array_equal(result == 1, big)
    assert not result[tiny].any() and not result[unseeded].any()
    # the same tiny seed survives once S_min is lowered
    assert mt2_watershed(energy_cell, np.zeros(shape, np.float32), min_seed_size=10).max() == 2


def test_mt2_watershed_thresholds_are_parameters():
    cell = np.full((32, 32), 0.7, np.float32)
    assert mt2_watershed(cell, np.zeros_like(cell)).max() == 0  # 0.7 < T_seed 0.8
    assert mt2_watershed(cell, np.zeros_like(cell), seed_threshold=0.6).max() == 1


def test_split_at_necks_cuts_a_dumbbell_between_its_lobes_and_keeps_round_and_thin_regions_whole():
    shape = (80, 160)
    dumbbell = two_touching_discs(shape) > 0  # two radius-20 lobes joined by a neck ~19 px wide
    round_cell = disc(shape, (40, 135), 12)
    thin = np.zeros(shape, bool)
    thin[72:75, 10:150] = True  # 3 px wide: its distance never reaches the depth
    seeds = ndi.label(dumbbell | round_cell | thin)[0]
    split = split_at_necks(seeds, depth=2.0)
    assert split.dtype == np.int32 and split.max() == 4
    assert np.array_equal(split > 0, seeds > 0)
    left, right = (split == split[40, 40]), (split == split[40, 76])
    assert split[40, 40] != split[40, 76]
    assert iou(left, disc(shape, (40, 40), 20)) > 0.85 and iou(right, disc(shape, (40, 76), 20)) > 0.85
    assert len(np.unique(split[round_cell])) == 1 and len(np.unique(split[thin])) == 1
    # depth 0 is the identity (relabelled), and a neck shallower than the depth is not cut
    assert np.array_equal(split_at_necks(seeds, depth=0) > 0, seeds > 0) and split_at_necks(seeds, depth=0).max() == 3
    assert split_at_necks(seeds, depth=15.0).max() == 3


def _smoothed_distance(inside):
    return gaussian(ndi.distance_transform_edt(inside), sigma=1.0, preserve_range=True)


@pytest.mark.parametrize("depth", [0.75, 2.0, 3.0, 50.0])
def test_the_island_by_island_h_levelling_is_the_whole_image_reconstruction(dev_dir, depth):
    # seeds as split_at_necks gets them: every real cell shrunk by 2 px, so neighbours become separate islands,
    # many of them lower than the depth; plus islands cut by the image border and one thinner than any depth
    label = read_label(dev_dir / "labels" / "dsb_f4c4db3df4ff_label.tiff")
    inside = ndi.binary_erosion(label > 0, iterations=2)
    inside[:5, :40] = True
    inside[-1, -30:] = True
    distance = _smoothed_distance(inside)
    expected = reconstruction(distance - depth, distance, method="dilation")
    assert np.array_equal(_h_levelled(distance, depth), expected)


def test_the_island_by_island_h_levelling_on_generated_islands_with_known_tops():
    inside = disc((60, 90), (30, 25), 12) | disc((60, 90), (30, 70), 4)
    distance = ndi.distance_transform_edt(inside)
    levelled = _h_levelled(distance, depth=3.0)
    assert np.array_equal(levelled, reconstruction(distance - 3.0, distance, method="dilation"))
    # each disc's top is cut 3 px down and stays a dome of its own; between them everything is at level 0
    assert levelled[30, 25] == distance.max() - 3.0 and distance[30, 25] == distance.max()
    assert levelled[30, 70] == distance[30, 70] - 3.0 > 0
    assert levelled[0, 0] == 0.0 and levelled[30, 47] == 0.0


def test_mt2_watershed_neck_depth_splits_touching_cells_the_boundary_head_missed():
    label = two_touching_discs()
    cell = (label > 0).astype(np.float32)  # one merged seed: no boundary between the two cells
    no_boundary = np.zeros_like(cell)
    assert mt2_watershed(cell, no_boundary, min_seed_size=16).max() == 1
    result = mt2_watershed(cell, no_boundary, min_seed_size=16, neck_depth=2.0)
    assert result.max() == 2
    for instance in (1, 2):
        assert max(iou(result == k, label == instance) for k in (1, 2)) > 0.85


def test_interior_components_fills_small_holes_drops_small_objects_and_is_8_connected():
    shape = (64, 64)
    prob = np.zeros(shape, np.float32)
    body = disc(shape, (20, 20), 10)
    prob[body] = 0.9
    prob[19:22, 19:22] = 0.1  # a 9 px hole inside the body
    prob[50:53, 50:53] = 0.9  # a 9 px speck: removed
    prob[40, 10] = prob[41, 11] = prob[42, 12] = prob[43, 13] = 0.9  # a diagonal line ...
    prob[44:48, 14:18] = 0.9  # ... touching a 16 px block: one 8-connected object of 20 px
    result = interior_components(prob)
    assert result.dtype == np.int32 and result.max() == 2
    assert np.array_equal(result == result[20, 20], body)  # hole filled
    assert not result[50:53, 50:53].any()
    diagonal_id = result[40, 10]
    assert diagonal_id and result[45, 15] == diagonal_id and (result == diagonal_id).sum() == 20


def test_interior_components_expand_grows_into_background_without_merging():
    prob = np.zeros((40, 60), np.float32)
    prob[10:30, 10:28] = 0.9
    prob[10:30, 31:50] = 0.9  # 3 px gap
    plain = interior_components(prob)
    grown = interior_components(prob, expand_px=2)
    assert plain.max() == grown.max() == 2
    assert (grown > 0).sum() > (plain > 0).sum()
    assert np.all(grown[plain > 0] == plain[plain > 0])
    assert {grown[20, 28], grown[20, 30]} == {1, 2}  # the gap is shared, not merged


def normalized_distance(mask):
    distance = ndi.distance_transform_edt(mask)
    return distance / distance.max()


def test_distance_watershed_splits_touching_cells():
    label = two_touching_discs()
    cell = np.zeros(label.shape, np.float32)
    for instance in (1, 2):
        cell[label == instance] = normalized_distance(label == instance)[label == instance]
    neighbor = np.zeros(label.shape, np.float32)
    contact = ndi.binary_dilation(label == 1, iterations=3) & ndi.binary_dilation(label == 2, iterations=3)
    neighbor[ndi.binary_dilation(contact, iterations=3)] = 1.0
    result = distance_watershed(cell, neighbor)
    assert result.max() == 2
    for instance in (1, 2):
        # the outermost ring (distance 1 of a max ~18, below the 0.09 mask threshold) is not foreground
        assert max(iou(result == k, label == instance) for k in (1, 2)) > 0.85


def test_distance_watershed_without_seeds_is_empty():
    cell = np.full((16, 16), 0.3, np.float32)
    result = distance_watershed(cell, np.zeros_like(cell))
    assert result.shape == (16, 16) and result.max() == 0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        mt2_watershed(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="shape"):
        distance_watershed(np.zeros((4, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="2-D"):
        interior_components(np.zeros((2, 4, 4)))


def test_dictionary_wrappers_read_channels_and_keep_metadata():
    label = two_touching_discs()
    logits = torch.full((5, *label.shape), -10.0)
    logits[3][torch.from_numpy(label > 0)] = 10.0  # cell logit
    logits[1][torch.from_numpy(label > 0)] = 10.0  # interior logit
    logits[0][torch.from_numpy(label == 0)] = 10.0
    prediction = MetaTensor(logits, meta={"filename_or_obj": "x.png"})

    mt2 = MT2Watershedd(keys="pred", sigmoid=True, output_key="instances")({"pred": prediction})
    assert mt2["instances"].shape == (1, *label.shape) and mt2["instances"].dtype == torch.int32
    assert mt2["instances"].meta["filename_or_obj"] == "x.png"
    assert mt2["instances"].max() == 1  # no boundary signal: the two cells stay one object
    necks = MT2Watershedd(keys="pred", sigmoid=True, min_seed_size=16, neck_depth=2.0)({"pred": prediction})
    assert necks["pred"].max() == 2  # unless their merged seed is cut at its neck

    interior = InteriorComponentsd(keys="pred", softmax=True)({"pred": prediction})
    assert interior["pred"].max() == 1 and interior["pred"].shape == (1, *label.shape)

    cell = np.zeros(label.shape, np.float32)
    for instance in (1, 2):
        cell[label == instance] = normalized_distance(label == instance)[label == instance]
    maps = np.zeros((5, *label.shape), np.float32)
    maps[3] = cell
    distance = DistanceWatershedd(keys="pred")({"pred": maps})
    assert distance["pred"].max() == 2

    with pytest.raises(ValueError, match="C, H, W"):
        DistanceWatershedd(keys="pred")({"pred": np.zeros((8, 8))})


def test_dark_field_images_are_split_at_their_own_neck_depth():
    """Two nuclei of radius 8 px whose centres are 12 px apart: their merged seed narrows by less than 2 px, so a
    neck depth of 2 keeps it whole and 0.75 cuts it. With ``dark_field_neck_depth`` the image decides which."""
    shape = (40, 60)
    nuclei = disc(shape, (20, 24), 8) | disc(shape, (20, 36), 8)
    logits = torch.full((5, *shape), -10.0)
    logits[3][torch.from_numpy(nuclei)] = 10.0  # cell logit; no boundary signal between the two
    dark_image = torch.from_numpy(np.stack([nuclei.astype(np.float32)] * 3))  # bright nuclei, dark background
    bright_image = 1.0 - dark_image
    settings = dict(keys="pred", sigmoid=True, min_seed_size=16, neck_depth=2.0)

    def count(image, **more):
        return int(MT2Watershedd(**settings, **more)({"pred": logits, "image": image})["pred"].max())

    assert count(dark_image) == count(bright_image) == 1  # dark_field_neck_depth None: neck_depth for every image
    assert count(dark_image, dark_field_neck_depth=0.75) == 2
    assert count(bright_image, dark_field_neck_depth=0.75) == 1
    renamed = MT2Watershedd(**settings, dark_field_neck_depth=0.75, image_key="img")({"pred": logits, "img": dark_image})
    assert renamed["pred"].max() == 2
    with pytest.raises(KeyError, match="normalized image under 'image'"):
        MT2Watershedd(**settings, dark_field_neck_depth=0.75)({"pred": logits})


def test_interior_components_of_dark_field_images_are_split_at_their_own_neck_depth():
    """The same two nuclei as an interior class whose boundary band is missing between them: one component,
    which a neck depth of 0.5 cuts in two on a dark-field image only; then each grows back by expand_px."""
    shape = (40, 60)
    nuclei = disc(shape, (20, 24), 8) | disc(shape, (20, 36), 8)
    logits = torch.full((3, *shape), -10.0)
    logits[1][torch.from_numpy(nuclei)] = 10.0  # interior; no boundary class between the two
    dark_image = torch.from_numpy(np.stack([nuclei.astype(np.float32)] * 3))
    bright_image = 1.0 - dark_image
    settings = dict(keys="pred", softmax=True, threshold=0.65, expand_px=2)

    def labels(image, **more):
        return np.asarray(InteriorComponentsd(**settings, **more)({"pred": logits, "image": image})["pred"][0])

    assert labels(dark_image).max() == labels(bright_image).max() == 1  # none split: the organizers'
    split = labels(dark_image, dark_field_neck_depth=0.5)
    assert split.max() == 2 and split[20, 20] != split[20, 40]
    assert np.array_equal(split > 0, labels(dark_image) > 0)  # the split loses no pixel, and both grew back
    assert labels(bright_image, dark_field_neck_depth=0.5).max() == 1
    assert labels(bright_image, neck_depth=0.5).max() == 2  # neck_depth: every image
    with pytest.raises(KeyError, match="InteriorComponentsd with dark_field_neck_depth reads .* under 'image'"):
        InteriorComponentsd(**settings, dark_field_neck_depth=0.5)({"pred": logits})


def test_grow_into_foreground_fills_each_cell_and_meets_at_the_foreground_dip():
    """Two touching discs with the foreground probability dipping on their contact line, a shrunk seed in each,
    and a foreground blob no seed reaches: each seed grows to its own disc, the blob stays background."""
    label = two_touching_discs()
    foreground = (label > 0).astype(np.float32)
    contact = ndi.binary_dilation(label == 1) & (label == 2)
    foreground[ndi.binary_dilation(contact)] = 0.6  # still foreground, lower than either cell
    blob = disc(label.shape, (70, 110), 5) & (label == 0)
    foreground[blob] = 1.0
    seeds = np.zeros_like(label)
    seeds[ndi.binary_erosion(label == 1, iterations=6)] = 1
    seeds[ndi.binary_erosion(label == 2, iterations=6)] = 2
    grown = grow_into_foreground(seeds, foreground, 0.5)
    assert grown.dtype == np.int32
    assert sorted(np.unique(grown)) == [0, 1, 2]
    for instance in (1, 2):
        assert iou(grown == instance, label == instance) > 0.95
        assert (grown[seeds == instance] == instance).all()  # each object keeps its own pixels
    assert not grown[blob].any()
    assert not grow_into_foreground(seeds, foreground, 1.0)[(seeds == 0)].any()  # nothing above 1.0: no growth
    with pytest.raises(ValueError, match="differ in shape"):
        grow_into_foreground(seeds, foreground[:-1], 0.5)


def test_interior_components_grow_into_the_foreground_when_asked():
    shape = (40, 40)
    cell = disc(shape, (20, 20), 10)
    interior = disc(shape, (20, 20), 7).astype(np.float32)
    grown = interior_components(interior, 0.5, foreground_prob=cell.astype(np.float32), foreground_threshold=0.5)
    assert np.array_equal(grown > 0, cell)
    assert np.array_equal(interior_components(interior, 0.5) > 0, interior > 0)
    with pytest.raises(ValueError, match="no foreground_prob"):
        interior_components(interior, 0.5, foreground_threshold=0.5)


def _class_logits(interior, cells):
    """(3, H, W) logits: background outside ``cells``, interior on ``interior``, boundary on the rest."""
    logits = torch.full((3, *cells.shape), -10.0)
    logits[0][torch.from_numpy(~cells)] = 10.0
    logits[1][torch.from_numpy(interior)] = 10.0
    logits[2][torch.from_numpy(cells & ~interior)] = 10.0
    return logits


def test_crossct_foreground_growth_applies_to_images_that_are_not_dark_field():
    """A large and a small cell whose interiors are 4 px inside them: on a bright image (not dark-field) the large
    one grows to its whole cell and the small one, whose interior is under foreground_min_size, is dropped; on a
    dark-field image both are kept and grow by expand_px only."""
    shape = (64, 64)
    large, small = disc(shape, (20, 20), 12), disc(shape, (46, 46), 7)
    interior = disc(shape, (20, 20), 8) | disc(shape, (46, 46), 3)
    logits = _class_logits(interior, large | small)
    dark_image = torch.from_numpy(np.stack([(large | small).astype(np.float32)] * 3))
    settings = dict(keys="pred", softmax=True, threshold=0.65, expand_px=1, foreground_threshold=0.5,
                    foreground_min_size=64)
    transform = InteriorComponentsd(**settings)
    bright = np.asarray(transform({"pred": logits, "image": 1.0 - dark_image})["pred"][0])
    assert np.array_equal(bright > 0, large)
    dark = np.asarray(transform({"pred": logits, "image": dark_image})["pred"][0])
    assert dark.max() == 2
    assert np.array_equal(dark > 0, ndi.binary_dilation(interior))  # 1 px of growth, not the whole cells
    classes = torch.softmax(logits, dim=0).numpy()
    assert np.array_equal(crossct_instances(classes, False, 0.65, foreground_threshold=0.5, foreground_min_size=64), bright)
    assert crossct_instances(classes, False, 0.65, foreground_threshold=0.5).max() == 2  # min_size's 16 keeps both
    with pytest.raises(KeyError, match="InteriorComponentsd with foreground_threshold reads .* under 'image'"):
        transform({"pred": logits})
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        crossct_instances(classes[1], False)


def test_mt2_watershed_grows_into_the_foreground_when_asked():
    """Two touching cells whose boundary heat-map fires on a 3 px band inside each outline, as on images unlike the
    training ones: the energy mask holds only the inner discs; grown into the 3-class foreground each instance
    takes back its whole cell, and the two meet where the foreground dips between them."""
    label = two_touching_discs()
    cells = label > 0
    inner = np.zeros_like(cells)
    for instance in (1, 2):
        inner |= ndi.binary_erosion(label == instance, iterations=3)
    cell = cells.astype(np.float32)
    boundary = (cells & ~inner).astype(np.float32)
    foreground = gaussian(cells.astype(np.float32), 1.0)
    thin = mt2_watershed(cell, boundary, min_seed_size=16)
    grown = mt2_watershed(cell, boundary, min_seed_size=16, foreground_prob=foreground, foreground_threshold=0.5)
    assert np.array_equal(thin > 0, inner)
    assert sorted(np.unique(grown)) == [0, 1, 2]
    assert iou(grown > 0, cells) > 0.95
    for instance in (1, 2):
        assert max(iou(grown == k, label == instance) for k in (1, 2)) > 0.9
        assert max(iou(thin == k, label == instance) for k in (1, 2)) < 0.8
    with pytest.raises(ValueError, match="no foreground_prob"):
        mt2_watershed(cell, boundary, foreground_threshold=0.5)


def test_mt2_foreground_growth_applies_to_images_that_are_not_dark_field():
    """The wrapper grows a bright-field image's instance into ``1 - background`` (logits through a softmax over the
    classes) and leaves a dark-field image's at the energy mask."""
    shape = (48, 48)
    cells = disc(shape, (24, 24), 12)
    inner = disc(shape, (24, 24), 8)
    logits = torch.full((5, *shape), -10.0)
    logits[:3] = _class_logits(inner, cells)
    logits[3][torch.from_numpy(cells)] = 10.0  # cell head
    logits[4][torch.from_numpy(cells & ~inner)] = 10.0  # boundary head on a 4 px band
    dark_image = torch.from_numpy(np.stack([cells.astype(np.float32)] * 3))
    transform = MT2Watershedd(keys="pred", sigmoid=True, min_seed_size=16, foreground_threshold=0.5)
    bright = np.asarray(transform({"pred": logits, "image": 1.0 - dark_image})["pred"][0])
    dark = np.asarray(transform({"pred": logits, "image": dark_image})["pred"][0])
    assert np.array_equal(bright > 0, cells)
    assert np.array_equal(dark > 0, inner)
    probabilities = torch.cat([torch.softmax(logits[:3], 0), torch.sigmoid(logits[3:])]).numpy()
    from_probabilities = MT2Watershedd(keys="pred", min_seed_size=16, foreground_threshold=0.5)
    assert np.array_equal(np.asarray(from_probabilities({"pred": probabilities, "image": 1.0 - dark_image})["pred"][0]), bright)
    without = MT2Watershedd(keys="pred", sigmoid=True, min_seed_size=16)({"pred": logits})  # no image needed
    assert np.array_equal(np.asarray(without["pred"][0]) > 0, inner)
    with pytest.raises(KeyError, match="MT2Watershedd with foreground_threshold reads .* under 'image'"):
        transform({"pred": logits})
