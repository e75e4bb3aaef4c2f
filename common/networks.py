"""Networks of the two bundles, each returning ONE tensor (MONAI Label and ``verify_net_in_out`` need that)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNetPlusPlus
from torch import nn

__all__ = [
    "MultiHeadUNetPlusPlus", "PadToMultiple", "CrossCTNetworks", "CheckpointSizeError", "MT2_CHANNELS", "CROSSCT_CHANNELS",
]

# Output channel layouts of the networks, also described in each bundle's metadata.json ``pred_classes``.
MT2_CHANNELS = ("background", "interior", "boundary", "cell heat-map", "boundary heat-map")
CROSSCT_CHANNELS = ("background", "interior", "boundary", "cell distance", "neighbor distance")


class CheckpointSizeError(ValueError):
    """A checkpoint made for a network of another size than the one built (e.g. other ``features``)."""


def _size_mismatches(module: nn.Module, state: dict, prefix: str) -> list[str]:
    own = module.state_dict()
    return [
        f"{name} {tuple(state[prefix + name].shape)} in the checkpoint, {tuple(tensor.shape)} in this network"
        for name, tensor in own.items()
        if prefix + name in state and tuple(state[prefix + name].shape) != tuple(tensor.shape)
    ]


class _SizeCheckedLoading:
    """Makes ``load_state_dict`` (MONAI's CheckpointLoader, MONAI Label, ``torch.load`` users) fail with one
    message that names the size setting to change, instead of torch's list of size mismatches; strict=False does
    not skip a mismatch, so fine-tuning a checkpoint of another size can never start."""

    size_setting = "the network settings"

    def _register_size_check(self) -> None:
        self.register_load_state_dict_pre_hook(type(self)._check_sizes)

    def _check_sizes(self, state, prefix, *_) -> None:
        mismatches = _size_mismatches(self, state, prefix)
        if mismatches:
            shown = "; ".join(mismatches[:3]) + (f"; and {len(mismatches) - 3} more" if len(mismatches) > 3 else "")
            raise CheckpointSizeError(
                f"the checkpoint was made for a network of another size ({shown}). {self.checkpoint_size_hint(state, prefix)}"
            )

    def checkpoint_size_hint(self, state: dict, prefix: str) -> str:
        return f"Build the network with the checkpoint's {self.size_setting}, or train without loading it."


class MultiHeadUNetPlusPlus(_SizeCheckedLoading, nn.Module):
    """MT²'s UNet++ with three 1x1 heads on the last decoder node, as one (B, 5, H, W) logit tensor:
    channels 0-2 the 3-class head (background, interior, boundary), 3 the cell heat-map head and 4 the
    boundary heat-map head (apply sigmoid to 3-4).

    Three 1x1 convolutions on the same features are exactly one 1x1 convolution with their output channels
    stacked, so the heads are MONAI ``BasicUNetPlusPlus``'s final 1x1 convolution with 5 outputs.

    Args:
        in_channels: input channels (3 after ``to_three_channels``).
        features: the six UNet++ feature sizes (encoder levels 0-4 and the last decoder node).
        norm, act, dropout, upsample: passed to ``BasicUNetPlusPlus``.

    Input (B, in_channels, H, W) float32, any H, W; output (B, 5, H, W) float32 logits.
    """

    num_outputs = len(MT2_CHANNELS)

    def __init__(
        self,
        in_channels: int = 3,
        features: Sequence[int] = (32, 32, 64, 128, 256, 32),
        norm: str | tuple = ("instance", {"affine": True}),
        act: str | tuple = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
        dropout: float = 0.0,
        upsample: str = "deconv",
    ):
        super().__init__()
        self.unetpp = BasicUNetPlusPlus(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=self.num_outputs,
            features=tuple(features),
            deep_supervision=False,
            norm=norm,
            act=act,
            dropout=dropout,
            upsample=upsample,
        )
        # MONAI's forward runs the deep-supervision heads even when their outputs are dropped: as identities
        # they cost nothing, and DistributedDataParallel finds no parameter without a gradient
        for name in ("final_conv_0_1", "final_conv_0_2", "final_conv_0_3"):
            setattr(self.unetpp, name, nn.Identity())
        self.features = [int(size) for size in features]
        self._register_size_check()

    # the first convolution of each encoder level and of the last decoder node: their filters are `features`
    FEATURE_WEIGHTS = tuple(
        f"unetpp.{node}.conv.weight"
        for node in ("conv_0_0.conv_0", "conv_1_0.convs.conv_0", "conv_2_0.convs.conv_0", "conv_3_0.convs.conv_0",
                     "conv_4_0.convs.conv_0", "upcat_0_4.convs.conv_0")
    )  # fmt: skip

    def checkpoint_size_hint(self, state: dict, prefix: str) -> str:
        if not all(prefix + name in state for name in self.FEATURE_WEIGHTS):
            return "Build the network with the checkpoint's `features`, or train without loading it."
        found = [int(state[prefix + name].shape[0]) for name in self.FEATURE_WEIGHTS]
        return (
            f"It holds a UNet++ with features {found}; this one has features {self.features}. Set `features` to "
            f"{found} (e.g. --features \"{found}\") to load it, or train without loading it."
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # BasicUNetPlusPlus returns a list even without deep supervision
        return self.unetpp(x)[0]


class PadToMultiple(nn.Module):
    """Runs ``network`` on its input zero-padded at the bottom/right to multiples of ``multiple`` and crops
    the output back, so networks with size constraints (Swin-UNETR: multiples of 32) take any image size.

    Input (B, C, H, W); output (B, C_out, H, W).
    """

    def __init__(self, network: nn.Module, multiple: int = 32):
        super().__init__()
        if multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        self.network = network
        self.multiple = multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.multiple, -width % self.multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.network(x)[..., :height, :width]


class CrossCTNetworks(_SizeCheckedLoading, nn.Module):
    """CrossCT's two networks as one module: one state dict (``unet.*``, ``swin.*``) holds both, and
    ``output`` chooses what ``forward`` returns — the U-Net's output, the Swin-UNETR's, or their average
    ("ensemble": channels 0-2 averaged logits, 3-4 averaged distance maps).

    Args:
        unet: the CNN (B, 3, H, W) -> (B, 5, H, W).
        swin: the transformer, same input and output (wrap it in :class:`PadToMultiple` for any size).
        output: "unet", "swin" or "ensemble".
    """

    OUTPUTS = ("unet", "swin", "ensemble")

    def __init__(self, unet: nn.Module, swin: nn.Module, output: str = "ensemble"):
        super().__init__()
        if output not in self.OUTPUTS:
            raise ValueError(f"output must be one of {self.OUTPUTS}, got {output!r}")
        self.unet = unet
        self.swin = swin
        self.output = output
        self._register_size_check()

    size_setting = "`unet_features` and `swin_feature_size`"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output == "unet":
            return self.unet(x)
        if self.output == "swin":
            return self.swin(x)
        return 0.5 * (self.unet(x) + self.swin(x))
