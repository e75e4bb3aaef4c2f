"""The ``amp`` setting: which dtype it means where, bfloat16 against float32 on a real image, and a bfloat16
mean-teacher step whose unlabeled transforms stay in float32."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import BasicUNet
from monai.transforms import Compose, Lambdad, RandGaussianSmoothd

from common.acquisition import RandDefocusd
from common.engines import MeanTeacherTrainer
from common.intensity import normalize_whole, to_three_channels
from common.io import read_image, read_label
from common.losses import CrossCTSupervisedLoss, MT2SupervisedLoss, mt2_consistency_loss
from common.precision import AutocastInferer, autocast_dtype, cpu_has_native_bfloat16
from common.targets import cell_distance_map, mt2_heatmaps, neighbor_distance_map, three_class_map


def test_amp_settings_mean_the_documented_dtypes():
    assert autocast_dtype("false", "cpu") is None and autocast_dtype(False, "cuda") is None
    assert autocast_dtype(True, "cpu") is torch.bfloat16 and autocast_dtype("true", "cuda") is torch.float16
    assert autocast_dtype("auto", "cuda") is torch.float16
    # on a CPU without native bfloat16 the emulated kernels are far slower than float32: auto must not pick it
    assert autocast_dtype("auto", "cpu") is (torch.bfloat16 if cpu_has_native_bfloat16() else None)
    with pytest.raises(ValueError, match="amp must be"):
        autocast_dtype("fast", "cpu")


def _real_patch(dev_dir, name="dsb_9774c8239632.png", size=48):
    image = to_three_channels(read_image(dev_dir / "images" / name))
    image = normalize_whole(image)[:, :size, :size]
    label = read_label(dev_dir / "labels" / name.replace(".png", "_label.tiff"))[:size, :size]
    return torch.from_numpy(image)[None].float(), label


def test_bfloat16_inference_agrees_with_float32_on_a_real_image(dev_dir):
    image, _ = _real_patch(dev_dir)
    torch.manual_seed(0)
    network = BasicUNet(spatial_dims=2, in_channels=3, out_channels=5, features=(4, 4, 8, 8, 16, 4)).eval()
    window = SlidingWindowInferer(roi_size=(32, 32), sw_batch_size=2, overlap=0.25)
    with torch.no_grad():
        full = AutocastInferer(window, amp=False)(image, network)
        half = AutocastInferer(window, amp=True)(image, network)
    assert half.dtype == torch.float32 and half.shape == full.shape
    relative = (half - full).abs().max() / full.abs().max()
    assert relative < 0.05, f"bfloat16 outputs differ from float32 by {relative:.3f} of the largest output"
    assert relative > 0  # it did run in reduced precision


def test_a_few_bfloat16_training_steps_lower_the_loss_on_a_fixed_real_batch(dev_dir):
    image, label = _real_patch(dev_dir)
    maps = [three_class_map(label), cell_distance_map(label), neighbor_distance_map(label)]
    target = torch.from_numpy(np.stack(maps).astype(np.float32))[None]
    torch.manual_seed(0)
    network = BasicUNet(spatial_dims=2, in_channels=3, out_channels=5, features=(4, 4, 8, 8, 16, 4))
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    loss_function = CrossCTSupervisedLoss()
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = network(image)
        loss = loss_function(logits.float(), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def _float32_only(image: torch.Tensor) -> torch.Tensor:
    if image.dtype != torch.float32:
        raise TypeError(f"an unlabeled transform returned {image.dtype}")
    return image


def _bfloat16_mean_teacher_step(dev_dir, num_workers=0, loss_function=None, consistency_loss=None):
    """One bfloat16 mean-teacher step (forced: any CPU) on a real 32² patch, the strong unlabeled view blurred
    then defocused; returns the trainer after the step."""
    image, label = _real_patch(dev_dir, size=32)
    target = np.concatenate([three_class_map(label)[None], mt2_heatmaps(label)]).astype(np.float32)
    labeled = [{"image": image[0], "label": torch.from_numpy(target)}] * 2
    strong_view = Compose([
        RandGaussianSmoothd("image_strong", prob=1.0, sigma_x=(1.0, 1.0), sigma_y=(1.0, 1.0)),
        RandDefocusd("image_strong", prob=1.0),
        Lambdad("image_strong", _float32_only),
    ])  # fmt: skip
    unlabeled = Dataset([{"image": image[0], "image_strong": image[0].clone()}] * 2, transform=strong_view)
    torch.manual_seed(0)
    student, teacher = (BasicUNet(spatial_dims=2, in_channels=3, out_channels=5, features=(4, 4, 8, 8, 16, 4))
                        for _ in range(2))  # fmt: skip
    trainer = MeanTeacherTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=DataLoader(labeled, batch_size=2),
        unlabeled_data_loader=DataLoader(unlabeled, batch_size=2, num_workers=num_workers),
        network=student,
        teacher_network=teacher,
        optimizer=torch.optim.AdamW(student.parameters(), lr=1e-3),
        loss_function=loss_function or MT2SupervisedLoss(),
        consistency_loss=consistency_loss or mt2_consistency_loss,
        amp=True,
    )
    trainer.run()
    assert trainer.autocast_dtype is torch.bfloat16 and trainer.state.iteration == 1
    return trainer


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_bfloat16_mean_teacher_step_runs_the_unlabeled_transforms_in_float32(dev_dir, num_workers):
    # The unlabeled batch is drawn inside the step's autocast: a blur's convolution there returned bfloat16 and
    # the next transform, which goes through numpy, failed, in the main process and in forked loader workers.
    trainer = _bfloat16_mean_teacher_step(dev_dir, num_workers)
    assert math.isfinite(float(trainer.state.output[0]["loss_consistency"]))


def test_a_bfloat16_step_computes_its_losses_in_float32(dev_dir):
    # SSIM's local variances lose more than its constant in bfloat16: a real MT² run's loss went to -inf at step 26
    calls = []

    def recorded(loss_function):
        def run(*tensors):
            calls.append((torch.is_autocast_enabled("cpu"), *(tensor.dtype for tensor in tensors)))
            return loss_function(*tensors)

        return run

    trainer = _bfloat16_mean_teacher_step(dev_dir, loss_function=recorded(MT2SupervisedLoss()),
                                          consistency_loss=recorded(mt2_consistency_loss))  # fmt: skip
    assert calls == [(False, torch.float32, torch.float32)] * 2, calls
    network_output = trainer.state.output[0]["pred"]
    assert network_output.dtype == torch.bfloat16  # the forward pass itself did run in reduced precision


class _RecordsWeightDtype(torch.nn.Module):
    """A 1x1 convolution that records the dtype of the weight and input it ran with, in a class attribute
    that copies of it share."""

    seen = []

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)

    def forward(self, x):
        self.seen.append((self.conv.weight.dtype, x.dtype))
        return self.conv(x)


def test_bfloat16_inference_runs_on_bfloat16_weights_and_leaves_the_module_in_float32():
    network = _RecordsWeightDtype().eval()
    network.seen.clear()
    image = torch.rand(1, 3, 16, 16)
    window = SlidingWindowInferer(roi_size=(8, 8), sw_batch_size=2)
    with torch.no_grad():
        outputs = AutocastInferer(window, amp=True)(image, network)
    assert outputs.dtype == torch.float32
    assert set(network.seen) == {(torch.bfloat16, torch.bfloat16)}
    assert all(parameter.dtype == torch.float32 for parameter in network.parameters())
    with torch.no_grad():
        expected = network.conv(image)
    assert torch.allclose(outputs, expected, atol=0.05)
    # with gradients on (a network being trained), it runs under autocast on its float32 weights
    network.seen.clear()
    AutocastInferer(window, amp=True)(image, network)
    assert {weight for weight, _ in network.seen} == {torch.float32}
