"""ThroughputMonitor against an ignite engine whose data and compute times are known."""

from __future__ import annotations

import time

import pytest
import torch
from ignite.engine import Engine

from common.throughput import ThroughputMonitor


class _SlowLoader:
    def __init__(self, batches: int, seconds: float):
        self.batches, self.seconds = batches, seconds

    def __iter__(self):
        for _ in range(self.batches):
            if self.seconds:  # sleep(0) would still hand the core to another process for a time slice
                time.sleep(self.seconds)
            yield {"image": torch.zeros(3, 1, 4, 4)}

    def __len__(self):
        return self.batches


@pytest.mark.parametrize("data_seconds, step_seconds", [(0.1, 0.1), (0.0, 0.1)])
def test_data_wait_share_and_patch_rate_match_the_known_times(data_seconds, step_seconds):
    engine = Engine(lambda engine, batch: time.sleep(step_seconds))
    ThroughputMonitor(skip_first=1).attach(engine)
    engine.run(_SlowLoader(6, data_seconds), max_epochs=1)
    figures = engine.state.throughput
    assert figures["iterations"] == 5 and figures["patches"] == 15  # the first step is left out
    expected_share = data_seconds / (data_seconds + step_seconds)
    assert figures["data_wait_share"] == pytest.approx(expected_share, abs=0.12)
    assert figures["patches_per_s"] == pytest.approx(3 / (data_seconds + step_seconds), rel=0.35)


def test_a_multi_process_run_counts_the_patches_of_every_rank():
    engine = Engine(lambda engine, batch: None)
    ThroughputMonitor(skip_first=1, processes=2).attach(engine)
    engine.run(_SlowLoader(4, 0.0), max_epochs=1)
    assert engine.state.throughput["iterations"] == 3 and engine.state.throughput["patches"] == 18  # 3 steps x 3 x 2
