"""Mixed precision as one setting, ``amp``, shared by training, validation, inference and whole-slide tiling.

``amp`` is ``"auto"``, ``True`` or ``False`` (or their strings, as the command line gives them):

- ``"auto"``: float16 autocast on CUDA (with a gradient scaler in training); bfloat16 autocast on a CPU whose
  oneDNN build reports native bfloat16 support (AVX-512 BF16 or AMX); float32 elsewhere. On a CPU without
  native bfloat16 the emulated kernels are an order of magnitude SLOWER than float32, which is why "auto"
  asks torch and never assumes.
- ``True``: float16 on CUDA, bfloat16 on any CPU, even a slow one.
- ``False``: float32 everywhere.

Inference in bfloat16 (no gradient, on a CPU) runs the network on bfloat16 copies of its weights and input
instead of under autocast, which casts weights and activations again at every call: in batches of four 256²
windows MT²'s UNet++ took 0.124 s a window under autocast against 0.085 s with bfloat16 weights (2 AMD EPYC
cores with AVX-512 BF16; float32 0.157). Training keeps autocast and its float32 master weights.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Sequence

import torch
from monai.inferers import Inferer

from common.workflows import flag

__all__ = ["cpu_has_native_bfloat16", "autocast_dtype", "autocast", "in_precision", "AutocastInferer"]


def cpu_has_native_bfloat16() -> bool:
    """Whether torch's oneDNN runs bfloat16 natively on this CPU (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the oneDNN query
        return False


def _setting(amp: Any) -> str:
    if str(amp).strip().lower() == "auto":
        return "auto"
    try:
        return "true" if flag(amp) else "false"
    except ValueError:
        raise ValueError(f"amp must be auto, true or false, got {amp!r}") from None


def autocast_dtype(amp: Any, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype that ``amp`` means on ``device``, or None for float32.

    Args:
        amp: "auto", True/False or their strings.
        device: where the network runs.

    Returns:
        torch.float16 (CUDA), torch.bfloat16 (CPU) or None.
    """
    setting = _setting(amp)
    if setting == "false":
        return None
    device_type = torch.device(device).type
    if device_type == "cuda":
        return torch.float16
    if device_type == "cpu" and (setting == "true" or cpu_has_native_bfloat16()):
        return torch.bfloat16
    return None


def autocast(dtype: torch.dtype | None, device: torch.device | str):
    """A ``torch.autocast`` context for ``dtype`` on ``device``, or a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _bfloat16_copy(network: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``network`` with its floating-point parameters and buffers in bfloat16; ``network`` itself is
    left as it is (it may be training between validations)."""
    if isinstance(network, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        network = network.module  # the wrapper's forward only adds gradient bookkeeping, and there are no gradients
    return copy.deepcopy(network).to(torch.bfloat16)


def in_precision(network: Callable[..., torch.Tensor], dtype: torch.dtype | None) -> Callable[..., torch.Tensor]:
    """``network`` run in ``dtype`` on its inputs' device (None: float32), returning float32, so that stitching
    and post-processing never see a half-precision tensor: half-precision sums over many overlapping windows
    lose precision.

    float16 runs under autocast. bfloat16 on a CPU, with gradients off and ``network`` an ``nn.Module``, runs
    on a bfloat16 copy of the network made at the first such call (the module docstring says why), so call
    ``in_precision`` again after the weights change (the inferers do, once per call); otherwise under autocast.
    """
    bfloat16_network = None

    def run(windows: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal bfloat16_network
        if (
            dtype is torch.bfloat16
            and windows.device.type == "cpu"
            and isinstance(network, torch.nn.Module)
            and not torch.is_grad_enabled()
        ):
            if bfloat16_network is None:
                bfloat16_network = _bfloat16_copy(network)
            with torch.autocast("cpu", enabled=False):
                return bfloat16_network(windows.to(torch.bfloat16), *args, **kwargs).float()
        with autocast(dtype, windows.device):
            outputs = network(windows, *args, **kwargs)
        return outputs.float()

    return run


class AutocastInferer(Inferer):
    """Runs another inferer's network calls under the autocast that ``amp`` means on the inputs' device, and
    returns float32, so post-processing and stitching never see a half-precision tensor.

    Put it outermost, around any inferer that wraps the network in a function (``FlipAveragingInferer``): the
    bfloat16 copy of the weights needs the network itself.

    Args:
        inferer: the wrapped inferer (``SlidingWindowInferer``, :class:`common.inferers.FlipAveragingInferer`, ...).
        amp: "auto", True or False (see the module docstring).
    """

    def __init__(self, inferer: Inferer, amp: Any = "auto"):
        super().__init__()
        _setting(amp)
        self.inferer = inferer
        self.amp = amp

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any):
        dtype = autocast_dtype(self.amp, inputs.device)
        if dtype is None:
            return self.inferer(inputs, network, *args, **kwargs)
        return self.inferer(inputs, in_precision(network, dtype), *args, **kwargs)
