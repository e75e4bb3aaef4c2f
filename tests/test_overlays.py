"""common.overlays: contour colours, overlay pictures and their PNG files."""

from __future__ import annotations

import numpy as np
import pytest
from monai.data import MetaTensor
from PIL import Image

from common.overlays import SaveOverlayd, instance_colours, overlay_contours


def _two_squares() -> np.ndarray:
    label = np.zeros((40, 60), dtype=np.int32)
    label[5:15, 5:15] = 3
    label[20:35, 30:50] = 7
    return label


def test_colours_are_bright_stable_and_distinct_for_neighbouring_ids():
    colours = instance_colours(np.arange(1, 201))
    assert colours.dtype == np.uint8 and colours.shape == (200, 3)
    assert (colours.max(axis=1) == 255).all()  # full value: visible on dark and bright images
    assert np.array_equal(instance_colours(np.array([7])), colours[6:7])
    steps = np.abs(colours[1:].astype(int) - colours[:-1].astype(int)).sum(axis=1)
    assert steps.min() > 100


def test_contours_are_drawn_on_instance_borders_only():
    label = _two_squares()
    image = np.full((1, 40, 60), 0.5, dtype=np.float32)
    picture = overlay_contours(image, label)
    assert picture.shape == (40, 60, 3) and picture.dtype == np.uint8
    grey = np.all(picture == 128, axis=-1)
    # the ring of each square is coloured, its inside and the background keep the grey image
    assert not grey[5, 5] and not grey[14, 10] and not grey[20, 40]
    assert grey[10, 10] and grey[27, 40] and grey[0, 0] and grey[17, 20]
    assert np.array_equal(picture[5, 5], instance_colours(np.array([3]))[0])
    assert np.array_equal(picture[34, 49], instance_colours(np.array([7]))[0])
    assert np.count_nonzero(~grey) == (10 * 4 - 4) + (15 * 2 + 20 * 2 - 4)


def test_rgb_images_keep_their_colours_and_big_pictures_are_subsampled():
    image = np.zeros((3, 40, 60), dtype=np.float32)
    image[0] = 1.0
    picture = overlay_contours(image, np.zeros((40, 60), dtype=np.int32))
    assert (picture == [255, 0, 0]).all()
    small = overlay_contours(image, _two_squares(), max_pixels=600)
    assert small.shape == (20, 30, 3)


def test_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ"):
        overlay_contours(np.zeros((1, 10, 10)), np.zeros((10, 12), dtype=np.int32))


def test_dict_transform_writes_a_png_named_after_the_image(tmp_path):
    image = MetaTensor(np.full((1, 40, 60), 0.25, dtype=np.float32), meta={"filename_or_obj": "/x/cells.tif"})
    data = {"image": image, "pred": _two_squares()[None]}
    SaveOverlayd("pred", tmp_path)(data)
    written = np.asarray(Image.open(tmp_path / "cells_overlay.png"))
    assert np.array_equal(written, overlay_contours(image.numpy(), _two_squares()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells_overlay.png"]  # no temporary file left
    SaveOverlayd("pred", tmp_path / "off", enabled=False)(data)
    assert not (tmp_path / "off").exists()
