"""tools/evaluate.py and common/evaluation.py on a folder of real dev labels and predictions made from them."""

from __future__ import annotations

import csv
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bundle_runs import tool_module
from common.evaluation import evaluate_folders
from common.io import read_label, write_label
from common.metrics import challenge_counts, remove_border_instances

REPO_ROOT = Path(__file__).resolve().parents[1]
NAMES = ["dsb_0121d6759c5a", "dsb_1c8b905c9519", "he_image02", "phase_set02", "stardist_img2d"]
MISSING = "phase_set02"


def _load_tool():
    return tool_module("evaluate")


def _shifted(label, offset=3):
    out = np.zeros_like(label)
    out[offset:, offset:] = label[:-offset, :-offset]
    return out


@pytest.fixture()
def folders(tmp_path, dev_dir):
    """labels/ with five dev labels; preds/ with a copy, a shifted map, one with cells dropped, one missing."""
    label_dir, pred_dir = tmp_path / "labels", tmp_path / "preds"
    label_dir.mkdir()
    labels, preds = {}, {}
    for name in NAMES:
        path = shutil.copy(dev_dir / "labels" / f"{name}_label.tiff", label_dir)
        labels[name] = read_label(path)
    preds["dsb_0121d6759c5a"] = labels["dsb_0121d6759c5a"]
    preds["dsb_1c8b905c9519"] = _shifted(labels["dsb_1c8b905c9519"])
    he = labels["he_image02"]
    preds["he_image02"] = np.where(he % 2 == 0, he, 0)
    preds["stardist_img2d"] = _shifted(labels["stardist_img2d"], 1)
    for name, pred in preds.items():
        write_label(pred_dir / f"{name}_label.tiff", pred)
    return label_dir, pred_dir, labels, preds


def test_cli_writes_rows_and_prints_summary(folders, dev_dir, dev_modalities, capsys):
    label_dir, pred_dir, labels, preds = folders
    _load_tool().evaluate(pred_dir=str(pred_dir), label_dir=str(label_dir), modalities=str(dev_dir / "modalities.csv"))
    out, err = capsys.readouterr()

    with open(pred_dir / "f1_scores.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["name", "tp", "fp", "fn", "precision", "recall", "f1"]
        rows = {row["name"]: row for row in reader}
    assert sorted(rows) == sorted(NAMES)
    for name, row in rows.items():
        counts = challenge_counts(labels[name], preds.get(name, np.zeros_like(labels[name])))
        assert (int(row["tp"]), int(row["fp"]), int(row["fn"])) == (counts.tp, counts.fp, counts.fn), name
        assert float(row["f1"]) == pytest.approx(counts.f1)
        assert float(row["precision"]) == pytest.approx(counts.precision)
        assert float(row["recall"]) == pytest.approx(counts.recall)
    n_missing = int(remove_border_instances(labels[MISSING]).max())
    assert n_missing > 0
    assert (rows[MISSING]["tp"], rows[MISSING]["fp"], rows[MISSING]["fn"]) == ("0", "0", str(n_missing))
    assert float(rows["dsb_0121d6759c5a"]["f1"]) == 1.0
    assert 0.0 < float(rows["he_image02"]["f1"]) < 1.0 and 0.0 < float(rows["dsb_1c8b905c9519"]["f1"]) < 1.0
    assert MISSING in err and "warning" in err

    f1s = {name: float(row["f1"]) for name, row in rows.items()}
    assert f"all: mean F1 {statistics.fmean(f1s.values()):.4f}, median F1 {statistics.median(f1s.values()):.4f}" in out
    groups: dict[str, list[float]] = {}
    for name, f1 in f1s.items():
        groups.setdefault(dev_modalities[name], []).append(f1)
    assert len(groups) >= 3
    for modality, values in groups.items():
        line = f"{modality}: mean F1 {statistics.fmean(values):.4f}, median F1 {statistics.median(values):.4f}"
        assert f"{line}, n {len(values)}" in out


def test_cli_command_line_with_explicit_output(folders, tmp_path):
    label_dir, pred_dir, _, _ = folders
    output = tmp_path / "out" / "scores.csv"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "evaluate.py"), "--pred_dir", str(pred_dir),
         "--label_dir", str(label_dir), "--output_csv", str(output)],
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "all: mean F1" in result.stdout and "fluorescence" not in result.stdout  # no modalities given
    with open(output, newline="") as handle:
        assert [row["name"] for row in csv.DictReader(handle)] == sorted(NAMES)
    assert not (pred_dir / "f1_scores.csv").exists()


def test_bad_folders_and_shapes_give_clear_errors(folders, tmp_path):
    label_dir, pred_dir, labels, _ = folders
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no \\*_label.tiff"):
        evaluate_folders(pred_dir, empty)
    with pytest.raises(FileNotFoundError, match="prediction folder"):
        evaluate_folders(tmp_path / "nowhere", label_dir)
    write_label(pred_dir / f"{MISSING}_label.tiff", labels[MISSING][:-5])
    with pytest.raises(ValueError, match=f"{MISSING}_label.tiff.*shape"):
        evaluate_folders(pred_dir, label_dir, progress=False)
