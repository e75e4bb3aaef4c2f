"""What MONAI Label needs from each bundle, checked on the exported (standalone) copy: MONAI's property checks
(MetaProperties + InferProperties, MetaProperties + TrainProperties), inference driven the way MONAI Label's
BundleInferTask drives it, and training driven the way its BundleTrainTask does (the steps below follow MONAI
Label 0.8.5's source). These run in the project's environment in seconds; the real server, in its own environment,
is driven over HTTP by tests/test_monailabel_server.py."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import bundle_runs as runs
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle.properties import InferProperties, MetaProperties, TrainProperties
from monai.transforms import Compose

from common.bundle_export import export_bundle
from common.io import read_image

BUNDLES = ["mt2_cell_segmentation", "crossct_cell_segmentation"]
IMAGE = "dsb_9774c8239632.png"  # 256 x 256 RGBA
TRAIN_IMAGES = ["dsb_0121d6759c5a.png", "stardist_img2d.tif"]
VALIDATION_IMAGES = ["he_image02.png"]
TRAIN_SETTINGS = {"patch_size": [64, 64], "batch_size": 2, "unlabeled_batch_size": 2, "val_interval": 1, "num_workers": 0}


@pytest.fixture(scope="module", params=BUNDLES)
def exported(request, tmp_path_factory):
    """(bundle name, exported folder with a tiny models/model.pt, the overrides that build its networks)."""
    folder = tmp_path_factory.mktemp(request.param)
    checkpoint, networks = runs.tiny_checkpoint(request.param, folder)
    bundle, _ = export_bundle(runs.REPO / "bundles" / request.param, folder / "dist", checkpoint=checkpoint)
    return request.param, bundle, networks


@contextmanager
def served(bundle: Path):
    """The bundle folder on sys.path and its ``scripts`` package unloaded afterwards, as MONAI Label does around
    every use of a bundle (two bundles each have a ``scripts`` package)."""
    sys.path.insert(0, str(bundle))
    try:
        yield
    finally:
        sys.path.remove(str(bundle))
        for name in [name for name in sys.modules if name == "scripts" or name.startswith("scripts.")]:
            del sys.modules[name]


@pytest.mark.parametrize("workflow_type, config, properties", [
    ("infer", "inference.yaml", {**MetaProperties, **InferProperties}),
    ("train", "train.yaml", {**MetaProperties, **TrainProperties}),
])  # fmt: skip
def test_monai_property_checks_find_nothing_missing(exported, dev_dir, tmp_path, workflow_type, config, properties):
    _, bundle, networks = exported
    dataset_dir = dev_dir / "images" if workflow_type == "infer" else dev_dir
    with served(bundle):
        workflow = ConfigWorkflow(
            config_file=str(bundle / "configs" / config),
            workflow_type=workflow_type,
            bundle_root=str(bundle),
            dataset_dir=str(dataset_dir),
            output_dir=str(tmp_path),
            run_dir=str(tmp_path),
            **networks,
        )
        workflow.initialize()
        assert set(workflow.properties) == set(properties)
        assert workflow.check_properties() == []


def monai_label_inference(bundle: Path, image: Path, overrides: dict) -> tuple[dict, dict, object]:
    """One image through the bundle the way BundleInferTask + BasicInferTask do it: the inference config parsed
    with ``bundle_root`` and ``device`` overridden, ``network_def`` instantiated and ``models/model.pt`` loaded
    (its "model" entry or the whole dict, non-strict), the ``preprocessing`` transforms on ``{"image": path}``,
    the ``inferer`` on the batched image, the first item of its output under the metadata's first output key,
    then the ``postprocessing`` transforms. Label names come from that output's ``channel_def``.

    Returns:
        (the data after post-processing, the label names {name: value}, the raw network output).
    """
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.yaml"))
    parser.config.update({"bundle_root": str(bundle), "device": "cpu", **overrides})
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    key_image, _ = next(iter(metadata["network_data_format"]["inputs"].items()))
    key_pred, pred = next(iter(metadata["network_data_format"]["outputs"].items()))
    labels = {name.lower(): int(value) for value, name in pred.get("channel_def", {}).items() if name.lower() != "background"}

    network = parser.get_parsed_content("network_def", instantiate=True)
    checkpoint = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(checkpoint.get("model", checkpoint), strict=False)
    network.eval()

    def transforms(key):
        content = parser.get_parsed_content(key, instantiate=True)
        return list(content.transforms) if isinstance(content, Compose) else [content]

    data = {key_image: str(image), "image_path": str(image)}
    for transform in transforms("preprocessing"):
        data = transform(data)
    inferer = parser.get_parsed_content("inferer", instantiate=True)
    with torch.no_grad():
        raw = network(data[key_image][None].float())
        data[key_pred] = inferer(data[key_image][None], network)[0]
    for transform in transforms("postprocessing"):
        data = transform(data)
    return data, labels, raw


def test_inference_as_monai_label_runs_it_gives_a_cell_label_of_the_image_size(exported, dev_dir):
    name, bundle, networks = exported
    with served(bundle):
        data, labels, raw = monai_label_inference(bundle, dev_dir / "images" / IMAGE, {**networks, "roi_size": [64, 64]})
        assert sys.modules["scripts.common"].__file__ == str(bundle / "scripts" / "common" / "__init__.py")
    assert isinstance(raw, torch.Tensor) and raw.shape[1] == 5, type(raw)
    assert labels == {"cell": 1}
    # what MONAI Label's ITK writer takes for a PNG study: 2-D, 8 or 16 bits, in MONAI's (x, y) order
    prediction = data["pred"]
    assert prediction.shape == read_image(dev_dir / "images" / IMAGE).shape[-2:][::-1]
    assert prediction.dtype == np.uint16 and int(prediction.min()) == 0


def test_training_as_monai_label_runs_it_from_labeled_lists_alone(exported, dev_dir):
    """BundleTrainTask sets bundle_root, device, train#trainer#max_epochs, train#dataset#data,
    validate#dataset#data and train#handlers (with a CheckpointLoader of models/model.pt put first) and runs
    the "run" id; it never sets dataset_dir."""
    from monai.bundle import run

    name, bundle, networks = exported

    def items(names):
        return [{"image": str(dev_dir / "images" / n), "label": str(dev_dir / "labels" / f"{Path(n).stem}_label.tiff")} for n in names]

    config = bundle / "configs" / "train.yaml"
    parser = ConfigParser()
    parser.read_config(str(config))
    handlers = parser.get("train#handlers", [])
    handlers.insert(0, {"_target_": "CheckpointLoader", "load_path": str(bundle / "models" / "model.pt"), "load_dict": {"model": "$@network"}, "strict": False})
    overrides = {
        "bundle_root": str(bundle),
        "train#trainer#max_epochs": 1,
        "train#dataset#data": items(TRAIN_IMAGES),
        "device": "cpu",
        "train#handlers": handlers,
        "validate#dataset#data": items(VALIDATION_IMAGES),
    }
    before = torch.load(bundle / "models" / "model.pt", weights_only=True)
    with served(bundle):
        run(run_id="run", meta_file=str(bundle / "configs" / "metadata.json"), config_file=str(config), **overrides, **networks, **TRAIN_SETTINGS)
    # an exported bundle publishes the trained network where MONAI Label serves it from
    after = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert after.keys() == before.keys() and any(not torch.equal(after[k], before[k]) for k in before)
    # the handlers MONAI Label passed are the trainer's: the bundle's checkpointer among them wrote epoch 1
    trainer_state = torch.load(bundle / "runs" / "checkpoint_last.pt", weights_only=True)["trainer"]
    assert trainer_state["iteration"] == trainer_state["epoch_length"] > 0
    assert (bundle / "runs" / "model.pt").is_file()
