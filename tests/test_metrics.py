"""The challenge F1 (common/metrics.py) against a brute-force transcription of the definition in methods.md.

The brute force below builds the dense (max_id + 1)^2 overlap histogram and runs the Hungarian algorithm on the
full n_gt x n_pred cost matrix exactly as the organizers describe; border removal is its own simple code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from ignite.exceptions import NotComputableError
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree
from skimage.segmentation import expand_labels, relabel_sequential

from common.io import read_label
from common.metrics import (
    InstanceF1,
    MatchCounts,
    challenge_counts,
    f1_from_counts,
    match_counts,
    remove_border_instances,
)

# --------------------------------------------------------------------------- brute force of the definition


def brute_border_removal(label: np.ndarray, margin: int = 2) -> np.ndarray:
    label = np.asarray(label, dtype=np.int64)
    h, w = label.shape
    frame = np.ones((h, w), dtype=bool)
    frame[margin : h - margin, margin : w - margin] = False
    kept = np.where(np.isin(label, label[frame]), 0, label)
    return relabel_sequential(kept)[0].astype(np.int64)


def brute_counts(gt: np.ndarray, pred: np.ndarray) -> tuple[int, int, int]:
    """TP, FP, FN of two sequentially relabelled maps: dense histogram + full Hungarian on the organizers' cost."""
    n_gt, n_pred = int(gt.max()), int(pred.max())
    if n_gt == 0 or n_pred == 0:
        return 0, n_pred, n_gt
    histogram = np.bincount(
        (gt.astype(np.int64) * (n_pred + 1) + pred).ravel(), minlength=(n_gt + 1) * (n_pred + 1)
    ).reshape(n_gt + 1, n_pred + 1)
    intersection = histogram[1:, 1:]
    union = histogram.sum(axis=1)[1:, None] + histogram.sum(axis=0)[None, 1:] - intersection
    iou = intersection / union
    cost = -(iou >= 0.5).astype(float) - iou / (2 * min(n_gt, n_pred))
    rows, cols = linear_sum_assignment(cost)
    tp = int(np.count_nonzero(iou[rows, cols] >= 0.5))
    return tp, n_pred - tp, n_gt - tp


def brute_tiles(label: np.ndarray) -> list[np.ndarray]:
    """Zero-pad to multiples of 2000 and border-remove each 2000 x 2000 tile on its own (row-major order)."""
    label = np.pad(label, [(0, -side % 2000) for side in label.shape])
    return [
        brute_border_removal(label[top : top + 2000, left : left + 2000])
        for top in range(0, label.shape[0], 2000)
        for left in range(0, label.shape[1], 2000)
    ]


def brute_tiled_counts(gt_tiles: list[np.ndarray], pred_tiles: list[np.ndarray]) -> tuple[int, int, int]:
    total = np.sum([brute_counts(gt, pred) for gt, pred in zip(gt_tiles, pred_tiles)], axis=0)
    return tuple(int(v) for v in total)


def brute_challenge(gt: np.ndarray, pred: np.ndarray) -> tuple[int, int, int]:
    if gt.size < 25_000_000:
        return brute_counts(brute_border_removal(gt), brute_border_removal(pred))
    return brute_tiled_counts(brute_tiles(gt), brute_tiles(pred))


def as_tuple(counts: MatchCounts) -> tuple[int, int, int]:
    return counts.tp, counts.fp, counts.fn


def brute_f1(gt: np.ndarray, pred: np.ndarray) -> float:
    tp, fp, fn = brute_challenge(gt, pred)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


# --------------------------------------------------------------------------- perturbations of real labels


def erode(label):
    """Each instance loses its outer 1-px ring (also where it touches a neighbour)."""
    same = (ndi.minimum_filter(label, size=3) == label) & (ndi.maximum_filter(label, size=3) == label)
    return np.where(same, label, 0)


def dilate(label):
    return expand_labels(label, distance=2)  # grows into background only: neighbours are not overwritten


def merge_neighbours(label, max_merges=6):
    """Give up to ``max_merges`` disjoint pairs of nearest-neighbour instances (by centroid) a single id."""
    ids = np.unique(label)[1:]
    centroids = np.array(ndi.center_of_mass(np.ones_like(label), label, ids))
    distance, nearest = cKDTree(centroids).query(centroids, k=2)
    out, used = label.copy(), set()
    for first in np.argsort(distance[:, 1]):
        second = nearest[first, 1]
        if first not in used and second not in used and len(used) < 2 * max_merges:
            out[out == ids[second]] = ids[first]
            used |= {first, second}
    return out


def split_cells(label, every=3):
    """Split every ``every``-th instance in two by raster order: even areas give two exact halves (IoU 0.5 ties)."""
    out, next_id = label.copy(), int(label.max()) + 1
    for index, window in enumerate(ndi.find_objects(label)):
        if window is None or index % every:
            continue
        region = out[window]  # a view: writes go to ``out``
        pixels = np.flatnonzero(region == index + 1)
        region.flat[pixels[pixels.size // 2 :]] = next_id
        next_id += 1
    return out


def shift(label, offset=3):
    out = np.zeros_like(label)
    out[offset:, offset:] = label[:-offset, :-offset]
    return out


def drop_cells(label):
    ids = np.flatnonzero(np.bincount(label.ravel()))
    return np.where(np.isin(label, ids[1::3]), 0, label)


def border_cells(label):
    """Squares just on and just off the 2-px frame on every side, and three real cells moved onto the left edge."""
    out, h, w = label.copy(), *label.shape
    new = int(label.max()) + 1
    for k, window in enumerate(
        [np.s_[1:7, 10:16], np.s_[2:8, 20:26], np.s_[h - 8 : h - 2, 30:36], np.s_[h - 7 : h - 1, 40:46],
         np.s_[10:16, 1:7], np.s_[20:26, 2:8], np.s_[30:36, w - 7 : w - 1], np.s_[40:46, w - 8 : w - 2]]
    ):
        out[window] = new + k
    for cell in np.unique(label)[1:4]:
        rows, cols = np.nonzero(out == cell)
        out[rows, cols] = 0
        out[rows, cols - cols.min() + 1] = cell
    return out


def scatter_ids(label, largest=65_535):
    """Same instances under random, non-contiguous ids up to ``largest``."""
    rng = np.random.default_rng(7)
    lookup = np.concatenate([[0], rng.choice(largest, size=int(label.max()), replace=False) + 1])
    return lookup[label]


PERTURBATIONS = {
    "eroded": erode,
    "dilated": dilate,
    "merged": merge_neighbours,
    "split": split_cells,
    "shifted": shift,
    "dropped": drop_cells,
    "border": border_cells,
    "scattered_ids": scatter_ids,
}


@pytest.fixture(scope="module")
def dev_labels(dev_pairs) -> dict[str, np.ndarray]:
    return {label_path.name: read_label(label_path) for _, label_path in dev_pairs}


@pytest.fixture(scope="module")
def dev_labels_kept(dev_labels) -> dict[str, np.ndarray]:
    """The brute-force border removal of every dev label (computed once for all perturbation tests)."""
    return {name: brute_border_removal(label) for name, label in dev_labels.items()}


# --------------------------------------------------------------------------- real dev labels


def test_every_dev_label_against_itself_scores_one(dev_labels, dev_labels_kept):
    for name, label in dev_labels.items():
        n_kept = int(dev_labels_kept[name].max())
        assert n_kept > 0, name
        counts = challenge_counts(label, label.copy())
        assert as_tuple(counts) == (n_kept, 0, 0), name
        assert counts.f1 == 1.0


@pytest.mark.parametrize("kind", sorted(PERTURBATIONS))
def test_perturbed_dev_labels_match_brute_force(dev_labels, dev_labels_kept, kind):
    perturb = PERTURBATIONS[kind]
    not_perfect = 0
    for name, label in dev_labels.items():
        changed = perturb(label)
        kept, changed_kept = dev_labels_kept[name], brute_border_removal(changed)
        expected = brute_counts(kept, changed_kept)
        assert as_tuple(challenge_counts(label, changed)) == expected, f"{name} ({kind})"
        # the roles swapped: the same matches, FP and FN exchanged -- checked independently all the same
        assert as_tuple(challenge_counts(changed, label)) == brute_counts(changed_kept, kept), f"{name} ({kind})"
        not_perfect += expected[1] + expected[2] > 0
    if kind != "scattered_ids":  # the perturbation must change the score somewhere, or the test proves nothing
        assert not_perfect > 0


def test_split_cells_produce_exact_half_ties_and_count_once(dev_labels):
    # the two halves of an even-area cell both have IoU exactly 0.5 with it: one of them is a TP, the other FP
    label = dev_labels["he_image01_label.tiff"]
    changed = split_cells(label)
    counts = challenge_counts(label, changed)
    assert as_tuple(counts) == brute_challenge(label, changed)
    n_pred = int(brute_border_removal(changed).max())
    n_gt = int(brute_border_removal(label).max())
    assert counts.tp + counts.fp == n_pred and counts.tp + counts.fn == n_gt
    assert counts.fp > 0 and counts.fn < counts.fp  # split cells keep a half-match, so FN stays below FP


def test_huge_sparse_ids_are_handled(dev_labels):
    label = dev_labels["he_image02_label.tiff"]
    huge = scatter_ids(label, largest=2**32 - 2).astype(np.uint32)  # far more ids than pixels: compressed first
    assert huge.max() > 2**31
    assert as_tuple(challenge_counts(huge, erode(label))) == brute_challenge(label, erode(label))
    # the same instances survive, renumbered 1..n (in the order of the new ids)
    kept_huge, kept = remove_border_instances(huge), remove_border_instances(label)
    np.testing.assert_array_equal(kept_huge > 0, kept > 0)
    pairs = np.unique(np.stack([kept_huge.ravel(), kept.ravel()]), axis=1)
    assert pairs.shape[1] - 1 == kept.max() == kept_huge.max() == brute_border_removal(label).max()


def test_match_counts_has_no_border_removal(dev_labels):
    label = dev_labels["dsb_0121d6759c5a_label.tiff"]
    n_all = len(np.unique(label)) - 1
    assert as_tuple(match_counts(label, label)) == (n_all, 0, 0)
    assert as_tuple(match_counts(label, shift(label))) == brute_counts(
        brute_border_removal(label, 0), brute_border_removal(shift(label), 0)
    )


# --------------------------------------------------------------------------- whole-slide tiling (>= 25 Mpx)


def mosaic(labels, side=5000):
    """A side x side map tiled with real labels (ids offset per copy); copies straddle the 2000-px tile seams."""
    canvas = np.zeros((side, side), dtype=np.int32)
    top, offset, row_height, left = 0, 0, 0, 0
    index = 0
    while top < side:
        label = labels[index % len(labels)]
        index += 1
        h, w = min(label.shape[0], side - top), min(label.shape[1], side - left)
        piece = label[:h, :w].astype(np.int32)
        canvas[top : top + h, left : left + w] = np.where(piece > 0, piece + offset, 0)
        offset += int(label.max())
        row_height, left = max(row_height, h), left + w
        if left >= side:
            top, left, row_height = top + row_height, 0, 0
    return canvas


def test_whole_slide_is_scored_per_tile_like_brute_force(dev_labels):
    gt = mosaic(list(dev_labels.values()))
    assert gt.size == 25_000_000
    pred = drop_cells(shift(gt, 2))
    gt_tiles = brute_tiles(gt)
    assert as_tuple(challenge_counts(gt, pred)) == brute_tiled_counts(gt_tiles, brute_tiles(pred))
    # against itself, the per-tile border removal drops the cells on the seams, which the whole image keeps
    tiled, untiled = challenge_counts(gt, gt), challenge_counts(gt, gt, tiling_min_pixels=10**9)
    assert as_tuple(tiled) == (sum(int(tile.max()) for tile in gt_tiles), 0, 0)
    assert 0 < tiled.tp < untiled.tp


def squares(shape, windows, dtype=np.uint8):
    label = np.zeros(shape, dtype=dtype)
    for k, window in enumerate(windows, start=1):
        label[window] = k
    return label


def test_tile_seams_and_padded_edges_at_full_scale():
    inside = np.s_[100:120, 100:120]
    on_seam = np.s_[100:120, 1990:2010]  # crosses the vertical seam at x = 2000
    on_bottom_edge = np.s_[4990:5000, 300:320]  # touches the image edge, but the padded tile edge is at 6000
    big = squares((5000, 5000), [inside, on_seam, on_bottom_edge])
    assert as_tuple(challenge_counts(big, big)) == (2, 0, 0)  # inside + bottom edge
    just_small = squares((4999, 5001), [inside, on_seam, np.s_[4989:4999, 300:320]])  # 24,999,999 px: untiled
    assert as_tuple(challenge_counts(just_small, just_small)) == (2, 0, 0)  # inside + seam


def test_tiling_parameters_known_answer():
    a, seam, bottom, near_top = np.s_[5:10, 5:10], np.s_[5:10, 17:23], np.s_[45:50, 5:10], np.s_[41:45, 25:30]
    label = squares((50, 50), [a, seam, bottom, near_top])
    # tiles of 20 on the image padded to 60 x 60: the seam square and the one touching a tile's top frame go
    assert as_tuple(challenge_counts(label, label, tile_size=20, tiling_min_pixels=0)) == (2, 0, 0)
    # untiled, only the square touching the image's bottom edge goes
    assert as_tuple(challenge_counts(label, label)) == (3, 0, 0)


# --------------------------------------------------------------------------- small cases with known answers


def disc(shape, center, radius):
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius**2


def test_two_discs():
    gt = np.zeros((64, 64), dtype=np.int32)
    gt[disc(gt.shape, (20, 20), 8)] = 3
    gt[disc(gt.shape, (44, 36), 8)] = 9
    assert as_tuple(challenge_counts(gt, gt)) == (2, 0, 0)
    pred = np.zeros_like(gt)
    pred[disc(gt.shape, (20, 21), 8)] = 1  # 1 px off: IoU well above 0.5
    pred[disc(gt.shape, (44, 48), 8)] = 2  # 12 px off: IoU well below 0.5
    counts = challenge_counts(gt, pred)
    assert as_tuple(counts) == (1, 1, 1)
    assert counts.precision == counts.recall == counts.f1 == 0.5


def test_iou_exactly_half_is_a_match_and_just_below_is_not():
    gt = squares((30, 30), [np.s_[5:15, 5:15]])  # area 100
    half = squares((30, 30), [np.s_[5:15, 5:10]])  # IoU 50 / 100
    assert as_tuple(challenge_counts(gt, half)) == (1, 0, 0)
    below = half.copy()
    below[5, 5] = 0  # IoU 49 / 100
    assert as_tuple(challenge_counts(gt, below)) == (0, 1, 1)


def test_exact_half_ties_match_one_to_one():
    whole = squares((30, 30), [np.s_[5:15, 5:15]])
    halves = squares((30, 30), [np.s_[5:15, 5:10], np.s_[5:15, 10:15]])  # both halves have IoU 0.5 with it
    assert as_tuple(challenge_counts(whole, halves)) == (1, 1, 0)
    assert as_tuple(challenge_counts(halves, whole)) == (1, 0, 1)
    # two wholes each split in halves, plus an exact copy: 3 gt, 5 pred, 3 matches
    gt = squares((40, 60), [np.s_[5:15, 5:15], np.s_[5:15, 25:35], np.s_[20:30, 5:15]])
    pred = squares((40, 60), [np.s_[5:15, 5:10], np.s_[5:15, 10:15], np.s_[5:15, 25:30], np.s_[5:15, 30:35],
                              np.s_[20:30, 5:15]])
    assert as_tuple(challenge_counts(gt, pred)) == (3, 2, 0) == brute_challenge(gt, pred)


def test_empty_maps():
    cells = squares((30, 30), [np.s_[5:10, 5:10], np.s_[15:20, 15:20]])
    empty = np.zeros_like(cells)
    assert as_tuple(challenge_counts(empty, cells)) == (0, 2, 0)
    assert as_tuple(challenge_counts(cells, empty)) == (0, 0, 2)
    # decision (the spec's F1 = 0 when TP = 0): no GT and no prediction scores 0, not 1
    both = challenge_counts(empty, empty)
    assert as_tuple(both) == (0, 0, 0) and both.f1 == 0.0 and both.precision == both.recall == 0.0
    only_border = squares((30, 30), [np.s_[0:5, 10:15]])
    assert as_tuple(challenge_counts(only_border, only_border)) == (0, 0, 0)


def test_remove_border_instances_known_answer():
    label = np.zeros((12, 12), dtype=np.uint16)
    label[1, 5] = 40  # in the 2-px frame
    label[3:5, 3:5] = 70  # clear of the frame
    label[6:8, 2:4] = 20  # column 2 is inside the frame only for margin > 2
    label[8:10, 8:10] = 90  # last row 9 = h - 3: kept
    out = remove_border_instances(label[None])
    assert out.dtype == np.int32 and out.shape == (12, 12)
    expected = np.zeros((12, 12), dtype=np.int32)
    expected[6:8, 2:4], expected[3:5, 3:5], expected[8:10, 8:10] = 1, 2, 3  # ids keep their order 20 < 70 < 90
    np.testing.assert_array_equal(out, expected)
    assert remove_border_instances(label, margin=3).max() == 1  # only 70 stays clear of a 3-px frame
    np.testing.assert_array_equal(remove_border_instances(label, margin=0) > 0, label > 0)


def test_inputs_are_checked_and_converted():
    gt = squares((20, 20), [np.s_[5:10, 5:10]])
    with pytest.raises(ValueError, match="shapes differ"):
        challenge_counts(gt, gt[:-1])
    with pytest.raises(ValueError, match="non-integer"):
        challenge_counts(gt, gt * 0.5)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        challenge_counts(gt[None, None], gt[None, None])
    as_float_tensor = torch.from_numpy(gt.astype(np.float32))[None]
    assert as_tuple(challenge_counts(torch.from_numpy(gt.astype(np.int64)), as_float_tensor)) == (1, 0, 0)


def test_match_counts_sum_and_f1():
    total = sum([MatchCounts(2, 1, 0), MatchCounts(0, 0, 1)])
    assert total == MatchCounts(2, 1, 1)
    assert total.precision == total.recall == pytest.approx(2 / 3)
    assert f1_from_counts(total) == total.f1 == pytest.approx(2 / 3)
    assert MatchCounts(0, 5, 5).f1 == 0.0


# --------------------------------------------------------------------------- 5,000 cells


def test_five_thousand_cells_known_answer():
    # 50 x 100 grid of 8 x 8 squares, pitch 14; each prediction is the square shifted right by s = k % 5 px
    # (IoU (8 - s) / (8 + s): a match for s <= 2), except s = 4 which predicts the left half (IoU exactly 0.5);
    # every 7th prediction is missing and 100 spurious squares lie outside the grid. Ids are shuffled.
    rng = np.random.default_rng(0)
    gt = np.zeros((50 * 14 + 40, 100 * 14 + 20), dtype=np.int32)
    pred = np.zeros_like(gt)
    gt_ids, pred_ids = rng.permutation(5000) + 1, rng.permutation(6000) + 1
    expected_tp = 0
    for k in range(5000):
        top, left = 10 + (k // 100) * 14, 10 + (k % 100) * 14
        gt[top : top + 8, left : left + 8] = gt_ids[k]
        s = k % 5
        if k % 7 == 0:
            continue
        window = np.s_[top : top + 8, left : left + 4] if s == 4 else np.s_[top : top + 8, left + s : left + s + 8]
        pred[window] = pred_ids[k]
        expected_tp += s in (0, 1, 2, 4)
    for j in range(100):
        pred[50 * 14 + 20 : 50 * 14 + 28, 10 + j * 14 : 18 + j * 14] = pred_ids[5000 + j]
    n_pred = len(np.unique(pred)) - 1
    assert as_tuple(challenge_counts(gt, pred)) == (expected_tp, n_pred - expected_tp, 5000 - expected_tp)


# --------------------------------------------------------------------------- ignite / MONAI metric


def test_instance_f1_accumulates_mean_f1_over_images(dev_labels):
    names = ["dsb_0121d6759c5a_label.tiff", "dsb_52a6b8ae4c8e_label.tiff", "dsb_55f98f43c152_label.tiff"]
    gts = [dev_labels[name] for name in names]  # all 256 x 320
    preds = [gts[0], split_cells(gts[1]), drop_cells(shift(gts[2]))]
    expected = np.mean([brute_f1(gt, pred) for gt, pred in zip(gts, preds)])
    assert expected < 1.0

    metric = InstanceF1()
    with pytest.raises(NotComputableError):
        metric.compute()
    # a batch (B, 1, H, W) as tensors, then a list of (H, W) numpy maps
    metric.update((torch.from_numpy(np.stack(preds[:2])[:, None]), torch.from_numpy(np.stack(gts[:2])[:, None])))
    metric.update(([preds[2]], [gts[2]]))
    assert metric.compute() == pytest.approx(expected)
    metric.reset()
    metric.update((np.stack(preds), np.stack(gts)))  # (B, H, W)
    assert metric.compute() == pytest.approx(expected)

    engine = Engine(lambda _, batch: batch)
    InstanceF1(output_transform=lambda out: (out["pred"], out["label"])).attach(engine, "f1")
    batches = [{"pred": torch.from_numpy(p)[None, None].float(), "label": torch.from_numpy(g)[None, None]}
               for p, g in zip(preds, gts)]
    assert engine.run(batches).metrics["f1"] == pytest.approx(expected)


def test_instance_f1_as_monai_evaluator_key_metric(dev_labels):
    from monai.data import DataLoader
    from monai.engines import SupervisedEvaluator
    from monai.handlers import from_engine

    gts = [dev_labels["dsb_7798ca1ddb31_label.tiff"], dev_labels["dsb_d256b32adda3_label.tiff"]]
    preds = [erode(gts[0]), gts[1]]
    # the identity network returns the "image", which here is the predicted instance map (as float)
    data = [{"image": torch.from_numpy(p[None]).float(), "label": torch.from_numpy(g[None])}
            for p, g in zip(preds, gts)]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(data, batch_size=2),
        network=torch.nn.Identity(),
        key_val_metric={"val_f1": InstanceF1(output_transform=from_engine(["pred", "label"]))},
    )
    evaluator.run()
    expected = np.mean([brute_f1(gt, pred) for gt, pred in zip(gts, preds)])
    assert 0.0 < expected < 1.0
    assert evaluator.state.metrics["val_f1"] == pytest.approx(expected)
