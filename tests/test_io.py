"""common.io: images and labels read right (real files and every generated format), bad files fail clearly."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from common.io import (
    SUPPORTED_IMAGE_SUFFIXES,
    ImageReadError,
    LoadMicroscopyd,
    image_name,
    label_path_for,
    list_images,
    read_image,
    read_label,
    write_label,
)

HEIGHT, WIDTH = 13, 17  # not square, so a swapped H/W shows


def _expected_channel_first(path: Path) -> np.ndarray:
    """The file's pixels channel-first, read with tifffile / PIL directly (the reference for read_image)."""
    if path.suffix.lower() in (".tif", ".tiff"):
        array = np.squeeze(tifffile.imread(path))
    else:
        with Image.open(path) as image:
            array = np.asarray(image)
    return array[np.newaxis] if array.ndim == 2 else np.moveaxis(array, -1, 0)


# ---------------------------------------------------------------------------------------------- real data


def test_real_images_read_channel_first(dev_pairs, unlabeled_dir):
    paths = [image for image, _ in dev_pairs] + list_images(unlabeled_dir)
    assert len(paths) > len(dev_pairs)
    for path in paths:
        image = read_image(path)
        expected = _expected_channel_first(path)
        assert image.dtype == np.float32, path.name
        assert 1 <= image.shape[0] <= 4, path.name
        assert image.shape == expected.shape, path.name
        np.testing.assert_array_equal(image, expected.astype(np.float32), err_msg=path.name)


def test_real_labels_read_as_int32_ids(dev_pairs):
    for image_path, label_path in dev_pairs:
        label = read_label(label_path)
        expected = tifffile.imread(label_path)
        assert label.dtype == np.int32, label_path.name
        np.testing.assert_array_equal(label, expected, err_msg=label_path.name)
        assert label.shape == read_image(image_path).shape[1:], label_path.name


def test_load_microscopyd_on_real_pairs(dev_pairs):
    image_path, label_path = dev_pairs[0]
    data = LoadMicroscopyd()({"image": str(image_path), "label": label_path, "name": "kept"})
    image, label = data["image"], data["label"]
    assert image.dtype == torch.float32 and label.dtype == torch.int32
    assert label.shape == (1, *image.shape[1:])
    assert image.meta["filename_or_obj"] == str(image_path)
    assert label.meta["filename_or_obj"] == str(label_path)
    assert tuple(image.meta["spatial_shape"]) == tuple(image.shape[1:])
    np.testing.assert_array_equal(label.numpy()[0], tifffile.imread(label_path))
    assert data["name"] == "kept"


# ------------------------------------------------------------------------------ generated images, every format


def _pixels(dtype: np.dtype, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(0.0, 1000.0, shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)


def _write_tiff(path: Path, channel_last: np.ndarray, channel_first_layout: bool) -> None:
    channels = channel_last.shape[-1]
    if channel_first_layout:
        data = np.moveaxis(channel_last, -1, 0)
        planar = "separate" if channels > 1 else None
    else:
        data, planar = channel_last, ("contig" if channels > 1 else None)
    tifffile.imwrite(path, data, photometric="minisblack", planarconfig=planar)


def _write_png(path: Path, channel_last: np.ndarray) -> None:
    path.write_bytes(imagecodecs.png_encode(channel_last[..., 0] if channel_last.shape[-1] == 1 else channel_last))


def _write_bmp(path: Path, channel_last: np.ndarray) -> None:
    path.write_bytes(imagecodecs.bmp_encode(channel_last[..., 0] if channel_last.shape[-1] == 1 else channel_last))


TIFF_CASES = [
    (suffix, channels, layout, dtype)
    for suffix in (".tif", ".tiff")
    for channels in (1, 2, 3, 4)
    for layout in ("channel-first", "channel-last")
    for dtype in ("uint8", "uint16", "int16", "float32")
]
# PNG and BMP store pixels interleaved (channel-last only); PNG has 8 and 16 bits, BMP 8, neither signed/float.
PNG_CASES = [(".png", channels, "channel-last", dtype) for channels in (1, 2, 3, 4) for dtype in ("uint8", "uint16")]
BMP_CASES = [(".bmp", channels, "channel-last", "uint8") for channels in (1, 3, 4)]


@pytest.mark.parametrize(("suffix", "channels", "layout", "dtype"), TIFF_CASES + PNG_CASES + BMP_CASES)
def test_generated_image_round_trip(tmp_path, suffix, channels, layout, dtype):
    channel_last = _pixels(np.dtype(dtype), (HEIGHT, WIDTH, channels), seed=channels)
    path = tmp_path / f"image{suffix}"
    if suffix in (".tif", ".tiff"):
        _write_tiff(path, channel_last, layout == "channel-first")
    elif suffix == ".png":
        _write_png(path, channel_last)
    else:
        _write_bmp(path, channel_last)
    image = read_image(path)
    assert image.dtype == np.float32
    np.testing.assert_array_equal(image, np.moveaxis(channel_last, -1, 0).astype(np.float32))


@pytest.mark.parametrize(("suffix", "mode"), [(".jpg", "L"), (".jpeg", "RGB"), (".JPG", "RGB")])
def test_jpeg_reads_close_to_written(tmp_path, suffix, mode):
    # JPEG is lossy: a smooth image at quality 100 without chroma subsampling comes back within a few levels.
    ramp = np.add.outer(np.arange(HEIGHT) * 4, np.arange(WIDTH) * 3).astype(np.uint8)
    channel_last = ramp[..., None] if mode == "L" else np.stack([ramp, ramp // 2, 255 - ramp], axis=-1)
    path = tmp_path / f"image{suffix}"
    Image.fromarray(channel_last[..., 0] if mode == "L" else channel_last).save(
        path, format="JPEG", quality=100, subsampling=0
    )
    image = read_image(path)
    assert image.shape == (channel_last.shape[-1], HEIGHT, WIDTH)
    assert np.abs(image - np.moveaxis(channel_last, -1, 0)).max() <= 4


def test_tiff_channels_from_metadata_and_pages(tmp_path):
    planes = _pixels(np.dtype("uint16"), (2, HEIGHT, WIDTH), seed=5)
    tifffile.imwrite(tmp_path / "pages.tif", planes)  # two plain pages: the short axis is the channel axis
    tifffile.imwrite(tmp_path / "imagej.tif", planes[None, None], imagej=True, metadata={"axes": "TZCYX"})
    tifffile.imwrite(tmp_path / "ome.tif", planes[None, :, None], ome=True, metadata={"axes": "TCZYX"})
    tifffile.imwrite(tmp_path / "ome1.tif", planes[:1, None, None], ome=True, metadata={"axes": "TCZYX"})
    for name in ("pages.tif", "imagej.tif", "ome.tif"):
        np.testing.assert_array_equal(read_image(tmp_path / name), planes, err_msg=name)
    np.testing.assert_array_equal(read_image(tmp_path / "ome1.tif"), planes[:1])


def test_stacks_and_volumes_are_errors(tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", _pixels(np.dtype("uint8"), (7, HEIGHT, WIDTH), seed=1))
    tifffile.imwrite(
        tmp_path / "zstack.tif",
        _pixels(np.dtype("uint8"), (3, HEIGHT, WIDTH), seed=2),
        imagej=True,
        metadata={"axes": "ZYX"},
    )
    for name in ("stack.tif", "zstack.tif"):
        with pytest.raises(ImageReadError, match=name):
            read_image(tmp_path / name)


# ----------------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize(("max_id", "written_dtype"), [(300, np.uint16), (65535, np.uint16), (70000, np.uint32)])
def test_label_round_trip(tmp_path, max_id, written_dtype):
    label = np.zeros((HEIGHT, WIDTH), dtype=np.int64)
    label[2:5, 3:9] = 7
    label[8:12, 10:16] = max_id
    path = write_label(tmp_path / "nested" / "folder" / "a_label.tiff", label)
    assert path == tmp_path / "nested" / "folder" / "a_label.tiff"
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.dtype == written_dtype
        assert page.compression in (tifffile.COMPRESSION.ADOBE_DEFLATE, tifffile.COMPRESSION.DEFLATE)
    read = read_label(path)
    assert read.dtype == np.int32
    np.testing.assert_array_equal(read, label)
    assert sorted(os.listdir(path.parent)) == ["a_label.tiff"]  # no temporary file left


def test_read_label_accepts_integral_types_and_singleton_axis(tmp_path):
    label = np.zeros((1, HEIGHT, WIDTH), dtype=np.float32)
    label[0, 1:4, 2:6] = 3.0
    tifffile.imwrite(tmp_path / "float.tif", label)
    tifffile.imwrite(tmp_path / "int64.tif", label.astype(np.int64))
    (tmp_path / "uint8.png").write_bytes(imagecodecs.png_encode(label[0].astype(np.uint8)))
    for name in ("float.tif", "int64.tif", "uint8.png"):
        read = read_label(tmp_path / name)
        assert read.dtype == np.int32 and read.shape == (HEIGHT, WIDTH), name
        np.testing.assert_array_equal(read, label[0], err_msg=name)


@pytest.mark.parametrize(
    ("name", "values", "message"),
    [
        ("negative.tif", np.array([[0, -1], [2, 3]], dtype=np.int16), "negative"),
        ("fraction.tif", np.array([[0, 1.5], [2, 3]], dtype=np.float32), "non-integral"),
        ("huge.tif", np.array([[0, 2**31], [2, 3]], dtype=np.int64), "exceeds"),
        ("rgb.tif", np.zeros((4, 5, 3), dtype=np.uint8), "2-D"),
    ],
)
def test_bad_labels_are_errors_naming_the_file(tmp_path, name, values, message):
    tifffile.imwrite(tmp_path / name, values)
    with pytest.raises(ImageReadError, match=message) as error:
        read_label(tmp_path / name)
    assert name in str(error.value)


def test_write_label_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="2-D"):
        write_label(tmp_path / "a.tiff", np.zeros((1, 4, 4), dtype=np.uint16))
    with pytest.raises(ValueError, match="negative"):
        write_label(tmp_path / "b.tiff", np.array([[0, -2], [1, 1]]))
    with pytest.raises(ValueError, match="TIFF"):
        write_label(tmp_path / "c.png", np.zeros((4, 4), dtype=np.uint16))
    assert list(tmp_path.iterdir()) == []


def test_write_label_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "a_label.tiff"
    write_label(target, np.full((4, 4), 5, dtype=np.uint16))
    before = target.read_bytes()

    def failing_imwrite(file, *args, **kwargs):
        Path(file).write_bytes(b"II*\x00partial")  # the temporary file exists, half-written, then the write fails
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", failing_imwrite)
    with pytest.raises(OSError, match="disk full"):
        write_label(target, np.full((4, 4), 9, dtype=np.uint16))
    with pytest.raises(OSError, match="disk full"):
        write_label(tmp_path / "new_label.tiff", np.ones((4, 4), dtype=np.uint16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_label.tiff"]
    assert target.read_bytes() == before


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("suffix", SUPPORTED_IMAGE_SUFFIXES)
def test_unreadable_file(tmp_path, suffix):
    path = tmp_path / f"noise{suffix}"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ImageReadError, match=path.name) as error:
        read_image(path)
    assert error.value.__cause__ is not None  # the decoder's own error is kept


def test_truncated_files(tmp_path, dev_pairs):
    pngs = [image for image, _ in dev_pairs if image.suffix == ".png"]
    tifs = [image for image, _ in dev_pairs if image.suffix == ".tif"]
    assert pngs and tifs
    for source in (pngs[0], *tifs):
        data = source.read_bytes()
        path = tmp_path / f"half_{source.name}"
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(ImageReadError, match=path.name):
            read_image(path)


@pytest.mark.parametrize("suffix", [*SUPPORTED_IMAGE_SUFFIXES])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.touch()
    with pytest.raises(ImageReadError, match=f"{path.name}.*empty"):
        read_image(path)
    if suffix in (".tif", ".tiff", ".png"):
        with pytest.raises(ImageReadError, match=path.name):
            read_label(path)


def test_five_channel_image(tmp_path):
    path = tmp_path / "five.tif"
    pixels = _pixels(np.dtype("uint8"), (HEIGHT, WIDTH, 5), seed=0)
    tifffile.imwrite(path, pixels, photometric="minisblack", planarconfig="contig")
    with pytest.raises(ImageReadError, match=f"{path.name}.*5 channels"):
        read_image(path)


@pytest.mark.parametrize(
    ("name", "shape"), [("one.png", (1, 1)), ("one.tif", (1, 1)), ("row.png", (1, 9)), ("col.tif", (9, 1))]
)
def test_too_small_image(tmp_path, name, shape):
    path = tmp_path / name
    pixels = np.full(shape, 7, dtype=np.uint8)
    if name.endswith(".png"):
        _write_png(path, pixels[..., None])
    else:
        tifffile.imwrite(path, pixels)
    with pytest.raises(ImageReadError, match=path.name):
        read_image(path)


def test_label_shape_differs_from_image(tmp_path):
    image_path = tmp_path / "cells.png"
    _write_png(image_path, _pixels(np.dtype("uint8"), (HEIGHT, WIDTH, 3), seed=0))
    label_path = write_label(tmp_path / "cells_label.tiff", np.zeros((HEIGHT, WIDTH + 1), dtype=np.uint16))
    with pytest.raises(ValueError, match="cells_label.tiff") as error:
        LoadMicroscopyd()({"image": image_path, "label": label_path})
    assert "cells.png" in str(error.value)


def test_missing_file(tmp_path):
    for reader in (read_image, read_label):
        with pytest.raises(ImageReadError, match="absent.tif"):
            reader(tmp_path / "absent.tif")
    with pytest.raises(ImageReadError, match="absent.png"):
        LoadMicroscopyd()({"image": tmp_path / "absent.png", "label": tmp_path / "absent_label.tiff"})


# --------------------------------------------------------------------------------------- folders, loader


def test_list_images(tmp_path):
    for name in ("b.TIF", "a.png", "c.Jpeg", ".hidden.png", "notes.txt", "d.bmp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.TIF", "c.Jpeg", "d.bmp"]
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "z.tiff").write_bytes(b"x")
    assert list_images(tmp_path) == [tmp_path / "images" / "z.tiff"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(tmp_path / "nowhere")


def test_label_path_for():
    assert label_path_for("/data/images/cell_01.png", "/data/labels") == Path("/data/labels/cell_01_label.tiff")
    assert label_path_for(Path("x/img.tiff"), Path("y")) == Path("y/img_label.tiff")
    # an OME-TIFF's name drops the whole double extension, as the label writer does
    assert label_path_for("x/slide.ome.tif", "y") == Path("y/slide_label.tiff")
    assert image_name("x/slide.OME.TIFF") == "slide" and image_name("x/a.b.png") == "a.b"


def test_load_microscopyd_batches_with_default_collation(tmp_path):
    from monai.data import DataLoader, Dataset

    items = []
    for index in range(2):
        image_path = tmp_path / f"cells{index}.tif"
        tifffile.imwrite(image_path, _pixels(np.dtype("uint16"), (HEIGHT, WIDTH), seed=index))
        label = np.zeros((HEIGHT, WIDTH), dtype=np.uint16)
        label[2:6, 3 + index : 8 + index] = index + 1
        label_path = write_label(tmp_path / f"cells{index}_label.tiff", label)
        items.append({"image": str(image_path), "label": str(label_path)})
    loader = DataLoader(Dataset(items, transform=LoadMicroscopyd(keys=("image", "label"))), batch_size=2, num_workers=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 1, HEIGHT, WIDTH) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (2, 1, HEIGHT, WIDTH) and batch["label"].dtype == torch.int32
    assert list(batch["image"].meta["filename_or_obj"]) == [item["image"] for item in items]
    np.testing.assert_array_equal(batch["image"][1, 0].numpy(), tifffile.imread(items[1]["image"]))
    assert batch["label"][1].max().item() == 2


def test_load_microscopyd_missing_keys(tmp_path):
    image_path = tmp_path / "cells.png"
    _write_png(image_path, _pixels(np.dtype("uint8"), (HEIGHT, WIDTH, 2), seed=3))
    data = LoadMicroscopyd(allow_missing_keys=True)({"image": image_path})
    assert data["image"].shape == (2, HEIGHT, WIDTH) and "label" not in data
    with pytest.raises(KeyError):
        LoadMicroscopyd()({"image": image_path})


def test_a_tiff_whose_description_has_a_stale_shape_reads_its_pages_and_warns_by_name(tmp_path, caplog):
    # as a crop saved with its original's description: tifffile logs an ERROR without the path and reads the pages
    pixels = np.arange(12 * 16, dtype=np.uint16).reshape(12, 16)
    path = tmp_path / "stale.tif"
    tifffile.imwrite(path, pixels, description='{"shape": [24, 32]}', metadata=None)
    with caplog.at_level(logging.WARNING):
        image = read_image(path)
    np.testing.assert_array_equal(image[0], pixels)
    assert [record for record in caplog.records if record.name == "tifffile"] == []
    ours = [record.getMessage() for record in caplog.records if record.name == "common.io"]
    assert len(ours) == 1 and str(path) in ours[0] and ours[0].endswith("read as YX 12x16"), ours
