"""Choose MT²'s post-processing thresholds on a labeled folder (the validation split, never a test set).

    python tools/tune_thresholds.py --dataset_dir VAL [--checkpoint model.pt] [--cell_thresholds "[0.2,0.3,0.4,0.5]"]
        [--seed_thresholds "[0.4,0.5,0.6,0.7,0.8]"] [--min_seed_sizes "[16,32]"] [--neck_depths "[0,1,1.5,2,3]"]
        [--overrides "{...}"] [--max_objects_per_cell 1.5]

The network runs once per image with the bundle's own ``configs/inference.yaml`` (preprocessing, multi-scale
inferer, weights); then every combination of ``cell_threshold``, ``seed_threshold``, ``min_seed_size`` and
``neck_depth`` is applied to the stored probabilities and scored with the challenge F1. Prints one JSON line per
combination (mean F1 over the images, the mean and the largest ratio of objects found to cells, as the challenge
counts them) and last the best one, ready for the inference config: the highest mean F1 among the combinations that
give no image more than ``--max_objects_per_cell`` (1.5) objects per cell. ``VAL`` holds ``images/`` and ``labels/``.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import fire
import numpy as np
import torch
from tqdm import tqdm

from common.io import label_path_for, list_images, read_label
from common.metrics import challenge_counts, f1_from_counts
from common.postprocess import mt2_watershed
from common.workflows import command_line_json, inference_config, loaded_network

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "mt2_cell_segmentation"


def _numbers(value) -> list[float]:
    if isinstance(value, str):
        value = json.loads(value)
    return [float(item) for item in value]


def _probabilities(dataset_dir: Path, checkpoint: str | None, overrides: dict) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, (2, H, W) cell and boundary probabilities, label) for every labeled image of ``dataset_dir``."""
    parser = inference_config(BUNDLE, checkpoint, **overrides)
    device = parser.get_parsed_content("device")
    network = loaded_network(parser)
    preprocessing = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    results = []
    for image_path in tqdm(list_images(dataset_dir / "images"), desc="network"):
        label = read_label(label_path_for(image_path, dataset_dir / "labels"))
        image = preprocessing({"image": str(image_path)})["image"]
        with torch.no_grad():
            probabilities = inferer(torch.as_tensor(image)[None].to(device), network)[0, 3:5].cpu().numpy()
        results.append((image_path.stem, probabilities, label))
    return results


def tune(
    dataset_dir: str,
    checkpoint: str | None = None,
    cell_thresholds="[0.2, 0.3, 0.4, 0.5]",
    seed_thresholds="[0.4, 0.5, 0.6, 0.7, 0.8]",
    min_seed_sizes="[16, 32]",
    neck_depths="[0, 1, 1.5, 2, 3]",
    overrides: str | dict = "{}",
    max_objects_per_cell: float | None = 1.5,
) -> dict | None:
    """Score every threshold combination; print JSON lines and return the best: the highest mean F1 among the
    combinations that give no image more than ``max_objects_per_cell`` objects per cell (None: no bound), or None
    when none does."""
    overrides = command_line_json(overrides)
    images = _probabilities(Path(dataset_dir), checkpoint, overrides)
    if not images:
        raise SystemExit(f"tune_thresholds: no labeled images in {dataset_dir}")
    best = None
    grid = itertools.product(
        _numbers(cell_thresholds), _numbers(seed_thresholds), _numbers(min_seed_sizes), _numbers(neck_depths)
    )
    for cell_threshold, seed_threshold, min_seed_size, neck_depth in grid:
        if seed_threshold < cell_threshold:
            continue
        f1s, ratios = [], []
        for _, (cell, boundary), label in images:
            found = mt2_watershed(cell, boundary, cell_threshold, seed_threshold, int(min_seed_size), neck_depth)
            counts = challenge_counts(label, found)
            f1s.append(f1_from_counts(counts))
            # objects per cell as the challenge counts them (after its border rule), as the model cards report
            ratios.append((counts.tp + counts.fp) / max(1, counts.tp + counts.fn))
        line = {
            "cell_threshold": cell_threshold,
            "seed_threshold": seed_threshold,
            "min_seed_size": int(min_seed_size),
            "neck_depth": neck_depth,
            "mean_f1": round(float(np.mean(f1s)), 4),
            "mean_objects_per_cell": round(float(np.mean(ratios)), 3),
            "max_objects_per_cell": round(float(np.max(ratios)), 3),
            "per_image_f1": {name: round(f1, 4) for (name, _, _), f1 in zip(images, f1s)},
        }
        print(json.dumps(line), flush=True)
        within = max_objects_per_cell is None or line["max_objects_per_cell"] <= max_objects_per_cell
        if within and (best is None or line["mean_f1"] > best["mean_f1"]):
            best = line
    print(json.dumps({"best": best}), flush=True)
    return best


if __name__ == "__main__":
    fire.Fire(tune)
