"""Networks return one tensor of the right shape; losses follow their definitions."""

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss
from monai.networks.nets import BasicUNet, SwinUNETR

from common.losses import CrossCTSupervisedLoss, MT2SupervisedLoss, cross_teaching_loss, gaussian_rampup, mt2_consistency_loss
from common.networks import CheckpointSizeError, CrossCTNetworks, MultiHeadUNetPlusPlus, PadToMultiple

TINY_FEATURES = (4, 4, 8, 8, 16, 4)


@pytest.mark.parametrize("size", [(32, 32), (37, 50)])
def test_unetpp_returns_one_five_channel_tensor_for_any_size(size):
    torch.manual_seed(0)
    network = MultiHeadUNetPlusPlus(features=TINY_FEATURES).eval()
    with torch.no_grad():
        output = network(torch.rand(2, 3, *size))
    assert isinstance(output, torch.Tensor) and output.shape == (2, 5, *size)


def test_every_unetpp_parameter_gets_a_gradient():
    # DistributedDataParallel fails on parameters that do not contribute to the output
    network = MultiHeadUNetPlusPlus(features=TINY_FEATURES)
    network(torch.rand(1, 3, 32, 32)).sum().backward()
    unused = [name for name, parameter in network.named_parameters() if parameter.grad is None]
    assert unused == []


def test_pad_to_multiple_lets_swin_unetr_take_any_size():
    torch.manual_seed(0)
    swin = SwinUNETR(in_channels=3, out_channels=5, spatial_dims=2, feature_size=12, depths=(1, 1, 1, 1)).eval()
    image = torch.rand(1, 3, 40, 70)
    with pytest.raises(Exception):
        swin(image)
    with torch.no_grad():
        output = PadToMultiple(swin, multiple=32)(image)
        padded = swin(F.pad(image, (0, 26, 0, 24)))
    assert output.shape == (1, 5, 40, 70)
    assert torch.equal(output, padded[..., :40, :70])


def random_targets(batch=2, size=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, 3, (batch, 1, size, size), generator=generator).float()
    maps = torch.rand(batch, 2, size, size, generator=generator)
    return torch.cat([classes, maps], dim=1)


def test_mt2_loss_regression_terms_vanish_when_heatmaps_match():
    target = random_targets()
    logits = torch.randn(2, 5, 24, 24)
    logits[:, 3:5] = torch.logit(target[:, 1:3].clamp(1e-4, 1 - 1e-4))
    target[:, 1:3] = torch.sigmoid(logits[:, 3:5])
    expected = DiceCELoss(to_onehot_y=True, softmax=True)(logits[:, :3], target[:, :1])
    assert MT2SupervisedLoss()(logits, target).item() == pytest.approx(expected.item(), abs=1e-4)


def test_mt2_loss_weights_mse_by_lambda():
    target = random_targets()
    logits = torch.randn(2, 5, 24, 24)
    with_mse = MT2SupervisedLoss(mse_weight=10.0)(logits, target)
    without_mse = MT2SupervisedLoss(mse_weight=0.0)(logits, target)
    mse = sum(F.mse_loss(torch.sigmoid(logits[:, c : c + 1]), target[:, c - 2 : c - 1]) for c in (3, 4))
    assert (with_mse - without_mse).item() == pytest.approx(10.0 * mse.item(), rel=1e-4)


def test_mt2_consistency_is_mse_to_detached_teacher():
    student = torch.randn(2, 5, 8, 8, requires_grad=True)
    teacher = torch.rand(2, 2, 8, 8, requires_grad=True)
    loss = mt2_consistency_loss(student, teacher)
    assert loss.item() == pytest.approx(F.mse_loss(torch.sigmoid(student[:, 3:5]), teacher).item())
    loss.backward()
    assert teacher.grad is None and student.grad[:, :3].abs().sum() == 0 and student.grad[:, 3:].abs().sum() > 0


def test_crossct_supervised_loss_is_dice_ce_plus_mse():
    target = random_targets()
    logits = torch.randn(2, 5, 24, 24)
    expected = DiceCELoss(to_onehot_y=True, softmax=True)(logits[:, :3], target[:, :1]) + F.mse_loss(
        logits[:, 3:5], target[:, 1:3]
    )
    assert CrossCTSupervisedLoss()(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_cross_teaching_gradients_come_only_from_the_other_network():
    torch.manual_seed(0)
    logits_a = torch.randn(2, 5, 16, 16, requires_grad=True)
    logits_b = torch.randn(2, 5, 16, 16, requires_grad=True)
    cross_teaching_loss(logits_a, logits_b).backward()

    # the same loss with B's outputs as constants gives A exactly the same gradient
    a_only = logits_a.detach().clone().requires_grad_(True)
    b_const = logits_b.detach()
    pseudo_b = F.one_hot(b_const[:, :3].argmax(1), 3).permute(0, 3, 1, 2).float()
    loss_a = DiceLoss()(torch.softmax(a_only[:, :3], 1), pseudo_b) + F.mse_loss(a_only[:, 3:], b_const[:, 3:])
    loss_a.backward()
    assert torch.allclose(logits_a.grad, a_only.grad, atol=1e-7)


def test_cross_teaching_loss_is_far_lower_for_agreeing_than_for_disagreeing_networks():
    interior = torch.zeros(1, 5, 8, 8)
    interior[:, 1] = 20.0
    boundary = torch.zeros(1, 5, 8, 8)
    boundary[:, 2] = 20.0
    boundary[:, 3:] = 1.0
    agree = cross_teaching_loss(interior, interior.clone()).item()
    disagree = cross_teaching_loss(interior, boundary).item()
    # what remains when they agree is Dice's smoothing on the two absent classes
    assert agree < 0.05 and disagree > 1.5


def test_gaussian_rampup_follows_the_formula():
    for step, total in [(0, 100), (25, 100), (50, 100), (99, 100), (100, 100)]:
        assert gaussian_rampup(step, total) == pytest.approx(0.1 * math.exp(-5 * (1 - step / total) ** 2))
    assert gaussian_rampup(500, 100) == pytest.approx(0.1)
    assert gaussian_rampup(10, 100, maximum=1.0) == pytest.approx(math.exp(-5 * 0.81))


SHIPPED_MT2 = Path(__file__).resolve().parents[1] / "bundles" / "mt2_cell_segmentation" / "models" / "model.pt"


def test_a_checkpoint_of_another_size_fails_naming_the_size_it_holds():
    """Non-strict loading (MONAI Label's) cannot skip a size mismatch: the error says which features to set."""
    from monai.handlers import CheckpointLoader
    from ignite.engine import Engine

    shipped = torch.load(SHIPPED_MT2, map_location="cpu", weights_only=True)
    held = [int(shipped[name].shape[0]) for name in MultiHeadUNetPlusPlus.FEATURE_WEIGHTS]
    wider = MultiHeadUNetPlusPlus(features=[2 * size for size in held])
    engine = Engine(lambda engine, batch: None)
    CheckpointLoader(load_path=str(SHIPPED_MT2), load_dict={"model": wider}, strict=False).attach(engine)
    with pytest.raises(CheckpointSizeError, match=re.escape(f"features {held}") + ".*--features"):
        engine.run([0], max_epochs=1)
    MultiHeadUNetPlusPlus(features=held).load_state_dict(shipped)  # the size it holds loads


def test_crossct_networks_name_their_size_settings_on_a_mismatch():
    def networks(features):
        return CrossCTNetworks(
            unet=BasicUNet(spatial_dims=2, in_channels=3, out_channels=5, features=features),
            swin=torch.nn.Conv2d(3, 5, 1),
        )

    state = networks((4, 4, 8, 8, 16, 4)).state_dict()
    with pytest.raises(CheckpointSizeError, match="unet_features"):
        networks((8, 8, 16, 16, 32, 8)).load_state_dict(state, strict=False)
    networks((4, 4, 8, 8, 16, 4)).load_state_dict(state)
