"""MT² training augmentation: CutMix that mixes images and targets alike, and how to build the other views
from MONAI transforms.

CutMix (this module). One box and one pairing of the batch are drawn, then pasted identically into every
tensor passed (image, 3-class map, heat-maps, and later the teacher's outputs on the weak view), so the mixed
targets stay aligned with the mixed image. :func:`random_cutmix_box` and :func:`cutmix` are pure functions;
:class:`CutMixer` adds the probability and the random generator and hands back the box and pairing so the
mean-teacher trainer can mix the teacher outputs with the same box.

Geometry and photometry need no code here; bundle configs use MONAI dictionary transforms:

- Geometry (labeled and unlabeled; MT² paper section 2.2): ``RandZoomd(prob=1, min_zoom=0.5, max_zoom=2,
  keep_size=False, mode=["bilinear", "nearest"])`` (nearest for labels), ``SpatialPadd(spatial_size=512)``,
  ``RandSpatialCropd(roi_size=512, random_size=False)``, ``RandFlipd(spatial_axis=0)``,
  ``RandFlipd(spatial_axis=1)``, ``RandRotate90d``. Targets are computed from the label after the geometry.
- Weak and strong views of an unlabeled image: after the geometry, ``CopyItemsd(keys="image",
  names="image_strong")``, then the photometric jitter on ``image_strong`` only. A MONAI dictionary
  transform draws its random parameters once per call for all its keys, and the copy is made after them,
  so both views share the geometry exactly (tests/test_augment.py checks it on a real image).
- Photometric jitter, brightness and contrast only (the paper: hue and saturation jitter hurt stained
  brightfield, where colour tells which cells to segment), on images in [0, 1]:
  ``RandScaleIntensityd(factors=f_b, prob=p)`` — brightness, ``x * (1 + u)``, u ~ U(-f_b, f_b), the
  torchvision ``ColorJitter`` brightness; ``RandScaleIntensityFixedMeand(factors=f_c, prob=p)`` — contrast,
  ``(x - mean) * (1 + u) + mean`` with the mean over the whole image, the ColorJitter contrast (which uses
  the grey-level mean); then ``ScaleIntensityRanged(a_min=0, a_max=1, b_min=0, b_max=1, clip=True)`` to
  clip back to [0, 1] as ColorJitter does. With ``channel_wise`` left False the same factor applies to all
  channels, so colour ratios (hue) are kept. The paper gives no magnitudes; 0.25 for both is a moderate
  start. (``RandAdjustContrastd`` is a gamma curve, not a linear contrast change.)
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["random_cutmix_box", "cutmix", "CutMixer"]

Box = tuple[int, int, int, int]


def random_cutmix_box(
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    area_range: tuple[float, float] = (0.25, 0.5),
) -> Box:
    """Draw a CutMix box lying wholly inside a ``height`` x ``width`` image.

    The box covers a fraction ``a ~ U(area_range)`` of the image with the image's aspect ratio
    (sides ``round(height * sqrt(a))`` and ``round(width * sqrt(a))``, at least 1 px) at a uniformly drawn
    position. Unlike the original CutMix (area ``1 - lambda``, lambda ~ Beta(1, 1), box clipped at the
    border), the mixed area is never vanishingly small nor the whole image, so every mixed sample keeps a
    substantial part of both images.

    Args:
        height, width: image size in pixels.
        generator: torch random generator; None draws from torch's global generator (so
            ``monai.utils.set_determinism`` governs it).
        area_range: (low, high) area fraction, 0 < low <= high <= 1.

    Returns:
        (top, left, box_height, box_width) ints.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height} x {width}")
    low, high = area_range
    if not 0 < low <= high <= 1:
        raise ValueError(f"area_range must satisfy 0 < low <= high <= 1, got {area_range}")
    area = low + (high - low) * torch.rand((), generator=generator).item()
    box_h = min(height, max(1, round(height * area**0.5)))
    box_w = min(width, max(1, round(width * area**0.5)))
    top = int(torch.randint(0, height - box_h + 1, (), generator=generator))
    left = int(torch.randint(0, width - box_w + 1, (), generator=generator))
    return top, left, box_h, box_w


def cutmix(tensors: Sequence[torch.Tensor], box: Box, permutation: torch.Tensor) -> list[torch.Tensor]:
    """Paste the ``box`` region of ``tensor[permutation]`` into each tensor; inputs are not modified.

    Sample ``i`` of every output is sample ``i`` of its input with the box replaced by the box of sample
    ``permutation[i]``: the same box and pairing for all tensors, so image and targets are mixed alike.

    Args:
        tensors: (B, ..., H, W) tensors (e.g. (B, C, H, W) images, (B, 1, H, W) label maps) with equal B, H, W;
            any dtype and device.
        box: (top, left, box_height, box_width) from :func:`random_cutmix_box`.
        permutation: (B,) integer tensor, the donor sample of each sample.

    Returns:
        list of new tensors, shapes and dtypes as the inputs.
    """
    if len(tensors) == 0:
        return []
    batch, height, width = tensors[0].shape[0], tensors[0].shape[-2], tensors[0].shape[-1]
    for tensor in tensors:
        if tensor.ndim < 3 or (tensor.shape[0], *tensor.shape[-2:]) != (batch, height, width):
            raise ValueError(
                f"all tensors must be (B, ..., H, W) with B, H, W = {batch}, {height}, {width}; "
                f"got shape {tuple(tensor.shape)}"
            )
    if permutation.shape != (batch,):
        raise ValueError(f"permutation must have shape ({batch},), got {tuple(permutation.shape)}")
    top, left, box_h, box_w = box
    if box_h < 1 or box_w < 1 or top < 0 or left < 0 or top + box_h > height or left + box_w > width:
        raise ValueError(f"box {box} does not lie inside a {height} x {width} image")
    rows, cols = slice(top, top + box_h), slice(left, left + box_w)
    mixed = []
    for tensor in tensors:
        out = tensor.clone()
        out[..., rows, cols] = tensor[permutation.to(tensor.device)][..., rows, cols]
        mixed.append(out)
    return mixed


class CutMixer:
    """CutMix applied to a whole batch with probability ``p``.

    Each call draws (from its own generator) whether to mix; if so one box (:func:`random_cutmix_box`) and
    a pairing in which every sample takes its box from ANOTHER sample (a random cyclic shift of the batch,
    so no sample is "mixed" with itself when B > 1), and mixes all the tensors given with them.

    Args:
        p: probability of mixing a batch (MT²: 0.5).
        area_range: box area fraction range, see :func:`random_cutmix_box`.
        seed: seeds this mixer's own ``torch.Generator``; None uses torch's global generator.

    Call ``mixer(tensors)`` with (B, ..., H, W) tensors; returns ``(mixed, box, permutation)``: the list of
    mixed tensors (the inputs themselves when not mixed), the box or None, the (B,) int64 pairing or None.
    """

    def __init__(self, p: float = 0.5, area_range: tuple[float, float] = (0.25, 0.5), seed: int | None = None):
        if not 0 <= p <= 1:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p
        self.area_range = area_range
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def __call__(self, tensors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], Box | None, torch.Tensor | None]:
        tensors = list(tensors)
        if not tensors or torch.rand((), generator=self.generator).item() >= self.p:
            return tensors, None, None
        batch, height, width = tensors[0].shape[0], tensors[0].shape[-2], tensors[0].shape[-1]
        box = random_cutmix_box(height, width, self.generator, self.area_range)
        shift = int(torch.randint(1, batch, (), generator=self.generator)) if batch > 1 else 0
        permutation = (torch.arange(batch) + shift) % batch
        return cutmix(tensors, box, permutation), box, permutation
