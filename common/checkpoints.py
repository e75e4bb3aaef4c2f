"""Checkpoints of a training run, and resuming from them: the last epoch, the best validation epoch (both
with everything needed to resume) and the best network alone (``model.pt``, what inference and MONAI Label
load).

All files are written atomically and hold tensors and plain numbers only, so they load with
``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Mapping

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["TrainingCheckpointer"]

logger = logging.getLogger(__name__)


class TrainingCheckpointer:
    """Handler for a trainer: ``checkpoint_last.pt`` after every epoch; with a ``validator``, also
    ``checkpoint_best.pt`` and ``model.pt`` whenever the validator's key metric improves; with ``resume_from``,
    everything (networks, optimizers, schedulers, epoch and iteration) restored from that checkpoint when the
    run starts, so it continues after the saved epoch.

    The full checkpoints hold ``save_dict`` plus the trainer itself under ``"trainer"`` (epoch and iteration),
    which is why this handler receives the trainer when attached instead of from the config: a config entry
    cannot refer to the trainer that refers to it.

    Args:
        save_dir: output folder (created); None saves nothing (the other ranks of a multi-process run).
        save_dict: name -> object with ``state_dict`` (networks, optimizers, schedulers); its ``model_key``
            entry is the network written alone to ``model.pt``.
        validator: the evaluator whose key metric selects the best epoch, or None.
        model_key: the ``save_dict`` key of the network to export.
        resume_from: a full checkpoint written by this handler ('' or None: start afresh).
        publish_to: where to copy the run's network when training completes ('' or None: nowhere): this run's
            best ``model.pt``, or the final network when the run never validated. A bundle's ``models/model.pt``,
            which MONAI Label serves and reloads after training.
    """

    def __init__(
        self,
        save_dir: str | Path | None,
        save_dict: Mapping[str, object],
        validator: Engine | None = None,
        model_key: str = "model",
        resume_from: str | Path | None = None,
        publish_to: str | Path | None = None,
    ):
        if model_key not in save_dict:
            raise ValueError(f"save_dict has no '{model_key}' entry to export as model.pt")
        self.save_dir = Path(save_dir) if save_dir else None
        self.save_dict = dict(save_dict)
        self.validator = validator
        self.model_key = model_key
        self.resume_from = Path(resume_from) if resume_from else None
        if self.resume_from is not None and not self.resume_from.is_file():
            raise FileNotFoundError(f"resume_from: no checkpoint at {self.resume_from}")
        self.publish_to = Path(publish_to) if publish_to else None

    def _saver(self) -> DiskSaver:
        return _ReplacingDiskSaver(str(self.save_dir), atomic=True, create_dir=True, require_empty=False)

    def attach(self, trainer: Engine) -> None:
        self._best_checkpoints: list[Checkpoint] = []
        everything = {**self.save_dict, "trainer": trainer, BEST_KEY: _BestScore(self._best_checkpoints, self.validator)}
        if self.resume_from is not None:
            trainer.add_event_handler(Events.STARTED, self._resume, everything)
        if self.save_dir is None:
            return
        if self.publish_to is not None:
            trainer.add_event_handler(Events.COMPLETED, self._publish)
        last = Checkpoint(everything, self._saver(), filename_pattern="checkpoint_last.{ext}", n_saved=1)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, last)
        if self.validator is None:
            return

        def key_metric(_: Engine) -> float:
            return _latest_score(self.validator)

        best = Checkpoint(everything, self._saver(), filename_pattern="checkpoint_best.{ext}", n_saved=1, score_function=key_metric)
        network: nn.Module = self.save_dict[self.model_key]
        model = Checkpoint({self.model_key: network}, self._saver(), filename_pattern="model.{ext}", n_saved=1, score_function=key_metric)
        self.validator.add_event_handler(Events.COMPLETED, best)
        self.validator.add_event_handler(Events.COMPLETED, model)
        self._best_checkpoints += [best, model]

    def _publish(self, _: Engine) -> None:
        """Copy the run's best ``model.pt`` (or the final network) to ``publish_to``, atomically."""
        best = self.save_dir / "model.pt"
        validated = best.is_file() and any(checkpoint.last_checkpoint for checkpoint in self._best_checkpoints)
        self.publish_to.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.publish_to.with_name(f".{self.publish_to.name}.tmp")
        try:
            if validated:  # model.pt is already the tensor-only state dict to publish
                shutil.copyfile(best, temporary)
            else:
                network: nn.Module = self.save_dict[self.model_key]
                torch.save({name: tensor.detach().cpu() for name, tensor in network.state_dict().items()}, temporary)
            temporary.replace(self.publish_to)
        finally:
            temporary.unlink(missing_ok=True)
        what = "the best network of the run" if validated else "the final network (the run never validated)"
        logger.info("published %s to %s", what, self.publish_to)

    def _resume(self, trainer: Engine, everything: dict) -> None:
        checkpoint = torch.load(self.resume_from, map_location="cpu", weights_only=True)
        if BEST_KEY not in checkpoint:  # written before checkpoints remembered their best score
            everything = {key: value for key, value in everything.items() if key != BEST_KEY}
        missing = sorted(set(everything) - set(checkpoint))
        if missing:
            raise KeyError(f"{self.resume_from} is not a full training checkpoint: it lacks {missing}")
        requested_epochs = trainer.state.max_epochs
        schedules = {key: obj.state_dict() for key, obj in everything.items() if isinstance(obj, LRScheduler)}
        Checkpoint.load_objects(to_load=everything, checkpoint=checkpoint)
        for key, configured in schedules.items():
            _follow_configured_schedule(everything[key], configured)
        # the checkpoint carries its run's max_epochs; this run's setting decides how long to go on
        trainer.state.max_epochs = requested_epochs
        if trainer.state.epoch >= requested_epochs:
            raise ValueError(
                f"{self.resume_from} already holds epoch {trainer.state.epoch}: ask for more than "
                f"{requested_epochs} epochs to train further"
            )
        logger.info("resumed from %s after epoch %d (iteration %d)", self.resume_from, trainer.state.epoch, trainer.state.iteration)
        best = everything.get(BEST_KEY)
        if best is not None and best.score is not None:
            logger.info("best validation score so far: %.4f%s (a new checkpoint_best.pt/model.pt needs more)", best.score,
                        f" at epoch {best.epoch}" if best.epoch is not None else "")


BEST_KEY = "best_score"


def _latest_score(validator: Engine | None) -> float | None:
    """The validator's key metric from its latest run; None before the first validation (or without a validator)."""
    state = getattr(validator, "state", None)
    name = getattr(state, "key_metric_name", None)
    if name is None or name not in state.metrics:
        return None
    return float(state.metrics[name])
_SCHEDULE_PROGRESS = ("last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step")


def _follow_configured_schedule(scheduler: LRScheduler, configured: Mapping[str, object]) -> None:
    """Keep a resumed scheduler's progress (its step) but this run's settings (e.g. a cosine ``T_max`` for more
    epochs, another base learning rate), and set the optimizer's rates to where that schedule stands, so that
    asking a resumed run for more epochs stretches the schedule instead of restarting its cycle past the end."""
    progress = {name: value for name, value in scheduler.__dict__.items() if name in _SCHEDULE_PROGRESS}
    scheduler.__dict__.update({name: value for name, value in configured.items() if name not in _SCHEDULE_PROGRESS})
    scheduler.__dict__.update(progress)
    closed_form = getattr(scheduler, "_get_closed_form_lr", None)
    if closed_form is None:
        return
    rates = closed_form()
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = list(rates)


class _BestScore:
    """The best validation score of a run (and its epoch) as checkpoint state, so that a resumed run replaces
    ``checkpoint_best.pt``/``model.pt`` only when it beats the score they were saved with, and a MONAI evaluator
    logs the run's best ("Key metric: ... best value ... at epoch ..."), not only its best since the restart.

    The scores are the saved checkpoints' and the validator's latest (ignite asks for the state before it records
    the checkpoint it is writing, so the best checkpoint's own score is the latest one, not yet a saved one).
    The epoch is the validator's ``state.best_metric_epoch``, which MONAI's evaluators keep (-1: not known).
    """

    def __init__(self, checkpoints: list[Checkpoint], validator: Engine | None):
        self.checkpoints = checkpoints
        self.validator = validator
        self.score: float | None = None
        self.epoch: int | None = None

    def _validator_state(self):
        state = getattr(self.validator, "state", None)
        return state if hasattr(state, "best_metric_epoch") else None

    def state_dict(self) -> dict[str, torch.Tensor]:
        scores = [priority for checkpoint in self.checkpoints for priority, _ in checkpoint.state_dict()["_saved"]]
        latest = _latest_score(self.validator)
        scores += [] if latest is None else [latest]
        best, state = (max(scores) if scores else float("nan")), self._validator_state()
        # the evaluator's best is the run's only when no remembered score from before a restart beats it
        known = state is not None and scores and math.isclose(float(state.best_metric), best, rel_tol=0.0, abs_tol=1e-9)
        epoch = state.best_metric_epoch if known else -1
        return {"score": torch.tensor(best, dtype=torch.float64),
                "epoch": torch.tensor(int(epoch), dtype=torch.int64)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        score = float(state["score"])
        if score != score:  # NaN: the run had not validated yet
            return
        self.score = score
        for checkpoint in self.checkpoints:
            filename = checkpoint.filename_pattern.format(ext="pt")
            checkpoint.load_state_dict({"_saved": [(score, filename)]})
        epoch = int(state["epoch"]) if "epoch" in state else -1  # older checkpoints kept the score alone
        if epoch < 0:
            return
        self.epoch = epoch
        validator_state = self._validator_state()
        if validator_state is not None:
            validator_state.best_metric, validator_state.best_metric_epoch = score, epoch


class _ReplacingDiskSaver(DiskSaver):
    """``DiskSaver`` whose ``remove`` accepts a file that is not there: a run resumed into another folder
    remembers its best score but not the old folder's files."""

    def remove(self, filename: str) -> None:
        try:
            super().remove(filename)
        except FileNotFoundError:
            pass
