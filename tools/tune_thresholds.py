"""Choose a bundle's post-processing settings on a labeled folder (the validation split, never a test set).

    python tools/tune_thresholds.py --dataset_dir VAL [--checkpoint model.pt] [--cell_thresholds "[0.2,0.3,0.4,0.5]"]
        [--seed_thresholds "[0.4,0.5,0.6,0.7,0.8]"] [--min_seed_sizes "[16,32]"] [--neck_depths "[0,1,1.5,2,3]"]
        [--dark_field_neck_depths "[0.5,0.75,1]"] [--foreground_thresholds "[null,0.4,0.5]"] [--overrides "{...}"]
        [--max_objects_per_cell 1.5] [--modalities MODALITIES_CSV]
    python tools/tune_thresholds.py --bundle crossct --dataset_dir VAL [--checkpoint model.pt]
        [--interior_thresholds "[0.4,0.5,0.6,0.65,0.7,0.75]"] [--expand_pxs "[0,1,2,3]"]
        [--dark_field_neck_depths "[null,0.5]"] [--foreground_thresholds "[null,0.4,0.5]"]
        [--foreground_min_sizes "[null,48,64]"] [--overrides "{...}"]

The network runs once per image with the bundle's own ``configs/inference.yaml`` (preprocessing, inferer, weights;
``--overrides`` changes any of its settings, e.g. CrossCT's ``network_output``); then every combination of the
bundle's settings is applied to the stored maps and scored with the challenge F1. MT²: ``cell_threshold``,
``seed_threshold``, ``min_seed_size``, ``neck_depth`` and ``dark_field_neck_depth`` (the neck depth of the images
``common.intensity.is_dark_field`` calls dark-field; null: ``neck_depth`` for all) of its watershed, and
``foreground_threshold`` (the other images' instances grow into ``1 - background`` above it; null: they do not);
CrossCT: ``interior_threshold``,
``expand_px``, ``dark_field_neck_depth`` (the depth at which the interior components of dark-field images are
split; null: none split), ``foreground_threshold`` and ``foreground_min_size`` (the other images' components, of
at least that size, null: 16, grow into ``1 - background`` above that threshold instead of by ``expand_px``;
null: they do not) of its interior components (``common.postprocess.crossct_instances``). Prints one JSON line
per combination (mean F1 over the images, the mean
and the largest ratio of objects found to cells, as the challenge counts them) and last the best one, ready for the
inference config: the highest mean F1 among the combinations that give no image more than
``--max_objects_per_cell`` (1.5) objects per cell. ``VAL`` holds ``images/`` and ``labels/``.

With ``--modalities`` (a ``name,modality`` CSV such as ``cellseg-dev/modalities.csv``) the classical baseline
(``common.classical.otsu_distance_watershed``, the defaults of ``tools/baseline.py``) is scored on the same images,
its F1 per modality printed first, each line gets its own ``per_modality_f1``, and the best must also reach the
baseline's F1 on every modality: a setting that loses to a global threshold on one kind of image is not shipped
when another one does not. When no combination reaches it, the best within the objects-per-cell bound alone is
returned, with ``"below_baseline"`` naming the modalities it loses on.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Callable, NamedTuple

import fire
import numpy as np
import torch
from tqdm import tqdm

from common.classical import otsu_distance_watershed
from common.evaluation import group_by_modality, read_modalities
from common.intensity import is_dark_field
from common.io import label_path_for, list_images, read_image, read_label
from common.metrics import challenge_counts, f1_from_counts
from common.postprocess import crossct_instances, mt2_instances
from common.workflows import command_line_json, inference_config, loaded_network

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


class _Tuning(NamedTuple):
    """What tuning needs of a bundle: where it is, the maps its post-processing reads from the inferer's
    (1, C, H, W) output, that post-processing as ``(maps, dark_field, **setting) -> (H, W) instances``
    (``dark_field``: whether the image is, :func:`common.intensity.is_dark_field`), and which settings make
    sense."""

    bundle_dir: Path
    maps: Callable[[torch.Tensor], np.ndarray]
    instances: Callable[..., np.ndarray]
    valid: Callable[[dict], bool]


TUNINGS = {
    "mt2": _Tuning(
        BUNDLES / "mt2_cell_segmentation",
        lambda output: output[0, [0, 3, 4]].float().cpu().numpy(),  # background, cell, boundary probabilities
        lambda maps, dark_field, **setting: mt2_instances(maps[1], maps[2], dark_field, 1.0 - maps[0], **setting),
        # a seed threshold below the mask threshold makes seeds outside the mask
        lambda setting: setting["seed_threshold"] >= setting["cell_threshold"],
    ),
    "crossct": _Tuning(
        BUNDLES / "crossct_cell_segmentation",
        lambda output: torch.softmax(output[0, :3].float(), dim=0).cpu().numpy(),  # class probabilities
        lambda classes, dark_field, interior_threshold, **setting: crossct_instances(
            classes, dark_field, interior_threshold, **setting
        ),
        # a minimum size of the foreground-grown components (null: min_size's 16) means nothing without the growth
        lambda setting: setting["foreground_threshold"] is not None or setting["foreground_min_size"] is None,
    ),
}


def _numbers(value) -> list[float | int]:
    """A grid given as JSON text or a list: its numbers, integers kept as such (sizes print as 16, not 16.0), and
    null (None) where a setting may be off; fire passes ``[null,0.5]`` as ``["null", 0.5]``."""
    if isinstance(value, str):
        value = json.loads(value)
    off = {"null", "none"}
    return [None if item is None or str(item).lower() in off else item if isinstance(item, int) else float(item)
            for item in value]


def _network_maps(tuning: _Tuning, dataset_dir: Path, checkpoint: str | None, overrides: dict) -> list[tuple[str, np.ndarray, bool, np.ndarray]]:
    """(name, the maps ``tuning`` post-processes, whether the image is dark-field, label) for every labeled
    image of ``dataset_dir``."""
    parser = inference_config(tuning.bundle_dir, checkpoint, **overrides)
    device = parser.get_parsed_content("device")
    network = loaded_network(parser)
    preprocessing = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    results = []
    for image_path in tqdm(list_images(dataset_dir / "images"), desc="network"):
        label = read_label(label_path_for(image_path, dataset_dir / "labels"))
        image = preprocessing({"image": str(image_path)})["image"]
        with torch.no_grad():
            maps = tuning.maps(inferer(torch.as_tensor(image)[None].to(device), network))
        results.append((image_path.stem, maps, is_dark_field(image), label))
    return results


def _per_modality(f1s: dict[str, float], modality_of: dict[str, str]) -> dict[str, float]:
    """Mean F1 per modality (images the CSV does not name: ``unknown``)."""
    groups = group_by_modality(f1s.items(), modality_of)
    return {modality: round(float(np.mean(values)), 4) for modality, values in groups.items()}


def _baseline_f1s(dataset_dir: Path, labels: dict[str, np.ndarray]) -> dict[str, float]:
    """Challenge F1 of the classical baseline on each image of ``dataset_dir`` whose label ``labels`` holds (the
    labels :func:`_network_maps` already read)."""
    scores = {}
    for image_path in list_images(dataset_dir / "images"):
        if image_path.stem in labels:
            prediction = otsu_distance_watershed(read_image(image_path))
            scores[image_path.stem] = f1_from_counts(challenge_counts(labels[image_path.stem], prediction))
    return scores


def tune(
    dataset_dir: str,
    checkpoint: str | None = None,
    cell_thresholds="[0.2, 0.3, 0.4, 0.5]",
    seed_thresholds="[0.4, 0.5, 0.6, 0.7, 0.8]",
    min_seed_sizes="[16, 32]",
    neck_depths="[0, 1, 1.5, 2, 3]",
    overrides: str | dict = "{}",
    max_objects_per_cell: float | None = 1.5,
    bundle: str = "mt2",
    interior_thresholds="[0.4, 0.5, 0.6, 0.65, 0.7, 0.75]",
    expand_pxs="[0, 1, 2, 3]",
    modalities: str | None = None,
    dark_field_neck_depths="[0.5, 0.75, 1]",
    foreground_thresholds="[null, 0.4, 0.5]",
    foreground_min_sizes="[null, 48, 64]",
) -> dict | None:
    """Score every setting combination of ``bundle`` (mt2: the first four grids, ``dark_field_neck_depths`` and
    ``foreground_thresholds``;
    crossct: ``interior_thresholds``, ``expand_pxs``, ``dark_field_neck_depths``, ``foreground_thresholds`` and
    ``foreground_min_sizes``); print JSON
    lines and return the best: the highest mean F1 among the combinations that give no image more than
    ``max_objects_per_cell`` objects per cell (None: no bound), or None when none does; with ``modalities`` (a
    ``name,modality`` CSV), among those that also reach the classical baseline's F1 on every modality, when any
    does (module docstring)."""
    if bundle not in TUNINGS:
        raise SystemExit(f"tune_thresholds: --bundle must be one of {sorted(TUNINGS)}, not {bundle!r}")
    tuning = TUNINGS[bundle]
    grids = {
        "mt2": dict(cell_threshold=cell_thresholds, seed_threshold=seed_thresholds, min_seed_size=min_seed_sizes,
                    neck_depth=neck_depths, dark_field_neck_depth=dark_field_neck_depths,
                    foreground_threshold=foreground_thresholds),
        "crossct": dict(interior_threshold=interior_thresholds, expand_px=expand_pxs,
                        dark_field_neck_depth=dark_field_neck_depths, foreground_threshold=foreground_thresholds,
                        foreground_min_size=foreground_min_sizes),
    }[bundle]
    overrides = command_line_json(overrides)
    images = _network_maps(tuning, Path(dataset_dir), checkpoint, overrides)
    if not images:
        raise SystemExit(f"tune_thresholds: no labeled images in {dataset_dir}")
    names = [name for name, *_ in images]
    modality_of = read_modalities(modalities) if modalities else None
    floor = None
    if modality_of is not None:
        floor = _per_modality(_baseline_f1s(Path(dataset_dir), {name: label for name, *_, label in images}), modality_of)
        print(json.dumps({"classical_per_modality_f1": floor}), flush=True)
    best = best_above_floor = None
    for values in itertools.product(*(_numbers(grid) for grid in grids.values())):
        setting = dict(zip(grids, values))
        if not tuning.valid(setting):
            continue
        f1s, ratios = [], []
        for _, maps, dark_field, label in images:
            counts = challenge_counts(label, tuning.instances(maps, dark_field, **setting))
            f1s.append(f1_from_counts(counts))
            # objects per cell as the challenge counts them (after its border rule), as the model cards report
            ratios.append((counts.tp + counts.fp) / max(1, counts.tp + counts.fn))
        line = {
            **setting,
            "mean_f1": round(float(np.mean(f1s)), 4),
            "mean_objects_per_cell": round(float(np.mean(ratios)), 3),
            "max_objects_per_cell": round(float(np.max(ratios)), 3),
            "per_image_f1": {name: round(f1, 4) for name, f1 in zip(names, f1s)},
        }
        if floor is not None:
            line["per_modality_f1"] = _per_modality(dict(zip(names, f1s)), modality_of)
            line["below_baseline"] = [m for m, f1 in line["per_modality_f1"].items() if f1 < floor[m]]
        print(json.dumps(line), flush=True)
        within = max_objects_per_cell is None or line["max_objects_per_cell"] <= max_objects_per_cell
        if within and (best is None or line["mean_f1"] > best["mean_f1"]):
            best = line
        if within and floor is not None and not line["below_baseline"]:
            if best_above_floor is None or line["mean_f1"] > best_above_floor["mean_f1"]:
                best_above_floor = line
    best = best_above_floor or best
    print(json.dumps({"best": best}), flush=True)
    return best


if __name__ == "__main__":
    fire.Fire(tune)
