"""tools/compact_weights.py: float16 storage that loads back into the float32 networks."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import BasicUNet

from bundle_runs import tool_module


def _tool():
    return tool_module("compact_weights")


def test_half_precision_weights_load_and_predict_like_the_original(tmp_path):
    torch.manual_seed(0)
    network = BasicUNet(spatial_dims=2, in_channels=3, out_channels=5, features=(8, 8, 16, 32, 64, 8)).eval()
    torch.save({"model": network.state_dict()}, tmp_path / "full.pt")
    _tool().compact_weights(str(tmp_path / "full.pt"), str(tmp_path / "half.pt"))
    half = torch.load(tmp_path / "half.pt", weights_only=True)
    assert {v.dtype for v in half.values() if v.is_floating_point()} == {torch.float16}
    assert (tmp_path / "half.pt").stat().st_size < 0.6 * (tmp_path / "full.pt").stat().st_size
    restored = BasicUNet(spatial_dims=2, in_channels=3, out_channels=5, features=(8, 8, 16, 32, 64, 8)).eval()
    restored.load_state_dict(half)
    assert all(p.dtype == torch.float32 for p in restored.parameters())
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected, got = network(image), restored(image)
    assert torch.allclose(expected, got, atol=1e-2 * float(expected.abs().max()))
    assert not torch.equal(expected, got)


def test_not_a_state_dict_is_refused(tmp_path):
    torch.save({"model": {"weight": torch.ones(2), "epoch": torch.tensor(3)}, "note": torch.zeros(1)}, tmp_path / "ok.pt")
    _tool().compact_weights(str(tmp_path / "ok.pt"), str(tmp_path / "ok_half.pt"))  # integer tensors kept as they are
    assert torch.load(tmp_path / "ok_half.pt", weights_only=True)["epoch"].dtype == torch.int64
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(SystemExit, match="not a tensor-only state dict"):
        _tool().compact_weights(str(tmp_path / "list.pt"), str(tmp_path / "x.pt"))


def test_several_sources_are_averaged_tensor_by_tensor(tmp_path):
    torch.manual_seed(0)
    shape = dict(spatial_dims=2, in_channels=3, out_channels=5, features=(8, 8, 16, 32, 64, 8))
    networks = [BasicUNet(**shape) for _ in range(3)]
    for i, network in enumerate(networks):  # a training checkpoint, a plain state dict, a float16 snapshot
        state = network.state_dict()
        saved = {"model": state} if i == 0 else state if i == 1 else {k: v.half() for k, v in state.items()}
        torch.save(saved, tmp_path / f"e{i}.pt")
    _tool().compact_weights([str(tmp_path / f"e{i}.pt") for i in range(3)], str(tmp_path / "mean.pt"))
    mean = torch.load(tmp_path / "mean.pt", weights_only=True)
    key = "conv_0.conv_0.conv.weight"
    tensors = [network.state_dict()[key] for network in networks]
    expected = (tensors[0] + tensors[1] + tensors[2].half().float()) / 3
    assert mean[key].dtype == torch.float16
    assert torch.allclose(mean[key].float(), expected, atol=1e-3)
    assert not torch.allclose(mean[key].float(), networks[0].state_dict()[key], atol=1e-3)
    BasicUNet(**shape).load_state_dict(mean)


def test_sources_of_different_networks_are_refused(tmp_path):
    torch.save({"w": torch.ones(2), "index": torch.arange(3)}, tmp_path / "a.pt")
    torch.save({"w": torch.ones(3), "index": torch.arange(3)}, tmp_path / "b.pt")
    torch.save({"w": torch.ones(2), "index": torch.arange(1, 4)}, tmp_path / "c.pt")
    torch.save({"v": torch.ones(2), "index": torch.arange(3)}, tmp_path / "d.pt")
    with pytest.raises(SystemExit, match="no source"):
        _tool().compact_weights("[]", str(tmp_path / "x.pt"))
    for other, message in (("b", "w is"), ("c", "integer tensor index differs"), ("d", "different tensors")):
        with pytest.raises(SystemExit, match=message):
            _tool().compact_weights([str(tmp_path / "a.pt"), str(tmp_path / f"{other}.pt")], str(tmp_path / "x.pt"))
