"""What the noise ceiling of the normalization (``max_noise``, :mod:`common.intensity`) changes, and what it buys.

    # the noise of every image after each bundle's normalization, and which images the shipped ceiling changes
    python tools/normalization_check.py noise --folders "[../shared/data/cellseg-dev,../shared/data/cellseg-ood-eval]"

    # sparse fields made from labeled fluorescence images (common.sparse_fields), segmented by a bundle with and
    # without the ceiling and by the classical baseline; challenge F1 and objects found per field
    python tools/normalization_check.py sparse --dataset_dir VAL --names "[stardist_img2d]" --output_dir OUT
    # ... of other weights than the shipped ones
    python tools/normalization_check.py sparse ... --bundles "[mt2]" --checkpoint RUN/model.pt

``noise`` prints one JSON line per image (``--output`` also writes them) and a summary per folder; ``sparse``
writes the fields under ``OUT/images`` and ``OUT/labels`` and prints one JSON line per field and setting.
"""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

import fire
import numpy as np
from PIL import Image
from tqdm import tqdm

from common.classical import otsu_distance_watershed
from common.intensity import noise_sigma, normalize_per_channel, normalize_whole, to_three_channels
from common.io import image_name, list_images, read_image, read_label, write_label
from common.metrics import challenge_counts, f1_from_counts
from common.segment import segment_images
from common.sparse_fields import sparse_field
from common.workflows import command_line_json, command_line_list, config_values

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def _inference_config(bundle: str) -> Path:
    return BUNDLES / f"{bundle}_cell_segmentation" / "configs" / "inference.yaml"


def shipped_max_noise(bundle: str) -> float | None:
    """The ``max_noise`` a bundle's inference config ships."""
    return config_values(_inference_config(bundle), ["max_noise"])["max_noise"]


def bundle_normalization(bundle: str):
    """A bundle's normalization function as its configs choose it: CrossCT per channel; MT² whole-array, with the
    config's ``ignore_zeros``."""
    if bundle == "crossct":
        return normalize_per_channel
    ignore_zeros = config_values(_inference_config(bundle), ["ignore_zeros"])["ignore_zeros"]
    return functools.partial(normalize_whole, ignore_zeros=ignore_zeros)


def normalized_noise(image: np.ndarray, bundle: str, max_noise: float | None) -> float:
    """Noise (largest over the three channels) of an image after a bundle's normalization, in [0, 1] units."""
    normalized = bundle_normalization(bundle)(to_three_channels(image), max_noise=max_noise)
    return max(noise_sigma(channel) for channel in normalized)


def noise(folders, bundles=("mt2", "crossct"), output: str | None = None) -> None:
    """Per image of each folder (its images/ subfolder when there is one): the noise after each bundle's
    normalization without a ceiling and with the shipped one; a summary per folder and bundle."""
    folders, bundles = command_line_list(folders), command_line_list(bundles)
    ceilings = {bundle: shipped_max_noise(bundle) for bundle in bundles}
    rows = []
    for folder in folders:
        for path in tqdm(list_images(folder), desc=Path(folder).name, unit="image"):
            image = read_image(path)
            row = {"folder": Path(folder).name, "image": image_name(path)}
            for bundle in bundles:
                row[f"{bundle}_noise"] = round(normalized_noise(image, bundle, None), 4)
                row[f"{bundle}_noise_ceiled"] = round(normalized_noise(image, bundle, ceilings[bundle]), 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if output:
        Path(output).write_text("".join(json.dumps(row) + "\n" for row in rows))
    for folder in sorted({row["folder"] for row in rows}):
        mine = [row for row in rows if row["folder"] == folder]
        for bundle in bundles:
            values = np.array([row[f"{bundle}_noise"] for row in mine])
            changed = [row["image"] for row in mine if row[f"{bundle}_noise"] != row[f"{bundle}_noise_ceiled"]]
            print(
                f"{folder} ({len(mine)} images), {bundle} (max_noise {ceilings[bundle]}): noise median "
                f"{np.median(values):.4f}, 90th percentile {np.percentile(values, 90):.4f}, max {values.max():.4f}; "
                f"changed by the ceiling: {len(changed)} {changed[:10]}"
            )


def _score(label: np.ndarray, prediction: np.ndarray) -> dict:
    counts = challenge_counts(label, prediction)
    return {"f1": round(f1_from_counts(counts), 3), "objects": int(len(np.unique(prediction)) - 1)}


def sparse(
    dataset_dir: str,
    names,
    output_dir: str,
    noise_stds=(4.0, 8.0),
    jpeg_qualities=(None, 70),
    cells: int = 3,
    seeds=(0,),
    bundles=("mt2", "crossct"),
    checkpoint: str | None = None,
) -> None:
    """Make sparse fields from the named labeled images of ``dataset_dir`` (images/ + labels/), one per noise level,
    JPEG quality (None: not compressed) and seed, and score each bundle with ``max_noise`` None and the shipped
    value, and the classical baseline. ``checkpoint``: weights to score instead of the bundle's ``models/model.pt``
    (one bundle only)."""
    names, noise_stds = command_line_list(names), command_line_json(noise_stds)
    jpeg_qualities = command_line_json(jpeg_qualities)
    seeds, bundles = command_line_json(seeds), command_line_list(bundles)
    if checkpoint is not None and len(bundles) != 1:
        raise SystemExit(f"--checkpoint holds one bundle's weights; name that bundle alone with --bundles, not {bundles}")
    weights = {} if checkpoint is None else {"checkpoint": str(Path(checkpoint).resolve())}
    images_out, labels_out = Path(output_dir, "images"), Path(output_dir, "labels")
    images_out.mkdir(parents=True, exist_ok=True)
    fields = []
    images = {image_name(path): path for path in list_images(Path(dataset_dir, "images"))}
    missing = [name for name in names if name not in images]
    if missing:
        raise SystemExit(f"{dataset_dir}/images has no image named {missing}")
    for name in names:
        image_path = images[name]
        image, label = read_image(image_path), read_label(Path(dataset_dir, "labels", f"{name}_label.tiff"))
        for noise_std, jpeg_quality, seed in itertools.product(noise_stds, jpeg_qualities, seeds):
            field, field_label = sparse_field(image, label, cells, noise_std, jpeg_quality, seed=seed)
            field_name = f"{name}_noise{noise_std:g}_jpeg{jpeg_quality or 'none'}_seed{seed}"
            path = images_out / f"{field_name}.png"  # lossless: the field's JPEG compression is already in it
            Image.fromarray(field[0]).save(path)
            write_label(labels_out / f"{field_name}_label.tiff", field_label)
            fields.append((field_name, path, field_label))
    for field_name, path, field_label in fields:
        baseline = otsu_distance_watershed(read_image(path))
        print(json.dumps({"field": field_name, "setting": "otsu", **_score(field_label, baseline)}), flush=True)
    for bundle in bundles:
        for max_noise in (None, shipped_max_noise(bundle)):
            predictions = segment_images(BUNDLES / f"{bundle}_cell_segmentation", [path for _, path, _ in fields], max_noise=max_noise,
                                         **weights)
            for (field_name, _, field_label), prediction in zip(fields, predictions):
                row = {"field": field_name, "setting": f"{bundle} max_noise {max_noise}", **_score(field_label, prediction)}
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    fire.Fire({"noise": noise, "sparse": sparse})
