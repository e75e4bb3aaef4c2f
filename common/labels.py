"""Instance label maps in memory: the one check-and-convert every consumer of labels uses."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["as_instance_label"]


def as_instance_label(label, what: str = "label") -> np.ndarray:
    """Validate an instance map and return it as a 2-D numpy integer array.

    Args:
        label: (H, W) or (1, H, W) numpy array or torch tensor (incl. MetaTensor) of instance ids, 0 = background;
            integer, bool, or float holding whole numbers (MONAI transforms hand labels over as floats).
        what: the name used in error messages.

    Returns:
        (H, W) int32 array, or int64 when an id does not fit in int32.

    Raises:
        ValueError: wrong shape, non-integral or non-finite values, negative ids, or ids beyond int64.
    """
    if isinstance(label, torch.Tensor):
        label = label.detach().cpu().numpy()
    array = np.asarray(label)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"{what} must be an (H, W) or (1, H, W) instance map, got shape {array.shape}")
    if array.dtype == bool:
        return array.astype(np.int32)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.rint(array)):
            raise ValueError(f"{what} holds non-integer values: an instance map of integer ids is expected")
    elif array.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integer instance ids, got dtype {array.dtype}")
    if not array.size:
        return array.astype(np.int32)
    low, high = array.min(), array.max()
    if low < 0:
        raise ValueError(f"{what} holds negative ids; instance ids must be >= 0 (0 = background)")
    if high > np.iinfo(np.int64).max:
        raise ValueError(f"{what} holds ids beyond the int64 range")
    return array.astype(np.int32 if high <= np.iinfo(np.int32).max else np.int64, copy=False)
