"""TorchScript as the model zoo checks it: ``python -m monai.bundle ckpt_export`` of each bundle's inference
network with its shipped weights, and the exported module gives the eager network's output on a real image.

MT²'s UNet++ is scripted. CrossCT's module holds MONAI's 2-D Swin-UNETR, which ``torch.jit.script`` refuses
(its patch embedding indexes a third patch dimension in code compiled for every input rank), so CrossCT is
exported by tracing at its sliding-window size, 256 x 256: the only input size its inferer gives the network.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import bundle_runs as runs

from common.workflows import inference_config, loaded_network

IMAGE = "dsb_9774c8239632.png"  # 256 x 256 RGBA fluorescence


def ckpt_export(bundle: str, target: Path, *extra: str) -> subprocess.CompletedProcess:
    root = runs.REPO / "bundles" / bundle
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "ckpt_export", "--net_id", "network_def", "--filepath", str(target),
         "--ckpt_file", str(root / "models" / "model.pt"), "--meta_file", str(root / "configs" / "metadata.json"),
         "--config_file", str(root / "configs" / "inference.yaml"), "--bundle_root", str(root), *extra],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def real_window(parser, dev_dir: Path) -> torch.Tensor:
    """(1, 3, 256, 256) float32: the bundle's own preprocessing of a real 256 x 256 image."""
    data = parser.get_parsed_content("preprocessing")({"image": str(dev_dir / "images" / IMAGE)})
    image = torch.as_tensor(data["image"]).float()[None]
    assert image.shape == (1, 3, 256, 256)
    return image


@pytest.mark.parametrize("bundle, export_arguments", [
    ("mt2_cell_segmentation", []),
    ("crossct_cell_segmentation", ["--use_trace", "True", "--input_shape", "[1, 3, 256, 256]"]),
])  # fmt: skip
def test_exported_torchscript_matches_the_eager_network_on_a_real_image(bundle, export_arguments, dev_dir, tmp_path):
    target = tmp_path / "model.ts"
    result = ckpt_export(bundle, target, *export_arguments)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    parser = inference_config(runs.REPO / "bundles" / bundle, device="cpu")
    eager = loaded_network(parser)
    scripted = torch.jit.load(str(target), map_location="cpu").eval()
    image = real_window(parser, dev_dir)
    with torch.no_grad():
        expected, exported = eager(image), scripted(image)
    assert exported.shape == expected.shape and expected.shape[-2:] == (256, 256)
    assert torch.allclose(exported, expected, atol=1e-4, rtol=0), (exported - expected).abs().max()
    assert expected.abs().max() > 0.1  # a real prediction, not an empty output that any export would match


def test_crossct_swin_unetr_cannot_be_scripted_and_the_card_says_so(tmp_path):
    """The reason the card gives for tracing CrossCT; when MONAI's Swin-UNETR becomes scriptable this fails, and
    the card and the export command should switch to scripting."""
    result = ckpt_export("crossct_cell_segmentation", tmp_path / "model.ts")
    assert result.returncode != 0
    assert "patchembedding.py" in result.stderr and "Tuple index out of range" in result.stderr
    card = (runs.REPO / "bundles" / "crossct_cell_segmentation" / "docs" / "README.md").read_text()
    assert "--use_trace True" in card and "cannot be scripted" in card
