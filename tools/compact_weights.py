"""Store a model.pt with float16 tensors, halving its size (the CrossCT pair is 26 MB in float32).

    python tools/compact_weights.py --source RUN/model.pt --target bundles/<bundle>/models/model.pt

The bundles' networks stay float32: ``load_state_dict`` casts each tensor back when the weights are loaded, so
only the weights' last bits differ (the tool prints the largest relative change). Integer tensors are kept.
"""

from __future__ import annotations

from pathlib import Path

import fire
import torch


def compact_weights(source: str, target: str) -> None:
    """Write ``source``'s tensor-only state dict to ``target`` with floating-point tensors as float16.

    Raises:
        SystemExit: the source is not a tensor-only state dict, or a value does not fit float16.
    """
    state = torch.load(source, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SystemExit(f"compact_weights: {source} is not a tensor-only state dict")
    compact = {}
    worst = 0.0
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            compact[key] = tensor
            continue
        if tensor.abs().max() > torch.finfo(torch.float16).max:
            raise SystemExit(f"compact_weights: {key} holds values beyond float16's range")
        half = tensor.to(torch.float16)
        scale = tensor.abs().max().clamp_min(1e-12)
        worst = max(worst, float((half.float() - tensor).abs().max() / scale))
        compact[key] = half
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    torch.save(compact, target)
    print(
        f"wrote {target}: {len(compact)} tensors, {Path(source).stat().st_size / 2**20:.1f} MB -> "
        f"{Path(target).stat().st_size / 2**20:.1f} MB, largest change {worst:.1e} of a tensor's largest value"
    )


if __name__ == "__main__":
    fire.Fire(compact_weights)
