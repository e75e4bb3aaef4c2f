"""Round trip of every labeled image: label -> training targets -> post-processing -> instances, scored
against the label with the challenge F1. The MT² watershed and the CrossCT interior components use the settings of
their bundle's inference config (what ships): MT²'s seeds and CrossCT's interior components are split at
``dark_field_neck_depth`` where the label's image (``images/<name>.*``, after MT²'s preprocessing) is dark-field
(MT²'s seeds at ``neck_depth`` elsewhere), and both bundles' instances of the other images grow into the foreground
(``foreground_threshold``), as the bundles do; CrossCT's distance-map watershed (``postprocess:
distance``) its defaults. It measures what the target/post-processing pair alone loses, before any network.

    python tools/roundtrip.py --dataset_dir ../shared/data/cellseg-dev [--modalities .../modalities.csv]
"""

from __future__ import annotations

from pathlib import Path

import fire
from tqdm import tqdm

from common.evaluation import read_modalities, summarize_scores
from common.intensity import is_dark_field
from common.io import list_images
from common.roundtrip import roundtrip_scores
from common.workflows import config_values, inference_config

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
SHIPPED_SETTINGS = {
    "mt2": (
        BUNDLES / "mt2_cell_segmentation",
        ("cell_threshold", "seed_threshold", "min_seed_size", "neck_depth", "dark_field_neck_depth",
         "foreground_threshold"),
    ),
    "crossct": (
        BUNDLES / "crossct_cell_segmentation",
        ("interior_threshold", "expand_px", "dark_field_neck_depth", "foreground_threshold", "foreground_min_size"),
    ),
}


def dark_fields(dataset_dir: str | Path, names: list[str]) -> dict[str, bool]:
    """Whether each named label's image is dark-field after MT²'s preprocessing (``common.intensity.is_dark_field``).

    Raises:
        FileNotFoundError: a label has no image in ``dataset_dir/images``: both bundles' neck depth depends on it.
    """
    images = {path.stem: path for path in list_images(Path(dataset_dir, "images"))}
    missing = [name for name in names if name not in images]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} labels have no image in {Path(dataset_dir, 'images')} (e.g. {missing[0]}): the MT² and "
            "CrossCT round trips read each image to tell a dark-field one, which the bundles split at its own depth"
        )
    preprocessing = inference_config(SHIPPED_SETTINGS["mt2"][0]).get_parsed_content("preprocessing")
    return {
        name: is_dark_field(preprocessing({"image": str(images[name])})["image"])
        for name in tqdm(names, desc="dark field")
    }


def roundtrip(dataset_dir: str, modalities: str | None = None) -> None:
    """Print mean/median F1 (and per modality) of the MT² and CrossCT round trips."""
    labels = sorted(Path(dataset_dir, "labels").glob("*_label.tiff"))
    modality_of = read_modalities(modalities) if modalities else None
    shipped = {method: config_values(root / "configs" / "inference.yaml", names) for method, (root, names) in SHIPPED_SETTINGS.items()}
    dark = dark_fields(dataset_dir, [path.name.removesuffix("_label.tiff") for path in labels])
    for method, settings in (*shipped.items(), ("crossct_distance", {})):
        scores = roundtrip_scores(tqdm(labels, desc=method), method, dark_field_of=dark.get, **settings)
        print(f"{method} {settings or '(defaults)'}:")
        print("\n".join("  " + line for line in summarize_scores(scores, modality_of)))


if __name__ == "__main__":
    fire.Fire(roundtrip)
