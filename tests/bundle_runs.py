"""Helpers shared by the bundle tests: small datalists of real images, bundle workflows with tiny settings, and
``python -m monai.bundle run`` in a subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from common.distributed import free_port  # noqa: F401  (the tests' rendezvous and server ports)

REPO = Path(__file__).resolve().parents[1]


def tool_module(name: str):
    """tools/<name>.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

# Runs ``python -m monai.bundle`` unchanged behind a Python audit hook that records every file the process opens
# for writing (or creates, renames, removes) under a watched folder; the record is named after torchrun's RANK.
WRITE_AUDIT_LAUNCHER = '''
"""python -m monai.bundle ARGS, recording every write under WATCHED into PROBE/writes_rank<RANK>.json."""
import json, os, runpy, sys

watched, probe = (os.path.realpath(p) for p in sys.argv[1:3])
del sys.argv[1:3]
writes = []
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def inside(path):
    try:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False
        resolved = os.path.realpath(os.fsdecode(path))
        return resolved == watched or resolved.startswith(watched + os.sep)
    except (TypeError, ValueError):
        return False


def audit(event, args):
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
        paths = [path] if writing else []
    elif event in ("os.rename", "os.replace", "os.link", "os.symlink"):
        paths = list(args[:2])
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.truncate", "shutil.copyfile", "shutil.rmtree"):
        paths = list(args[:1])
    else:
        return
    writes.extend(f"{event} {os.fsdecode(p)}" for p in paths if inside(p))


sys.addaudithook(audit)
sys.argv = ["monai.bundle", *sys.argv[1:]]
try:
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
finally:
    record = {"rank": int(os.environ["RANK"]), "pid": os.getpid(), "writes": writes}
    with open(os.path.join(probe, f"writes_rank{os.environ['RANK']}.json"), "w") as handle:
        json.dump(record, handle)
'''


def write_datalist(dev_dir: Path, unlabeled_dir: Path, folder: Path, training: list[str], validation: list[str]) -> Path:
    """``folder/datalist.json`` with absolute paths to the named dev images and the first 4 unlabeled ones."""

    def item(name):
        return {"image": str(dev_dir / "images" / name), "label": str(dev_dir / "labels" / f"{Path(name).stem}_label.tiff")}

    unlabeled = sorted((unlabeled_dir / "images").iterdir())[:4]
    datalist = {
        "training": [item(name) for name in training],
        "validation": [item(name) for name in validation],
        "unlabeled": [{"image": str(path)} for path in unlabeled],
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "datalist.json").write_text(json.dumps(datalist))
    return folder


def initialized_workflow(bundle: Path, config: str, workflow_type: str, run_id: str = "run", **overrides):
    """A ``ConfigWorkflow`` of ``bundle/configs/config``, initialized, with ``overrides``."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(bundle / "configs" / config),
        workflow_type=workflow_type,
        run_id=run_id,
        bundle_root=str(bundle),
        **overrides,
    )
    workflow.initialize()
    return workflow


def validation_and_inference_f1(bundle: Path, name: str, dev_dir: Path, unlabeled_dir: Path, names: list[str],
                                folder: Path) -> tuple[float, float]:
    """Mean challenge F1 of the shipped weights on the named dev images twice: by ``train.yaml``'s validator (a
    datalist with them as its validation rows) and by the bundle's default inference (``tools/tradeoff_benchmark``'s
    ``measure``, which scores as ``evaluate.yaml`` does)."""
    dataset_dir = write_datalist(dev_dir, unlabeled_dir, folder / "data", ["dsb_0121d6759c5a.png"], names)
    workflow = initialized_workflow(
        bundle, "train.yaml", "train", run_id="training", dataset_dir=str(dataset_dir), run_dir=str(folder / "run"),
        num_workers=0,
    )  # fmt: skip
    workflow.parser.get_parsed_content("network").load_state_dict(
        torch.load(bundle / "models" / "model.pt", weights_only=True)
    )
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    tradeoff = tool_module("tradeoff_benchmark")
    items = tradeoff.folder_items(folder_of_links(dev_dir, names, folder / "labeled", with_labels=True))
    return float(evaluator.state.metrics["val_f1"]), tradeoff.measure(name, items, {})["f1"]


def parameters(network: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in network.parameters()]


def state_equal(network: torch.nn.Module, state: dict) -> bool:
    """True when every tensor of ``state`` equals the network's."""
    own = network.state_dict()
    return set(own) == set(state) and all(torch.equal(own[key].cpu(), value.cpu()) for key, value in state.items())


def run_bundle_command(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run ARGUMENTS`` in ``cwd``; output captured."""
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=environment,
        timeout=900,
    )


def folder_of_links(dev_dir: Path, names: list[str], folder: Path, with_labels: bool = False) -> Path:
    """``folder/images`` (and ``folder/labels``) holding links to the named dev images (and their labels)."""
    (folder / "images").mkdir(parents=True)
    if with_labels:
        (folder / "labels").mkdir()
    for name in names:
        (folder / "images" / name).symlink_to(dev_dir / "images" / name)
        if with_labels:
            label = f"{Path(name).stem}_label.tiff"
            (folder / "labels" / label).symlink_to(dev_dir / "labels" / label)
    return folder


def override_arguments(overrides: dict) -> list[str]:
    """``--key value`` command-line pairs (values as JSON, which MONAI's CLI parses)."""
    arguments = []
    for key, value in overrides.items():
        arguments += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return arguments


def check_inference_skips_a_corrupt_file(bundle: Path, settings: dict, dev_dir: Path, names: list[str], tmp_path: Path):
    """Run the bundle's inference on the named real images plus a truncated PNG: the good images are written
    at their size (with an overlay when the bundle writes overlays), the bad one is named, the exit status is
    non-zero, and nothing else is left in the output."""
    from common.io import read_label
    from common.workflows import config_values, flag

    folder = folder_of_links(dev_dir, names, tmp_path / "input")
    (folder / "images" / "truncated.png").write_bytes((dev_dir / "images" / "dsb_1c8b905c9519.png").read_bytes()[:2000])
    output = tmp_path / "out"
    result = run_bundle_command(
        "inference",
        "--config_file", str(bundle / "configs" / "inference.yaml"),
        "--dataset_dir", str(folder), "--output_dir", str(output),
        *override_arguments(settings),
        cwd=tmp_path,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    assert "truncated.png" in log and "could not be segmented" in log, log[-3000:]
    written = sorted(path.name for path in output.iterdir())
    default = config_values(bundle / "configs" / "inference.yaml", ["write_overlays"])["write_overlays"]
    suffixes = ["_label.tiff", "_overlay.png"] if flag(settings.get("write_overlays", default)) else ["_label.tiff"]
    assert written == sorted(f"{Path(name).stem}{suffix}" for name in names for suffix in suffixes), written
    for name in names:
        stem = Path(name).stem
        assert read_label(output / f"{stem}_label.tiff").shape == read_label(dev_dir / "labels" / f"{stem}_label.tiff").shape


def check_evaluation_writes_scores(bundle: Path, settings: dict, dev_dir: Path, names: list[str], tmp_path: Path):
    """Run the bundle's evaluate.yaml on a labeled folder of the named images: the CSV holds one row per image
    and the mean and median F1 are printed."""
    dataset = folder_of_links(dev_dir, names, tmp_path / "labeled", with_labels=True)
    output = tmp_path / "eval"
    result = run_bundle_command(
        "evaluating",
        "--config_file", str(bundle / "configs" / "evaluate.yaml"),
        "--dataset_dir", str(dataset), "--output_dir", str(output),
        "--inference_overrides", json.dumps(settings),
        cwd=tmp_path,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    rows = (output / "f1_scores.csv").read_text().strip().splitlines()
    assert rows[0] == "name,tp,fp,fn,precision,recall,f1"
    assert sorted(row.split(",")[0] for row in rows[1:]) == sorted(Path(name).stem for name in names)
    assert "mean F1" in log and "median F1" in log


def check_bundle_contract(bundle: Path, dev_dir: Path, net_overrides: dict, run_dir: Path):
    """MONAI's property checks for training and inference, verify_net_in_out on the inference network, and the
    metadata against the model-zoo schema when ``../shared/schemas`` is there."""
    from monai.bundle import verify_metadata, verify_net_in_out

    configs = bundle / "configs"
    # MONAI Label always sets dataset_dir; the data lists are built from it while the properties are checked
    for workflow_type, config, dataset_dir in (("train", "train.yaml", dev_dir), ("infer", "inference.yaml", dev_dir / "images")):
        outputs = {"run_dir": str(run_dir)} if workflow_type == "train" else {"output_dir": str(run_dir)}
        workflow = initialized_workflow(bundle, config, workflow_type, dataset_dir=str(dataset_dir), **outputs)
        assert workflow.check_properties() in (None, []), (config, workflow.check_properties())
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(configs / "metadata.json"),
        config_file=str(configs / "inference.yaml"),
        n=2,
        any=32,
        device="cpu",
        **net_overrides,
    )
    schema = REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"
    if schema.is_file():
        verify_metadata(meta_file=str(configs / "metadata.json"), filepath=str(schema))


TINY_UNET_FEATURES = [4, 4, 8, 8, 16, 4]
TINY_SWIN_FEATURE_SIZE = 12


def tiny_checkpoint(bundle: str, folder: Path) -> tuple[Path, dict]:
    """The initialised network of ``bundle`` (a folder name under bundles/) at test size, saved as a
    tensor-only state dict in ``folder``; and the config overrides that build that network."""
    from monai.networks.nets import BasicUNet, SwinUNETR

    from common.networks import CrossCTNetworks, MultiHeadUNetPlusPlus, PadToMultiple

    torch.manual_seed(0)
    if bundle.startswith("mt2"):
        network = MultiHeadUNetPlusPlus(features=TINY_UNET_FEATURES)
        settings = {"features": TINY_UNET_FEATURES}
    else:
        unet = BasicUNet(spatial_dims=2, in_channels=3, out_channels=5, features=TINY_UNET_FEATURES)
        swin = SwinUNETR(spatial_dims=2, in_channels=3, out_channels=5, feature_size=TINY_SWIN_FEATURE_SIZE)
        network = CrossCTNetworks(PadToMultiple(unet), PadToMultiple(swin))
        settings = {"unet_features": TINY_UNET_FEATURES, "swin_feature_size": TINY_SWIN_FEATURE_SIZE}
    path = folder / f"{bundle}_tiny.pt"
    torch.save(network.state_dict(), path)
    return path, settings
