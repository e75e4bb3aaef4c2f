"""CutMix (common.augment) and the MONAI weak/strong view pipeline documented there."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import (
    Compose,
    CopyItemsd,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSpatialCropd,
    RandZoomd,
    ScaleIntensityRanged,
    SpatialPadd,
)

from common.augment import CutMixer, cutmix, random_cutmix_box
from common.io import read_image, read_label

# ---------------------------------------------------------------- CutMix


def constant_batch(batch: int, channels: int, height: int, width: int, dtype=torch.float32) -> torch.Tensor:
    """Sample i is filled with the value i."""
    return torch.arange(batch, dtype=dtype).view(batch, 1, 1, 1).expand(batch, channels, height, width).clone()


def test_random_cutmix_box_lies_inside_with_area_in_range():
    generator = torch.Generator().manual_seed(0)
    for height, width in [(64, 64), (48, 100), (7, 5)]:
        for _ in range(200):
            top, left, box_h, box_w = random_cutmix_box(height, width, generator, area_range=(0.25, 0.5))
            assert 0 <= top and top + box_h <= height and 0 <= left and left + box_w <= width
            # sides are rounded to whole pixels: allow half a pixel on each side
            low = (height * 0.5 - 0.5) * (width * 0.5 - 0.5) / (height * width)
            high = (height * 0.5**0.5 + 0.5) * (width * 0.5**0.5 + 0.5) / (height * width)
            assert low <= box_h * box_w / (height * width) <= high


def test_random_cutmix_box_fixed_area_and_positions_cover_the_image():
    generator = torch.Generator().manual_seed(1)
    boxes = [random_cutmix_box(64, 48, generator, area_range=(0.25, 0.25)) for _ in range(300)]
    assert {(h, w) for _, _, h, w in boxes} == {(32, 24)}  # a quarter of the area, the image's aspect ratio
    assert {t for t, _, _, _ in boxes} == set(range(33)) and {l for _, l, _, _ in boxes} == set(range(25))
    assert random_cutmix_box(10, 10, None, area_range=(1.0, 1.0)) == (0, 0, 10, 10)
    for bad in [(0.0, 0.5), (0.6, 0.5), (0.5, 1.5)]:
        with pytest.raises(ValueError):
            random_cutmix_box(10, 10, None, area_range=bad)


def test_random_cutmix_box_is_reproducible_with_a_seeded_generator():
    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return [random_cutmix_box(100, 80, generator) for _ in range(5)]

    assert draw(5) == draw(5)
    assert len({draw(seed)[0] for seed in range(20)}) > 10


def test_cutmix_pastes_the_donor_box_into_every_tensor_alike():
    image = constant_batch(3, 3, 10, 12)
    label = constant_batch(3, 1, 10, 12, dtype=torch.int32) + 10
    image_before, label_before = image.clone(), label.clone()
    box, permutation = (2, 3, 4, 5), torch.tensor([1, 2, 0])
    mixed_image, mixed_label = cutmix([image, label], box, permutation)
    # inputs untouched, outputs are new tensors of the same kind
    assert torch.equal(image, image_before) and torch.equal(label, label_before)
    assert mixed_image.dtype == torch.float32 and mixed_label.dtype == torch.int32
    assert mixed_image.shape == image.shape and mixed_label.shape == label.shape
    for i, donor in enumerate(permutation.tolist()):
        assert int((mixed_image[i] == donor).sum()) == 3 * 4 * 5
        assert int((mixed_image[i] == i).sum()) == 3 * (10 * 12 - 4 * 5)
        assert int((mixed_label[i] == donor + 10).sum()) == 4 * 5
        assert torch.all(mixed_image[i, :, 2:6, 3:8] == donor)
    # the same pixels changed in the image and in the label
    assert torch.equal(mixed_image[:, :1] != image[:, :1], mixed_label != label)


def test_cutmix_of_real_patches_keeps_image_and_targets_aligned(dev_pairs):
    image_path, label_path = next((i, l) for i, l in dev_pairs if read_image(i).shape[0] >= 3)
    image = torch.from_numpy(read_image(image_path)[:3, :64, :64])
    label = torch.from_numpy(read_label(label_path)[None, :64, :64])
    images = torch.stack([image, image.flip(-1)])
    labels = torch.stack([label, label.flip(-1)])
    mixed_images, mixed_labels = cutmix([images, labels], (10, 20, 30, 40), torch.tensor([1, 0]))
    # inside the box each sample shows the other's pixels, image and label from the same place
    assert torch.equal(mixed_images[0, :, 10:40, 20:60], images[1, :, 10:40, 20:60])
    assert torch.equal(mixed_labels[1, :, 10:40, 20:60], labels[0, :, 10:40, 20:60])
    assert torch.equal(mixed_images[0, :, :10], images[0, :, :10])


def test_cutmix_refuses_inconsistent_inputs():
    batch = constant_batch(2, 1, 8, 8)
    with pytest.raises(ValueError, match="inside"):
        cutmix([batch], (5, 0, 4, 4), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="permutation"):
        cutmix([batch], (0, 0, 4, 4), torch.tensor([1, 0, 2]))
    with pytest.raises(ValueError, match="B, H, W"):
        cutmix([batch, constant_batch(2, 1, 8, 9)], (0, 0, 4, 4), torch.tensor([1, 0]))
    assert cutmix([], (0, 0, 1, 1), torch.tensor([0])) == []


def test_cutmixer_p0_is_identity_and_p1_always_mixes():
    batch, label = constant_batch(4, 3, 16, 16), constant_batch(4, 1, 16, 16, dtype=torch.int64)
    never = CutMixer(p=0.0, seed=0)
    for _ in range(20):
        mixed, box, permutation = never([batch, label])
        assert box is None and permutation is None and mixed[0] is batch and mixed[1] is label
    always = CutMixer(p=1.0, seed=0)
    for _ in range(20):
        mixed, box, permutation = always([batch, label])
        assert box is not None
        assert sorted(permutation.tolist()) == [0, 1, 2, 3]
        assert not torch.any(permutation == torch.arange(4))  # every sample takes another's box
        # the box and pairing handed back reproduce the mixing (what the trainer does for teacher outputs)
        again = cutmix([batch, label], box, permutation)
        assert torch.equal(again[0], mixed[0]) and torch.equal(again[1], mixed[1])
        assert not torch.equal(mixed[0], batch)
    single, box, permutation = CutMixer(p=1.0, seed=0)([batch[:1]])
    assert permutation.tolist() == [0] and torch.equal(single[0], batch[:1])


def test_cutmixer_is_reproducible_and_mixes_with_probability_p():
    batch = constant_batch(3, 1, 20, 30)

    def draws(seed):
        mixer = CutMixer(p=0.5, seed=seed)
        return [mixer([batch])[1:] for _ in range(400)]

    first, second = draws(7), draws(7)
    assert all(a[0] == b[0] and (a[1] is None) == (b[1] is None) for a, b in zip(first, second))
    assert all(a[1] is None or torch.equal(a[1], b[1]) for a, b in zip(first, second))
    rate = sum(box is not None for box, _ in first) / len(first)
    assert 0.42 < rate < 0.58
    assert [box for box, _ in draws(8)] != [box for box, _ in first]
    with pytest.raises(ValueError):
        CutMixer(p=1.5)


# ---------------------------------------------------------------- weak / strong views with MONAI


def geometry(patch: int = 64) -> list:
    keys = ["image", "label"]
    return [
        RandZoomd(keys, prob=1.0, min_zoom=0.5, max_zoom=2.0, keep_size=False, mode=["bilinear", "nearest"]),
        SpatialPadd(keys, spatial_size=patch),
        RandSpatialCropd(keys, roi_size=patch, random_size=False),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandRotate90d(keys, prob=0.5),
    ]


def jitter(key: str = "image_strong") -> list:
    return [
        RandScaleIntensityd(key, factors=0.25, prob=1.0),
        RandScaleIntensityFixedMeand(key, factors=0.25, prob=1.0),
        ScaleIntensityRanged(key, a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
    ]


def affine_fit_residual(weak: np.ndarray, strong: np.ndarray) -> tuple[float, float, float]:
    """Least-squares strong ~ a * weak + b over the pixels jitter did not clip; returns (a, b, max residual)."""
    keep = (strong > 0) & (strong < 1)
    assert keep.mean() > 0.5, "too many clipped pixels for a meaningful fit"
    a, b = np.polyfit(weak[keep].astype(np.float64), strong[keep].astype(np.float64), 1)
    return a, b, float(np.abs(a * weak[keep] + b - strong[keep]).max())


@pytest.fixture(scope="module")
def real_sample(dev_pairs):
    image_path, label_path = next((i, l) for i, l in dev_pairs if i.stem.startswith("he_"))
    image = read_image(image_path)[:3]
    image = (image - image.min()) / (image.max() - image.min())
    return {"image": torch.from_numpy(image), "label": torch.from_numpy(read_label(label_path)[None])}


@pytest.mark.parametrize("seed", range(6))
def test_weak_and_strong_views_share_geometry(real_sample, seed):
    views = Compose([*geometry(), CopyItemsd(keys="image", names="image_strong"), *jitter()])
    views.set_random_state(seed)
    out = views(dict(real_sample))
    weak, strong = np.asarray(out["image"]), np.asarray(out["image_strong"])
    assert weak.shape == strong.shape == (3, 64, 64) and np.asarray(out["label"]).shape == (1, 64, 64)
    # the label followed with nearest interpolation: only existing ids
    assert set(np.unique(np.asarray(out["label"]))) <= set(np.unique(real_sample["label"].numpy()))
    # the weak view is the geometry alone: same random draws without the copy and the jitter
    weak_only = Compose(geometry())
    weak_only.set_random_state(seed)
    np.testing.assert_array_equal(np.asarray(weak_only(dict(real_sample))["image"]), weak)
    # the strong view is one affine intensity map of the weak view, the same for all channels
    a, b, residual = affine_fit_residual(weak, strong)
    assert residual < 1e-4 and (abs(a - 1) > 1e-3 or abs(b) > 1e-3)
    assert np.corrcoef(weak.ravel(), strong.ravel())[0, 1] > 0.99


def test_views_with_separate_geometry_draws_fail_the_same_geometry_check(real_sample):
    # negative control: the check above does detect views whose geometry was drawn independently
    first, second = Compose(geometry()), Compose([*geometry(), *jitter("image")])
    first.set_random_state(0)
    second.set_random_state(1)
    weak = np.asarray(first(dict(real_sample))["image"])
    strong = np.asarray(second(dict(real_sample))["image"])
    assert affine_fit_residual(weak, strong)[2] > 0.1
