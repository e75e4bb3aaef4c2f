"""Modality-balanced sampling of a training pool: known shares, and a sampler that draws them."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from common.sampling import BalancedModalitySampler, modality_weights


def _pool() -> list[dict]:
    return [{"image": f"f{i}", "modality": "fluorescence"} for i in range(100)] + [
        {"image": f"p{i}", "modality": "phase"} for i in range(4)
    ]


def _share(weights: torch.Tensor, items: list[dict], modality: str) -> float:
    return float(sum(w for w, item in zip(weights, items) if item["modality"] == modality))


def test_modality_shares_follow_the_power_of_their_counts():
    items = _pool()
    assert _share(modality_weights(items, power=1.0), items, "phase") == pytest.approx(4 / 104)
    assert _share(modality_weights(items, power=0.0), items, "phase") == pytest.approx(0.5)
    # square root: 2 / (10 + 2)
    assert _share(modality_weights(items, power=0.5), items, "phase") == pytest.approx(2 / 12)
    weights = modality_weights(items, power=0.5)
    assert float(weights.sum()) == pytest.approx(1.0) and len(set(weights[:100].tolist())) == 1
    with pytest.raises(ValueError, match="power"):
        modality_weights(items, power=2.0)
    with pytest.raises(ValueError, match="no items"):
        modality_weights([])


def test_entries_without_a_modality_form_one_group():
    items = [{"image": "a"}, {"image": "b"}, {"image": "c", "modality": "phase"}]
    weights = modality_weights(items, power=0.0)
    assert weights.tolist() == pytest.approx([0.25, 0.25, 0.5])


def test_the_sampler_draws_the_rare_modality_at_its_share():
    items = _pool()
    torch.manual_seed(0)
    sampler = BalancedModalitySampler(items, power=0.5, num_samples=6000)
    drawn = Counter(items[index]["modality"] for index in sampler)
    assert len(sampler) == 6000 and sum(drawn.values()) == 6000
    assert drawn["phase"] / 6000 == pytest.approx(2 / 12, abs=0.02)
    assert len(BalancedModalitySampler(items)) == len(items)
