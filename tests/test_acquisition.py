"""Acquisition augmentations (common.acquisition): known answers on generated arrays, then a real image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from skimage.color.colorconv import rgb_from_hed

from common.acquisition import (
    RandDefocusd,
    RandInvertIntensityd,
    RandJpegd,
    RandPoissonNoised,
    RandStainJitterd,
    acquisition_families,
    chosen_families,
    defocus_blur,
    disk_kernel,
    invert_intensity,
    is_colour,
    jitter_stains,
    jpeg_recompress,
    poisson_noise,
)
from common.intensity import normalize_whole, to_three_channels
from common.io import read_image


def test_poisson_noise_keeps_the_mean_and_has_shot_noise_variance():
    image = np.full((1, 256, 256), 0.5, dtype=np.float32)
    noisy = poisson_noise(image, peak=100.0, rng=np.random.default_rng(0))
    assert noisy.dtype == np.float32 and noisy.shape == image.shape
    assert abs(noisy.mean() - 0.5) < 0.002
    # Var(Poisson(50) / 100) = 50 / 100**2
    assert noisy.var() == pytest.approx(0.005, rel=0.05)
    # the quantum is 1 / peak
    assert np.allclose(noisy * 100.0, np.round(noisy * 100.0), atol=1e-4)


def test_poisson_noise_grows_as_the_peak_falls_and_refuses_a_bad_peak():
    image = np.full((1, 128, 128), 0.3, dtype=np.float32)
    rng = np.random.default_rng(1)
    assert poisson_noise(image, 10.0, rng).std() > 3 * poisson_noise(image, 1000.0, rng).std()
    with pytest.raises(ValueError, match="peak"):
        poisson_noise(image, 0.0, rng)


def test_jpeg_recompress_error_falls_with_quality_and_output_is_8_bit():
    rng = np.random.default_rng(0)
    smooth = np.stack(np.meshgrid(np.linspace(0, 1, 96), np.linspace(0, 1, 96)))  # (2, H, W) ramps
    image = np.concatenate([smooth, rng.random((1, 96, 96))]).astype(np.float32)
    errors = [np.abs(jpeg_recompress(image, quality) - image).mean() for quality in (10, 50, 95)]
    assert errors[0] > errors[1] > errors[2]
    out = jpeg_recompress(image, 50)
    assert out.dtype == np.float32 and out.shape == image.shape
    assert np.allclose(out * 255.0, np.round(out * 255.0), atol=1e-3)
    grey = jpeg_recompress(image[:1], 95)
    assert grey.shape == (1, 96, 96)
    with pytest.raises(ValueError, match="quality"):
        jpeg_recompress(image, 0)


def test_disk_kernel_is_a_normalized_disk():
    kernel = disk_kernel(2.0)
    assert kernel.shape == (5, 5) and kernel.sum() == pytest.approx(1.0)
    assert kernel[0, 0] == 0 and kernel[2, 0] > 0 and kernel[2, 2] == kernel[0, 2]
    assert np.count_nonzero(kernel) == 13  # the lattice points within radius 2


def test_defocus_spreads_a_point_into_the_disk_and_keeps_a_flat_image():
    point = np.zeros((1, 21, 21), dtype=np.float32)
    point[0, 10, 10] = 1.0
    blurred = defocus_blur(point, 3.0)
    assert np.count_nonzero(blurred > 1e-9) == np.count_nonzero(disk_kernel(3.0))
    assert blurred.sum() == pytest.approx(1.0, abs=1e-5)
    flat = np.full((2, 16, 16), 0.25, dtype=np.float32)
    assert np.allclose(defocus_blur(flat, 2.5), flat, atol=1e-6)


def test_invert_intensity_is_its_own_inverse():
    image = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    assert np.allclose(invert_intensity(invert_intensity(image)), image, atol=1e-6)
    assert invert_intensity(np.zeros((1, 2, 2))).min() == 1.0


def test_chosen_families_keeps_the_config_order_and_names_unknown_families():
    families = {"noise": ["gauss", "poisson"], "jpeg": ["jpeg"], "blur": ["smooth", "defocus"]}
    assert chosen_families(families, ["blur", "noise"]) == ["gauss", "poisson", "smooth", "defocus"]
    assert chosen_families(families, []) == []
    with pytest.raises(ValueError, match="unknown acquisition families \\['fog'\\]"):
        chosen_families(families, ["noise", "fog"])


@pytest.fixture(scope="module")
def real_image(dev_pairs) -> np.ndarray:
    """A real dev image, normalized the way MT² trains on it, cropped to 128 x 128."""
    image_path = next(image for image, _ in dev_pairs if image.stem.startswith("dsb_"))
    return normalize_whole(to_three_channels(read_image(image_path)))[:, :128, :128]


TRANSFORMS = [
    (RandPoissonNoised, {"peak_range": (10.0, 100.0)}),
    (RandJpegd, {"quality_range": (20, 40)}),
    (RandDefocusd, {"radius_range": (1.5, 3.0)}),
    (RandInvertIntensityd, {}),
]


@pytest.mark.parametrize("transform_class, options", TRANSFORMS)
def test_random_wrappers_on_a_real_image(real_image, transform_class, options):
    image = MetaTensor(torch.from_numpy(real_image.copy()))
    untouched = transform_class(keys=["image", "image_strong"], prob=0.0, **options)
    out = untouched({"image": image, "image_strong": image.clone(), "label": 7})
    assert torch.equal(out["image"], image) and out["label"] == 7

    first = transform_class(keys=["image", "image_strong"], prob=1.0, **options)
    first.set_random_state(3)
    out = first({"image": image, "image_strong": image.clone()})
    assert isinstance(out["image"], MetaTensor) and out["image"].dtype == torch.float32
    assert out["image"].shape == image.shape
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
    assert not torch.allclose(out["image"], image, atol=1e-3)
    if transform_class is not RandPoissonNoised:  # noise is drawn per key; the others are deterministic
        assert torch.equal(out["image"], out["image_strong"])

    again = transform_class(keys=["image", "image_strong"], prob=1.0, **options)
    again.set_random_state(3)
    assert torch.equal(again({"image": image, "image_strong": image.clone()})["image"], out["image"])


def test_random_wrappers_refuse_bad_ranges():
    with pytest.raises(ValueError, match="peak_range"):
        RandPoissonNoised(keys="image", peak_range=(0.0, 10.0))
    with pytest.raises(ValueError, match="quality_range"):
        RandJpegd(keys="image", quality_range=(50, 101))
    with pytest.raises(ValueError, match="radius_range"):
        RandDefocusd(keys="image", radius_range=(3.0, 1.0))


def test_real_image_read_back_from_jpeg_keeps_its_cells(real_image):
    """At the quality range the configs use, the image stays close: 8-bit JPEG at 30 changes a pixel by little."""
    out = jpeg_recompress(real_image, 30)
    assert np.abs(out - real_image).mean() < 0.03
    assert np.corrcoef(out.ravel(), real_image.ravel())[0, 1] > 0.95



@pytest.mark.parametrize("family", ["inversion", "illumination", "gamma", "blur", "noise", "jpeg"])
def test_each_family_at_full_probability_changes_a_real_image_within_the_unit_range(real_image, family):
    transforms = acquisition_families("image")[family]
    for transform in transforms:
        if hasattr(transform, "prob"):
            transform.prob = 1.0
        if hasattr(transform, "set_random_state"):
            transform.set_random_state(0)
    data = {"image": MetaTensor(torch.from_numpy(real_image.copy())), "label": torch.ones(1, 128, 128)}
    for transform in transforms:
        data = transform(data)
    out = data["image"]
    assert out.shape == real_image.shape and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert float((out - torch.from_numpy(real_image)).abs().mean()) > 1e-3
    assert torch.equal(data["label"], torch.ones(1, 128, 128))


def _stained(densities: np.ndarray) -> np.ndarray:
    """(3, H, W) RGB transmitted through haematoxylin, eosin and DAB densities (3, H, W), by Beer-Lambert."""
    optical_density = np.einsum("shw,sc->chw", densities, rgb_from_hed)
    return np.exp(-optical_density).astype(np.float32)


def test_stain_jitter_scales_and_shifts_each_stain_by_its_known_amount():
    densities = np.zeros((3, 32, 32))
    densities[0, 8:24, 8:24] = 0.6  # a haematoxylin nucleus
    densities[1] = 0.2  # eosin everywhere
    image = _stained(densities)
    expected = _stained(densities * np.array([1.5, 0.5, 1.0])[:, None, None] + np.array([0.0, 0.0, 0.1])[:, None, None])
    out = jitter_stains(image, scales=[1.5, 0.5, 1.0], shifts=[0.0, 0.0, 0.1])
    assert out.dtype == np.float32 and out.shape == image.shape
    np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_allclose(jitter_stains(image, [1, 1, 1], [0, 0, 0]), image, atol=1e-5)
    # without the DAB shift: the nucleus gets darker, the eosin background lighter
    scaled = jitter_stains(image, scales=[1.5, 0.5, 1.0], shifts=[0.0, 0.0, 0.0])
    assert scaled[:, 16, 16].sum() < image[:, 16, 16].sum() and scaled[:, 0, 0].sum() > image[:, 0, 0].sum()


def test_stain_jitter_leaves_grey_and_white_alone_and_refuses_bad_arguments():
    grey = np.repeat(np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 8, 8), 3, axis=0)
    assert not is_colour(grey)
    assert np.array_equal(jitter_stains(grey, [1.2, 0.8, 1.1], [0.05, 0.05, 0.05]), grey)
    white = np.ones((3, 8, 8), dtype=np.float32)
    assert np.array_equal(jitter_stains(white, [0.8, 1.2, 1.1], [0.0, 0.0, 0.0]), white)
    with pytest.raises(ValueError, match="3-channel"):
        jitter_stains(np.zeros((1, 8, 8), np.float32), [1, 1, 1], [0, 0, 0])
    with pytest.raises(ValueError, match="3 positive scales"):
        jitter_stains(white, [1, 0, 1], [0, 0, 0])
    with pytest.raises(ValueError, match="scale_range"):
        RandStainJitterd(keys="image", scale_range=(1.2, 0.8))


def test_stain_family_recolours_a_real_brightfield_image_and_keeps_its_structure():
    """The scikit-image IHC sample (haematoxylin + DAB): at full probability it changes colour, not layout."""
    sample = Path(__file__).resolve().parents[1] / "common" / "sample_data" / "images" / "skimage_ihc.png"
    image = normalize_whole(to_three_channels(read_image(sample)))[:, :256, :256]
    (transform,) = acquisition_families("image")["stain"]
    transform.prob = 1.0
    transform.set_random_state(3)
    label = torch.arange(256 * 256).reshape(1, 256, 256)
    data = transform({"image": MetaTensor(torch.from_numpy(image.copy())), "label": label})
    out = data["image"].numpy()
    assert out.dtype == np.float32 and out.shape == image.shape
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert np.abs(out - image).mean() > 0.005
    assert np.corrcoef(out.mean(axis=0).ravel(), image.mean(axis=0).ravel())[0, 1] > 0.95
    assert torch.equal(data["label"], label)
