"""Store a model.pt with float16 tensors, halving its size (the CrossCT pair is 26 MB in float32); optionally the
mean of several checkpoints of one run (weight averaging).

    python tools/compact_weights.py --source RUN/model.pt --target bundles/<bundle>/models/model.pt
    python tools/compact_weights.py --source "[E20.pt,E24.pt,E28.pt]" --target bundles/<bundle>/models/model.pt

The bundles' networks stay float32: ``load_state_dict`` casts each tensor back when the weights are loaded, so
only the weights' last bits differ (the tool prints the largest relative change). Integer tensors are kept. Several
sources are averaged tensor by tensor in float32 before the cast: they must hold the same keys and shapes and equal
integer tensors (snapshots of one architecture, normally one run's later epochs).
"""

from __future__ import annotations

from pathlib import Path

import fire
import torch

from common.workflows import command_line_list


def load_state_dict(source: str) -> dict[str, torch.Tensor]:
    """A checkpoint's tensor-only state dict (its ``model`` entry when it is a training checkpoint).

    Raises:
        SystemExit: the file is not a tensor-only state dict.
    """
    state = torch.load(source, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SystemExit(f"compact_weights: {source} is not a tensor-only state dict")
    return state


def average_state_dicts(states: list[dict[str, torch.Tensor]], names: list[str]) -> dict[str, torch.Tensor]:
    """The tensor-by-tensor mean (float32) of state dicts of one architecture; integer tensors must be equal.

    Raises:
        SystemExit: the keys, shapes or integer tensors differ (the message names the sources).
    """
    first = states[0]
    for state, name in zip(states[1:], names[1:]):
        if state.keys() != first.keys():
            raise SystemExit(f"compact_weights: {name} and {names[0]} hold different tensors")
        for key, tensor in state.items():
            if tensor.shape != first[key].shape:
                shapes = f"{tuple(tensor.shape)} in {name}, {tuple(first[key].shape)} in {names[0]}"
                raise SystemExit(f"compact_weights: {key} is {shapes}")
            if not tensor.is_floating_point() and not torch.equal(tensor, first[key]):
                raise SystemExit(f"compact_weights: the integer tensor {key} differs between {name} and {names[0]}")
    return {
        key: torch.stack([state[key].float() for state in states]).mean(0) if tensor.is_floating_point() else tensor
        for key, tensor in first.items()
    }


def compact_weights(source: str | list[str] | tuple[str, ...], target: str) -> None:
    """Write ``source``'s tensor-only state dict (or the mean of several) to ``target`` with float tensors as float16.

    Raises:
        SystemExit: no source, a source is not a tensor-only state dict, the sources do not match, or a value does
            not fit float16.
    """
    sources = command_line_list(source)
    if not sources:
        raise SystemExit("compact_weights: no source checkpoint given")
    states = [load_state_dict(s) for s in sources]
    state = states[0] if len(states) == 1 else average_state_dicts(states, sources)
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
        worst = max(worst, float((half.float() - tensor.float()).abs().max() / scale))
        compact[key] = half
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    torch.save(compact, target)
    size = sum(Path(s).stat().st_size for s in sources) / len(sources)
    averaged = f" (the mean of {len(sources)} checkpoints)" if len(sources) > 1 else ""
    print(
        f"wrote {target}: {len(compact)} tensors{averaged}, {size / 2**20:.1f} MB -> "
        f"{Path(target).stat().st_size / 2**20:.1f} MB, largest change {worst:.1e} of a tensor's largest value"
    )


if __name__ == "__main__":
    fire.Fire(compact_weights)
