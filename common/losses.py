"""Losses of the two methods on (B, 5, H, W) logits.

Targets are stacked (B, 3, H, W) float tensors: channel 0 the 3-class index map (0 bg, 1 interior,
2 boundary), channels 1-2 the two regression maps (MT² cell and boundary heat-maps, or CrossCT cell- and
neighbor-distance maps).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss, SSIMLoss
from torch import nn

__all__ = ["MT2SupervisedLoss", "mt2_consistency_loss", "CrossCTSupervisedLoss", "cross_teaching_loss", "gaussian_rampup"]

CLASS_CHANNELS = slice(0, 3)
REGRESSION_CHANNELS = slice(3, 5)


class MT2SupervisedLoss(nn.Module):
    """MT² supervised loss (paper eq. 1-3): CE + Dice on the 3 classes, and for each heat-map
    (1 - SSIM) + ``mse_weight`` * MSE on the sigmoid output (SSIM: 11x11 Gaussian window, sigma 1.5).

    Args:
        mse_weight: lambda of eq. 2 (10 in the paper).
    """

    def __init__(self, mse_weight: float = 10.0, ssim_window: int = 11, ssim_sigma: float = 1.5):
        super().__init__()
        self.mse_weight = mse_weight
        self.dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
        self.ssim = SSIMLoss(spatial_dims=2, data_range=1.0, win_size=ssim_window, kernel_sigma=ssim_sigma)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.dice_ce(logits[:, CLASS_CHANNELS], target[:, :1])
        heatmaps = torch.sigmoid(logits[:, REGRESSION_CHANNELS].float())
        for channel in range(2):
            predicted, wanted = heatmaps[:, channel : channel + 1], target[:, channel + 1 : channel + 2]
            loss = loss + self.ssim(predicted, wanted) + self.mse_weight * F.mse_loss(predicted, wanted)
        return loss


def mt2_consistency_loss(student_logits: torch.Tensor, teacher_heatmaps: torch.Tensor) -> torch.Tensor:
    """Mean-teacher consistency (paper eq. 4): MSE between the student's cell and boundary heat-maps
    (sigmoid of channels 3-4 of ``student_logits``, (B, 5, H, W)) and the teacher's, ``teacher_heatmaps``
    (B, 2, H, W) probabilities, which carry no gradient."""
    return F.mse_loss(torch.sigmoid(student_logits[:, REGRESSION_CHANNELS].float()), teacher_heatmaps.detach())


class CrossCTSupervisedLoss(nn.Module):
    """CrossCT supervised loss for one network: DiceCE on the softmax of channels 0-2 plus MSE on the
    distance channels 3-4 (raw outputs, regressed to the [0, 1] maps)."""

    def __init__(self):
        super().__init__()
        self.dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        classes = self.dice_ce(logits[:, CLASS_CHANNELS], target[:, :1])
        return classes + F.mse_loss(logits[:, REGRESSION_CHANNELS].float(), target[:, 1:3])


_dice = DiceLoss(softmax=False, to_onehot_y=False)


def _pseudo_label(logits: torch.Tensor) -> torch.Tensor:
    """One-hot argmax of the class channels, (B, 3, H, W), cut from the graph."""
    classes = logits[:, CLASS_CHANNELS].detach()
    return F.one_hot(classes.argmax(dim=1), num_classes=classes.shape[1]).permute(0, 3, 1, 2).to(classes.dtype)


def cross_teaching_loss(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """CrossCT's unsupervised term for two networks' (B, 5, H, W) outputs on the same unlabeled batch:
    Dice(softmax_A, pseudo-label of B) + Dice(softmax_B, pseudo-label of A) + the MSE of each network's
    distance channels to the other's. Every teaching signal (pseudo-label or distance map) is detached: each
    network learns only from the other, never from its own output."""
    prob_a = torch.softmax(logits_a[:, CLASS_CHANNELS].float(), dim=1)
    prob_b = torch.softmax(logits_b[:, CLASS_CHANNELS].float(), dim=1)
    classes = _dice(prob_a, _pseudo_label(logits_b)) + _dice(prob_b, _pseudo_label(logits_a))
    distances_a = logits_a[:, REGRESSION_CHANNELS].float()
    distances_b = logits_b[:, REGRESSION_CHANNELS].float()
    return classes + F.mse_loss(distances_a, distances_b.detach()) + F.mse_loss(distances_b, distances_a.detach())


def gaussian_rampup(step: float, total: float, maximum: float = 0.1) -> float:
    """lambda(t) = maximum * exp(-5 (1 - t/T)^2), t clipped to [0, T]: CrossCT's cross-teaching weight."""
    if total <= 0:
        return maximum
    phase = 1.0 - min(max(step, 0.0), total) / total
    return maximum * math.exp(-5.0 * phase * phase)
