"""Speed benchmarks of the shared code; each sub-command prints one JSON line per figure on stdout.

    python tools/benchmark.py targets [--size 2048] [--cells 600] [--seed 0] [--repeats 1] [--naive_cells 64]

Sub-commands are registered in ``COMMANDS`` at the bottom; add new ones there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import fire
import numpy as np
from skimage.draw import ellipse
from skimage.segmentation import expand_labels
from tqdm import tqdm

from common.targets import cell_distance_map, mt2_heatmaps, neighbor_distance_map

# Share of the image the ellipses cover before they are grown into contact: far enough below the jamming limit
# of random sequential placement that rejection sampling finds room for every cell quickly.
_FILL = 0.35


def synthetic_label(size: int = 2048, cells: int = 600, seed: int = 0) -> np.ndarray:
    """A reproducible crowded instance label: random non-overlapping ellipses, then grown until many touch.

    Args:
        size: side of the square label (px).
        cells: number of instances.
        seed: random seed.

    Returns:
        (size, size) int32 label with ids 1..cells, 0 = background.
    """
    if size < 16 or cells < 1:
        raise ValueError(f"need size >= 16 and cells >= 1, got size={size}, cells={cells}")
    rng = np.random.default_rng(seed)
    mean_radius = np.sqrt(_FILL * size * size / cells / np.pi)
    if mean_radius < 3:
        raise ValueError(f"{cells} cells do not fit in {size}x{size} (mean radius {mean_radius:.1f} px < 3 px)")
    label = np.zeros((size, size), np.int32)
    placed, attempts = 0, 0
    while placed < cells:
        attempts += 1
        if attempts > 100 * cells:
            raise RuntimeError(f"placed only {placed} of {cells} cells in {attempts} attempts; lower --cells")
        radius = mean_radius * rng.uniform(0.6, 1.4)
        rows, cols = ellipse(*rng.uniform(0, size, 2), radius, radius * rng.uniform(0.6, 1.0),
                             shape=label.shape, rotation=rng.uniform(0, np.pi))
        if rows.size == 0 or label[rows, cols].any():
            continue
        placed += 1
        label[rows, cols] = placed
    # growing every cell into the background by half a radius closes most gaps between neighbours
    return expand_labels(label, distance=mean_radius / 2).astype(np.int32)


def touching_fraction(label: np.ndarray) -> float:
    """Share of the instances that touch (4-neighbourhood) at least one other instance."""
    touching = set()
    for a, b in ((label[1:], label[:-1]), (label[:, 1:], label[:, :-1])):
        contact = (a != b) & (a > 0) & (b > 0)
        touching.update(np.unique(a[contact]).tolist(), np.unique(b[contact]).tolist())
    count = len(np.unique(label[label > 0]))
    return len(touching) / count if count else 0.0


def _timed(function: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    """Best wall time over ``repeats`` calls, and the last result."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def targets(size: int = 2048, cells: int = 600, seed: int = 0, repeats: int = 1, naive_cells: int | None = 64):
    """Cropped vs whole-image per-instance computation of the training targets on a synthetic label.

    Args:
        size: side of the synthetic label (px).
        cells: number of instances in it.
        seed: random seed of the label.
        repeats: timed runs per path; the best is reported (the whole-image path runs once).
        naive_cells: time the whole-image path on the instances with the N smallest ids only and
            extrapolate linearly (its cost per instance does not depend on the others); None or 0 times all
            of them (about 15 minutes for 600 cells on 2048^2). The equality check then runs on that subset.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if naive_cells is not None and naive_cells < 0:
        raise ValueError(f"naive_cells must be >= 0 or None, got {naive_cells}")
    label = synthetic_label(size, cells, seed)
    ids = np.unique(label[label > 0])
    subset = bool(naive_cells) and naive_cells < len(ids)
    naive_label = np.where(label <= ids[naive_cells - 1], label, 0) if subset else label
    common_fields = {"benchmark": "targets", "cells": int(len(ids)), "size": size, "seed": seed,
                     "touching_fraction": round(touching_fraction(label), 3)}
    functions = {"mt2_heatmaps": mt2_heatmaps, "cell_distance_map": cell_distance_map,
                 "neighbor_distance_map": neighbor_distance_map}
    for name, function in tqdm(functions.items(), desc="targets", unit="target"):
        cropped_s, cropped = _timed(lambda: function(label), repeats)
        naive_s, naive = _timed(lambda: function(naive_label, crop=False), 1)
        if subset:
            cropped = function(naive_label)
        line = dict(common_fields, target=name)
        if subset:
            line.update(naive_extrapolated_from=int(naive_cells), naive_measured_s=round(naive_s, 3))
            naive_s *= len(ids) / naive_cells
        line.update(naive_s=round(naive_s, 3), cropped_s=round(cropped_s, 4), ratio=round(naive_s / cropped_s, 1),
                    max_abs_diff=float(np.abs(naive - cropped).max()))
        tqdm.write(json.dumps(line))


COMMANDS = {"targets": targets}

if __name__ == "__main__":
    fire.Fire(COMMANDS)
