"""The MT² bundle end to end on CPU with a tiny network and real images: both training phases, the EMA rule,
resume, inference (including a corrupt file), evaluation, and MONAI's bundle checks."""

from __future__ import annotations

import math

import pytest
import torch
import bundle_runs as runs
from ignite.engine import Events

BUNDLE = runs.REPO / "bundles" / "mt2_cell_segmentation"
TRAIN_IMAGES = ["dsb_0121d6759c5a.png", "phase_set02.tif", "stardist_img2d.tif"]
VALIDATION_IMAGES = ["he_image02.png"]
INFERENCE_IMAGES = ["dsb_9774c8239632.png", "phase_set09.tif", "he_image06.png"]  # 3 modalities, 3 sizes
FEATURES = [4, 4, 8, 8, 16, 4]
TINY = {"features": FEATURES, "patch_size": [64, 64], "batch_size": 2, "unlabeled_batch_size": 2, "val_interval": 1, "num_workers": 0}


def train_workflow(dataset_dir, run_dir, **overrides):
    settings = {**TINY, "epochs": 2, "warmup_epochs": 1, **overrides}
    return runs.initialized_workflow(BUNDLE, "train.yaml", "train", dataset_dir=str(dataset_dir), run_dir=str(run_dir), **settings)


def first_seen(workflow, event, probe) -> dict:
    """Run the training workflow and return what ``probe(trainer)`` gave at the first ``event``."""
    trainer = workflow.parser.get_parsed_content("train#trainer")
    seen = {}

    @trainer.on(event)
    def record(engine):
        if not seen:
            seen.update(probe(engine))

    workflow.run()
    workflow.finalize()
    return seen


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, dev_dir, unlabeled_dir):
    """Train 2 epochs (1 supervised warm-up + 1 mean-teacher) and record what the teacher did."""
    folder = tmp_path_factory.mktemp("mt2")
    dataset_dir = runs.write_datalist(dev_dir, unlabeled_dir, folder / "data", TRAIN_IMAGES, VALIDATION_IMAGES)
    workflow = train_workflow(dataset_dir, folder / "run")
    trainer = workflow.parser.get_parsed_content("train#trainer")
    student, teacher = workflow.parser.get_parsed_content("network"), workflow.parser.get_parsed_content("teacher")
    record = {"ema_errors": [], "copied_at_phase_start": None}

    @trainer.on(Events.EPOCH_STARTED)
    def check_copy(engine):
        if engine.state.epoch == 2:  # runs after the trainer's own handler that initialises the teacher
            record["copied_at_phase_start"] = runs.state_equal(teacher, student.state_dict())

    @trainer.on(Events.ITERATION_STARTED)
    def before(engine):
        record["teacher_before"] = runs.parameters(teacher)

    @trainer.on(Events.ITERATION_COMPLETED)
    def after(engine):
        if engine.state.epoch == 1:
            record["teacher_unchanged_in_warmup"] = all(
                torch.equal(a, b) for a, b in zip(record["teacher_before"], runs.parameters(teacher))
            )
            return
        expected = [0.995 * t + 0.005 * s for t, s in zip(record["teacher_before"], runs.parameters(student))]
        record["ema_errors"].append(max((e - t).abs().max().item() for e, t in zip(expected, runs.parameters(teacher))))
        record["consistency"] = engine.state.output[0].get("loss_consistency")

    workflow.run()
    workflow.finalize()
    record["student"], record["teacher"] = runs.parameters(student), runs.parameters(teacher)
    return folder, record


def test_training_runs_both_phases_and_the_teacher_follows_the_ema_rule(trained_run):
    folder, record = trained_run
    assert record["teacher_unchanged_in_warmup"]
    assert record["copied_at_phase_start"] is True
    assert len(record["ema_errors"]) >= 1 and max(record["ema_errors"]) < 1e-6
    assert record["consistency"] is not None and math.isfinite(float(record["consistency"]))
    assert any(not torch.equal(s, t) for s, t in zip(record["student"], record["teacher"]))
    for name in ("checkpoint_last.pt", "checkpoint_best.pt", "model.pt"):
        assert (folder / "run" / name).is_file(), name


def test_checkpoints_are_tensor_only_and_hold_everything(trained_run):
    folder, _ = trained_run
    checkpoint = torch.load(folder / "run" / "checkpoint_last.pt", weights_only=True)
    assert {"model", "teacher", "optimizer", "lr_scheduler", "trainer"} <= set(checkpoint)
    trainer_state = checkpoint["trainer"]  # ignite stores the epoch as iterations done / epoch length
    assert trainer_state["iteration"] == 2 * trainer_state["epoch_length"]
    model = torch.load(folder / "run" / "model.pt", weights_only=True)
    assert all(isinstance(value, torch.Tensor) for value in model.values())


def test_resume_continues_from_the_saved_epoch_with_identical_weights(trained_run, tmp_path):
    folder, _ = trained_run
    checkpoint_path = folder / "run" / "checkpoint_last.pt"
    saved = torch.load(checkpoint_path, weights_only=True)
    workflow = train_workflow(folder / "data", tmp_path / "resumed", epochs=3, resume_from=str(checkpoint_path))
    student, teacher = workflow.parser.get_parsed_content("network"), workflow.parser.get_parsed_content("teacher")
    seen = first_seen(workflow, Events.EPOCH_STARTED, lambda engine: {
        "epoch": engine.state.epoch,
        "student": runs.state_equal(student, saved["model"]),
        "teacher": runs.state_equal(teacher, saved["teacher"]),
    })
    assert seen == {"epoch": 3, "student": True, "teacher": True}
    resumed_state = torch.load(tmp_path / "resumed" / "checkpoint_last.pt", weights_only=True)["trainer"]
    assert resumed_state["iteration"] == 3 * resumed_state["epoch_length"]


def test_a_new_run_starts_from_pretrained_weights_with_a_fresh_optimizer(trained_run, tmp_path):
    folder, _ = trained_run
    weights = torch.load(folder / "run" / "model.pt", weights_only=True)
    workflow = train_workflow(folder / "data", tmp_path / "fine_tuned", epochs=1, pretrained_checkpoint=str(folder / "run" / "model.pt"))
    student, optimizer = workflow.parser.get_parsed_content("network"), workflow.parser.get_parsed_content("optimizer")
    seen = first_seen(workflow, Events.ITERATION_STARTED, lambda engine: {
        "epoch": engine.state.epoch,
        "iteration": engine.state.iteration,
        "student": runs.state_equal(student, weights),
        "optimizer_state": len(optimizer.state),
        "lr": optimizer.param_groups[0]["lr"],
    })
    assert seen == {"epoch": 1, "iteration": 1, "student": True, "optimizer_state": 0, "lr": 0.001}
    assert not runs.state_equal(student, weights)  # and it trained from there


@pytest.mark.parametrize("remembered, replaced", [(2.0, False), (-1.0, True)])
def test_a_resumed_run_replaces_the_best_model_only_when_it_beats_the_remembered_score(trained_run, tmp_path, remembered, replaced):
    folder, _ = trained_run
    checkpoint = torch.load(folder / "run" / "checkpoint_last.pt", weights_only=True)
    assert math.isfinite(float(checkpoint["best_score"]["score"]))  # the run validated, and its checkpoint says how well
    assert 1 <= int(checkpoint["best_score"]["epoch"]) <= 2  # and at which epoch
    checkpoint["best_score"]["score"] = torch.tensor(remembered, dtype=torch.float64)  # F1 lies in [0, 1]
    checkpoint["best_score"]["epoch"] = torch.tensor(1, dtype=torch.int64)
    torch.save(checkpoint, tmp_path / "remembering.pt")
    workflow = train_workflow(folder / "data", tmp_path / "resumed", epochs=3, resume_from=str(tmp_path / "remembering.pt"))
    workflow.run()
    workflow.finalize()
    assert (tmp_path / "resumed" / "model.pt").is_file() == replaced
    assert (tmp_path / "resumed" / "checkpoint_best.pt").is_file() == replaced
    kept = torch.load(tmp_path / "resumed" / "checkpoint_last.pt", weights_only=True)["best_score"]
    assert float(kept["score"]) == remembered if not replaced else 0.0 <= float(kept["score"]) <= 1.0
    # the evaluator's own record (its "Key metric ... best value ... at epoch" log) is the run's, not the restart's
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == ((remembered, 1) if not replaced else (float(kept["score"]), 3))
    assert int(kept["epoch"]) == evaluator.state.best_metric_epoch


def inference_settings(folder):
    return {"features": FEATURES, "roi_size": [64, 64], "num_workers": 0, "checkpoint": str(folder / "run" / "model.pt")}


def test_inference_segments_real_images_and_names_a_corrupt_one(trained_run, dev_dir, tmp_path):
    folder, _ = trained_run
    runs.check_inference_skips_a_corrupt_file(BUNDLE, inference_settings(folder), dev_dir, INFERENCE_IMAGES, tmp_path)


def test_evaluation_writes_per_image_f1_csv(trained_run, dev_dir, tmp_path):
    folder, _ = trained_run
    runs.check_evaluation_writes_scores(BUNDLE, inference_settings(folder), dev_dir, INFERENCE_IMAGES[:2], tmp_path)


def test_bundle_contract_properties_network_and_metadata(dev_dir, tmp_path):
    runs.check_bundle_contract(BUNDLE, dev_dir, {"features": FEATURES}, tmp_path)


def test_in_training_validation_scores_what_the_shipped_inference_scores(dev_dir, unlabeled_dir, tmp_path):
    """train.yaml's validator with the shipped weights gives the mean F1 that inference.yaml's default (three
    scales, 256 windows at overlap 0.25, Gaussian blending, the same watershed) gives on the same images, so the
    model.pt a run selects is the best for the inference it ships with."""
    names = ["dsb_f4c4db3df4ff.png", "dsb_52a6b8ae4c8e.png"]  # one scale, overlap 0.5, constant: 0.421, not 0.575
    validated, shipped = runs.validation_and_inference_f1(BUNDLE, "mt2", dev_dir, unlabeled_dir, names, tmp_path)
    assert shipped > 0.5  # the shipped weights find cells on these two images
    assert validated == pytest.approx(shipped, abs=1e-4)
