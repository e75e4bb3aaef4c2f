"""The CrossCT bundle end to end on CPU with tiny networks and real images: supervised pre-training, then
cross-teaching initialised from it (ramp-up, detached pseudo-labels, both networks learning), resume, inference
of 3 real images (one with sides not multiples of 32) next to a corrupt file, evaluation, and MONAI's checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
import bundle_runs as runs
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.losses import DiceLoss

from common.losses import cross_teaching_loss
from common.targets import three_class_map

BUNDLE = runs.REPO / "bundles" / "crossct_cell_segmentation"
TRAIN_IMAGES = ["dsb_0121d6759c5a.png", "phase_set02.tif", "stardist_img2d.tif"]
VALIDATION_IMAGES = ["he_image02.png"]
INFERENCE_IMAGES = ["dsb_9774c8239632.png", "phase_set09.tif", "he_image06.png"]  # 1022 x 1024 and 392 x 459
NETWORKS = {"unet_features": [4, 4, 8, 8, 16, 4], "swin_feature_size": 12}
TINY = {**NETWORKS, "patch_size": [64, 64], "batch_size": 2, "unlabeled_batch_size": 2, "val_interval": 1, "num_workers": 0}
EPOCHS, RAMPUP_EPOCHS = 2, 2


def workflow_for(run_id, dataset_dir, run_dir, **overrides):
    settings = {**TINY, "pretrain_epochs": 1, "epochs": EPOCHS, "rampup_epochs": RAMPUP_EPOCHS, **overrides}
    return runs.initialized_workflow(
        BUNDLE, "train.yaml", "train", run_id=run_id, dataset_dir=str(dataset_dir), run_dir=str(run_dir), **settings
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, dev_dir, unlabeled_dir):
    """Stage 1 (1 epoch, supervised) then stage 2 (2 epochs of cross-teaching), recording what happened."""
    folder = tmp_path_factory.mktemp("crossct")
    dataset_dir = runs.write_datalist(dev_dir, unlabeled_dir, folder / "data", TRAIN_IMAGES, VALIDATION_IMAGES)
    pretraining = workflow_for("pretraining", dataset_dir, folder / "run")
    pretraining.run()
    pretraining.finalize()

    workflow = workflow_for("training", dataset_dir, folder / "run")
    trainer = workflow.parser.get_parsed_content("train#trainer")
    pair = workflow.parser.get_parsed_content("network")
    pretrained = torch.load(folder / "run" / "pretrain" / "model.pt", weights_only=True)
    record = {"weights": []}

    @trainer.on(Events.STARTED)
    def snapshot(engine):  # attached after the bundle's handlers, so after stage 1's networks were loaded
        record["starts_from_stage_one"] = runs.state_equal(pair, pretrained)
        record["unet_start"], record["swin_start"] = runs.parameters(pair.unet), runs.parameters(pair.swin)

    @trainer.on(Events.ITERATION_COMPLETED)
    def weight(engine):
        output = engine.state.output[0]
        record["weights"].append((engine.state.iteration, float(output["cross_weight"]), float(output["loss_cross"])))

    workflow.run()
    workflow.finalize()
    record.update(unet_end=runs.parameters(pair.unet), swin_end=runs.parameters(pair.swin), T=trainer.rampup_iterations)
    record["unlabeled"] = next(iter(workflow.parser.get_parsed_content("train#unlabeled_dataloader")))["image"]
    return folder, record, pair


def test_stage_two_starts_from_stage_one_and_both_networks_learn(trained_run):
    folder, record, _ = trained_run
    assert (folder / "run" / "pretrain" / "model.pt").is_file()
    assert record["starts_from_stage_one"]
    for name in ("unet", "swin"):
        start, end = record[f"{name}_start"], record[f"{name}_end"]
        assert any(not torch.equal(a, b) for a, b in zip(start, end)), f"{name} did not change"


def test_cross_weight_follows_the_gaussian_rampup(trained_run):
    _, record, _ = trained_run
    total = record["T"]
    assert total == RAMPUP_EPOCHS * len(record["weights"]) // EPOCHS
    assert len(record["weights"]) >= 3
    for iteration, weight, cross in record["weights"]:
        t = iteration - 1
        assert weight == pytest.approx(0.1 * math.exp(-5 * (1 - t / total) ** 2), rel=1e-6)
        assert math.isfinite(cross)


def test_pseudo_labels_carry_no_gradient_to_the_network_that_made_them(trained_run):
    """Swin's gradient from the cross-teaching loss equals the gradient of the terms where Swin is taught by the
    U-Net alone: nothing reaches Swin through its own pseudo-labels or distance maps (and likewise the U-Net)."""
    _, record, pair = trained_run
    images = record["unlabeled"][:1]
    pair.train()

    def gradients(network, loss):
        pair.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in network.parameters() if p.grad is not None]

    dice = DiceLoss()
    for student, teacher in ((pair.swin, pair.unet), (pair.unet, pair.swin)):
        full = gradients(student, cross_teaching_loss(student(images), teacher(images)))
        taught, teaching = student(images), teacher(images).detach()
        pseudo = F.one_hot(teaching[:, :3].argmax(1), 3).permute(0, 3, 1, 2).float()
        reference = dice(torch.softmax(taught[:, :3], 1), pseudo) + F.mse_loss(taught[:, 3:], teaching[:, 3:])
        expected = gradients(student, reference)
        assert len(full) == len(expected) > 0
        assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(full, expected))


def test_one_checkpoint_holds_both_networks_optimizers_schedulers_and_iteration(trained_run):
    folder, _, pair = trained_run
    checkpoint = torch.load(folder / "run" / "checkpoint_last.pt", weights_only=True)
    expected = {"model", "optimizer_unet", "optimizer_swin", "lr_scheduler_unet", "lr_scheduler_swin", "trainer"}
    assert expected <= set(checkpoint)
    assert {key.split(".")[0] for key in checkpoint["model"]} == {"unet", "swin"}
    assert checkpoint["trainer"]["iteration"] == EPOCHS * checkpoint["trainer"]["epoch_length"]


def test_resume_continues_with_identical_networks(trained_run, tmp_path):
    folder, _, _ = trained_run
    checkpoint_path = folder / "run" / "checkpoint_last.pt"
    saved = torch.load(checkpoint_path, weights_only=True)
    workflow = workflow_for("training", folder / "data", tmp_path / "resumed", epochs=EPOCHS + 1, resume_from=str(checkpoint_path))
    trainer = workflow.parser.get_parsed_content("train#trainer")
    pair = workflow.parser.get_parsed_content("network")
    seen = {}

    @trainer.on(Events.EPOCH_STARTED)
    def on_epoch(engine):
        seen.setdefault("start", (engine.state.epoch, runs.state_equal(pair, saved["model"])))

    workflow.run()
    workflow.finalize()
    assert seen["start"] == (EPOCHS + 1, True)


def inference_settings(folder):
    return {**NETWORKS, "roi_size": [64, 64], "num_workers": 0, "checkpoint": str(folder / "run" / "model.pt")}


@pytest.mark.parametrize("postprocess", ["interior", "distance"])
def test_inference_segments_real_images_of_any_size_and_names_a_corrupt_one(trained_run, dev_dir, tmp_path, postprocess):
    folder, _, _ = trained_run
    settings = {**inference_settings(folder), "postprocess": postprocess}
    runs.check_inference_skips_a_corrupt_file(BUNDLE, settings, dev_dir, INFERENCE_IMAGES, tmp_path)


def test_evaluation_writes_per_image_f1_csv(trained_run, dev_dir, tmp_path):
    folder, _, _ = trained_run
    settings = {**inference_settings(folder), "network_output": "unet"}
    runs.check_evaluation_writes_scores(BUNDLE, settings, dev_dir, INFERENCE_IMAGES[:2], tmp_path)


def test_bundle_contract_properties_network_and_metadata(dev_dir, tmp_path):
    runs.check_bundle_contract(BUNDLE, dev_dir, NETWORKS, tmp_path)


@pytest.mark.parametrize("config", ["inference.yaml", "train.yaml"])
def test_shipped_interior_components_give_back_the_boundary_band(config):
    """The 3-class targets make a cell's interior the cell less a 2-px band; a prediction equal to those targets,
    through the interior components the bundle ships (inference and validation), gives back the whole cell, not
    its interior. Without the band the IoU is 0.66 for the radius-10 disk and 0.36, under the challenge's 0.5,
    for the radius-5 one.

    A dark-field image's components grow by expand_px: both cells come back (IoU > 0.85). Any other image's grow
    into the predicted foreground, which in the targets is the cell and the one-pixel ring the boundary class
    reaches into the background; there the radius-5 cell, whose interior (29 px) is under foreground_min_size, is
    dropped."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / config))
    parser.update({"bundle_root": str(BUNDLE)})
    postprocess = parser.get_parsed_content("postprocessing_choices#interior")
    assert parser.get_parsed_content("foreground_min_size") > 29
    rows, cols = np.mgrid[:64, :64]
    cells = np.zeros((64, 64), np.int32)
    cells[(rows - 20) ** 2 + (cols - 20) ** 2 <= 10**2] = 1
    cells[(rows - 44) ** 2 + (cols - 40) ** 2 <= 5**2] = 2
    classes = three_class_map(cells)
    one_hot = np.eye(3, dtype=np.float32)[classes].transpose(2, 0, 1)
    logits = torch.as_tensor(np.concatenate([10 * one_hot, np.zeros((2, 64, 64), np.float32)]))
    # bright cells on a dark field, and the same inverted
    dark_field = torch.as_tensor(np.stack([(cells > 0).astype(np.float32)] * 3))
    found = np.asarray(postprocess({"pred": logits, "image": dark_field})["pred"])[0]
    for cell in (1, 2):
        truth = cells == cell
        ids = np.unique(found[truth])
        assert len(ids[ids > 0]) == 1, f"cell {cell} is found as {ids}"
        mine = found == ids[ids > 0][0]
        assert (mine & truth).sum() / (mine | truth).sum() > 0.85
    found = np.asarray(postprocess({"pred": logits, "image": 1.0 - dark_field})["pred"])[0]
    target_foreground, _ = ndi.label(classes > 0)
    assert set(np.unique(found)) == {0, 1}
    assert np.array_equal(found == 1, target_foreground == target_foreground[20, 20])
    assert not found[cells == 2].any()


def test_in_training_validation_scores_what_the_shipped_inference_scores(dev_dir, unlabeled_dir, tmp_path):
    """train.yaml's validator with the shipped weights gives the mean F1 that inference.yaml's default (the U-Net
    with flips, Gaussian blending, the same post-processing) gives on the same images, so the model.pt a run
    selects is the best for the inference it ships with."""
    names = ["dsb_f4c4db3df4ff.png", "dsb_52a6b8ae4c8e.png"]  # the ensemble without flips scored 0.437 here, not 0.484
    validated, shipped = runs.validation_and_inference_f1(BUNDLE, "crossct", dev_dir, unlabeled_dir, names, tmp_path)
    assert shipped > 0.4  # the shipped weights find cells on these two images
    assert validated == pytest.approx(shipped, abs=1e-4)
