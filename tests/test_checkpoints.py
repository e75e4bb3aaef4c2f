"""Resuming a run with more epochs than it was started with: the cosine schedule stretches to the new length; the
best score survives a resume; the run's network is published where a bundle serves it."""

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


def _validator_scoring(scores):
    """An evaluator whose key metric "f1" takes the given values, one per run."""
    scores = iter(scores)
    validator = Engine(lambda engine, batch: None)

    @validator.on(Events.COMPLETED)
    def score(engine):
        engine.state.metrics["f1"] = next(scores)
        engine.state.key_metric_name = "f1"

    return validator


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
    network = torch.nn.Linear(2, 1)
    validator = _validator_scoring([0.2, 0.5, 0.3])

    trainer = Engine(lambda engine, batch: None)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: validator.run(range(1)))
    TrainingCheckpointer(tmp_path, {"model": network}, validator=validator).attach(trainer)
    trainer.run(range(2), max_epochs=3)
    best = torch.load(tmp_path / "checkpoint_best.pt", weights_only=True)
    last = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)
    assert best["trainer"]["iteration"] == 2 * 2  # saved after epoch 2
    assert float(best["best_score"]["score"]) == 0.5
    assert float(last["best_score"]["score"]) == 0.5


def test_publishes_the_best_network_of_the_run_when_training_completes(tmp_path):
    """publish_to gets the network of the best validation (not the last epoch's), as a tensor-only state dict."""
    network = torch.nn.Linear(2, 1)
    validator = _validator_scoring([0.2, 0.5, 0.3])

    weights_at_epoch = []

    def step(engine, batch):
        with torch.no_grad():
            network.weight += 1.0

    trainer = Engine(step)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: validator.run(range(1)))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: weights_at_epoch.append(network.weight.detach().clone()))
    target = tmp_path / "bundle" / "models" / "model.pt"
    TrainingCheckpointer(tmp_path / "run", {"model": network}, validator=validator, publish_to=target).attach(trainer)
    trainer.run(range(2), max_epochs=3)
    published = torch.load(target, weights_only=True)
    assert torch.equal(published["weight"], weights_at_epoch[1])  # epoch 2 scored best (0.5)
    assert not torch.equal(published["weight"], network.weight)
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.pt"]  # no temporary file left


def test_publishes_the_final_network_when_the_run_never_validated(tmp_path):
    network = torch.nn.Linear(2, 1)

    def step(engine, batch):
        with torch.no_grad():
            network.bias += 1.0

    trainer = Engine(step)
    target = tmp_path / "model.pt"
    TrainingCheckpointer(tmp_path / "run", {"model": network}, validator=Engine(lambda e, b: None), publish_to=target).attach(trainer)
    trainer.run(range(3), max_epochs=1)
    assert torch.equal(torch.load(target, weights_only=True)["bias"], network.bias)


def test_a_checkpoint_without_the_best_epoch_still_resumes_with_its_best_score(tmp_path):
    """Checkpoints written before the epoch was kept hold the score alone: the resumed run still beats it or not."""
    network = torch.nn.Linear(2, 1)
    trainer = Engine(lambda engine, batch: None)
    validator = _validator_scoring([0.2, 0.5])
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: validator.run(range(1)))
    TrainingCheckpointer(tmp_path / "first", {"model": network}, validator=validator).attach(trainer)
    trainer.run(range(2), max_epochs=2)
    checkpoint = torch.load(tmp_path / "first" / "checkpoint_last.pt", weights_only=True)
    assert int(checkpoint["best_score"]["epoch"]) == -1  # a plain ignite validator keeps no best epoch
    del checkpoint["best_score"]["epoch"]
    torch.save(checkpoint, tmp_path / "old.pt")

    trainer = Engine(lambda engine, batch: None)
    validator = _validator_scoring([0.4, 0.45])
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: validator.run(range(1)))
    TrainingCheckpointer(tmp_path / "resumed", {"model": network}, validator=validator, resume_from=tmp_path / "old.pt").attach(trainer)
    trainer.run(range(2), max_epochs=4)
    assert not (tmp_path / "resumed" / "model.pt").exists()  # 0.4 and 0.45 never beat the remembered 0.5
    assert float(torch.load(tmp_path / "resumed" / "checkpoint_last.pt", weights_only=True)["best_score"]["score"]) == 0.5
