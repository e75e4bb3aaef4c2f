"""MultiScaleInferer: MT² multi-scale sliding-window inference with max fusion."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from torch import nn

import common.inferers
from common.inferers import FlipAveragingInferer
from common.io import read_image
from common.networks import MultiHeadUNetPlusPlus
from common.postprocess import MT2Watershedd

ROI = 32
# float32 unless a test says otherwise: these tests compare stitching with exact answers, and amp "auto" means
# bfloat16 on a CPU that runs it natively
MultiScaleInferer = functools.partial(common.inferers.MultiScaleInferer, amp=False)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # the networks here are tiny: with several test processes sharing 2 cores, intra-op threads only spin
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Pointwise(nn.Module):
    """A fixed 1x1 convolution 3 -> 5: its output at a pixel depends on that pixel only."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(5, 3, 1, 1, generator=generator) * 2)
            self.conv.bias.copy_(torch.randn(5, generator=generator))

    def forward(self, x):
        return self.conv(x)


class Pattern(nn.Module):
    """Pointwise logits plus stripes in the window's own pixel grid on the cell and boundary logits, so the
    cell-minus-boundary map, once resized back, changes with the scale and each scale wins somewhere."""

    def __init__(self):
        super().__init__()
        self.pointwise = Pointwise(1)

    def forward(self, x):
        out = self.pointwise(x)
        height, width = x.shape[-2:]
        rows = torch.arange(height, dtype=x.dtype).view(-1, 1)
        cols = torch.arange(width, dtype=x.dtype).view(1, -1)
        stripes = 3 * torch.stack([torch.sin(0.9 * cols) + 0 * rows, torch.cos(0.7 * rows) + 0 * cols])
        return torch.cat([out[:, :3], out[:, 3:] + stripes], dim=1)


def activations(logits: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.softmax(logits[:, :3], 1), torch.sigmoid(logits[:, 3:])], 1)


def smooth_images(batch: int, height: int, width: int, seed: int = 0, period: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, max(2, height // period), max(2, width // period), generator=generator)
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)


def assert_probabilities(out: torch.Tensor, shape: tuple[int, ...]):
    assert out.shape == shape and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out[:, :3].sum(1), torch.ones(shape[0], *shape[2:]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(20, 25), (45, 70), (100, 83)], ids=["smaller", "non-square", "larger"])
def test_unetpp_output_is_probabilities_at_input_size(size):
    torch.manual_seed(0)
    network = MultiHeadUNetPlusPlus(features=(4, 4, 8, 8, 16, 4)).eval()
    inferer = MultiScaleInferer(roi_size=ROI, sw_batch_size=2)
    with torch.no_grad():
        out = inferer(smooth_images(2, *size), network)
    assert_probabilities(out, (2, 5, *size))


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@pytest.mark.parametrize("size", [(20, 25), (75, 90)], ids=["smaller", "larger"])
def test_single_scale_equals_activations_of_pointwise_network(mode, size):
    # overlapping windows of a pointwise network agree, so any stitching weights give its plain output
    network, images = Pointwise(), smooth_images(2, *size)
    inferer = MultiScaleInferer(roi_size=ROI, overlap=0.5, mode=mode, scales=(1.0,))
    with torch.no_grad():
        out, expected = inferer(images, network), activations(network(images))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_rescaled_inference_maps_back_onto_the_image():
    # up- then down-sampling a smooth image nearly restores it: a misaligned resize would not
    network, images = Pointwise(), smooth_images(1, 60, 44, period=20)
    with torch.no_grad():
        reference = MultiScaleInferer(roi_size=ROI, scales=(1.0,))(images, network)
        for scale in (0.8, 1.2, 2.0):
            out = MultiScaleInferer(roi_size=ROI, scales=(scale,))(images, network)
            assert out.shape == reference.shape
            assert (out - reference).abs().max() < 0.01
            # on a constant image every scale gives the same, exactly known answer
            constant = torch.full((1, 3, 37, 29), 0.4)
            out_constant = MultiScaleInferer(roi_size=ROI, scales=(scale,))(constant, network)
            expected = activations(network(constant[:, :, :1, :1])).expand_as(out_constant)
            torch.testing.assert_close(out_constant, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(30, 26), (70, 90)], ids=["smaller", "larger"])
def test_scales_are_fused_by_pixelwise_max_of_cell_minus_boundary(size):
    network, images, scales = Pattern(), smooth_images(2, *size, seed=3), (0.8, 1.0, 1.2)
    with torch.no_grad():
        fused = MultiScaleInferer(roi_size=ROI, scales=scales)(images, network)
        singles = torch.stack([MultiScaleInferer(roi_size=ROI, scales=(s,))(images, network) for s in scales])
    energies = singles[:, :, 3] - singles[:, :, 4]  # (scale, B, H, W)
    best = energies.argmax(0)
    # every scale wins on a good share of pixels, so the fusion is really exercised
    assert all((best == k).float().mean() > 0.1 for k in range(len(scales)))
    torch.testing.assert_close(fused[:, 3] - fused[:, 4], energies.max(0).values, atol=1e-6, rtol=0)
    winner = torch.gather(singles[:, :, 3:], 0, best[None, :, None].expand(1, -1, 2, -1, -1))[0]
    torch.testing.assert_close(fused[:, 3:], winner, atol=1e-6, rtol=0)
    torch.testing.assert_close(fused[:, :3], singles[:, :, :3].mean(0), atol=1e-6, rtol=0)
    assert_probabilities(fused, (2, 5, *size))


def test_fluorescence_rule_uses_its_own_scales_when_first_channel_is_zero():
    network = Pattern()
    images = smooth_images(2, 40, 36, seed=5)
    images[0, 0] = 0  # sample 0 looks like 2-channel fluorescence stored as RGB with an empty first channel
    images[1, 2] = 0  # a zero THIRD channel does not trigger the rule
    with torch.no_grad():
        default = MultiScaleInferer(roi_size=ROI)(images, network)
        only_15 = MultiScaleInferer(roi_size=ROI, scales=(1.5,), fluorescence_rule=False)(images, network)
        ordinary = MultiScaleInferer(roi_size=ROI, fluorescence_rule=False)(images, network)
    torch.testing.assert_close(default[0], only_15[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(default[1], ordinary[1], atol=1e-6, rtol=0)
    rule_off = MultiScaleInferer(roi_size=ROI, fluorescence_scales=(0.5,), fluorescence_rule=False)
    torch.testing.assert_close(ordinary, rule_off(images, network))
    assert (only_15[0] - ordinary[0]).abs().max() > 0.05  # the two choices really differ
    assert MultiScaleInferer().scales_for(images[0]) == (1.5,)
    assert MultiScaleInferer().scales_for(images[1]) == (0.8, 1.0, 1.2)


def test_tiles_of_a_whole_image_run_at_the_whole_image_scales():
    network = Pattern()
    images = smooth_images(2, 40, 36, seed=5)
    images[0, 0] = 0  # a tile whose first channel is empty, cut from an image whose first channel is not
    inferer = MultiScaleInferer(roi_size=ROI)
    ordinary, fluorescence = inferer.for_whole_image(first_channel_empty=False), inferer.for_whole_image(first_channel_empty=True)
    assert [ordinary.scales_for(image) for image in images] == [(0.8, 1.0, 1.2)] * 2
    assert [fluorescence.scales_for(image) for image in images] == [(1.5,)] * 2
    with torch.no_grad():
        expected = MultiScaleInferer(roi_size=ROI, fluorescence_rule=False)(images, network)
        torch.testing.assert_close(ordinary(images, network), expected, atol=1e-6, rtol=0)
    assert inferer.scales_for(images[0]) == (1.5,) and inferer.fluorescence_rule  # the original is unchanged
    rule_off = MultiScaleInferer(fluorescence_rule=False).for_whole_image(first_channel_empty=True)
    assert rule_off.scales == (0.8, 1.0, 1.2)
    # tiles starting on multiples of 5 px are resampled at 0.8 and 1.2 on the whole image's grid; 2 px for 1.5
    assert (ordinary.grid_step(), fluorescence.grid_step(), inferer.grid_step()) == (5, 2, 10)
    assert MultiScaleInferer(scales=(0.77,), fluorescence_rule=False).grid_step() == 100
    assert MultiScaleInferer(scales=(0.777,), fluorescence_rule=False).grid_step() == 1


def test_metatensor_input_keeps_its_metadata():
    images = MetaTensor(smooth_images(1, 24, 30), meta={"filename_or_obj": "a.png"})
    with torch.no_grad():
        out = MultiScaleInferer(roi_size=ROI, scales=(1.0, 1.2))(images, Pointwise())
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "a.png"
    assert out.shape == (1, 5, 24, 30) and out.dtype == torch.float32


def test_invalid_arguments_are_refused():
    for kwargs in ({"mode": "nearest"}, {"scales": ()}, {"scales": (1.0, 0.0)}, {"overlap": 1.0}, {"sw_batch_size": 0}):
        with pytest.raises(ValueError):
            MultiScaleInferer(**kwargs)
    with pytest.raises(ValueError, match="5 channels"):
        MultiScaleInferer(roi_size=ROI)(smooth_images(1, 20, 20), nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        MultiScaleInferer(roi_size=ROI)(torch.zeros(3, 20, 20), Pointwise())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 autocast runs only on CUDA")
def test_cuda_autocast_returns_float32_close_to_full_precision():
    network, images = Pointwise().cuda(), smooth_images(1, 80, 70).cuda()
    with torch.no_grad():
        half = MultiScaleInferer(roi_size=ROI, amp=True)(images, network)
        full = MultiScaleInferer(roi_size=ROI, amp=False)(images, network)
        on_cpu = MultiScaleInferer(roi_size=ROI, stitch_device="cpu")(images, network)
    assert half.dtype == torch.float32 and half.is_cuda and on_cpu.device.type == "cpu"
    assert (half - full).abs().max() < 1e-2
    torch.testing.assert_close(on_cpu, half.cpu(), atol=1e-5, rtol=0)


def test_real_image_gives_probabilities_the_mt2_watershed_accepts(dev_pairs):
    image_path = next(path for path, _ in dev_pairs if read_image(path).shape[1:] == (256, 320))
    image = torch.from_numpy(read_image(image_path)[:3] / 255.0)[None]
    torch.manual_seed(0)
    network = MultiHeadUNetPlusPlus(features=(4, 4, 8, 8, 16, 4)).eval()
    with torch.no_grad():
        out = MultiScaleInferer(roi_size=64, sw_batch_size=4)(image, network)
    assert_probabilities(out, (1, 5, 256, 320))
    labels = MT2Watershedd(keys="pred", sigmoid=False)({"pred": out[0]})["pred"]
    assert tuple(np.asarray(labels).shape[-2:]) == (256, 320)


def _same_partition(first: np.ndarray, second: np.ndarray) -> float:
    """Share of pixels on which two instance labelings agree once ids are matched one to one (background 0)."""
    pairs = np.stack([first.ravel(), second.ravel()], axis=1)
    unique, counts = np.unique(pairs, axis=0, return_counts=True)
    agreeing = 0
    used_first, used_second = set(), set()
    for (a, b), count in sorted(zip(map(tuple, unique), counts), key=lambda item: -item[1]):
        if (a == 0) != (b == 0) or a in used_first or b in used_second:
            continue
        used_first.add(a)
        used_second.add(b)
        agreeing += count
    return agreeing / first.size


def test_flip_averaging_makes_the_shipped_network_flip_equivariant_on_a_real_image(dev_pairs):
    """With test-time flips, segmenting a flipped real image gives the flipped segmentation (shipped weights)."""
    from pathlib import Path

    from common.intensity import normalize_per_channel, to_three_channels
    from common.postprocess import mt2_watershed

    weights = Path(__file__).resolve().parents[1] / "bundles" / "mt2_cell_segmentation" / "models" / "model.pt"
    network = MultiHeadUNetPlusPlus(features=(16, 16, 32, 64, 128, 16)).eval()
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    image_path = next(path for path, _ in dev_pairs if min(read_image(path).shape[1:]) >= 256)
    image = normalize_per_channel(to_three_channels(read_image(image_path)))[:, :256, :256]
    inputs = torch.from_numpy(np.ascontiguousarray(image)).float()[None]

    def segment(batch, flips):
        inferer = MultiScaleInferer(roi_size=256, scales=(1.0,), fluorescence_rule=False, amp=False, flips=flips)
        with torch.no_grad():
            probabilities = inferer(batch, network)[0].numpy()
        return probabilities, mt2_watershed(probabilities[3], probabilities[4], min_seed_size=16)

    for dims in ((-1,), (-2,)):
        probability_axis = dims[0] + 3  # of (5, H, W)
        plain, labels = segment(inputs, flips=True)
        flipped, flipped_labels = segment(torch.flip(inputs, dims), flips=True)
        np.testing.assert_allclose(np.flip(flipped, axis=probability_axis), plain, atol=1e-4)
        assert labels.max() > 5  # a real segmentation, not an empty one
        assert _same_partition(np.flip(flipped_labels, axis=probability_axis - 1), labels) > 0.999
    # without flips the network alone is not equivariant: the check above has something to find
    plain, _ = segment(inputs, flips=False)
    flipped, _ = segment(torch.flip(inputs, (-1,)), flips=False)
    assert np.abs(np.flip(flipped, axis=2) - plain).max() > 1e-3


def test_flip_averaging_inferer_averages_the_four_flips_of_a_sliding_window_network():
    from monai.inferers import SlidingWindowInferer

    torch.manual_seed(0)
    network = nn.Conv2d(3, 5, 3, padding=1).eval()
    image = torch.rand(1, 3, 40, 40)
    inferer = SlidingWindowInferer(roi_size=40)
    with torch.no_grad():
        averaged = FlipAveragingInferer(inferer, flips="true")(image, network)
        expected = sum(torch.flip(network(torch.flip(image, dims)), dims) for dims in ((), (-1,), (-2,), (-2, -1))) / 4
        passed_through = FlipAveragingInferer(inferer, flips=False)(image, network)
    torch.testing.assert_close(averaged, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(passed_through, network(image).detach(), atol=1e-6, rtol=1e-6)
    assert (averaged - passed_through).abs().max() > 1e-3
