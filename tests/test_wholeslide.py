"""Whole-slide mode: regions normalized as the plain path does, the switch by size, and seams that neither split
nor duplicate cells (plain and whole-slide segmentations of a 3000 x 3000 mosaic of real labels agree)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from PIL import Image
from scipy import ndimage as ndi
from torch import nn

import bundle_runs as runs
from common.intensity import normalize_per_channel, normalize_whole, to_three_channels
from common.io import read_image, read_label
from common.metrics import challenge_counts
from common.targets import mt2_heatmaps, three_class_map
from common.tiling import tile_grid
from common.wholeslide import SlideImage, WholeSlideSegmenter, image_size

benchmark = runs.tool_module("benchmark")

MOSAIC = 3000
TILE, HALO = 512, 128  # 36 tiles; the halo exceeds every cell of the mosaic


# ---------------------------------------------------------------------------------------------- SlideImage


def plain_input(
    raw: np.ndarray, per_channel: bool, max_noise: float | None = None, ignore_zeros: bool = False
) -> np.ndarray:
    """What the plain path feeds the network: float32 as read_image gives, three channels, normalized."""
    three = to_three_channels(raw.astype(np.float32))
    if per_channel:
        return normalize_per_channel(three, max_noise=max_noise)
    return normalize_whole(three, max_noise=max_noise, ignore_zeros=ignore_zeros)


# (per_channel, ignore_zeros): MT²'s paper normalization, MT²'s shipped one, CrossCT's
NORMALIZATIONS = {"whole": (False, False), "whole-non-zero": (False, True), "per-channel": (True, False)}


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_regions_equal_the_plain_normalization_of_real_images(dev_pairs, normalization):
    per_channel, ignore_zeros = NORMALIZATIONS[normalization]
    # every third image, and the one that is mostly exact zeros
    paths = [path for path, _ in dev_pairs[::3]] + [path for path, _ in dev_pairs if path.stem == "dsb_f4c4db3df4ff"]
    for image_path in paths:
        slide = SlideImage.read(image_path, per_channel, ignore_zeros=ignore_zeros)
        expected = plain_input(read_image(image_path), per_channel, ignore_zeros=ignore_zeros)
        np.testing.assert_array_equal(slide.region(slice(None), slice(None)), expected, err_msg=image_path.name)
        rows, cols = slice(17, 201), slice(5, 150)
        np.testing.assert_array_equal(slide.region(rows, cols), expected[:, rows, cols], err_msg=image_path.name)


@pytest.mark.parametrize("per_channel", [False, True], ids=["whole", "per-channel"])
@pytest.mark.parametrize("channels", [1, 3])
def test_regions_equal_the_plain_normalization_under_a_noise_ceiling(per_channel, channels):
    # a sparse, noisy field taller than one band of the noise estimate, where the ceiling changes the stretch
    rng = np.random.default_rng(3)
    raw = np.clip(rng.normal(10, 4, (channels, 600, 300)), 0, 255).astype(np.uint8)
    raw[:, 100:110, 50:60] = 220
    expected = plain_input(raw, per_channel, max_noise=0.05)
    assert not np.array_equal(expected, plain_input(raw, per_channel))
    slide = SlideImage(raw, per_channel, max_noise=0.05)
    np.testing.assert_array_equal(slide.region(slice(None), slice(None)), expected)
    rows, cols = slice(250, 590), slice(7, 99)
    np.testing.assert_array_equal(slide.region(rows, cols), expected[:, rows, cols])


GENERATED = {
    "gray-uint16": lambda rng: rng.integers(0, 65535, (1, 50, 60), dtype=np.uint16),
    "two-channel-uint8": lambda rng: rng.integers(0, 256, (2, 50, 60), dtype=np.uint8),
    "int16-with-negatives": lambda rng: rng.integers(-300, 300, (3, 40, 30)).astype(np.int16),
    "rgba-float": lambda rng: (rng.random((4, 33, 44)) * 7).astype(np.float32),
    "all-zero": lambda rng: np.zeros((3, 20, 20), np.uint8),
    "flat": lambda rng: np.full((1, 20, 20), 5, np.uint8),
    "zero-padded-uint16": lambda rng: np.pad(
        rng.integers(1, 4000, (1, 30, 30), dtype=np.uint16), ((0, 0), (0, 40), (0, 9))
    ),
}


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("kind", GENERATED)
def test_regions_equal_the_plain_normalization_of_every_pixel_type(kind, normalization):
    per_channel, ignore_zeros = NORMALIZATIONS[normalization]
    raw = GENERATED[kind](np.random.default_rng(0))
    region = SlideImage(raw, per_channel, ignore_zeros=ignore_zeros).region(slice(None), slice(None))
    np.testing.assert_array_equal(region, plain_input(raw, per_channel, ignore_zeros=ignore_zeros))


def test_first_channel_empty_follows_the_normalized_image():
    image = np.zeros((2, 30, 30), np.uint8)
    image[1] = 200  # 2-channel fluorescence: first channel empty
    assert SlideImage(image, per_channel=True).first_channel_empty()
    image[0, 3, 3] = 9
    assert not SlideImage(image, per_channel=True).first_channel_empty()
    # with whole-array percentiles a first channel below the lower percentile normalizes to all zero
    dim = np.full((3, 30, 30), 100, np.uint8)
    dim[0] = 1
    assert SlideImage(dim, per_channel=False).first_channel_empty()


# ---------------------------------------------------------------------------------------------- the switch


def test_image_size_reads_headers_of_every_format(tmp_path, dev_pairs):
    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for suffix in (".png", ".jpg", ".bmp", ".tif"):
        path = tmp_path / f"image{suffix}"
        Image.fromarray(rgb).save(path)
        assert image_size(path) == read_image(path).shape[1:], suffix
    tifffile.imwrite(tmp_path / "planar.tif", rgb.transpose(2, 0, 1), photometric="rgb", planarconfig="separate")
    assert image_size(tmp_path / "planar.tif") == (37, 53)
    for image_path, _ in dev_pairs[::5]:
        assert image_size(image_path) == read_image(image_path).shape[1:], image_path.name
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    assert image_size(tmp_path / "broken.png") is None
    assert image_size(tmp_path / "missing.tif") is None


def bundle_config(bundle: str, **overrides) -> ConfigParser:
    root = runs.REPO / "bundles" / bundle
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.yaml"))
    parser.update({"bundle_root": str(root), "write_overlays": False, **overrides})
    return parser


def test_whole_slide_mode_switches_on_by_size(tmp_path):
    small, big = tmp_path / "small.png", tmp_path / "big.png"
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(small)
    Image.fromarray(np.zeros((60, 50), np.uint8)).save(big)
    for mode, expected in (("auto", (False, True)), (True, (True, True)), ("false", (False, False))):
        parser = bundle_config("mt2_cell_segmentation", output_dir=str(tmp_path), whole_slide=mode,
                               whole_slide_min_pixels=3000)
        segmenter = parser.get_parsed_content("whole_slide_segmenter")
        assert (segmenter.applies(small), segmenter.applies(big)) == expected, mode


def test_preprocessing_it_cannot_reproduce_is_refused(tmp_path):
    from monai.transforms import Compose, ScaleIntensityd

    parser = bundle_config("crossct_cell_segmentation", output_dir=str(tmp_path))
    preprocessing = parser.get_parsed_content("preprocessing")
    # per channel (non-zero pixels, as always), the ceiling too
    assert WholeSlideSegmenter(preprocessing, None, None).normalization == (True, 1.0, 99.0, 0.05, True)
    mt2 = bundle_config("mt2_cell_segmentation", output_dir=str(tmp_path)).get_parsed_content("preprocessing")
    assert WholeSlideSegmenter(mt2, None, None).normalization == (False, 1.0, 99.0, 0.05, True)  # MT²: ignore_zeros
    with pytest.raises(ValueError, match="ScaleIntensityd"):
        WholeSlideSegmenter(Compose([*preprocessing.transforms, ScaleIntensityd(keys="image")]), None, None)


# ---------------------------------------------------------------------------------------------- seams


class MapsAsLogits(nn.Module):
    """A stand-in network for checking seams: an untrained network's output is noise, with no cells to cut.

    The input image ENCODES the maps a well-trained network would give (channel 0 the MT² cell heat-map,
    1 the boundary heat-map, 2 the interior class of real labels); the stand-in blurs them over 5 x 5 px, so each
    output pixel depends on its neighbourhood as a convolutional network's does, and returns them as the
    5-channel logits both bundles expect: [background 0, interior, boundary 0, logit(cell), logit(boundary)].
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False).clamp(1e-4, 1 - 1e-4)
        zeros = torch.zeros_like(x[:, :1])
        return torch.cat([zeros, 12 * (2 * x[:, 2:3] - 1), zeros, torch.logit(x[:, :2])], dim=1)


@pytest.fixture(scope="module")
def label_mosaic(dev_dir, tmp_path_factory):
    """A 3000 x 3000 RGB TIFF of the target maps (see MapsAsLogits) of a mosaic of real labels, and the label.

    The labels with at least 400 cells per Mpx make it: about 5,900 cells, none wider than the halo."""
    _, truth = benchmark.dev_mosaic(MOSAIC, MOSAIC, min_cells_per_mpx=400, dev_dir=dev_dir)
    maps = np.concatenate([mt2_heatmaps(truth), (three_class_map(truth) == 1)[None]])
    path = tmp_path_factory.mktemp("mosaic") / "mosaic.tif"
    tifffile.imwrite(path, np.round(maps * 255).astype(np.uint8).transpose(1, 2, 0), photometric="rgb")
    return path, truth


def cells_across_seams(labels: np.ndarray) -> np.ndarray:
    """Ids of the instances with pixels in more than one tile core of the test's grid."""
    crossing = []
    for tile in tile_grid(*labels.shape, tile_size=TILE, halo=0):
        for axis, boundary in ((0, tile.core[0].stop), (1, tile.core[1].stop)):
            if boundary < labels.shape[axis]:
                before, after = np.take(labels, boundary - 1, axis=axis), np.take(labels, boundary, axis=axis)
                crossing.append(before[(before == after) & (before > 0)])
    return np.unique(np.concatenate(crossing))


def best_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For every id of ``a``, the largest IoU with an instance of ``b`` (index = id; 0 where none overlaps)."""
    pairs, overlap = np.unique(a.astype(np.int64) * (int(b.max()) + 1) + b, return_counts=True)
    ids_a, ids_b = np.divmod(pairs, int(b.max()) + 1)
    keep = (ids_a > 0) & (ids_b > 0)
    area_a, area_b = np.bincount(a.ravel()), np.bincount(b.ravel())
    iou = overlap[keep] / (area_a[ids_a[keep]] + area_b[ids_b[keep]] - overlap[keep])
    best = np.zeros(area_a.size)
    np.maximum.at(best, ids_a[keep], iou)
    return best


@pytest.mark.parametrize("bundle", ["mt2_cell_segmentation", "crossct_cell_segmentation"])
def test_whole_slide_and_plain_mode_agree_across_many_seams(bundle, label_mosaic, tmp_path):
    path, truth = label_mosaic
    # float32: in bfloat16 the stand-in's pooled maps and logits would be rounded to 8 bits, noise this test
    # does not measure (a real network's bfloat16 outputs: tests/test_precision.py)
    parser = bundle_config(
        bundle, output_dir=str(tmp_path), whole_slide=True, tile_size=TILE, tile_halo=HALO, amp=False
    )
    names = ("preprocessing", "inferer", "instance_postprocessing", "whole_slide_segmenter")
    preprocessing, inferer, postprocessing, segmenter = (parser.get_parsed_content(name) for name in names)
    network = MapsAsLogits()
    with torch.no_grad():
        image = preprocessing({"image": str(path)})["image"]
        plain = np.asarray(postprocessing({"pred": inferer(image[None], network)[0], "image": image})["pred"])[0]
        tiled = segmenter.segment(path, inferer, network)

    assert len(tile_grid(MOSAIC, MOSAIC, TILE, HALO)) == 36
    np.testing.assert_array_equal(read_label(tmp_path / "mosaic_label.tiff"), tiled)
    assert np.array_equal(np.unique(tiled), np.arange(tiled.max() + 1)), "ids must be unique and sequential"
    # the stand-in gives real cells: thousands of labelled cells are found (the interior class alone loses the
    # smallest nuclei, so CrossCT's baseline post-processing finds fewer of them than MT²'s watershed)
    assert challenge_counts(truth, plain).tp > (np.unique(truth).size - 1) / 3
    # whole-slide mode agrees with plain mode (windows and resampling grids start at each tile, so a few
    # cells near the thresholds differ anywhere in the image) ...
    agreement = challenge_counts(plain, tiled)
    assert agreement.f1 >= 0.99, agreement
    # ... and every cell lying across a seam is there once, whole, on both sides: not split, not duplicated
    seam_cells_plain, seam_cells_tiled = cells_across_seams(plain), cells_across_seams(tiled)
    assert seam_cells_plain.size > 100
    assert np.mean(best_iou(plain, tiled)[seam_cells_plain] >= 0.5) >= 0.99
    assert np.mean(best_iou(tiled, plain)[seam_cells_tiled] >= 0.5) >= 0.99
    assert abs(seam_cells_tiled.size - seam_cells_plain.size) <= 0.01 * seam_cells_plain.size


# ---------------------------------------------------------------------------------------------- in the bundle


def test_bundle_inference_segments_whole_slide_images_and_names_unreadable_ones(dev_dir, tmp_path, capfd):
    from common.segment import segment_images

    bundle = runs.REPO / "bundles" / "crossct_cell_segmentation"
    settings = {"unet_features": [4, 4, 8, 8, 16, 4], "swin_feature_size": 12, "num_workers": 0}
    checkpoint = tmp_path / "random.pt"
    torch.manual_seed(0)
    network = bundle_config("crossct_cell_segmentation", output_dir=str(tmp_path), **settings).get_parsed_content("network_def")
    torch.save(network.state_dict(), checkpoint)
    image = dev_dir / "images" / "he_image01.png"
    whole_slide = {"whole_slide": True, "tile_size": 256, "tile_halo": 32, "checkpoint": str(checkpoint), **settings}
    (labels,) = segment_images(bundle, [image], output_dir=tmp_path / "out", **whole_slide)
    assert labels.shape == read_image(image).shape[1:] and labels.dtype == np.int32
    np.testing.assert_array_equal(read_label(tmp_path / "out" / "he_image01_label.tiff"), labels)
    assert (tmp_path / "out" / "he_image01_overlay.png").is_file()
    assert "he_image01.png: tiles done 6/6" in capfd.readouterr().out  # 488 x 643 px in 2 x 3 tiles

    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(image.read_bytes()[:3000])
    with pytest.raises(RuntimeError) as failure:
        segment_images(bundle, [truncated], output_dir=tmp_path / "bad", **whole_slide)
    causes = []
    error = failure.value
    while error is not None:  # MONAI wraps the engine's error in its own
        causes.append(str(error))
        error = error.__cause__
    assert any("could not be segmented" in cause and "truncated.png" in cause for cause in causes), causes
    assert not (tmp_path / "bad" / "truncated_label.tiff").exists()
