"""Scoring a folder of predicted instance maps against a folder of labels with the challenge F1.

Both folders hold ``<name>_label.tiff``; the label folder defines the image set. The functions here return
plain rows and text so that ``tools/evaluate.py`` stays a thin command line.
"""

from __future__ import annotations

import csv
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from common.distributed import gather_lists, rank_and_world_size
from common.io import read_label
from common.metrics import MatchCounts, challenge_counts

__all__ = [
    "LABEL_SUFFIX",
    "SCORE_COLUMNS",
    "ImageScore",
    "evaluate_folders",
    "write_scores_csv",
    "read_modalities",
    "group_by_modality",
    "summarize_scores",
    "evaluate_and_report",
]

LABEL_SUFFIX = "_label.tiff"
SCORE_COLUMNS = ("name", "tp", "fp", "fn", "precision", "recall", "f1")


@dataclass(frozen=True)
class ImageScore:
    """The challenge counts of one image; ``prediction_missing`` marks an absent prediction scored as empty."""

    name: str
    counts: MatchCounts
    prediction_missing: bool = False

    def as_row(self) -> dict[str, object]:
        """The CSV row: name, tp, fp, fn, precision, recall, f1."""
        c = self.counts
        return {"name": self.name, "tp": c.tp, "fp": c.fp, "fn": c.fn,
                "precision": c.precision, "recall": c.recall, "f1": c.f1}


def _label_files(label_dir: Path) -> list[Path]:
    if not label_dir.is_dir():
        raise FileNotFoundError(f"label folder {label_dir} does not exist")
    files = sorted(label_dir.glob(f"*{LABEL_SUFFIX}"))
    if not files:
        raise ValueError(f"label folder {label_dir} holds no *{LABEL_SUFFIX} file")
    return files


def evaluate_folders(pred_dir, label_dir, progress: bool = True, share: tuple[int, int] = (0, 1)) -> list[ImageScore]:
    """Score every ``<name>_label.tiff`` of ``label_dir`` against the same file name in ``pred_dir``.

    A missing prediction is scored as an empty map (all its instances FN) and flagged ``prediction_missing``.

    Args:
        pred_dir: folder of predicted instance maps.
        label_dir: folder of ground-truth instance maps; defines the image set.
        progress: show a tqdm progress bar.
        share: (k, n) scores only the label files k, k + n, k + 2n, ... of the sorted list (one process's share).

    Returns:
        One ImageScore per scored label file, sorted by name (name = file name without ``_label.tiff``).

    Raises:
        FileNotFoundError: a folder does not exist. ValueError: no label file, or a prediction's shape differs
            from its label's (the message names both files).
    """
    pred_dir, label_dir = Path(pred_dir), Path(label_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder {pred_dir} does not exist")
    index, count = share
    scores = []
    for label_path in tqdm(_label_files(label_dir)[index::count], desc="F1", unit="image", disable=not progress):
        name = label_path.name[: -len(LABEL_SUFFIX)]
        label = read_label(label_path)
        pred_path = pred_dir / label_path.name
        missing = not pred_path.exists()
        prediction = label * 0 if missing else read_label(pred_path)
        if prediction.shape != label.shape:
            raise ValueError(
                f"prediction {pred_path} has shape {prediction.shape} but label {label_path} has {label.shape}"
            )
        scores.append(ImageScore(name, challenge_counts(label, prediction), missing))
    return scores


def write_scores_csv(scores: list[ImageScore], path) -> Path:
    """Write the per-image rows (columns :data:`SCORE_COLUMNS`, full float precision) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SCORE_COLUMNS)
        writer.writeheader()
        writer.writerows(score.as_row() for score in scores)
    return path


def read_modalities(path) -> dict[str, str]:
    """name -> modality from a CSV with at least the columns ``name`` and ``modality``."""
    path = Path(path)
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"name", "modality"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"modalities file {path} lacks the column(s) {sorted(missing)}")
        return {row["name"]: row["modality"] for row in reader}


def group_by_modality(f1s: Iterable[tuple[str, float]], modalities: dict[str, str]) -> dict[str, list[float]]:
    """The F1s of ``(name, f1)`` pairs grouped by modality, modalities in sorted order; images absent from
    ``modalities`` are grouped under ``unknown``."""
    groups: dict[str, list[float]] = {}
    for name, f1 in f1s:
        groups.setdefault(modalities.get(name, "unknown"), []).append(f1)
    return dict(sorted(groups.items()))


def _summary_line(title: str, f1s: list[float]) -> str:
    return f"{title}: mean F1 {statistics.fmean(f1s):.4f}, median F1 {statistics.median(f1s):.4f}, n {len(f1s)}"


def summarize_scores(scores: list[ImageScore], modalities: dict[str, str] | None = None) -> list[str]:
    """Summary lines: mean and median F1 over all images, then one line per modality (sorted) when given.

    Images absent from ``modalities`` are grouped under ``unknown``.
    """
    if not scores:
        raise ValueError("no image was scored")
    lines = [_summary_line("all", [score.counts.f1 for score in scores])]
    if modalities is not None:
        groups = group_by_modality(((score.name, score.counts.f1) for score in scores), modalities)
        lines += [_summary_line(f"  {modality}", f1s) for modality, f1s in groups.items()]
    return lines


def evaluate_and_report(pred_dir, label_dir, output_csv=None, modalities=None, sharded: bool = False) -> list[ImageScore]:
    """Score ``pred_dir`` against ``label_dir``, write the per-image CSV (default ``<pred_dir>/f1_scores.csv``)
    and print the summary (per modality when a ``name,modality`` CSV is given; '' or None: none). A missing
    prediction is scored as empty and warned about on stderr. Used by ``tools/evaluate.py`` and the bundles'
    ``evaluate.yaml``.

    ``sharded=True`` (``multi_gpu_evaluate.yaml``, under ``torchrun``): each process scores its share of the
    images, every process gets all the scores, and rank 0 alone writes the CSV and prints, so both are those of
    a single-process run. A collective: every process must call it."""
    rank, world_size = rank_and_world_size() if sharded else (0, 1)
    modality_of = read_modalities(modalities) if modalities else None
    scores = evaluate_folders(pred_dir, label_dir, progress=rank == 0, share=(rank, world_size))
    if world_size > 1:
        scores = sorted(gather_lists(scores), key=lambda score: score.name)
    if rank != 0:
        return scores
    for score in scores:
        if score.prediction_missing:
            print(f"warning: no prediction for {score.name} in {pred_dir}; scored as empty (all FN)", file=sys.stderr)
    csv_path = write_scores_csv(scores, output_csv if output_csv else Path(pred_dir) / "f1_scores.csv")
    print("\n".join(summarize_scores(scores, modality_of)))
    print(f"per-image scores: {csv_path}")
    return scores
