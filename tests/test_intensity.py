"""common.intensity: channel handling and both percentile normalizations, known answers and real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from common.intensity import (
    DARK_FIELD_MEDIAN,
    NormalizeIntensityPercentiled,
    ToThreeChannelsd,
    is_dark_field,
    normalize_per_channel,
    normalize_whole,
    to_three_channels,
)
from common.io import read_image, read_label
from common.workflows import config_values

MT2_CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "mt2_cell_segmentation" / "configs"


def _linear_percentile(values: np.ndarray, q: float) -> float:
    """Percentile by hand: linear interpolation between order statistics at rank q/100 * (n - 1)."""
    ordered = np.sort(values.ravel()).astype(np.float64)
    rank = q / 100.0 * (ordered.size - 1)
    below = int(np.floor(rank))
    above = min(below + 1, ordered.size - 1)
    return ordered[below] + (rank - below) * (ordered[above] - ordered[below])


# --------------------------------------------------------------------------------------- to_three_channels


def test_to_three_channels():
    rng = np.random.default_rng(0)
    one = rng.integers(0, 255, (1, 5, 6)).astype(np.uint8)
    two = rng.normal(size=(2, 5, 6)).astype(np.float32)
    three = rng.normal(size=(3, 5, 6))
    four = rng.integers(0, 65535, (4, 5, 6)).astype(np.uint16)

    out = to_three_channels(one)
    assert out.shape == (3, 5, 6) and out.dtype == np.float32
    for channel in out:
        np.testing.assert_array_equal(channel, one[0])

    out = to_three_channels(two)
    np.testing.assert_array_equal(out[:2], two)
    assert not out[2].any()

    np.testing.assert_array_equal(to_three_channels(three), three.astype(np.float32))
    np.testing.assert_array_equal(to_three_channels(four), four[:3].astype(np.float32))

    with pytest.raises(ValueError, match="C, H, W"):
        to_three_channels(np.zeros((5, 6)))


# ------------------------------------------------------------------------------------ normalize_per_channel


def test_per_channel_ramp_uses_non_zero_percentiles():
    # Channel 0: a ramp 1..100 plus 100 zero pixels. The zeros must not move the percentiles.
    ramp = np.arange(1, 101, dtype=np.float32)
    channel = np.concatenate([ramp, np.zeros(100, dtype=np.float32)]).reshape(10, 20)
    image = np.stack([channel, 2.0 * channel + 10.0 * (channel > 0)])
    out = normalize_per_channel(image)
    assert out.dtype == np.float32 and out.shape == image.shape

    # By hand: 100 values 1..100, rank 0.99 -> 1.99 and rank 98.01 -> 99.01.
    low, high = 1.99, 99.01
    np.testing.assert_allclose(out[0], np.clip((channel - low) / (high - low), 0, 1), atol=1e-6)
    # Channel 1 is an affine map of channel 0 on the non-zero pixels: same result there; zeros clip to 0.
    np.testing.assert_allclose(out[1], out[0], atol=1e-6)
    assert out[0].min() == 0.0 and out[0].max() == 1.0


def test_per_channel_custom_percentiles_match_hand_computation():
    rng = np.random.default_rng(3)
    image = rng.gamma(2.0, 50.0, size=(1, 16, 16)).astype(np.float32) + 1.0
    out = normalize_per_channel(image, lower=5, upper=90)
    low, high = _linear_percentile(image, 5), _linear_percentile(image, 90)
    np.testing.assert_allclose(out[0], np.clip((image[0] - low) / (high - low), 0, 1), atol=1e-5)

    full = normalize_per_channel(image, lower=0, upper=100)
    np.testing.assert_allclose(full[0], (image[0] - image.min()) / (image.max() - image.min()), atol=1e-5)


def test_per_channel_zero_and_flat_channels():
    image = np.zeros((3, 8, 8), dtype=np.uint8)
    image[1, :4] = 200  # flat: every non-zero pixel is 200
    image[2] = np.arange(64, dtype=np.uint8).reshape(8, 8)
    out = normalize_per_channel(image)
    assert not out[0].any()  # all-zero stays zero
    expected_flat = np.where(image[1] > 0, 200 / 255, 0).astype(np.float32)  # the organizers' uint8 value / 255
    np.testing.assert_allclose(out[1], expected_flat, atol=1e-7)
    assert out[2].max() == 1.0

    flat_float = np.zeros((2, 4, 4), dtype=np.float32)
    flat_float[0] = 0.5
    flat_float[1] = 200.0
    flat_float[1, 0, 0] = 200.0005  # range 5e-4 < 1e-3: still flat
    out = normalize_per_channel(flat_float)
    np.testing.assert_allclose(out[0], 0.5)
    np.testing.assert_allclose(out[1], 1.0)  # float "as is" = clipped to [0, 1]


def test_per_channel_and_whole_differ_on_unequal_channels():
    ramp = np.linspace(0.0, 1.0, 100, dtype=np.float32).reshape(10, 10)
    image = np.stack([10.0 * ramp, 1000.0 * ramp])
    per_channel = normalize_per_channel(image)
    whole = normalize_whole(image)
    np.testing.assert_allclose(per_channel[0], per_channel[1], atol=1e-6)
    assert per_channel[0].max() == 1.0
    assert whole[0].max() < 0.02  # the dim channel stays dim when both share one pair of percentiles
    assert whole[1].max() == 1.0


# ------------------------------------------------------------------------------------------ normalize_whole


def test_whole_ramp_includes_zeros_and_all_channels():
    values = np.arange(100, dtype=np.float32)  # 0..99 split over two channels
    image = values.reshape(2, 5, 10)
    out = normalize_whole(image)
    low, high = 0.99, 98.01  # rank 0.99 and 98.01 of 0..99
    np.testing.assert_allclose(out, np.clip((image - low) / (high - low), 0, 1), atol=1e-6)
    assert out.dtype == np.float32


def test_whole_constant_image_is_zero():
    for value in (0.0, 7.0, -3.0):
        out = normalize_whole(np.full((3, 4, 5), value, dtype=np.float32))
        assert out.shape == (3, 4, 5) and not out.any()


def test_whole_ignoring_zeros_stretches_a_padded_image_as_the_unpadded_one():
    rng = np.random.default_rng(2)
    content = rng.integers(5, 200, (3, 20, 30)).astype(np.float32)
    padded = np.zeros((3, 60, 90), np.float32)
    padded[:, 10:30, 40:70] = content
    ignoring = normalize_whole(padded, ignore_zeros=True)
    np.testing.assert_array_equal(ignoring[:, 10:30, 40:70], normalize_whole(content))
    assert not ignoring[:, :10].any()  # the padding stays 0 (below the lower percentile)
    # counting the padding, both percentiles move down: the 99th now lies inside the content, more of it saturates
    counting = normalize_whole(padded)[:, 10:30, 40:70]
    assert (counting == 1).mean() > 2 * (ignoring[:, 10:30, 40:70] == 1).mean()


def test_whole_ignoring_zeros_changes_no_image_without_zeros():
    rng = np.random.default_rng(3)
    image = rng.normal(100, 30, (3, 40, 50)).astype(np.float32)
    assert (image != 0).all()
    np.testing.assert_array_equal(normalize_whole(image, ignore_zeros=True), normalize_whole(image))
    np.testing.assert_array_equal(
        normalize_whole(image, max_noise=0.01, ignore_zeros=True), normalize_whole(image, max_noise=0.01)
    )
    assert not normalize_whole(np.zeros((3, 5, 5), np.float32), ignore_zeros=True).any()


def test_bad_arguments():
    image = np.ones((1, 4, 4), dtype=np.float32)
    for function in (normalize_per_channel, normalize_whole):
        with pytest.raises(ValueError, match="percentiles"):
            function(image, lower=99, upper=1)
        with pytest.raises(ValueError, match="NaN"):
            function(np.full((1, 4, 4), np.nan, dtype=np.float32))
        with pytest.raises(ValueError, match="C, H, W"):
            function(np.ones((4, 4)))


# --------------------------------------------------------------------------------------- dictionary wrappers


def test_dictionary_wrappers_keep_type_and_meta():
    rng = np.random.default_rng(1)
    array = rng.integers(1, 1000, (2, 6, 7)).astype(np.float32)
    meta = MetaTensor(torch.from_numpy(array.copy()), meta={"filename_or_obj": "cells.tif"})
    data = {"image": meta, "plain": torch.from_numpy(array.copy()), "array": array.copy(), "label": "kept"}

    three = ToThreeChannelsd(keys=("image", "plain", "array"))(data)
    assert isinstance(three["image"], MetaTensor) and three["image"].meta["filename_or_obj"] == "cells.tif"
    assert isinstance(three["plain"], torch.Tensor) and isinstance(three["array"], np.ndarray)
    for key in ("image", "plain", "array"):
        values = np.asarray(three[key])
        assert values.shape == (3, 6, 7) and values.dtype == np.float32
        assert not values[2].any()

    for per_channel, function in ((True, normalize_per_channel), (False, normalize_whole)):
        normalized = NormalizeIntensityPercentiled(keys=("image", "array"), per_channel=per_channel)(three)
        assert isinstance(normalized["image"], MetaTensor)
        assert normalized["image"].dtype == torch.float32
        assert normalized["image"].meta["filename_or_obj"] == "cells.tif"
        expected = function(np.asarray(three["array"]))
        np.testing.assert_array_equal(normalized["image"].numpy(), expected)
        np.testing.assert_array_equal(normalized["array"], expected)
        assert normalized["label"] == "kept"

    padded = np.pad(array, ((0, 0), (0, 5), (0, 5)))
    out = NormalizeIntensityPercentiled(keys="image", per_channel=False, ignore_zeros=True)({"image": padded})["image"]
    np.testing.assert_array_equal(out, normalize_whole(padded, ignore_zeros=True))
    assert not np.array_equal(out, normalize_whole(padded))

    wrapper = NormalizeIntensityPercentiled(keys=("image", "missing"), allow_missing_keys=True)
    assert set(wrapper({"image": array})) == {"image"}
    with pytest.raises(KeyError):
        NormalizeIntensityPercentiled(keys="missing")({"image": array})


# ------------------------------------------------------------------------------------------------ dark field


def test_dark_field_is_judged_by_the_median_pixel():
    rows, cols = np.mgrid[:64, :64]
    nuclei = ((rows % 16 - 8) ** 2 + (cols % 16 - 8) ** 2 < 16).astype(np.float32)  # 16 bright discs, 20 % of pixels
    assert is_dark_field(nuclei) and is_dark_field(np.stack([nuclei] * 3))
    assert not is_dark_field(1.0 - nuclei)  # the same shapes dark on a bright field (brightfield)
    assert not is_dark_field(np.full((3, 8, 8), 0.4, np.float32))  # a mid-grey field (phase contrast)
    # the median, not the mean: a field 60 % background at 0.1 with very bright cells is still dark
    field = np.where(np.arange(100) < 60, 0.1, 1.0).astype(np.float32).reshape(10, 10)
    assert field.mean() > DARK_FIELD_MEDIAN and is_dark_field(field)
    assert is_dark_field(torch.from_numpy(nuclei).to(torch.bfloat16)) and is_dark_field(MetaTensor(torch.from_numpy(nuclei)))
    assert not is_dark_field(field, threshold=0.05)
    with pytest.raises(ValueError, match="empty"):
        is_dark_field(np.zeros((3, 0, 4), np.float32))


def test_dark_field_of_a_large_image_reads_a_subsample_with_the_same_answer():
    rng = np.random.default_rng(0)
    dark = rng.uniform(0.0, 0.2, size=(3, 1500, 1000)).astype(np.float32)  # 4.5 M values: subsampled
    assert is_dark_field(dark) and not is_dark_field(1.0 - dark)


def test_dark_field_tells_every_fluorescence_dev_image_from_the_others(dev_dir):
    """After MT²'s normalization, every fluorescence image of the dev set (11) is dark-field and every other one
    (stained tissue, H&E, grayscale brightfield, phase contrast: 24) is not."""
    import csv

    settings = config_values(MT2_CONFIGS / "inference.yaml", ["max_noise", "ignore_zeros"])
    with open(dev_dir / "modalities.csv", newline="") as handle:
        modality = {row["name"]: row["modality"] for row in csv.DictReader(handle)}
    wrong = []
    for image_path in sorted((dev_dir / "images").iterdir()):
        image = normalize_whole(to_three_channels(read_image(image_path)), **settings)
        if is_dark_field(image) != modality[image_path.stem].startswith("fluorescence"):
            wrong.append((image_path.stem, modality[image_path.stem]))
    assert len(modality) == 35 and not wrong


# ------------------------------------------------------------------------------------------------ real data


def test_real_images_normalize_into_unit_range(dev_pairs):
    for image_path, _ in dev_pairs:
        image = to_three_channels(read_image(image_path))
        for function in (normalize_per_channel, normalize_whole):
            out = function(image)
            assert out.shape == image.shape and out.dtype == np.float32, image_path.name
            assert np.isfinite(out).all(), image_path.name
            assert out.min() >= 0.0 and out.max() <= 1.0, image_path.name
            # Pixels above the upper percentile exist in any image with content, so something reaches 1.
            assert out.max() == 1.0, (image_path.name, function.__name__)


def test_mt2_ignoring_zeros_keeps_the_nuclei_of_a_zero_floored_field_unsaturated(dev_dir):
    """dsb_f4c4db3df4ff: 86 % of its pixels are exactly 0, so counting them puts the 99th percentile in the glow
    around the nuclei and most nuclei become flat white; the bundle's setting (train and inference alike) does not."""
    for config in ("train.yaml", "inference.yaml"):
        assert config_values(MT2_CONFIGS / config, ["ignore_zeros"])["ignore_zeros"] is True, config
    image = to_three_channels(read_image(dev_dir / "images" / "dsb_f4c4db3df4ff.png"))
    label = read_label(dev_dir / "labels" / "dsb_f4c4db3df4ff_label.tiff")
    ids = np.unique(label)[1:]

    def mostly_saturated(normalized: np.ndarray) -> int:
        return sum(int((normalized[0][label == i] == 1).mean() > 0.5) for i in ids)

    assert (image == 0).mean() > 0.8 and len(ids) > 60
    assert mostly_saturated(normalize_whole(image, max_noise=0.05)) > 0.5 * len(ids)
    assert mostly_saturated(normalize_whole(image, max_noise=0.05, ignore_zeros=True)) <= 2


def test_ignoring_zeros_changes_no_dev_image_but_the_zero_floored_one(dev_pairs):
    """On every other dev image (validation, H&E, training rows) ignore_zeros moves the input by at most 0.03: a
    few stray zeros shift the lower percentile by one grey level."""
    changed = []
    for image_path, _ in dev_pairs:
        image = to_three_channels(read_image(image_path))
        difference = np.abs(normalize_whole(image, ignore_zeros=True) - normalize_whole(image)).max()
        if difference > 0.03:
            changed.append(image_path.stem)
    assert changed == ["dsb_f4c4db3df4ff"]
