"""Round trip of every labeled image: label -> training targets -> post-processing -> instances, scored
against the label with the challenge F1. The MT² watershed and the CrossCT interior components use the settings of
their bundle's inference config (what ships), except that MT²'s seeds are split at ``neck_depth`` on every image
(the round trip reads labels, not images, so it cannot tell a dark-field image, which the bundle splits at
``dark_field_neck_depth``); CrossCT's distance-map watershed (``postprocess: distance``) its defaults. It measures
what the target/post-processing pair alone loses, before any network.

    python tools/roundtrip.py --dataset_dir ../shared/data/cellseg-dev [--modalities .../modalities.csv]
"""

from __future__ import annotations

from pathlib import Path

import fire
from tqdm import tqdm

from common.evaluation import read_modalities, summarize_scores
from common.roundtrip import roundtrip_scores
from common.workflows import config_values

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
SHIPPED_SETTINGS = {
    "mt2": (BUNDLES / "mt2_cell_segmentation", ("cell_threshold", "seed_threshold", "min_seed_size", "neck_depth")),
    "crossct": (BUNDLES / "crossct_cell_segmentation", ("interior_threshold", "expand_px")),
}


def roundtrip(dataset_dir: str, modalities: str | None = None) -> None:
    """Print mean/median F1 (and per modality) of the MT² and CrossCT round trips."""
    labels = sorted(Path(dataset_dir, "labels").glob("*_label.tiff"))
    modality_of = read_modalities(modalities) if modalities else None
    shipped = {method: config_values(root / "configs" / "inference.yaml", names) for method, (root, names) in SHIPPED_SETTINGS.items()}
    for method, settings in (*shipped.items(), ("crossct_distance", {})):
        scores = roundtrip_scores(tqdm(labels, desc=method), method, **settings)
        print(f"{method} {settings or '(defaults)'}:")
        print("\n".join("  " + line for line in summarize_scores(scores, modality_of)))


if __name__ == "__main__":
    fire.Fire(roundtrip)
