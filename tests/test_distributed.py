"""Multi-process training of both bundles: ``torchrun --nproc_per_node 2`` with gloo on CPU, tiny networks, a
few iterations on real images. The ranks end with identical networks (MT²'s EMA teacher and CrossCT's pair
included), rank 0's checkpoint holds those weights, and no process but rank 0 writes anything into the run
folder.

Two test-only additions wrap the product's command: a launcher that runs ``python -m monai.bundle`` unchanged
behind a Python audit hook recording every file a process opens for writing (or creates, renames, removes)
under the run folder, and a config merged last whose ``finalize`` saves each rank's networks to a probe folder
before the bundle's own ``finalize``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import torch
import bundle_runs as runs

from common.distributed import torchrun_launcher
from common.sampling import DistributedBalancedModalitySampler

TRAIN_IMAGES = ["dsb_0121d6759c5a.png", "phase_set02.tif", "stardist_img2d.tif", "dsb_9774c8239632.png"]
VALIDATION_IMAGES = ["dsb_ff3e512b5fb8.png"]
# three: the ranks validate 2 and 1 images, none twice
MT2_VALIDATION_IMAGES = ["dsb_ff3e512b5fb8.png", "dsb_52a6b8ae4c8e.png", "dsb_9774c8239632.png"]
# per rank: 2 labeled images (DistributedSampler), batch 1 -> 2 iterations an epoch
TINY = {"patch_size": [64, 64], "batch_size": 1, "unlabeled_batch_size": 1, "val_interval": 1, "num_workers": 0}

def run_two_ranks(bundle: Path, run_id: str, probed: dict, overrides: dict, dataset_dir: Path, run_dir: Path, folder: Path):
    """``torchrun --nproc_per_node 2 -m monai.bundle run RUN_ID`` of train.yaml + multi_gpu_train.yaml, behind
    the write audit of ``run_dir``; the ``probed`` values (name -> config expression of tensors) are saved per
    rank at the end.

    Returns:
        (the finished torchrun process, the folder holding each rank's probed values and write audit).
    """
    probe = folder / f"probe_{run_id}"
    probe.mkdir()
    configs = bundle / "configs"
    saved = ", ".join(f"'{name}': {expression}" for name, expression in probed.items())
    probe_config = folder / f"probe_{run_id}.yaml"
    probe_config.write_text(
        "finalize:\n"
        f"  - \"$torch.save({{{saved}}}, '{probe}/weights_rank' + str(torch.distributed.get_rank()) + '.pt')\"\n"
        f"  - \"%{configs / 'multi_gpu_train.yaml'}#finalize#0\"\n"
    )
    launcher = folder / "launcher.py"
    launcher.write_text(runs.WRITE_AUDIT_LAUNCHER)
    config_files = [str(configs / "train.yaml"), str(configs / "multi_gpu_train.yaml"), str(probe_config)]
    command = [
        *torchrun_launcher(2), str(launcher), str(run_dir), str(probe),
        "run", run_id, "--config_file", repr(config_files),
        "--dataset_dir", str(dataset_dir), "--run_dir", str(run_dir), *runs.override_arguments({**TINY, **overrides}),
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=folder, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return probe


def rank_records(probe: Path) -> tuple[list[dict], list[dict]]:
    """(per rank: the probed values, per rank: the write audit), ranks 0 and 1."""
    weights = [torch.load(probe / f"weights_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    audits = [json.loads((probe / f"writes_rank{rank}.json").read_text()) for rank in (0, 1)]
    return weights, audits


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def assert_only_rank_zero_wrote(run_dir: Path, audits: list[dict]) -> None:
    """Rank 1 wrote nothing under ``run_dir``, and no TensorBoard event file there carries its process id
    (the last but one part of the name); rank 0 wrote the checkpoints and TensorBoard events."""
    assert audits[1]["writes"] == [], audits[1]["writes"][:10]
    rank_zero_files = {Path(entry.split(" ", 1)[1]).name for entry in audits[0]["writes"]}
    assert {"checkpoint_last.pt", "checkpoint_best.pt", "model.pt"} <= rank_zero_files
    assert any(name.startswith("events.out.tfevents.") for name in rank_zero_files)
    events = [path.name for path in run_dir.rglob("events.out.tfevents.*")]
    assert not [name for name in events if name.split(".")[-2] == str(audits[1]["pid"])], events


def test_mean_teacher_on_two_ranks_keeps_student_and_ema_teacher_identical(dev_dir, unlabeled_dir, tmp_path):
    bundle = runs.REPO / "bundles" / "mt2_cell_segmentation"
    _, networks = runs.tiny_checkpoint("mt2", tmp_path)
    dataset_dir = runs.write_datalist(dev_dir, unlabeled_dir, tmp_path / "data", TRAIN_IMAGES, MT2_VALIDATION_IMAGES)
    run_dir = tmp_path / "run"
    probed = {
        "validated": "torch.tensor(list(@validate#sampler))",  # this rank's share of the validation images
        "val_f1": "torch.tensor(@validate#evaluator.state.metrics['val_f1'])",
        "student": "@network.module.state_dict()",
        "teacher": "@teacher.state_dict()",
        "consistency": "@train#trainer.state.output[0]['loss_consistency']",
        "drawn": "torch.tensor(list(@train#sampler))",  # this rank's share of the last epoch's labeled draws
        "patches": "torch.tensor(getattr(@train#trainer.state, 'throughput', {}).get('patches', -1))",
    }
    # the cards' commands set the epoch's draws (train.yaml's modality-balanced sampler): 4 here, 2 per rank
    overrides = {**networks, "epochs": 2, "warmup_epochs": 1, "train#sampler#num_samples": 4}
    probe = run_two_ranks(bundle, "training", probed, overrides, dataset_dir, run_dir, tmp_path)
    weights, audits = rank_records(probe)
    assert_same(weights[0]["student"], weights[1]["student"])
    assert_same(weights[0]["teacher"], weights[1]["teacher"])
    checkpoint = torch.load(run_dir / "checkpoint_last.pt", weights_only=True)
    assert_same(checkpoint["model"], weights[0]["student"])
    assert_same(checkpoint["teacher"], weights[0]["teacher"])
    assert checkpoint["trainer"]["iteration"] == 2 * checkpoint["trainer"]["epoch_length"] == 4
    # epoch 2 taught: a consistency loss on unlabeled images, and a teacher that follows the student by EMA
    assert all(math.isfinite(float(record["consistency"])) for record in weights)
    assert any(not torch.equal(t, s) for t, s in zip(checkpoint["teacher"].values(), checkpoint["model"].values()))
    # the ranks drew their shares of one balanced epoch: together, the draws one process would make
    training = json.loads((dataset_dir / "datalist.json").read_text())["training"]
    one_process = DistributedBalancedModalitySampler(training, num_samples=4, num_replicas=1, rank=0)
    one_process.set_epoch(2)
    assert [int(i) for pair in zip(weights[0]["drawn"], weights[1]["drawn"]) for i in pair] == list(one_process)
    # rank 0 alone times the epochs, counting both ranks' patches: 2 steps, the first left out, batch 1 on each rank
    assert [int(record["patches"]) for record in weights] == [2, -1]
    # each validation image validated by one rank only, so the F1 both ranks agree on counts each image once
    assert [record["validated"].tolist() for record in weights] == [[0, 2], [1]]
    assert float(weights[0]["val_f1"]) == float(weights[1]["val_f1"])
    assert_only_rank_zero_wrote(run_dir, audits)


def test_both_crossct_stages_on_two_ranks_keep_both_networks_identical(dev_dir, unlabeled_dir, tmp_path):
    bundle = runs.REPO / "bundles" / "crossct_cell_segmentation"
    _, networks = runs.tiny_checkpoint("crossct", tmp_path)
    dataset_dir = runs.write_datalist(dev_dir, unlabeled_dir, tmp_path / "data", TRAIN_IMAGES, VALIDATION_IMAGES)
    run_dir = tmp_path / "run"
    overrides = {**networks, "pretrain_epochs": 1, "epochs": 2, "rampup_epochs": 1}

    probe = run_two_ranks(bundle, "pretraining", {"pair": "@network.state_dict()"}, overrides, dataset_dir, run_dir, tmp_path)
    weights, audits = rank_records(probe)
    assert_same(weights[0]["pair"], weights[1]["pair"])
    assert_same(torch.load(run_dir / "pretrain" / "checkpoint_last.pt", weights_only=True)["model"], weights[0]["pair"])
    assert_only_rank_zero_wrote(run_dir, audits)

    probed = {"pair": "@network.state_dict()", "cross": "@train#trainer.state.output[0]['loss_cross']"}
    probe = run_two_ranks(bundle, "training", probed, overrides, dataset_dir, run_dir, tmp_path)
    weights, audits = rank_records(probe)
    assert_same(weights[0]["pair"], weights[1]["pair"])
    checkpoint = torch.load(run_dir / "checkpoint_last.pt", weights_only=True)
    assert_same(checkpoint["model"], weights[0]["pair"])
    assert checkpoint["trainer"]["iteration"] == 2 * checkpoint["trainer"]["epoch_length"] == 4
    assert all(math.isfinite(float(record["cross"])) for record in weights)  # the pair taught each other
    assert_only_rank_zero_wrote(run_dir, audits)
