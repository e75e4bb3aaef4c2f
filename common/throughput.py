"""How fast a trainer goes and how long it waits for data, from ignite's events.

:class:`ThroughputMonitor` times every iteration from the moment the trainer asks its loader for a batch to the
end of the optimizer step, and the part of it spent waiting for data: the labeled batch (ignite's
``GET_BATCH_STARTED`` .. ``GET_BATCH_COMPLETED``) plus any unlabeled batch the trainer fetched inside the
iteration (``SemiSupervisedTrainer.unlabeled_wait_seconds``). Validation runs outside these spans and is not
counted.
"""

from __future__ import annotations

import logging
import time

from ignite.engine import Engine, Events

__all__ = ["ThroughputMonitor"]

logger = logging.getLogger(__name__)


class ThroughputMonitor:
    """Per-epoch optimizer steps/s, patches/s and data-wait share of a trainer, logged and kept in
    ``trainer.state.throughput`` (a dict with ``iterations``, ``patches``, ``seconds``, ``data_seconds``,
    ``steps_per_s``, ``patches_per_s``, ``data_wait_share``) for the epoch just completed.

    Args:
        skip_first: iterations at the start of each epoch left out of the figures (loader start-up, worker
            forks, the first batch of a fresh cache).
        log: log one line per epoch.
        processes: ranks of a multi-process run, which step together on batches of this rank's size: patches
            count all of them (every rank's step waits for the slowest at the gradient all-reduce).
    """

    def __init__(self, skip_first: int = 1, log: bool = True, processes: int = 1):
        self.skip_first = max(0, int(skip_first))
        self.log = log
        self.processes = max(1, int(processes))

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.EPOCH_STARTED, self._reset)
        trainer.add_event_handler(Events.GET_BATCH_STARTED, self._batch_requested)
        trainer.add_event_handler(Events.GET_BATCH_COMPLETED, self._batch_arrived)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_done)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._report)

    def _reset(self, trainer: Engine) -> None:
        self._iterations = self._patches = 0
        self._seconds = self._data_seconds = 0.0
        self._seen = 0

    def _batch_requested(self, trainer: Engine) -> None:
        self._requested = time.perf_counter()
        self._unlabeled_before = getattr(trainer, "unlabeled_wait_seconds", 0.0)

    def _batch_arrived(self, trainer: Engine) -> None:
        self._arrived = time.perf_counter()
        self._batch_patches = _batch_size(trainer.state.batch)  # MONAI decollates the batch later

    def _iteration_done(self, trainer: Engine) -> None:
        self._seen += 1
        if self._seen <= self.skip_first or not hasattr(self, "_requested"):
            return
        done = time.perf_counter()
        unlabeled_wait = getattr(trainer, "unlabeled_wait_seconds", 0.0) - self._unlabeled_before
        self._iterations += 1
        self._patches += self._batch_patches * self.processes
        self._seconds += done - self._requested
        self._data_seconds += (self._arrived - self._requested) + unlabeled_wait

    def _report(self, trainer: Engine) -> None:
        seconds = max(self._seconds, 1e-9)
        figures = {
            "iterations": self._iterations,
            "patches": self._patches,
            "seconds": self._seconds,
            "data_seconds": self._data_seconds,
            "steps_per_s": self._iterations / seconds,
            "patches_per_s": self._patches / seconds,
            "data_wait_share": self._data_seconds / seconds,
        }
        trainer.state.throughput = figures
        if self.log and self._iterations:
            logger.info(
                "epoch %d: %.3f steps/s, %.2f labeled patches/s, data wait %.1f %% of iteration time",
                trainer.state.epoch,
                figures["steps_per_s"],
                figures["patches_per_s"],
                100 * figures["data_wait_share"],
            )


def _batch_size(batch) -> int:
    """Number of labeled patches in a collated batch (its ``image`` tensor's first dimension)."""
    image = batch.get("image") if isinstance(batch, dict) else None
    return int(image.shape[0]) if image is not None and hasattr(image, "shape") else 0
