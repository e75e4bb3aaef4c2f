"""Training augmentations for acquisition differences: what another lab's microscope does to an image.

Users bring images from other microscopes, cameras and file pipelines than the training pool's. Five of the
differences that matter have no MONAI transform, so they are here, each as a pure array function plus a random
dictionary wrapper:

- shot (Poisson) noise: :func:`poisson_noise`, :class:`RandPoissonNoised`;
- JPEG re-compression (8-bit, 4:2:0 chroma for colour): :func:`jpeg_recompress`, :class:`RandJpegd`;
- defocus, a disk-shaped point-spread function (a Gaussian blur is ``monai.transforms.RandGaussianSmoothd``):
  :func:`defocus_blur`, :class:`RandDefocusd`;
- intensity inversion, dark cells on a bright field and back (transmitted light against fluorescence):
  :func:`invert_intensity`, :class:`RandInvertIntensityd`;
- another lab's staining (stain amounts, hues, scanner colour): :func:`jitter_stains`, :class:`RandStainJitterd`,
  a scale and a shift of each stain's optical density after colour deconvolution (Ruifrok & Johnston's
  haematoxylin-eosin-DAB vectors, as ``skimage.color.rgb2hed`` uses), the "HED" augmentation of Tellez et al.,
  Medical Image Analysis 58, 2019.

Gaussian noise, gamma, illumination gradients and blur are MONAI's (``RandGaussianNoised``,
``RandAdjustContrastd``, ``RandBiasFieldd``, ``RandGaussianSmoothd``). :func:`acquisition_families` builds all
of them, grouped in named families with the strengths both bundles train with, and :func:`chosen_families` picks
the families a run uses (a training config's ``acquisition_families``).

Every function takes and returns a (C, H, W) float32 image in [0, 1], the output of
:class:`common.intensity.NormalizeIntensityPercentiled`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import imagecodecs
import numpy as np
from monai.config import KeysCollection
from monai.transforms import (
    MapTransform,
    RandAdjustContrastd,
    RandBiasFieldd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandomizableTransform,
    ScaleIntensityRanged,
)
from monai.utils import convert_to_dst_type, convert_to_numpy
from scipy import ndimage
from skimage.color.colorconv import hed_from_rgb, rgb_from_hed

__all__ = [
    "RandDefocusd",
    "RandInvertIntensityd",
    "RandJpegd",
    "RandPoissonNoised",
    "RandStainJitterd",
    "acquisition_families",
    "chosen_families",
    "defocus_blur",
    "disk_kernel",
    "invert_intensity",
    "is_colour",
    "jitter_stains",
    "jpeg_recompress",
    "poisson_noise",
]


def _positive_range(name: str, value: Sequence[float]) -> Sequence[float]:
    """``value`` (low, high) when ``0 < low <= high``; else a ValueError naming ``name``."""
    if not 0 < value[0] <= value[1]:
        raise ValueError(f"{name} must satisfy 0 < low <= high, got {value}")
    return value


def _check_unit_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected a (C, H, W) image, got shape {image.shape}")
    return image.astype(np.float32, copy=False)


def poisson_noise(image: np.ndarray, peak: float, rng: np.random.Generator) -> np.ndarray:
    """Shot noise of a camera whose brightest pixel collects ``peak`` photons.

    Args:
        image: (C, H, W) float in [0, 1].
        peak: expected photon count at intensity 1; smaller is noisier (SNR at intensity x is sqrt(x * peak)).
        rng: numpy random generator.

    Returns:
        (C, H, W) float32 in [0, 1]: ``Poisson(image * peak) / peak``, clipped.
    """
    if peak <= 0:
        raise ValueError(f"peak must be positive, got {peak}")
    image = _check_unit_image(image)
    counts = rng.poisson(np.clip(image, 0.0, 1.0).astype(np.float64) * peak)
    return np.clip(counts / peak, 0.0, 1.0).astype(np.float32)


def jpeg_recompress(image: np.ndarray, quality: int) -> np.ndarray:
    """Save as an 8-bit JPEG of ``quality`` and read back, as a lab's export pipeline would.

    A 3-channel image is compressed as one colour JPEG (so it gets the chroma subsampling and block artefacts of a
    colour file); any other channel count, channel by channel in grey.

    Args:
        image: (C, H, W) float in [0, 1].
        quality: JPEG quality, 1-100.

    Returns:
        (C, H, W) float32 in [0, 1], quantized to 1/255.
    """
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    image = _check_unit_image(image)
    as_uint8 = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    if as_uint8.shape[0] == 3:
        encoded = imagecodecs.jpeg8_encode(np.ascontiguousarray(as_uint8.transpose(1, 2, 0)), level=int(quality))
        decoded = imagecodecs.jpeg8_decode(encoded).transpose(2, 0, 1)
    else:
        decoded = np.stack([imagecodecs.jpeg8_decode(imagecodecs.jpeg8_encode(np.ascontiguousarray(channel),
                                                                               level=int(quality)))
                            for channel in as_uint8])
    return (decoded.astype(np.float32) / 255.0).reshape(image.shape)


def disk_kernel(radius: float) -> np.ndarray:
    """(2r+1, 2r+1) float64 disk of ``radius`` pixels (r = ceil(radius)), summing to 1: an out-of-focus PSF."""
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    half = int(np.ceil(radius))
    rows, cols = np.mgrid[-half:half + 1, -half:half + 1]
    kernel = (rows**2 + cols**2 <= radius**2).astype(np.float64)
    return kernel / kernel.sum()


def defocus_blur(image: np.ndarray, radius: float) -> np.ndarray:
    """Convolve each channel with a :func:`disk_kernel` (mirror-reflected borders).

    Args:
        image: (C, H, W) float in [0, 1].
        radius: disk radius in pixels, > 0.

    Returns:
        (C, H, W) float32 in [0, 1]; the mean intensity is kept away from the borders.
    """
    image = _check_unit_image(image)
    kernel = disk_kernel(radius)
    blurred = np.stack([ndimage.convolve(channel.astype(np.float64), kernel, mode="reflect") for channel in image])
    return np.clip(blurred, 0.0, 1.0).astype(np.float32)


def invert_intensity(image: np.ndarray) -> np.ndarray:
    """``1 - image``: (C, H, W) float in [0, 1] to (C, H, W) float32 in [0, 1]."""
    image = _check_unit_image(image)
    return (1.0 - np.clip(image, 0.0, 1.0)).astype(np.float32)


def is_colour(image: np.ndarray, tolerance: float = 1e-3) -> bool:
    """Whether a (3, H, W) image has colour: some pixel's channels differ by more than ``tolerance``.

    A grey image repeated to three channels (``common.intensity.to_three_channels``) is not colour.
    """
    image = np.asarray(image)
    return image.shape[0] == 3 and float(np.ptp(image, axis=0).max()) > tolerance


def jitter_stains(image: np.ndarray, scales: Sequence[float], shifts: Sequence[float]) -> np.ndarray:
    """Change the amount of each stain in a brightfield RGB image, as another lab's staining would.

    The image is taken to optical density (``-ln`` of the transmitted light, floored at 1/255), unmixed into
    haematoxylin, eosin and DAB densities with the Ruifrok-Johnston vectors, each density ``d`` becomes
    ``scale * d + shift``, and the mixture goes back to RGB. A scale of 1 and a shift of 0 give the image back
    (up to the 1/255 floor); white background stays white under any scale.

    Args:
        image: (3, H, W) float RGB in [0, 1]; a grey image (see :func:`is_colour`) is returned unchanged.
        scales: three multiplicative factors (haematoxylin, eosin, DAB), > 0.
        shifts: three additive optical densities.

    Returns:
        (3, H, W) float32 in [0, 1].
    """
    image = _check_unit_image(image)
    if image.shape[0] != 3:
        raise ValueError(f"stain jitter needs a 3-channel RGB image, got {image.shape[0]} channels")
    scales, shifts = np.asarray(scales, dtype=np.float64), np.asarray(shifts, dtype=np.float64)
    if scales.shape != (3,) or shifts.shape != (3,) or not (scales > 0).all():
        raise ValueError(f"need 3 positive scales and 3 shifts, got {scales.tolist()} and {shifts.tolist()}")
    if not is_colour(image):
        return image
    pixels = np.clip(image.reshape(3, -1).T.astype(np.float64), 1.0 / 255.0, 1.0)
    densities = -np.log(pixels) @ hed_from_rgb
    jittered = (densities * scales + shifts) @ rgb_from_hed
    rgb = np.exp(-jittered).T.reshape(image.shape)
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)


def acquisition_families(keys: KeysCollection = "image") -> dict[str, list]:
    """Every acquisition augmentation, by family, in the order a microscope applies them.

    Strengths come from the training-side images (``cellseg-dev``, ``cellseg-train``, ``cellseg-unlabeled``; never
    ``cellseg-ood-eval``). Their noise floor after normalization (Immerkaer's estimate on 143 of them) has
    median 0.010, 90th percentile 0.020, 99th 0.058 and maximum 0.20 (a noisy yeast frame), so the Gaussian
    noise reaches std 0.08 and the shot noise's peak spans 30-3,000 photons (std 0.13-0.013 at intensity 0.5).
    One of their 713 files is a JPEG, so compression artefacts are new to the networks: quality 30-90.
    Among the 93 stained-tissue images of ``cellseg-train``, normalized, the haematoxylin density's 95th
    percentile spans 0.78-1.17x its median (10th-90th percentile of the images), hence stain scales 0.8-1.2.
    Each family is drawn with probability 0.15-0.25, so most patches still show the pool's own acquisitions.

    Args:
        keys: the image key(s) to augment (not labels: none of these moves a pixel).

    Returns:
        family name -> list of dictionary transforms: ``inversion``, ``illumination`` (a smooth multiplicative
        field, 0.55-1.8x across a patch), ``gamma`` (0.5-2), ``blur`` (Gaussian sigma 0.5-2 px, defocus disk
        1-3 px), ``noise`` (Gaussian, shot), ``jpeg``, ``stain`` (each stain's density scaled by 0.8-1.2 and
        shifted by up to 0.05, Tellez et al.'s strong scale and light shift; colour images only, so drawn with
        probability 0.5); the noise family ends by clipping back to [0, 1].
    """
    clip = ScaleIntensityRanged(keys, a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True)
    return {
        "inversion": [RandInvertIntensityd(keys, prob=0.15)],
        "illumination": [RandBiasFieldd(keys, prob=0.25, degree=2, coeff_range=(0.0, 0.3)), clip],
        "gamma": [RandAdjustContrastd(keys, prob=0.25, gamma=(0.5, 2.0))],
        "blur": [RandGaussianSmoothd(keys, prob=0.15, sigma_x=(0.5, 2.0), sigma_y=(0.5, 2.0)),
                 RandDefocusd(keys, prob=0.1, radius_range=(1.0, 3.0))],
        "noise": [RandGaussianNoised(keys, prob=0.2, mean=0.0, std=0.08),
                  RandPoissonNoised(keys, prob=0.15, peak_range=(30.0, 3000.0)), clip],
        "jpeg": [RandJpegd(keys, prob=0.15, quality_range=(30, 90))],
        "stain": [RandStainJitterd(keys, prob=0.5, scale_range=(0.8, 1.2), shift_range=(-0.05, 0.05))],
    }


def chosen_families(families: Mapping[str, Sequence], chosen: Sequence[str]) -> list:
    """The transforms of the ``chosen`` families, in the order the config lists the families.

    Args:
        families: family name -> list of transforms (a training config's ``acquisition``).
        chosen: names to use; an empty list turns the augmentations off.

    Returns:
        A flat list of transforms.
    """
    unknown = [name for name in chosen if name not in families]
    if unknown:
        raise ValueError(f"unknown acquisition families {unknown}; the config defines {list(families)}")
    return [transform for name, transforms in families.items() if name in chosen for transform in transforms]


class _RandImageTransformd(RandomizableTransform, MapTransform):
    """Apply an array function to every key, with one random parameter drawn per call and shared by the keys."""

    def __init__(self, keys: KeysCollection, prob: float = 0.1, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.parameter = None

    def draw_parameter(self):
        return None

    def apply(self, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.parameter = self.draw_parameter()

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        out = dict(data)
        self.randomize()
        if not self._do_transform:
            return out
        for key in self.key_iterator(out):
            transformed = self.apply(convert_to_numpy(out[key]))
            out[key] = convert_to_dst_type(transformed, out[key], dtype=transformed.dtype)[0]
        return out


class RandPoissonNoised(_RandImageTransformd):
    """Dictionary wrapper of :func:`poisson_noise`, ``peak`` drawn log-uniformly from ``peak_range``."""

    def __init__(self, keys: KeysCollection, prob: float = 0.1, peak_range: tuple[float, float] = (10.0, 1000.0),
                 allow_missing_keys: bool = False):
        super().__init__(keys, prob, allow_missing_keys)
        self.peak_range = _positive_range("peak_range", peak_range)

    def draw_parameter(self) -> float:
        return float(np.exp(self.R.uniform(np.log(self.peak_range[0]), np.log(self.peak_range[1]))))

    def apply(self, image: np.ndarray) -> np.ndarray:
        return poisson_noise(image, self.parameter, np.random.default_rng(self.R.randint(2**31)))


class RandJpegd(_RandImageTransformd):
    """Dictionary wrapper of :func:`jpeg_recompress`, ``quality`` drawn uniformly from ``quality_range``."""

    def __init__(self, keys: KeysCollection, prob: float = 0.1, quality_range: tuple[int, int] = (30, 90),
                 allow_missing_keys: bool = False):
        super().__init__(keys, prob, allow_missing_keys)
        if not 1 <= quality_range[0] <= quality_range[1] <= 100:
            raise ValueError(f"quality_range must satisfy 1 <= low <= high <= 100, got {quality_range}")
        self.quality_range = quality_range

    def draw_parameter(self) -> int:
        return int(self.R.randint(self.quality_range[0], self.quality_range[1] + 1))

    def apply(self, image: np.ndarray) -> np.ndarray:
        return jpeg_recompress(image, self.parameter)


class RandDefocusd(_RandImageTransformd):
    """Dictionary wrapper of :func:`defocus_blur`, ``radius`` drawn uniformly from ``radius_range``."""

    def __init__(self, keys: KeysCollection, prob: float = 0.1, radius_range: tuple[float, float] = (1.0, 3.0),
                 allow_missing_keys: bool = False):
        super().__init__(keys, prob, allow_missing_keys)
        self.radius_range = _positive_range("radius_range", radius_range)

    def draw_parameter(self) -> float:
        return float(self.R.uniform(self.radius_range[0], self.radius_range[1]))

    def apply(self, image: np.ndarray) -> np.ndarray:
        return defocus_blur(image, self.parameter)


class RandInvertIntensityd(_RandImageTransformd):
    """Dictionary wrapper of :func:`invert_intensity`."""

    def apply(self, image: np.ndarray) -> np.ndarray:
        return invert_intensity(image)


class RandStainJitterd(_RandImageTransformd):
    """Dictionary wrapper of :func:`jitter_stains`: per stain, a scale from ``scale_range`` and a shift from
    ``shift_range``, uniform; grey images pass unchanged."""

    def __init__(self, keys: KeysCollection, prob: float = 0.1, scale_range: tuple[float, float] = (0.8, 1.2),
                 shift_range: tuple[float, float] = (-0.05, 0.05), allow_missing_keys: bool = False):
        super().__init__(keys, prob, allow_missing_keys)
        self.scale_range = _positive_range("scale_range", scale_range)
        if not shift_range[0] <= shift_range[1]:
            raise ValueError(f"shift_range must satisfy low <= high, got {shift_range}")
        self.shift_range = shift_range

    def draw_parameter(self) -> tuple[np.ndarray, np.ndarray]:
        return self.R.uniform(*self.scale_range, size=3), self.R.uniform(*self.shift_range, size=3)

    def apply(self, image: np.ndarray) -> np.ndarray:
        return jitter_stains(image, *self.parameter)
