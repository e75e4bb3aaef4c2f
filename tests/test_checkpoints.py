"""Resuming a run with more epochs than it was started with: the cosine schedule stretches to the new length."""

import math

import torch
from ignite.engine import Engine, Events

from common.checkpoints import TrainingCheckpointer


def _run(tmp_path, epochs, resume_from="", save_dir=None, iterations=4, lr=0.1):
    torch.manual_seed(0)
    network = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(network.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * iterations)
    rates = []

    def step(engine, batch):
        optimizer.zero_grad()
        network(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])

    trainer = Engine(step)
    checkpointer = TrainingCheckpointer(save_dir, {"model": network, "optimizer": optimizer, "lr_scheduler": scheduler}, resume_from=resume_from)
    checkpointer.attach(trainer)
    trainer.run(range(iterations), max_epochs=epochs)
    return rates


def test_resumed_run_with_more_epochs_follows_the_longer_cosine(tmp_path):
    _run(tmp_path, epochs=2, save_dir=tmp_path / "first")
    resumed = _run(tmp_path, epochs=6, resume_from=tmp_path / "first" / "checkpoint_last.pt")
    total = 6 * 4
    expected = [0.05 * (1 + math.cos(math.pi * step / total)) for step in range(9, total + 1)]
    assert len(resumed) == len(expected) == 16
    for got, want in zip(resumed, expected):
        assert abs(got - want) < 1e-9, (got, want)
    assert resumed[-1] < 1e-9 and max(resumed) < 0.1 * 0.5 * (1 + math.cos(math.pi * 7 / total)) + 1e-9


def test_checkpoints_remember_the_score_of_the_best_epoch(tmp_path):
    """checkpoint_best.pt holds the score it was saved for (not the best before it), checkpoint_last.pt the best."""
    scores = iter([0.2, 0.5, 0.3])
    network = torch.nn.Linear(2, 1)
    validator = Engine(lambda engine, batch: None)

    @validator.on(Events.COMPLETED)
    def score(engine):
        engine.state.metrics["f1"] = next(scores)
        engine.state.key_metric_name = "f1"

    trainer = Engine(lambda engine, batch: None)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: validator.run(range(1)))
    TrainingCheckpointer(tmp_path, {"model": network}, validator=validator).attach(trainer)
    trainer.run(range(2), max_epochs=3)
    best = torch.load(tmp_path / "checkpoint_best.pt", weights_only=True)
    last = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)
    assert best["trainer"]["iteration"] == 2 * 2  # saved after epoch 2
    assert float(best["best_score"]["score"]) == 0.5
    assert float(last["best_score"]["score"]) == 0.5
