"""The README's quick start and Python example, run as written with the shipped weights on the sample images."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.io import read_label
from common.metrics import challenge_counts

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = REPO_ROOT / "common" / "sample_data"
BUNDLES = ["mt2_cell_segmentation", "crossct_cell_segmentation"]


def _f1(truth: np.ndarray, prediction: np.ndarray) -> float:
    counts = challenge_counts(truth, prediction)
    return 2 * counts.tp / max(2 * counts.tp + counts.fp + counts.fn, 1)


def _readme_block(heading: str) -> str:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(f"## {heading}", 1)[1]
    return re.search(r"```(?:bash|python)\n(.*?)```", section, re.S).group(1)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_shipped_weights_are_tensor_only_and_small(bundle):
    path = REPO_ROOT / "bundles" / bundle / "models" / "model.pt"
    assert path.stat().st_size < 25 * 2**20
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state and all(isinstance(value, torch.Tensor) for value in state.values())


def test_quick_start_command_writes_labels_overlays_and_a_line_per_image(tmp_path):
    commands = [line for line in _readme_block("Quick start").splitlines() if line.startswith("python")]
    assert len(commands) == 1, "the quick start is one command"
    argv = commands[0].split()
    assert argv[:3] == ["python", "-m", "monai.bundle"] and "--output_dir" in argv
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "segmentation")
    completed = subprocess.run(
        [sys.executable, *argv[1:]], cwd=REPO_ROOT, capture_output=True, text=True, check=False, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = tmp_path / "segmentation"
    for name in ("stardist_nuclei", "skimage_ihc"):
        assert (out / f"{name}_label.tiff").is_file() and (out / f"{name}_overlay.png").is_file()
        assert re.search(rf"{name}: \d+ cells, \d+\.\d s", completed.stderr + completed.stdout)
    truth = read_label(SAMPLES / "labels" / "stardist_nuclei_label.tiff")
    assert _f1(truth, read_label(out / "stardist_nuclei_label.tiff")) > 0.6


def test_python_example_returns_label_arrays_of_the_sample_nuclei(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    namespace: dict = {}
    example = _readme_block("Use from Python").replace("path/to/image.tif", str(SAMPLES / "images" / "stardist_nuclei.tif"))
    exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102 - the documented example, as written
    label = namespace["labels"][0]
    truth = read_label(SAMPLES / "labels" / "stardist_nuclei_label.tiff")
    assert label.shape == truth.shape and label.dtype == np.int32
    # the sample is a held-out validation image of 125 nuclei; the shipped MT² finds most of them
    nuclei = len(np.unique(truth)) - 1
    assert _f1(truth, label) > 0.6
    assert 0.5 * nuclei < len(np.unique(label)) - 1 < 1.5 * nuclei
