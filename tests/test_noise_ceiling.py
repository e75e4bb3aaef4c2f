"""The noise ceiling of the percentile normalization (``max_noise``) and the sparse fields it is checked on: known
answers, and real images (a sparse field made from a dev image; the dev set, which the shipped ceiling leaves as
it was)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from bundle_runs import tool_module
from common.intensity import (
    NormalizeIntensityPercentiled,
    noise_sigma,
    normalize_per_channel,
    normalize_whole,
    to_three_channels,
)
from common.io import read_image, read_label
from common.sparse_fields import sparse_field
from common.workflows import config_values

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
NORMALIZATIONS = [normalize_whole, normalize_per_channel]


def _ramp_with_noise(shape, sigma, seed=0):
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    smooth = 100.0 + 0.05 * rows + 0.02 * cols
    return smooth + np.random.default_rng(seed).normal(0.0, sigma, shape)


def test_noise_sigma_measures_white_noise_and_ignores_linear_intensity():
    # 600 rows: more than one band of the banded sum
    assert noise_sigma(_ramp_with_noise((600, 500), 3.0)) == pytest.approx(3.0, rel=0.03)
    assert noise_sigma(_ramp_with_noise((600, 500), 0.0)) < 1e-4  # float32 rounding of the ramp only
    assert noise_sigma(np.ones((2, 50))) == 0.0


def test_noise_sigma_banded_sum_equals_immerkaers_convolution():
    image = np.random.default_rng(1).random((700, 300)).astype(np.float32)
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)
    response = ndi.convolve(image.astype(np.float64), kernel)[1:-1, 1:-1]
    expected = np.sqrt(np.pi / 2) * np.abs(response).mean() / 6
    assert noise_sigma(image) == pytest.approx(expected, rel=1e-10)


@pytest.fixture(scope="module")
def sparse_stardist(dev_dir):
    """A sparse field (3 nuclei, white noise of 4 grey levels, no JPEG) made from the dev set's stardist_img2d."""
    image = read_image(dev_dir / "images" / "stardist_img2d.tif")
    label = read_label(dev_dir / "labels" / "stardist_img2d_label.tiff")
    return sparse_field(image, label, cells=3, noise_std=4.0, jpeg_quality=None, seed=0)


@pytest.mark.parametrize("normalize", NORMALIZATIONS, ids=lambda f: f.__name__)
def test_ceiling_keeps_a_sparse_real_field_dark_and_its_nuclei_bright(sparse_stardist, normalize):
    field, label = sparse_stardist
    image = to_three_channels(field.astype(np.float32))
    plain = normalize(image)
    ceiled = normalize(image, max_noise=0.05)
    background = ndi.distance_transform_edt(label == 0) > 10
    # the plain stretch spreads the noise floor: the 1st and 99th percentiles both lie in the background
    assert noise_sigma(plain[0]) > 0.15
    assert np.median(plain[0][background]) > 0.3
    assert noise_sigma(ceiled[0]) <= 0.05 + 1e-9
    assert np.median(ceiled[0][background]) < 0.15
    assert np.median(ceiled[0][label > 0]) > 0.5


def test_jpeg_hides_the_noise_from_the_estimate(dev_dir):
    """The documented limit: JPEG removes the noise's fine grain, which the estimate reads, not its spread."""
    image = read_image(dev_dir / "images" / "stardist_img2d.tif")
    label = read_label(dev_dir / "labels" / "stardist_img2d_label.tiff")
    white, _ = sparse_field(image, label, cells=3, noise_std=4.0, jpeg_quality=None)
    compressed, _ = sparse_field(image, label, cells=3, noise_std=4.0, jpeg_quality=70)
    assert noise_sigma(white[0]) == pytest.approx(4.0, rel=0.1)
    assert noise_sigma(compressed[0]) < 1.0 < compressed[0][label == 0].std()


def test_ceiling_rescues_an_image_whose_percentiles_are_equal():
    image = np.zeros((1, 100, 100), dtype=np.float32)
    image[0, 40:44, 40:45] = 200.0  # 20 px: under 1 % of the image, so the 99th percentile is 0
    assert not normalize_whole(image).any()
    ceiled = normalize_whole(image, max_noise=0.05)
    assert ceiled[0, 41, 42] == 1.0 and ceiled[0, 0, 0] == 0.0


@pytest.mark.parametrize("normalize", NORMALIZATIONS, ids=lambda f: f.__name__)
def test_ceiling_leaves_an_image_with_less_noise_unchanged(normalize):
    image = _ramp_with_noise((120, 130), 0.2)[np.newaxis].repeat(3, axis=0).astype(np.float32)
    assert noise_sigma(normalize(image)[0]) < 0.05
    np.testing.assert_array_equal(normalize(image, max_noise=0.05), normalize(image))


@pytest.mark.parametrize("bundle", ["mt2", "crossct"])
def test_shipped_ceiling_changes_no_dev_image(dev_pairs, bundle):
    """The bundles' figures on the dev set (validation and H&E) hold with the ceiling: it changes none of them."""
    configs = BUNDLES / f"{bundle}_cell_segmentation" / "configs"
    max_noise = config_values(configs / "inference.yaml", ["max_noise"])["max_noise"]
    assert max_noise == config_values(configs / "train.yaml", ["max_noise"])["max_noise"] and max_noise > 0
    normalize = normalize_whole if bundle == "mt2" else normalize_per_channel
    for image_path, _ in dev_pairs:
        image = to_three_channels(read_image(image_path))
        np.testing.assert_array_equal(normalize(image, max_noise=max_noise), normalize(image), err_msg=image_path.name)


def test_bad_ceiling_is_refused():
    image = np.ones((1, 4, 4), dtype=np.float32)
    for value in (0, -0.1):
        with pytest.raises(ValueError, match="max_noise"):
            normalize_whole(image, max_noise=value)
        with pytest.raises(ValueError, match="max_noise"):
            NormalizeIntensityPercentiled(keys="image", max_noise=value)


def test_dictionary_wrapper_passes_the_ceiling(sparse_stardist):
    field, _ = sparse_stardist
    image = to_three_channels(field.astype(np.float32))
    out = NormalizeIntensityPercentiled(keys="image", per_channel=False, max_noise=0.05)({"image": image})["image"]
    np.testing.assert_array_equal(out, normalize_whole(image, max_noise=0.05))


# ------------------------------------------------------------------------------------------- sparse fields


def test_sparse_field_keeps_the_chosen_cells_on_a_flat_noisy_background():
    label = np.zeros((120, 120), dtype=np.int32)
    centres = [(20 + 20 * (i % 4), 20 + 25 * (i // 4)) for i in range(12)]
    rows, cols = np.mgrid[:120, :120]
    for number, (r, c) in enumerate(centres, start=1):
        label[(rows - r) ** 2 + (cols - c) ** 2 <= 25] = number
    image = np.where(label > 0, 500.0, 50.0)[np.newaxis].astype(np.float32)
    field, kept = sparse_field(image, label, cells=5, noise_std=3.0, jpeg_quality=None, seed=2)
    assert field.shape == (1, 120, 120) and field.dtype == np.uint8
    assert kept.dtype == np.int32 and sorted(np.unique(kept)) == list(range(6))
    # every kept cell is one whole cell of the input, at its 8-bit cell level; the rest is background + noise
    for number in range(1, 6):
        assert len(np.unique(label[kept == number])) == 1
        assert abs(np.median(field[0][kept == number]) - 200) <= 3
    background = field[0][ndi.distance_transform_edt(kept == 0) > 8].astype(np.float64)
    assert abs(np.median(background) - 8) <= 1 and background.std() == pytest.approx(3.0, rel=0.15)
    with pytest.raises(ValueError, match="12 cells away from the border; 13"):
        sparse_field(image, label, cells=13)


def test_noise_tool_names_the_images_the_shipped_ceiling_changes(tmp_path, sparse_stardist, capsys):
    from PIL import Image

    tool = tool_module("normalization_check")
    folder = tmp_path / "images"
    folder.mkdir()
    field, _ = sparse_stardist
    Image.fromarray(field[0]).save(folder / "sparse.png")
    rows, cols = np.mgrid[:100, :120]
    noise = np.random.default_rng(0).normal(0.0, 2.0, rows.shape)
    quiet = np.clip(np.rint(20 + rows + 0.5 * cols + noise), 0, 255).astype(np.uint8)  # noise ~0.015 of its range
    Image.fromarray(quiet).save(folder / "quiet.png")
    tool.noise(str(tmp_path), output=str(tmp_path / "noise.jsonl"))
    rows = {row["image"]: row for row in map(json.loads, (tmp_path / "noise.jsonl").read_text().splitlines())}
    assert rows["sparse"]["mt2_noise"] > 0.15 and rows["sparse"]["mt2_noise_ceiled"] <= 0.05
    assert rows["quiet"]["crossct_noise"] == rows["quiet"]["crossct_noise_ceiled"]
    assert "changed by the ceiling: 1 ['sparse']" in capsys.readouterr().out


def test_sparse_tool_scores_a_checkpoint_for_one_bundle_only(tmp_path):
    tool = tool_module("normalization_check")
    with pytest.raises(SystemExit, match="one bundle's weights"):
        tool.sparse(str(tmp_path), "[stardist_img2d]", str(tmp_path / "out"), checkpoint=str(tmp_path / "model.pt"))
    assert not (tmp_path / "out").exists()  # refused before anything is written
