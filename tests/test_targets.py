"""Training targets: cropped per-instance computation against a whole-image reference, known answers, wrappers.

The references below are written independently of ``common.targets``: every instance is handled on the whole
image (no bounding box, no padding), with a k-d tree instead of the distance transform. The k-d tree only
searches the pixels that can be nearest, which rests on one fact: the nearest pixel q of a set S to a pixel p
outside S always has a 4-neighbour outside S (step from q one pixel towards p along the longer axis: that
pixel is closer to p, so it is not in S). ``test_references_equal_plain_distance_transform`` checks these
references against the literal full-image distance transform per instance.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import tifffile
import torch
from monai.data import MetaTensor
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage.segmentation import find_boundaries

from common.targets import (
    CellDistanced,
    MT2Heatmapsd,
    NeighborDistanced,
    ThreeClassMapd,
    cell_distance_map,
    mt2_heatmaps,
    neighbor_distance_map,
    three_class_map,
)

TOLERANCE = 1e-5
SEARCH_RADIUS = 64.0


# ----------------------------------------------------------------------------------------------- references
def _touches(mask: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour in ``mask`` (inside the image only)."""
    out = np.zeros_like(mask)
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _label_edges(label: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour (inside the image) of a different label value."""
    out = np.zeros(label.shape, bool)
    out[1:] |= label[1:] != label[:-1]
    out[:-1] |= label[:-1] != label[1:]
    out[:, 1:] |= label[:, 1:] != label[:, :-1]
    out[:, :-1] |= label[:, :-1] != label[:, 1:]
    return out


def _group(owners: np.ndarray, points: np.ndarray) -> dict[int, np.ndarray]:
    """owner id -> its rows of ``points`` (original order kept), background (0) left out."""
    order = np.argsort(owners, kind="stable")
    ids, starts = np.unique(owners[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    return {int(i): points[order[s:e]] for i, s, e in zip(ids, starts, ends) if i != 0}


def instance_pixels(label: np.ndarray) -> dict[int, np.ndarray]:
    """id -> (N, 2) row/column coordinates of all its pixels over the whole image, in C order."""
    return _group(label.ravel(), np.stack(np.unravel_index(np.arange(label.size), label.shape), axis=1))


def reference_inner_distances(label: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """id -> (pixel coordinates, distance of each pixel to the nearest pixel outside the instance)."""
    # every pixel q whose 4-neighbour p belongs to another label is a candidate for p's instance
    candidates, owners = [], []
    for axis in (0, 1):
        for step in (1, -1):
            shifted = np.roll(label, step, axis=axis)  # shifted[q] = label[q - step]
            valid = np.ones(label.shape, bool)
            valid[(slice(None),) * axis + ((0,) if step == 1 else (-1,))] = False  # no wrap-around
            pairs = valid & (shifted != label) & (shifted > 0)
            candidates.append(np.stack(np.nonzero(pairs), axis=1))
            owners.append(shifted[pairs])
    candidates_of = _group(np.concatenate(owners), np.concatenate(candidates))
    result = {}
    for index, pixels in instance_pixels(label).items():
        if index in candidates_of:
            distance = cKDTree(candidates_of[index]).query(pixels)[0]
        else:  # the instance covers the image: no boundary, distance 1 by the module's convention
            distance = np.ones(len(pixels))
        result[index] = (pixels, distance)
    return result


def reference_cell_distance(label, inner) -> np.ndarray:
    out = np.zeros(label.shape)
    for pixels, distance in inner.values():
        out[pixels[:, 0], pixels[:, 1]] = distance / distance.max()
    return out


def _odd_size(length: float) -> int:
    return 2 * int(length // 2) + 1


def _blur(image: np.ndarray, size: int) -> np.ndarray:
    """OpenCV-style GaussianBlur(ksize=size, sigma=0): sigma from the size, reflect-101 border."""
    sigma = 0.3 * ((size - 1) / 2 - 1) + 0.8
    return ndi.gaussian_filter(image.astype(float), sigma, radius=size // 2, mode="mirror")


def reference_mt2(label, inner, core_fraction=0.2) -> np.ndarray:
    # The cell map is linear in the cores, so cores sharing a kernel size are blurred together; the
    # per-instance clip to [0, 1] is a no-op (a normalized non-negative kernel on a 0/1 map stays in [0, 1]).
    # A kernel of size 1 is the identity, so such a boundary is added as is (its own maximum is 1).
    cores = defaultdict(lambda: np.zeros(label.shape))
    boundary = np.zeros(label.shape)
    inner_boundaries = find_boundaries(label, mode="inner")  # for instance i: its pixels next to a non-i pixel
    for pixels, distance in inner.values():
        rows, cols = pixels.T
        radius = distance.max()
        core = distance > core_fraction * radius
        cores[_odd_size(radius / 5)][rows[core], cols[core]] = 1
        edge = np.zeros(label.shape, bool)
        edge[rows, cols] = inner_boundaries[rows, cols]
        size = _odd_size(radius / 10)
        if size == 1:
            boundary += edge
        elif edge.any():
            blurred = _blur(edge, size)
            boundary += blurred / blurred.max()
    cell = sum((_blur(core, size) for size, core in cores.items()), np.zeros(label.shape))
    return np.clip(np.stack([cell, boundary]), 0, 1)


def reference_neighbor_raw(label, search_radius=SEARCH_RADIUS) -> np.ndarray:
    """Per instance 1 - d / max d, d = distance to the nearest other instance clipped at search_radius."""
    edges = _label_edges(label) & (label > 0)  # the nearest pixel of another instance is always one of these
    edge_pixels = np.stack(np.nonzero(edges), axis=1)
    edge_owner = label[edges]
    raw = np.zeros(label.shape)
    for index, pixels in instance_pixels(label).items():
        others = edge_pixels[edge_owner != index]
        if len(others):
            distance = np.minimum(cKDTree(others).query(pixels)[0], search_radius)
        else:
            distance = np.full(len(pixels), search_radius)
        raw[pixels[:, 0], pixels[:, 1]] = 1 - distance / distance.max()
    return raw


def reference_neighbor(label, search_radius=SEARCH_RADIUS) -> np.ndarray:
    cubed = ndi.grey_closing(reference_neighbor_raw(label, search_radius), size=(5, 5)) ** 3
    if cubed.max() - cubed.min() < 0.5:
        return np.zeros(label.shape)
    return (cubed - cubed.min()) / (cubed.max() - cubed.min())


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dev_labels(dev_pairs):
    """(file name, (H, W) int32 label) for every dev label."""
    return [(path.name, tifffile.imread(path).astype(np.int32)) for _, path in dev_pairs]


@pytest.fixture(scope="module")
def dev_inner(dev_labels):
    """Reference inner distances of every dev label, shared by the cell-distance and MT² comparisons."""
    return {name: reference_inner_distances(label) for name, label in dev_labels}


@pytest.fixture(scope="module")
def small_dev_labels(dev_labels):
    """The three dev labels cheapest to process on the whole image per instance."""
    return sorted(dev_labels, key=lambda item: item[1].size * len(np.unique(item[1])))[:3]


def _max_diff(a, b) -> float:
    assert a.shape == b.shape
    return float(np.abs(np.asarray(a, float) - np.asarray(b, float)).max())


def _check_all(dev_labels, compute, reference):
    worst = {name: _max_diff(compute(label), reference(name, label)) for name, label in dev_labels}
    bad = {name: diff for name, diff in worst.items() if diff > TOLERANCE}
    assert not bad, f"cropped result differs from the whole-image reference: {bad}"


def synthetic_label() -> np.ndarray:
    """Touching and isolated instances, some on the image border, non-contiguous ids."""
    label = np.zeros((70, 90), np.int32)
    yy, xx = np.mgrid[:70, :90]
    label[(yy - 20) ** 2 + (xx - 25) ** 2 <= 14**2] = 4
    label[(yy - 30) ** 2 + (xx - 50) ** 2 <= 12**2] = 9  # overlaps the first disc's area: they touch
    label[50:70, 0:30] = 2  # on two image borders
    label[55:65, 70:90] = 31
    label[3:6, 80:83] = 7  # tiny
    return label


# ----------------------------------------------------------------------------------------------- dev labels
def test_cell_distance_matches_whole_image_reference(dev_labels, dev_inner):
    _check_all(dev_labels, cell_distance_map, lambda name, label: reference_cell_distance(label, dev_inner[name]))


def test_mt2_heatmaps_match_whole_image_reference(dev_labels, dev_inner):
    _check_all(dev_labels, mt2_heatmaps, lambda name, label: reference_mt2(label, dev_inner[name]))


def test_neighbor_distance_matches_whole_image_reference(dev_labels):
    _check_all(dev_labels, neighbor_distance_map, lambda name, label: reference_neighbor(label))


def test_references_equal_plain_distance_transform(small_dev_labels):
    for name, label in small_dev_labels + [("synthetic", synthetic_label())]:
        inner = reference_inner_distances(label)
        raw = reference_neighbor_raw(label)
        for index, (pixels, distance) in inner.items():
            mask = label == index
            assert np.array_equal(pixels, np.argwhere(mask)), f"{name} id {index}: pixels"
            plain = ndi.distance_transform_edt(mask)[mask]
            assert np.allclose(distance, plain), f"{name} id {index}: inner distance"
            others = (label > 0) & ~mask
            to_others = np.minimum(ndi.distance_transform_edt(~others)[mask], SEARCH_RADIUS)
            assert np.allclose(raw[mask], 1 - to_others / to_others.max()), f"{name} id {index}: neighbour"


def test_whole_image_window_equals_crop(small_dev_labels):
    for name, label in small_dev_labels + [("synthetic", synthetic_label())]:
        assert _max_diff(mt2_heatmaps(label, crop=False), mt2_heatmaps(label)) <= TOLERANCE, name
        assert _max_diff(cell_distance_map(label, crop=False), cell_distance_map(label)) <= TOLERANCE, name
        assert _max_diff(neighbor_distance_map(label, crop=False), neighbor_distance_map(label)) <= TOLERANCE, name


def test_three_class_map_matches_shift_reference(dev_labels):
    for name, label in dev_labels:
        inner_boundary = _label_edges(label) & (label > 0)
        boundary = inner_boundary | _touches(inner_boundary)  # dilation by disk(1) = the 4-neighbourhood
        expected = np.where(boundary, 2, np.where(label > 0, 1, 0))
        assert np.array_equal(three_class_map(label), expected), name


# ----------------------------------------------------------------------------------------------- known answers
def test_synthetic_label_matches_references():
    label = synthetic_label()
    inner = reference_inner_distances(label)
    assert _max_diff(cell_distance_map(label), reference_cell_distance(label, inner)) <= TOLERANCE
    assert _max_diff(neighbor_distance_map(label), reference_neighbor(label)) <= TOLERANCE
    for fraction in (0.1, 0.2):
        got = mt2_heatmaps(label, core_fraction=fraction)
        assert _max_diff(got, reference_mt2(label, inner, fraction)) <= TOLERANCE


def _disc(size=41, radius=10) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] - size // 2
    return ((yy**2 + xx**2) <= radius**2).astype(np.int32)


def test_disc_cell_distance_peaks_at_centre():
    label = _disc()
    distance = cell_distance_map(label)
    assert distance.dtype == np.float32 and distance.shape == label.shape
    assert distance[20, 20] == 1.0
    assert np.count_nonzero(distance == 1.0) == 1
    assert np.all(distance[label == 0] == 0)
    assert np.all(distance[label == 1] > 0)
    # the edge pixel on the axis is 1 px from the outside, the centre sqrt(101) px (outside pixel (10, 1))
    assert distance[20, 30] == pytest.approx(1 / np.sqrt(101))


def test_disc_mt2_heatmaps():
    label = _disc()  # r = sqrt(101): cell kernel 3 (sigma 0.8), boundary kernel 1 (no blur)
    heat = mt2_heatmaps(label)
    assert heat.shape == (2, 41, 41) and heat.dtype == np.float32
    assert heat[0, 20, 20] == pytest.approx(1.0)
    assert np.all(heat[0][label == 0] == 0)  # the core stops 2 px inside the disc, the blur reaches 1 px
    assert np.array_equal(heat[1], find_boundaries(label, mode="inner").astype(np.float32))
    # the authors' r/10 core is wider than the paper's r/5
    assert heat[0].sum() < mt2_heatmaps(label, core_fraction=0.1)[0].sum()


def test_touching_squares_neighbor_map():
    label = np.zeros((40, 60), np.int32)
    label[10:30, 10:30] = 1
    label[10:30, 30:50] = 2
    neighbor = neighbor_distance_map(label)
    assert neighbor.max() == pytest.approx(1.0)
    assert np.all(neighbor[12:28, 29:31] > 0.95)  # along the shared edge
    assert np.all(neighbor[12:28, 10] < 0.05) and np.all(neighbor[12:28, 49] < 0.05)  # far sides
    row = neighbor[20, 10:30]
    assert np.all(np.diff(row) >= 0)  # rises towards the neighbour
    assert np.allclose(neighbor, neighbor[:, ::-1], atol=TOLERANCE)  # mirror-symmetric pair


def test_isolated_instances_give_empty_neighbor_map():
    label = np.zeros((200, 200), np.int32)
    label[10:30, 10:30] = 1
    label[150:180, 150:180] = 2  # farther than the search radius
    assert not neighbor_distance_map(label).any()


def test_three_class_map_square():
    label = np.zeros((11, 11), np.int32)
    label[3:8, 3:8] = 5
    expected = np.zeros((11, 11), np.uint8)
    expected[2:9, 3:8] = 2  # the square's ring and its 4-neighbours, the background included
    expected[3:8, 2:9] = 2
    expected[5, 5] = 1  # the one pixel no boundary pixel touches
    result = three_class_map(label)
    assert result.dtype == np.uint8
    assert np.array_equal(result, expected)


@pytest.mark.parametrize("ids", [(3, 17, 1000), (70000, 5, 2**40)])
def test_non_contiguous_ids(ids):
    sequential = synthetic_label()
    relabelled = np.zeros(sequential.shape, np.int64)
    for new, old in zip(ids + (6, 8), np.unique(sequential[sequential > 0])):
        relabelled[sequential == old] = new
    for function in (three_class_map, mt2_heatmaps, cell_distance_map, neighbor_distance_map):
        assert np.array_equal(function(relabelled), function(sequential)), function.__name__


def test_empty_label_gives_zeros():
    label = np.zeros((32, 48), np.uint16)
    assert np.array_equal(three_class_map(label), np.zeros((32, 48), np.uint8))
    for function, shape in ((mt2_heatmaps, (2, 32, 48)), (cell_distance_map, (32, 48)),
                            (neighbor_distance_map, (32, 48))):
        out = function(label)
        assert out.shape == shape and out.dtype == np.float32 and not out.any()


def test_instance_covering_the_image():
    label = np.full((16, 16), 3, np.int32)
    assert np.all(cell_distance_map(label) == 1)
    heat = mt2_heatmaps(label)
    assert np.all(heat[0] == 1) and not heat[1].any()
    assert not neighbor_distance_map(label).any()
    assert np.all(three_class_map(label) == 1)


def test_label_forms_accepted_and_rejected():
    label = synthetic_label()
    assert np.array_equal(cell_distance_map(label[None]), cell_distance_map(label))
    assert np.array_equal(mt2_heatmaps(label.astype(np.float32)), mt2_heatmaps(label))
    assert np.array_equal(three_class_map(label.astype(np.uint16)), three_class_map(label))
    with pytest.raises(ValueError, match="shape"):
        cell_distance_map(np.stack([label, label]))
    with pytest.raises(ValueError, match="non-integer"):
        cell_distance_map(label + 0.5)
    with pytest.raises(ValueError, match="negative"):
        cell_distance_map(-label)
    with pytest.raises(ValueError, match="search_radius"):
        neighbor_distance_map(label, search_radius=0)


# ----------------------------------------------------------------------------------------------- wrappers
WRAPPERS = [
    (ThreeClassMapd, "class_map", 1, lambda label: three_class_map(label)),
    (MT2Heatmapsd, "heatmaps", 2, lambda label: mt2_heatmaps(label)),
    (CellDistanced, "cell_distance", 1, lambda label: cell_distance_map(label)),
    (NeighborDistanced, "neighbor_distance", 1, lambda label: neighbor_distance_map(label)),
]


@pytest.mark.parametrize("wrapper, key, channels, function", WRAPPERS)
def test_wrapper_on_numpy(wrapper, key, channels, function):
    label = synthetic_label()[None]
    out = wrapper(keys="label")({"label": label, "image": "untouched"})
    assert out["image"] == "untouched" and out["label"] is label
    assert isinstance(out[key], np.ndarray) and out[key].dtype == np.float32
    assert out[key].shape == (channels, 70, 90)
    assert np.array_equal(out[key], np.asarray(function(label[0]), np.float32).reshape(channels, 70, 90))


@pytest.mark.parametrize("wrapper, key, channels, function", WRAPPERS)
def test_wrapper_on_tensors(wrapper, key, channels, function):
    label = synthetic_label()[None]
    expected = np.asarray(function(label[0]), np.float32).reshape(channels, 70, 90)
    out = wrapper(keys="label", output_key="target")({"label": torch.as_tensor(label)})
    assert isinstance(out["target"], torch.Tensor) and out["target"].dtype == torch.float32
    assert np.array_equal(out["target"].numpy(), expected)
    meta = MetaTensor(torch.as_tensor(label, dtype=torch.float32), meta={"filename_or_obj": "x_label.tiff"})
    out = wrapper(keys="label", output_key="target")({"label": meta})
    assert isinstance(out["target"], MetaTensor) and out["target"].meta["filename_or_obj"] == "x_label.tiff"
    assert np.array_equal(out["target"].numpy(), expected)


def test_wrapper_parameters_and_errors():
    label = synthetic_label()[None]
    out = MT2Heatmapsd(keys="label", core_fraction=0.1)({"label": label})["heatmaps"]
    assert np.array_equal(out, mt2_heatmaps(label, core_fraction=0.1))
    out = NeighborDistanced(keys="label", search_radius=8)({"label": label})["neighbor_distance"]
    assert np.array_equal(out[0], neighbor_distance_map(label, search_radius=8))
    assert "class_map" not in ThreeClassMapd(keys="label", allow_missing_keys=True)({"image": 0})
    with pytest.raises(KeyError):
        ThreeClassMapd(keys="label")({"image": 0})
    with pytest.raises(ValueError, match=r"\(1, H, W\)"):
        CellDistanced(keys="label")({"label": label[0]})
    with pytest.raises(ValueError, match="output_key"):
        CellDistanced(keys=("a", "b"), output_key="same")


def test_wrappers_from_bundle_config():
    from monai.bundle import ConfigParser

    parser = ConfigParser({"transforms": [
        {"_target_": "common.targets.ThreeClassMapd", "keys": "label", "output_key": "class_map"},
        {"_target_": "common.targets.MT2Heatmapsd", "keys": "label", "output_key": "heatmaps"},
        {"_target_": "common.targets.CellDistanced", "keys": "label", "output_key": "cell_distance"},
        {"_target_": "common.targets.NeighborDistanced", "keys": "label", "output_key": "neighbor_distance"},
    ]})
    data = {"label": synthetic_label()[None]}
    for transform in parser.get_parsed_content("transforms"):
        data = transform(data)
    assert {key: data[key].shape[0] for key in ("class_map", "heatmaps", "cell_distance", "neighbor_distance")} == {
        "class_map": 1, "heatmaps": 2, "cell_distance": 1, "neighbor_distance": 1}


def test_class_map_feeds_dicece_with_onehot():
    from monai.losses import DiceCELoss

    class_map = ThreeClassMapd(keys="label")({"label": torch.as_tensor(synthetic_label()[None])})["class_map"]
    target = torch.stack([class_map, class_map])  # (B, 1, H, W) float class indices
    logits = torch.randn(2, 3, 70, 90, generator=torch.Generator().manual_seed(0))
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    assert torch.isclose(loss(logits, target), loss(logits, target.long()))
    perfect = 20.0 * torch.nn.functional.one_hot(target[:, 0].long(), 3).permute(0, 3, 1, 2).float()
    assert loss(perfect, target) < loss(logits, target)
