"""Sparse fields as a training augmentation (``common.sparse_fields.thinned_patch``, ``RandSparseFieldd``): known
answers on a generated patch, and a real dev patch through MT²'s own training transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from scipy import ndimage as ndi

from common.intensity import noise_sigma
from common.sparse_fields import RandSparseFieldd, thinned_patch

MT2_TRAIN = Path(__file__).resolve().parents[1] / "bundles" / "mt2_cell_segmentation" / "configs" / "train.yaml"


def _dotted_patch():
    """(3, 96, 96) patch at 0.1 with 9 square cells at 0.8 (ids 1..9), and its (1, 96, 96) float label."""
    image = np.full((3, 96, 96), 0.1, dtype=np.float32)
    label = np.zeros((1, 96, 96), dtype=np.float32)
    for number in range(1, 10):
        row, col = 8 + 30 * ((number - 1) // 3), 8 + 30 * ((number - 1) % 3)
        label[0, row : row + 10, col : col + 10] = number
        image[:, row : row + 10, col : col + 10] = 0.8
    return image, label


def test_thinned_patch_keeps_the_chosen_cells_on_the_patch_background_with_grey_noise():
    image, label = _dotted_patch()
    thinned, kept = thinned_patch(image, label, np.array([2.0, 7.0]), 0.03, np.random.default_rng(0), margin=2)
    assert thinned.shape == image.shape and thinned.dtype == np.float32
    assert kept.shape == label.shape and kept.dtype == label.dtype
    assert sorted(np.unique(kept)) == [0.0, 2.0, 7.0]
    # kept cells and their 2-px margin are untouched
    region = ndi.binary_dilation(kept[0] > 0, iterations=2)
    np.testing.assert_array_equal(thinned[:, region], image[:, region])
    # the removed cells became background: level 0.1, noise 0.03, the same in the three channels (grey stays grey)
    removed = (label[0] > 0) & (kept[0] == 0)
    assert np.median(thinned[0][removed]) == pytest.approx(0.1, abs=0.01)
    painted = thinned[0][~region]
    assert painted.std() == pytest.approx(0.03, rel=0.1)
    np.testing.assert_array_equal(thinned[0], thinned[1])
    np.testing.assert_array_equal(thinned[0], thinned[2])


def test_thinned_patch_with_no_cell_kept_is_an_empty_field_and_a_full_patch_is_refused():
    image, label = _dotted_patch()
    empty, empty_label = thinned_patch(image, label[0], np.array([]), 0.02, np.random.default_rng(1))
    assert empty_label.shape == (96, 96) and not empty_label.any()
    assert empty.max() < 0.3  # no cell left at 0.8
    assert noise_sigma(empty[0]) == pytest.approx(0.02, rel=0.1)
    full_label = np.ones((96, 96), dtype=np.int32)
    assert thinned_patch(image, full_label, np.array([1]), 0.02, np.random.default_rng(1)) is None
    with pytest.raises(ValueError, match="expected a"):
        thinned_patch(image, label[0, :50], np.array([1]), 0.02, np.random.default_rng(1))


def test_rand_sparse_field_keeps_at_most_max_cells_and_reproduces_with_its_seed():
    image, label = _dotted_patch()
    data = {"image": torch.from_numpy(image), "label": torch.from_numpy(label)}

    def counts(seed):
        transform = RandSparseFieldd(prob=1.0, max_cells=3)
        transform.set_random_state(seed)
        return [len(np.unique(transform(data)["label"])) - 1 for _ in range(40)]

    drawn = counts(5)
    assert set(drawn) == {0, 1, 2, 3}  # 0 included: empty fields are drawn too
    assert counts(5) == drawn
    never = RandSparseFieldd(prob=0.0)
    out = never(data)
    assert out["image"] is data["image"] and out["label"] is data["label"]
    with pytest.raises(ValueError, match="image key and the label key"):
        RandSparseFieldd(keys=["image"])


def test_mt2_training_transforms_thin_a_real_dev_patch(dev_dir):
    """MT²'s own train#preprocessing on a dev image, with and without thinning, the same seeds: the thinned
    patches keep at most 5 of the dozens of nuclei a plain patch holds, and the targets follow the kept cells."""
    item = {"image": str(dev_dir / "images" / "stardist_img2d.tif"),
            "label": str(dev_dir / "labels" / "stardist_img2d_label.tiff")}

    def interiors_and_background_noise(sparse_field_prob):
        parser = ConfigParser()
        parser.read_config(str(MT2_TRAIN))
        parser.update({"bundle_root": str(MT2_TRAIN.parents[1]), "patch_size": [192, 192],
                       "sparse_field_prob": sparse_field_prob, "acquisition_families": [], "zoom_range": [1.0, 1.0]})
        preprocessing = parser.get_parsed_content("train#preprocessing")
        found = []
        for seed in range(4):
            preprocessing.set_random_state(seed)
            out = preprocessing(dict(item))
            image, target = out["image"].numpy(), out["label"].numpy()
            assert image.shape == (3, 192, 192) and target.shape == (3, 192, 192)
            interiors = ndi.label(target[0] == 1)[1]  # class 1: cell interior
            found.append((interiors, float(image[0][target[0] == 0].std())))
        return found

    for (plain, _), (thinned, background_spread) in zip(interiors_and_background_noise(0.0),
                                                          interiors_and_background_noise(1.0)):
        assert plain >= 12
        assert thinned <= 5 + 2  # an interior can break in two at a thin neck
        assert background_spread < 0.12  # flat background plus at most 0.05 of noise; no nucleus left in it
