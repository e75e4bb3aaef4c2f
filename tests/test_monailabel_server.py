"""Both bundles in a real MONAI Label 0.8.5 server, driven over HTTP as a MONAI Label client drives it.

The server runs in its own virtualenv (``tests/monailabel/build_venv.sh``: MONAI Label pins numpy < 2 and needs
a CUDA build of torch; about 8 GB, built once and reused from ``$CELLSEG_MONAILABEL_VENV`` or
``~/.cache/cellseg/monailabel-0.8.5-torch-2.14.1``). The bundles are exported with their shipped weights into MONAI Label's
stock ``monaibundle`` app; the studies are an 8-bit RGB PNG, a 16-bit grayscale TIFF and a 2-channel TIFF made
from real images, with their labels in ``labels/final``. Each label the server returns must be the label
``python -m monai.bundle run inference`` writes for that image with the same weights, before and after one epoch
of fine-tuning through ``POST /train``.

Set ``CELLSEG_SKIP_MONAILABEL_SERVER=1`` to skip (e.g. on a machine without the disk space or network).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import bundle_runs as runs
from PIL import Image

from common.bundle_export import export_bundle, extract_bundle
from common.io import read_image, read_label

pytestmark = pytest.mark.skipif(
    os.environ.get("CELLSEG_SKIP_MONAILABEL_SERVER") == "1", reason="CELLSEG_SKIP_MONAILABEL_SERVER=1"
)

BUNDLES = ["mt2_cell_segmentation", "crossct_cell_segmentation"]
VENV = Path(os.environ.get("CELLSEG_MONAILABEL_VENV", Path.home() / ".cache" / "cellseg" / "monailabel-0.8.5-torch-2.14.1"))
BUILD_SCRIPT = runs.REPO / "tests" / "monailabel" / "build_venv.sh"
CROP = (slice(0, 384), slice(128, 512))  # of the 512 x 512 StarDist image: a quicker study with ~40 nuclei
STUDIES = {  # study id -> file name
    "rgb8": "rgb8.png",
    "gray16": "gray16.tif",
    "two_channel": "two_channel.tif",
}
STARTUP_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 1200


def make_studies(dev_dir: Path, folder: Path) -> None:
    """Write the three studies and their labels (``labels/final/<id>.tif``)."""
    (folder / "labels" / "final").mkdir(parents=True)
    rgba = np.asarray(Image.open(dev_dir / "images" / "dsb_0121d6759c5a.png"))
    Image.fromarray(rgba[..., :3]).save(folder / STUDIES["rgb8"])  # 8-bit RGB, 320 x 256
    gray = tifffile.imread(dev_dir / "images" / "stardist_img2d.tif")[CROP]  # 16-bit grayscale
    assert gray.dtype == np.uint16 and gray.ndim == 2
    tifffile.imwrite(folder / STUDIES["gray16"], gray)
    # two channels as multiplexed images store them, (C, H, W): nuclei, and a dimmer second stain
    tifffile.imwrite(folder / STUDIES["two_channel"], np.stack([gray, gray // 3]), photometric="minisblack")
    labels = {
        "rgb8": read_label(dev_dir / "labels" / "dsb_0121d6759c5a_label.tiff"),
        "gray16": read_label(dev_dir / "labels" / "stardist_img2d_label.tiff")[CROP],
    }
    labels["two_channel"] = labels["gray16"]
    for study, label in labels.items():
        tifffile.imwrite(folder / "labels" / "final" / f"{study}.tif", label.astype(np.uint16))


def request(url: str, method: str = "GET", body: dict | None = None, timeout: float = REQUEST_TIMEOUT_S) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    headers = {} if body is None else {"Content-Type": "application/json"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method, headers=headers), timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def server_log_tail(log: Path, characters: int = 6000) -> str:
    return log.read_text(errors="replace")[-characters:] if log.is_file() else "(no server log)"


@pytest.fixture(scope="module")
def monailabel_venv() -> Path:
    built = subprocess.run(["bash", str(BUILD_SCRIPT), str(VENV)], capture_output=True, text=True, timeout=3600)
    assert built.returncode == 0, f"building the MONAI Label venv failed:\n{built.stdout[-3000:]}\n{built.stderr[-3000:]}"
    return VENV


@pytest.fixture(scope="module")
def server(monailabel_venv, dev_dir, tmp_path_factory):
    """(base URL, app folder, studies folder, server log); the server and every process it started are stopped
    afterwards."""
    root = tmp_path_factory.mktemp("monailabel")
    apps, studies, log = root / "apps", root / "studies", root / "server.log"
    environment = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    for name in ("PYTHONPATH", "PIP_FIND_LINKS", "VIRTUAL_ENV"):
        environment.pop(name, None)
    environment["PATH"] = f"{monailabel_venv / 'bin'}{os.pathsep}{environment.get('PATH', '')}"
    subprocess.run([str(monailabel_venv / "bin" / "monailabel"), "apps", "--download", "--name", "monaibundle", "--output", str(apps)],
                   check=True, capture_output=True, env=environment, timeout=300)  # fmt: skip
    for bundle in BUNDLES:
        _, archive = export_bundle(runs.REPO / "bundles" / bundle, root / "dist")
        extract_bundle(archive, apps / "monaibundle" / "model")
    make_studies(dev_dir, studies)
    port = runs.free_port()
    command = [
        str(monailabel_venv / "bin" / "monailabel"), "start_server", "--app", str(apps / "monaibundle"),
        "--studies", str(studies), "--conf", "models", ",".join(BUNDLES), "--conf", "zoo_source", "ngc",
        "--conf", "sam2", "false", "--conf", "preload", "false", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with open(log, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environment, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert process.poll() is None, f"the server exited with {process.returncode}:\n{server_log_tail(log)}"
            try:
                if request(f"{url}/info/", timeout=10)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"no answer from the server in {STARTUP_TIMEOUT_S} s:\n{server_log_tail(log)}"
            time.sleep(2)
        yield url, apps / "monaibundle", studies, log
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (uvicorn, its training and inference subprocesses), SIGKILL to what
    is left after 30 s; fails if any process of the group survives."""
    group = process.pid
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and group_alive(group):
            process.poll()
            time.sleep(0.5)
        if not group_alive(group):
            break
    process.poll()
    assert not group_alive(group), "processes of the MONAI Label server survived SIGKILL"


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    # zombies of the group count as gone
    states = subprocess.run(["ps", "-o", "stat=", "-g", str(group)], capture_output=True, text=True).stdout.split()
    return any(not state.startswith("Z") for state in states)


def bundle_inference(bundle_dir: Path, studies: Path, output: Path) -> None:
    """``python -m monai.bundle run inference`` of the exported bundle, in the project's environment."""
    environment = {**os.environ, "PYTHONPATH": str(bundle_dir)}
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", str(bundle_dir / "configs" / "inference.yaml"),
         "--dataset_dir", str(studies), "--output_dir", str(output), "--write_overlays", "false"],
        cwd=output.parent, env=environment, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


def served_label(url: str, bundle: str, study: str, folder: Path, log: Path) -> np.ndarray:
    status, content = request(f"{url}/infer/{bundle}?image={study}&output=image", method="POST")
    assert status == 200, f"{status}: {content[:2000]!r}\n{server_log_tail(log)}"
    path = folder / f"{bundle}_{study}{Path(STUDIES[study]).suffix}"
    path.write_bytes(content)
    return np.asarray(Image.open(path)) if path.suffix == ".png" else tifffile.imread(path)


def check_labels_match(url: str, bundle: str, app: Path, studies: Path, log: Path, folder: Path) -> None:
    folder.mkdir()
    expected_dir = folder / "bundle_inference"
    bundle_inference(app / "model" / bundle, studies, expected_dir)
    for study, name in STUDIES.items():
        label = served_label(url, bundle, study, folder, log)
        height, width = read_image(studies / name).shape[-2:]
        assert label.shape == (height, width), (study, label.shape)
        assert label.dtype in (np.uint8, np.uint16), (study, label.dtype)  # what a PNG or TIFF study holds
        expected = read_label(expected_dir / f"{study}_label.tiff")
        np.testing.assert_array_equal(label, expected, err_msg=f"{bundle} on {study}")
        assert label.max() > 0, f"{bundle} found no cell in {study}"


def test_info_lists_both_bundles_for_inference_and_training(server):
    url, *_ = server
    status, content = request(f"{url}/info/")
    assert status == 200
    info = json.loads(content)
    for bundle in BUNDLES:
        assert bundle in info["models"] and bundle in info["trainers"], sorted(info["models"])
        assert info["models"][bundle]["labels"] == {"cell": 1}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_served_labels_equal_bundle_inference_before_and_after_fine_tuning(bundle, server, tmp_path):
    url, app, studies, log = server
    model = app / "model" / bundle / "models" / "model.pt"
    shipped = torch.load(model, map_location="cpu", weights_only=True)
    check_labels_match(url, bundle, app, studies, log, tmp_path / "shipped")

    started = log.stat().st_size
    body = {"max_epochs": 1, "val_split": 0.34, "device": "cpu", "multi_gpu": False, "pretrained": True}
    status, content = request(f"{url}/train/{bundle}?run_sync=true", method="POST", body=body)
    training_log = log.read_text(errors="replace")[started:]
    assert status == 200, f"{status}: {content[:2000]!r}\n{training_log[-6000:]}"
    # fine-tuning started from the shipped weights (MONAI Label's loader of models/model.pt) ...
    assert f"Restored all variables from {model}" in training_log, training_log[-6000:]
    # ... and published the new network where MONAI Label serves it
    tuned = torch.load(model, map_location="cpu", weights_only=True)
    assert tuned.keys() == shipped.keys()
    assert any(not torch.equal(tuned[name], shipped[name]) for name in shipped), "training left models/model.pt unchanged"

    check_labels_match(url, bundle, app, studies, log, tmp_path / "fine_tuned")
