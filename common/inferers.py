"""Inferers of the two bundles, usable wherever MONAI expects an ``Inferer`` (``inferer(inputs, network)``).

- :class:`MultiScaleInferer` — MT²'s test-time procedure: sliding-window inference at several scales, each
  resized back to the input size, fused per pixel by the maximum of ``sigmoid(cell) - sigmoid(boundary)``.
  It returns PROBABILITIES, not logits: follow it with ``common.postprocess.MT2Watershedd(sigmoid=False)``.
- :func:`flip_averaged` — test-time augmentation by flips: each window is run as it is and flipped along
  H, W and both, and the unflipped outputs are averaged (``MultiScaleInferer(flips=True)``, or
  :class:`FlipAveragingInferer` around any other inferer).
CrossCT uses ``monai.inferers.SlidingWindowInferer`` directly on ``common.networks.CrossCTNetworks``, which
chooses the U-Net, the Swin-UNETR or their average.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer, sliding_window_inference
from monai.utils import convert_to_dst_type

from common.precision import autocast_dtype, in_precision
from common.workflows import flag

__all__ = ["MultiScaleInferer", "FlipAveragingInferer", "flip_averaged"]

# Output layout of the MT² network (common.networks.MT2_CHANNELS).
_CLASS_CHANNELS = slice(0, 3)
_CELL, _BOUNDARY = 3, 4
_NUM_OUTPUTS = 5
# the flips of a (..., H, W) window: as it is, along W, along H, along both
_FLIP_DIMS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


def flip_averaged(network: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``network`` made flip-invariant: its float32 outputs on the window and its three flips (along H, W, both),
    each flipped back, averaged. Every output channel must be a map that flips with the image (classes,
    heat-maps, distances), as in both bundles. Costs four network calls per window.

    Args:
        network: called as ``network(windows, *args, **kwargs)`` on (B, C, h, w) windows, returning (B, K, h, w).

    Returns:
        A callable with the same signature returning (B, K, h, w) float32.
    """

    def predict(windows: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        total = None
        for dims in _FLIP_DIMS:
            outputs = network(torch.flip(windows, dims) if dims else windows, *args, **kwargs).float()
            outputs = torch.flip(outputs, dims) if dims else outputs
            total = outputs if total is None else total + outputs
        return total / len(_FLIP_DIMS)

    return predict


class FlipAveragingInferer(Inferer):
    """Runs another inferer with :func:`flip_averaged` applied to the network (``flips`` true), or passes
    straight through (``flips`` false), so a config can switch test-time flips with one setting.

    Args:
        inferer: the wrapped inferer (e.g. MONAI's ``SlidingWindowInferer``).
        flips: whether to average over flips; True, False or their strings.
    """

    def __init__(self, inferer: Inferer, flips: Any = False):
        super().__init__()
        self.inferer = inferer
        self.flips = flag(flips)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any):
        return self.inferer(inputs, flip_averaged(network) if self.flips else network, *args, **kwargs)


def _check_scales(scales: Sequence[float], name: str) -> tuple[float, ...]:
    scales = tuple(float(s) for s in scales)
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"{name} must be a non-empty sequence of positive factors, got {scales}")
    return scales


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a (B, C, H, W) float tensor (no antialiasing, ``align_corners=False``)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=False)


def _scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    return max(1, round(height * scale)), max(1, round(width * scale))


class MultiScaleInferer(Inferer):
    """MT² multi-scale sliding-window inference with per-pixel max fusion (paper section 2.4).

    For each sample of the batch: pick the scales (``fluorescence_scales`` when ``fluorescence_rule`` is on
    and the sample's FIRST channel is all zero — how the MT² authors recognise 2-channel fluorescence stored
    as RGB with an empty red channel — else ``scales``); for each scale, resize the image (bilinear, skipped
    at 1.0), run ``monai.inferers.sliding_window_inference`` (which pads images smaller than the window),
    resize the logits back to (H, W) and turn them into probabilities (softmax over channels 0-2, sigmoid on
    channels 3 and 4). The scales are fused per pixel: the cell and boundary probabilities are those of the
    scale whose ``cell - boundary`` is largest (the first such scale on ties), and the class probabilities
    are averaged over the scales. Scales are processed one at a time, so memory holds one scale's logits
    plus the running fusion, whatever the number of scales.

    The network must return (B, 5, h, w) logits laid out as ``common.networks.MT2_CHANNELS``.

    Args:
        roi_size: sliding-window side (or (h, w)); MT² uses 512.
        sw_batch_size: windows per network call.
        overlap: window overlap fraction; 0.5 with a 512 window is MT²'s stride of 256.
        mode: "constant" (plain average of overlapping windows, as MT²) or "gaussian".
        scales: resize factors for ordinary images.
        fluorescence_scales: resize factors for images whose first channel is all zero.
        fluorescence_rule: whether to apply that rule at all.
        stitch_device: where windows are stitched and the result is kept (e.g. "cpu" for whole-slide images
            on a small GPU); None = the inputs' device. The network always runs on the inputs' device.
        amp: "auto", True or False: the network's autocast (float16 on CUDA, bfloat16 on a CPU that runs it
            natively; see :mod:`common.precision`); stitching and fusion stay float32.
        progress: show MONAI's per-scale sliding-window progress bar.
        flips: test-time augmentation: each window's logits averaged over it and its flips along H, W and both
            (:func:`flip_averaged`; four network calls per window).

    Call ``inferer(inputs, network)`` with inputs (B, 3, H, W) float; returns (B, 5, H, W) float32
    PROBABILITIES in [0, 1] (channels 0-2 sum to 1) on ``stitch_device``; a MetaTensor input gives a
    MetaTensor output carrying the input's metadata.
    """

    def __init__(
        self,
        roi_size: Sequence[int] | int = 512,
        sw_batch_size: int = 4,
        overlap: float = 0.5,
        mode: str = "constant",
        scales: Sequence[float] = (0.8, 1.0, 1.2),
        fluorescence_scales: Sequence[float] = (1.5,),
        fluorescence_rule: bool = True,
        stitch_device: torch.device | str | None = None,
        amp: Any = "auto",
        progress: bool = False,
        flips: Any = False,
    ):
        super().__init__()
        if mode not in ("constant", "gaussian"):
            raise ValueError(f"mode must be 'constant' or 'gaussian', got {mode!r}")
        if sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        self.roi_size = roi_size
        self.sw_batch_size = sw_batch_size
        self.overlap = overlap
        self.mode = mode
        self.scales = _check_scales(scales, "scales")
        self.fluorescence_scales = _check_scales(fluorescence_scales, "fluorescence_scales")
        self.fluorescence_rule = fluorescence_rule
        self.stitch_device = stitch_device
        autocast_dtype(amp, "cpu")  # rejects a bad setting now, not at the first image
        self.amp = amp
        self.progress = progress
        self.flips = flag(flips)

    def scales_for(self, image: torch.Tensor) -> tuple[float, ...]:
        """The scales used for one (C, H, W) image."""
        return self._scales(first_channel_empty=not bool(torch.any(image[0])))

    def _scales(self, first_channel_empty: bool) -> tuple[float, ...]:
        return self.fluorescence_scales if self.fluorescence_rule and first_channel_empty else self.scales

    def grid_step(self, largest: int = 100) -> int:
        """The smallest pixel step k (up to ``largest``, else 1) with ``k * scale`` whole for every scale in use:
        an image region starting and ending on multiples of k is resampled on the whole image's grid."""
        scales = self.scales + (self.fluorescence_scales if self.fluorescence_rule else ())
        for step in range(1, largest + 1):
            if all(abs(step * scale - round(step * scale)) < 1e-6 for scale in scales):
                return step
        return 1

    def for_whole_image(self, first_channel_empty: bool) -> MultiScaleInferer:
        """A copy that runs every input at the scales of an image whose first channel is (or is not) all zero,
        whatever the input holds: the tiles of a whole-slide image all run at the whole image's scales."""
        fixed = copy.copy(self)
        fixed.scales = self._scales(first_channel_empty)
        fixed.fluorescence_rule = False
        return fixed

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any):
        if inputs.ndim != 4:
            raise ValueError(f"inputs must be (B, C, H, W), got shape {tuple(inputs.shape)}")
        images = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        predictor = self._predictor(network, images.device, *args, **kwargs)
        fused = torch.cat([self._infer_one(image[None], predictor) for image in images])
        if isinstance(inputs, MetaTensor):
            # as sliding_window_inference does: keep the input's metadata (and batch flag) for later inversion
            fused = convert_to_dst_type(fused, inputs, dtype=torch.float32, device=fused.device)[0]
        return fused

    def _predictor(self, network: Callable[..., torch.Tensor], device: torch.device, *args, **kwargs):
        network = in_precision(network, autocast_dtype(self.amp, device))
        network = flip_averaged(network) if self.flips else network

        def predict(windows: torch.Tensor) -> torch.Tensor:
            return network(windows, *args, **kwargs)

        return predict

    def _infer_one(self, image: torch.Tensor, predictor: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """(1, C, H, W) -> (1, 5, H, W) fused probabilities."""
        height, width = image.shape[-2:]
        stitch_device = torch.device(self.stitch_device) if self.stitch_device is not None else image.device
        image = image.float()
        scales = self.scales_for(image[0])
        class_sum = cell = boundary = energy = None
        for scale in scales:
            resized = _resize(image, _scaled_size(height, width, scale)) if scale != 1.0 else image
            logits = sliding_window_inference(
                resized,
                self.roi_size,
                self.sw_batch_size,
                predictor,
                overlap=self.overlap,
                mode=self.mode,
                sw_device=image.device,
                device=stitch_device,
                progress=self.progress,
            )
            del resized
            if logits.shape[1] != _NUM_OUTPUTS:
                raise ValueError(f"the network must return {_NUM_OUTPUTS} channels, got {logits.shape[1]}")
            logits = _resize(logits, (height, width))
            classes = torch.softmax(logits[:, _CLASS_CHANNELS], dim=1)
            scale_cell = torch.sigmoid(logits[:, _CELL : _CELL + 1])
            scale_boundary = torch.sigmoid(logits[:, _BOUNDARY : _BOUNDARY + 1])
            del logits
            scale_energy = scale_cell - scale_boundary
            if class_sum is None:
                class_sum, cell, boundary, energy = classes, scale_cell, scale_boundary, scale_energy
                continue
            class_sum = class_sum + classes  # out of place: softmax's backward needs its output intact
            better = scale_energy > energy
            cell = torch.where(better, scale_cell, cell)
            boundary = torch.where(better, scale_boundary, boundary)
            energy = torch.maximum(energy, scale_energy)
        return torch.cat([class_sum / len(scales), cell, boundary], dim=1).float()
