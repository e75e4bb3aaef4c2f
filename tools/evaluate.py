"""Challenge F1 of a folder of predicted instance maps against a folder of labels.

    python tools/evaluate.py --pred_dir P --label_dir L [--output_csv out.csv] [--modalities modalities.csv]

Both folders hold ``<name>_label.tiff``; the label folder defines the image set and a missing prediction counts
as an empty one (all FN). Writes ``name,tp,fp,fn,precision,recall,f1`` (default ``<pred_dir>/f1_scores.csv``)
and prints the mean and median F1, per modality too when a ``name,modality`` CSV is given.
"""

from __future__ import annotations

import fire

from common.evaluation import evaluate_and_report


def evaluate(pred_dir: str, label_dir: str, output_csv: str | None = None, modalities: str | None = None) -> None:
    """Score ``pred_dir`` against ``label_dir``; write the per-image CSV and print the summary."""
    evaluate_and_report(pred_dir, label_dir, output_csv, modalities)


if __name__ == "__main__":
    fire.Fire(evaluate)
