"""Modality-balanced sampling of a training pool: known shares, and a sampler that draws them."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from common.sampling import BalancedModalitySampler, DistributedBalancedModalitySampler, modality_weights


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


def test_ranks_share_out_one_balanced_epoch_of_draws():
    items = _pool()
    ranks = [DistributedBalancedModalitySampler(items, num_samples=6001, num_replicas=2, rank=r, seed=3)
             for r in (0, 1)]
    shares = [list(sampler) for sampler in ranks]
    assert [len(sampler) for sampler in ranks] == [3001, 3001] and [len(share) for share in shares] == [3001, 3001]
    # the ranks' draws interleave into one sequence, the same on every rank, at the modalities' balanced shares
    alone = list(DistributedBalancedModalitySampler(items, num_samples=6002, num_replicas=1, rank=0, seed=3))
    assert [index for pair in zip(*shares) for index in pair] == alone
    drawn = Counter(items[index]["modality"] for index in alone)
    assert drawn["phase"] / len(alone) == pytest.approx(2 / 12, abs=0.02)
    # set_epoch (MONAI's trainers call it each epoch) gives every rank the next epoch's draws
    again = DistributedBalancedModalitySampler(items, num_samples=6001, num_replicas=2, rank=0, seed=3)
    assert list(again) == shares[0]
    again.set_epoch(1)
    assert list(again) != shares[0]
    assert len(DistributedBalancedModalitySampler(items, num_replicas=4, rank=3)) == 26  # default: one draw per item
    with pytest.raises(ValueError, match="rank"):
        DistributedBalancedModalitySampler(items, num_replicas=2, rank=2)
