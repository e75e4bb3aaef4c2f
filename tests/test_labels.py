"""The label image a bundle's post-processing ends with: 2-D, unsigned, the ids unchanged."""

import numpy as np
import pytest
import torch

from common.labels import LabelImaged, ToMonaiSpatialOrderd, label_image


def test_label_image_is_two_dimensional_uint16_with_the_same_ids():
    ids = torch.zeros(1, 5, 7, dtype=torch.int32)
    ids[0, 1:3, 2:4], ids[0, 4, 6] = 7, 300
    image = label_image(ids)
    assert image.shape == (5, 7) and image.dtype == np.uint16
    np.testing.assert_array_equal(image, ids[0].numpy())


def test_label_image_takes_uint32_only_beyond_16_bits():
    ids = np.zeros((2, 2), dtype=np.int64)
    ids[1, 1] = 65_535
    assert label_image(ids).dtype == np.uint16
    ids[0, 0] = 65_536
    wide = label_image(ids)
    assert wide.dtype == np.uint32 and int(wide[0, 0]) == 65_536


@pytest.mark.parametrize("bad, message", [
    (np.full((2, 2), -1), "negative"),
    (np.zeros((2, 2, 2)), "instance map"),
    (np.full((2, 2), 0.5), "non-integer"),
])  # fmt: skip
def test_label_image_refuses_what_is_not_an_instance_map(bad, message):
    with pytest.raises(ValueError, match=message):
        label_image(bad)


def test_dictionary_wrapper_converts_only_its_keys():
    data = {"pred": torch.ones(1, 3, 3, dtype=torch.int32), "image": torch.zeros(3, 3, 3)}
    out = LabelImaged(keys="pred")(data)
    assert out["pred"].dtype == np.uint16 and out["pred"].shape == (3, 3)
    assert out["image"] is data["image"]


def test_monai_spatial_order_transposes_the_label_and_the_reference_shape_alike():
    from monai.data import MetaTensor

    label = np.arange(6, dtype=np.uint16).reshape(2, 3)
    image = MetaTensor(torch.zeros(3, 2, 3), meta={"spatial_shape": np.asarray([2, 3]), "filename_or_obj": "x.png"})
    out = ToMonaiSpatialOrderd(keys="pred")({"pred": label, "image": image})
    np.testing.assert_array_equal(out["pred"], label.T)
    assert out["pred"].dtype == np.uint16
    assert list(out["image"].meta["spatial_shape"]) == [3, 2] and out["image"].meta["filename_or_obj"] == "x.png"
    assert list(image.meta["spatial_shape"]) == [2, 3]  # the caller's image keeps its metadata
