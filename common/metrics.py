"""The NeurIPS 2022 CellSeg challenge metric: F1 of instance matching at IoU 0.5.

The procedure (``shared/notes/methods.md``, "Official metric"): drop every instance touching a 2-px frame at the
image border (GT and prediction separately), relabel, match instances one-to-one with the organizers' Hungarian
cost, count TP/FP/FN; images of >= 25 Mpx are scored per zero-padded 2000x2000 tile and the counts summed.

The organizers build a dense (max_id + 1)^2 overlap matrix and run the Hungarian algorithm on all n_gt x n_pred
pairs. Here the overlaps are counted sparsely and only the IoU >= 0.5 pairs are matched; the numbers are the same
(see :func:`_count_true_positives` for why).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

from common.labels import as_instance_label

__all__ = [
    "MatchCounts",
    "f1_from_counts",
    "remove_border_instances",
    "match_counts",
    "challenge_counts",
    "InstanceF1",
]


@dataclass(frozen=True)
class MatchCounts:
    """Instance-matching counts of one image (or a sum over tiles / images with ``+``).

    Attributes:
        tp: matched pairs with IoU >= 0.5.
        fp: predicted instances left unmatched (n_pred - tp).
        fn: ground-truth instances left unmatched (n_gt - tp).
    """

    tp: int
    fp: int
    fn: int

    def __add__(self, other: MatchCounts) -> MatchCounts:
        if not isinstance(other, MatchCounts):
            return NotImplemented
        return MatchCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    def __radd__(self, other):
        # lets the built-in sum() start from 0
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    @property
    def precision(self) -> float:
        """TP / n_pred; 0.0 when TP = 0 (as the organizers, also for an empty prediction)."""
        return self.tp / (self.tp + self.fp) if self.tp else 0.0

    @property
    def recall(self) -> float:
        """TP / n_gt; 0.0 when TP = 0."""
        return self.tp / (self.tp + self.fn) if self.tp else 0.0

    @property
    def f1(self) -> float:
        """F1 = 2PR / (P + R); 0.0 when TP = 0 -- so an image with no GT and no prediction scores 0, as in the spec."""
        return f1_from_counts(self)


def f1_from_counts(counts: MatchCounts) -> float:
    """F1 of a :class:`MatchCounts`: 0.0 when TP = 0, else 2PR / (P + R) (same float operations as the organizers)."""
    if counts.tp == 0:
        return 0.0
    precision, recall = counts.precision, counts.recall
    return 2 * precision * recall / (precision + recall)


def _compact_instances(label: np.ndarray, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop instances within ``margin`` px of the border and relabel the rest 1..n in their original id order.

    Args:
        label: (H, W) non-negative integer ids.
        margin: width of the border frame; 0 keeps every instance.

    Returns:
        (H, W) int32 ids 1..n (0 = background) and the (n + 1,) int64 pixel area of each new id (index 0 unused).
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    flat = label.ravel()
    # A lookup table indexed by id is linear in the image size; ids far beyond the pixel count (sparse uint32
    # ids) are first compressed by a sort so that the table stays small.
    if flat.size and int(flat.max()) > 4 * flat.size + 65_536:
        _, flat = np.unique(flat, return_inverse=True)
        if label.min() > 0:  # keep 0 = background after the compression
            flat = flat + 1
        label = flat.reshape(label.shape)
    areas = np.bincount(flat, minlength=1)
    keep = areas > 0
    keep[0] = False
    if margin > 0:
        frame = np.concatenate(
            [label[:margin].ravel(), label[-margin:].ravel(), label[:, :margin].ravel(), label[:, -margin:].ravel()]
        )
        keep[frame] = False
    lookup = np.zeros(keep.size, dtype=np.int32)
    lookup[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lookup[label], np.concatenate([[0], areas[keep]]).astype(np.int64)


def remove_border_instances(label, margin: int = 2) -> np.ndarray:
    """Delete every instance touching a ``margin``-px frame at the image border and relabel the rest sequentially.

    Args:
        label: (H, W) or (1, H, W) instance ids (0 = background; any integer dtype, numpy or torch).
        margin: frame width in pixels (the challenge uses 2); 0 only relabels.

    Returns:
        (H, W) int32 ids 1..n, kept instances in their original id order.
    """
    relabelled, _ = _compact_instances(as_instance_label(label), margin)
    return relabelled


def _count_true_positives(gt: np.ndarray, pred: np.ndarray, gt_areas: np.ndarray, pred_areas: np.ndarray) -> int:
    """Matched pairs with IoU >= 0.5 under the organizers' Hungarian matching, from sparse overlap counts.

    Why this equals the dense Hungarian on cost ``-(iou >= 0.5) - iou / (2 m)``, m = min(n_gt, n_pred): a full
    assignment has m pairs, so its secondary term sums to at most m / (2 m) = 0.5 < 1. An assignment with one
    more IoU >= 0.5 pair therefore always costs less: the optimum maximizes the number of IoU >= 0.5 pairs, and
    TP is that number. Any matching inside the IoU >= 0.5 graph extends to a full assignment (the cost matrix is
    complete), so TP = the maximum matching size of that bipartite graph, which Hopcroft-Karp finds exactly. The
    secondary term only decides WHICH pairs match among equals, never how many.
    """
    n_pred = pred_areas.size - 1
    gt_flat, pred_flat = gt.ravel(), pred.ravel()
    both = (gt_flat > 0) & (pred_flat > 0)
    pair_keys = gt_flat[both].astype(np.int64) * (n_pred + 1) + pred_flat[both]
    pair_keys, intersection = np.unique(pair_keys, return_counts=True)
    gt_ids, pred_ids = np.divmod(pair_keys, n_pred + 1)
    union = gt_areas[gt_ids] + pred_areas[pred_ids] - intersection
    # integer form of iou >= 0.5: exact, and the same decision as the float division for any image size
    candidate = 2 * intersection >= union
    gt_ids, pred_ids = gt_ids[candidate], pred_ids[candidate]
    # IoU > 0.5 with two disjoint partners is impossible (each would need more than half of the instance), so the
    # graph is already a matching unless exact 0.5 ties (an instance split in two equal halves) occur.
    if np.unique(gt_ids).size == gt_ids.size and np.unique(pred_ids).size == pred_ids.size:
        return int(gt_ids.size)
    graph = csr_matrix(
        (np.ones(gt_ids.size, dtype=np.int8), (gt_ids - 1, pred_ids - 1)), shape=(gt_areas.size - 1, n_pred)
    )
    return int(np.count_nonzero(maximum_bipartite_matching(graph, perm_type="column") >= 0))


def _counts_of_compacted(gt: tuple[np.ndarray, np.ndarray], pred: tuple[np.ndarray, np.ndarray]) -> MatchCounts:
    (gt_label, gt_areas), (pred_label, pred_areas) = gt, pred
    n_gt, n_pred = gt_areas.size - 1, pred_areas.size - 1
    tp = _count_true_positives(gt_label, pred_label, gt_areas, pred_areas) if n_gt and n_pred else 0
    return MatchCounts(tp=tp, fp=n_pred - tp, fn=n_gt - tp)


def _checked_pair(gt, pred) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = as_instance_label(gt, "gt"), as_instance_label(pred, "pred")
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred shapes differ: {gt.shape} vs {pred.shape}")
    return gt, pred


def match_counts(gt, pred) -> MatchCounts:
    """TP/FP/FN of one-to-one instance matching at IoU >= 0.5, without border removal or tiling.

    Args:
        gt: (H, W) or (1, H, W) ground-truth ids (0 = background; ids need not be contiguous).
        pred: predicted ids, same shape.

    Returns:
        MatchCounts; empty GT gives (0, n_pred, 0), empty prediction (0, 0, n_gt).
    """
    gt, pred = _checked_pair(gt, pred)
    return _counts_of_compacted(_compact_instances(gt, 0), _compact_instances(pred, 0))


def challenge_counts(gt, pred, margin: int = 2, tile_size: int = 2000, tiling_min_pixels: int = 25_000_000):
    """The full challenge procedure: border removal on both maps, then matching; big images tile by tile.

    Images with at least ``tiling_min_pixels`` pixels are zero-padded to multiples of ``tile_size``; each tile
    gets its own border removal (cells crossing a tile seam are dropped from both tiles; the image's own
    right/bottom edge lies inside a padded tile and removes nothing there) and the counts are summed. As the
    organizers do, the whole-image border removal is not applied before tiling.

    Args:
        gt: (H, W) or (1, H, W) ground-truth ids (0 = background).
        pred: predicted ids, same shape.
        margin: border frame width (2 in the challenge).
        tile_size: tile side for big images (2000).
        tiling_min_pixels: pixel count from which an image is tiled (25,000,000).

    Returns:
        MatchCounts (summed over tiles for big images).
    """
    gt, pred = _checked_pair(gt, pred)
    if gt.size < tiling_min_pixels:
        return _counts_of_compacted(_compact_instances(gt, margin), _compact_instances(pred, margin))
    if tile_size <= 0:
        raise ValueError(f"tile_size must be > 0, got {tile_size}")
    total = MatchCounts(0, 0, 0)
    height, width = gt.shape
    for top in range(0, height, tile_size):
        for left in range(0, width, tile_size):
            window = np.s_[top : top + tile_size, left : left + tile_size]
            tiles = []
            for label in (gt[window], pred[window]):
                padding = ((0, tile_size - label.shape[0]), (0, tile_size - label.shape[1]))
                tiles.append(_compact_instances(np.pad(label, padding), margin))
            total = total + _counts_of_compacted(*tiles)
    return total


def _split_batch(maps, what: str) -> list[np.ndarray]:
    """A batch of instance maps as a list of (H, W) arrays: (B, 1, H, W), (B, H, W), (H, W) or a list of maps."""
    if isinstance(maps, (list, tuple)):
        return [as_instance_label(item, what) for item in maps]
    if isinstance(maps, torch.Tensor):
        maps = maps.detach().cpu().numpy()
    maps = np.asarray(maps)
    if maps.ndim == 2:
        return [as_instance_label(maps, what)]
    if maps.ndim == 3:
        return [as_instance_label(item, what) for item in maps]
    if maps.ndim == 4 and maps.shape[1] == 1:
        return [as_instance_label(item[0], what) for item in maps]
    raise ValueError(f"{what}: expected (B, 1, H, W), (B, H, W), (H, W) or a list of maps, got shape {maps.shape}")


class InstanceF1(Metric):
    """Mean over images of the challenge F1 (:func:`challenge_counts`), as an ignite metric.

    Usable as a MONAI bundle's validation key metric, e.g.
    ``key_val_metric={"val_f1": InstanceF1(output_transform=monai.handlers.from_engine(["pred", "label"]))}``.
    ``update((y_pred, y))`` takes batches ((B, 1, H, W) or (B, H, W)) or lists of (1, H, W) / (H, W) instance maps,
    numpy or torch; float maps must hold integer ids. ``compute()`` returns the mean per-image F1 (float).

    Args:
        output_transform: maps the engine output to ``(y_pred, y)``.
        device: ignite's accumulation device (the sums are plain Python numbers).
        margin, tile_size, tiling_min_pixels: passed to :func:`challenge_counts`.
    """

    def __init__(
        self,
        output_transform=lambda output: output,
        device: str | torch.device = "cpu",
        margin: int = 2,
        tile_size: int = 2000,
        tiling_min_pixels: int = 25_000_000,
    ):
        self.margin, self.tile_size, self.tiling_min_pixels = margin, tile_size, tiling_min_pixels
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._f1_sum = 0.0
        self._num_images = 0

    @reinit__is_reduced
    def update(self, output) -> None:
        y_pred, y = output[0], output[1]
        predictions, labels = _split_batch(y_pred, "y_pred"), _split_batch(y, "y")
        if len(predictions) != len(labels):
            raise ValueError(f"y_pred holds {len(predictions)} maps but y holds {len(labels)}")
        for prediction, label in zip(predictions, labels):
            counts = challenge_counts(label, prediction, self.margin, self.tile_size, self.tiling_min_pixels)
            self._f1_sum += counts.f1
            self._num_images += 1

    @sync_all_reduce("_f1_sum", "_num_images")
    def compute(self) -> float:
        if self._num_images == 0:
            raise NotComputableError("InstanceF1 needs at least one image before compute()")
        return float(self._f1_sum / self._num_images)
