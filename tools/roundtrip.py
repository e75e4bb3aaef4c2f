"""Round trip of every labeled image: label -> training targets -> post-processing -> instances, scored
against the label with the challenge F1. The MT² post-processing settings are read from the MT² bundle's
inference config (what ships); CrossCT uses the distance-watershed defaults. It measures what the
target/post-processing pair alone loses, before any network.

    python tools/roundtrip.py --dataset_dir ../shared/data/cellseg-dev [--modalities .../modalities.csv]
"""

from __future__ import annotations

from pathlib import Path

import fire
from tqdm import tqdm

from common.evaluation import read_modalities, summarize_scores
from common.roundtrip import roundtrip_scores
from common.workflows import config_values

MT2_INFERENCE = Path(__file__).resolve().parents[1] / "bundles" / "mt2_cell_segmentation" / "configs" / "inference.yaml"
MT2_SETTINGS = ("cell_threshold", "seed_threshold", "min_seed_size", "neck_depth")


def roundtrip(dataset_dir: str, modalities: str | None = None) -> None:
    """Print mean/median F1 (and per modality) of the MT² and CrossCT round trips."""
    labels = sorted(Path(dataset_dir, "labels").glob("*_label.tiff"))
    modality_of = read_modalities(modalities) if modalities else None
    for method, settings in (("mt2", config_values(MT2_INFERENCE, MT2_SETTINGS)), ("crossct", {})):
        scores = roundtrip_scores(tqdm(labels, desc=method), method, **settings)
        print(f"{method} {settings or '(defaults)'}:")
        print("\n".join("  " + line for line in summarize_scores(scores, modality_of)))


if __name__ == "__main__":
    fire.Fire(roundtrip)
