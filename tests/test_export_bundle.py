"""Standalone bundles: the export rewrites every reference to the shared package; its zip, fetched with MONAI's
own ``python -m monai.bundle download``, segments a real image in another folder without the repository's
``common``; zips whose members would leave the target folder are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import bundle_runs as runs

from common.bundle_export import export_bundle, extract_bundle, rewrite_references
from common.io import read_image, read_label

TOOL = runs.REPO / "tools" / "export_bundle.py"
IMAGE = "dsb_9774c8239632.png"  # 256 x 256 RGBA

# Runs `python -m monai.bundle ARGS` with the repository's `common` made unimportable (the venv has the repository
# installed in editable mode), then lists every loaded module that lives in the repository.
ISOLATED_BUNDLE_RUN = """
import runpy, sys
repository = sys.argv.pop(1)

class RepositoryCommonBlocker:
    def find_spec(self, name, path=None, target=None):
        if name == "common" or name.startswith("common."):
            raise ModuleNotFoundError(f"the exported bundle imported the repository's {name!r}")
        return None

sys.meta_path.insert(0, RepositoryCommonBlocker())
sys.argv = ["monai.bundle", *sys.argv[1:]]
try:
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
finally:
    files = [getattr(module, "__file__", None) or "" for module in list(sys.modules.values())]
    print("REPOSITORY_MODULES", [name for name in files if name.startswith(repository)])
    print("SCRIPTS_COMMON", getattr(sys.modules.get("scripts.common"), "__file__", None))
"""


@pytest.mark.parametrize("bundle", ["mt2_cell_segmentation", "crossct_cell_segmentation"])
def test_downloaded_bundle_segments_a_real_image_outside_the_repository(bundle, dev_dir, tmp_path):
    checkpoint, networks = runs.tiny_checkpoint(bundle, tmp_path)
    settings = {**networks, "roi_size": [64, 64], "num_workers": 0, "write_overlays": False}
    folder, archive = export_bundle(runs.REPO / "bundles" / bundle, tmp_path / "dist", checkpoint=checkpoint)
    assert (folder / "models" / "model.pt").read_bytes() == checkpoint.read_bytes()
    version = json.loads((runs.REPO / "bundles" / bundle / "configs" / "metadata.json").read_text())["version"]
    assert archive.name == f"{bundle}_v{version}.zip"  # the model zoo's release asset name
    # MONAI's own downloader, as a user runs it on a published archive
    downloaded = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "download", "--name", bundle, "--url", archive.as_uri(),
         "--bundle_dir", str(tmp_path / "elsewhere" / "bundles")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert downloaded.returncode == 0, (downloaded.stdout + downloaded.stderr)[-4000:]
    unpacked = tmp_path / "elsewhere" / "bundles" / bundle
    assert (unpacked / "models" / "model.pt").read_bytes() == checkpoint.read_bytes()
    images = tmp_path / "input"
    images.mkdir()
    (images / IMAGE).symlink_to(dev_dir / "images" / IMAGE)
    output, workdir = tmp_path / "labels", tmp_path / "workdir"
    workdir.mkdir()

    environment = {**os.environ, "PYTHONPATH": str(unpacked), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    result = subprocess.run(
        [sys.executable, "-c", ISOLATED_BUNDLE_RUN, str(runs.REPO), "run", "inference",
         "--config_file", str(unpacked / "configs" / "inference.yaml"),
         "--dataset_dir", str(images), "--output_dir", str(output), *runs.override_arguments(settings)],
        cwd=workdir, env=environment, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "REPOSITORY_MODULES []" in log, log[-4000:]
    assert f"SCRIPTS_COMMON {unpacked / 'scripts' / 'common' / '__init__.py'}" in log, log[-4000:]
    label = read_label(output / f"{Path(IMAGE).stem}_label.tiff")
    assert label.shape == read_image(dev_dir / "images" / IMAGE).shape[-2:]


def fake_bundle(root: Path) -> Path:
    """A minimal bundle referring to ``common`` in every way the configs and scripts do, plus training
    artefacts and caches that must stay out of an export."""
    bundle = root / "demo_bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "scripts" / "__pycache__").mkdir(parents=True)
    (bundle / "runs").mkdir()
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1.0"}))
    (bundle / "configs" / "inference.yaml").write_text(
        "imports:\n  - $import common.workflows\n  - $import common\n"
        "bundle_root: $common.workflows.bundle_root_from_argv()\n"
        "reader:\n  _target_: common.io.LoadMicroscopyd  # common.io reads every format\n  keys: image\n"
    )
    (bundle / "scripts" / "__init__.py").write_text("from common import io\nimport common.folders\n")
    (bundle / "scripts" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"cache")
    (bundle / "runs" / "checkpoint_last.pt").write_bytes(b"artefact")
    return bundle


def test_export_rewrites_references_vendors_common_and_leaves_out_artefacts(tmp_path):
    folder, archive = export_bundle(fake_bundle(tmp_path), tmp_path / "dist")
    config = (folder / "configs" / "inference.yaml").read_text()
    assert config == (
        "imports:\n  - $import scripts.common.workflows\n  - $import scripts\n"
        "bundle_root: $scripts.common.workflows.bundle_root_from_argv()\n"
        "reader:\n  _target_: scripts.common.io.LoadMicroscopyd  # scripts.common.io reads every format\n  keys: image\n"
    )
    assert (folder / "scripts" / "__init__.py").read_text() == "from scripts.common import io\nimport scripts.common.folders\n"
    vendored = folder / "scripts" / "common"
    assert sorted(p.name for p in vendored.glob("*.py")) == sorted(p.name for p in (runs.REPO / "common").glob("*.py"))
    assert "from scripts.common.io import" in (vendored / "folders.py").read_text()
    assert not (folder / "runs").exists() and not list(folder.rglob("__pycache__"))
    assert archive.name == "demo_bundle_v0.1.0.zip"
    with zipfile.ZipFile(archive) as opened:
        zipped = {name.rstrip("/") for name in opened.namelist()}
    assert zipped == {f"demo_bundle/{path.relative_to(folder).as_posix()}" for path in folder.rglob("*")}


def test_export_refuses_a_version_that_cannot_name_the_archive(tmp_path):
    bundle = fake_bundle(tmp_path)
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"version": "../0.1"}))
    with pytest.raises(ValueError, match="not a dotted version"):
        export_bundle(bundle, tmp_path / "dist")
    assert not (tmp_path / "dist").exists()


def test_rewrite_touches_only_references_to_the_top_level_package():
    assert rewrite_references("$import common", config=True) == "$import scripts"
    assert rewrite_references("import common", config=False) == "import scripts.common"
    assert rewrite_references("$import common as c", config=True) == "$import scripts.common as c"
    assert rewrite_references("from common import io", config=False) == "from scripts.common import io"
    untouched = "monai.common.x uncommon.x common_name x.common.y 'common' in common sense."
    assert rewrite_references(untouched, config=True) == untouched


def test_export_refuses_what_it_cannot_make_standalone(tmp_path):
    bundle = fake_bundle(tmp_path)
    (bundle / "configs" / "train.yaml").write_text("loader: \"$__import__('common').io\"\n")
    with pytest.raises(ValueError, match=r"train\.yaml.*__import__\('common'\)"):
        export_bundle(bundle, tmp_path / "dist")
    assert not (tmp_path / "dist" / "demo_bundle").exists() and not list((tmp_path / "dist").iterdir())

    (bundle / "configs" / "train.yaml").unlink()
    export_bundle(bundle, tmp_path / "dist")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_bundle(bundle, tmp_path / "dist")
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"version": "0.2.0"}))
    folder, _ = export_bundle(bundle, tmp_path / "dist", overwrite=True)
    assert json.loads((folder / "configs" / "metadata.json").read_text()) == {"version": "0.2.0"}

    pickled = tmp_path / "not_a_state_dict.pt"
    torch.save({"epoch": 3, "note": "not weights"}, pickled)
    with pytest.raises(ValueError, match="not_a_state_dict.pt"):
        export_bundle(bundle, tmp_path / "dist", checkpoint=pickled, overwrite=True)
    with pytest.raises(ValueError, match="already carries scripts/common"):
        export_bundle(folder, tmp_path / "again")


def test_extraction_replaces_a_bundle_only_when_asked_and_never_mixes_versions(tmp_path):
    _, archive = export_bundle(fake_bundle(tmp_path), tmp_path / "dist")
    target = tmp_path / "model"
    folder = extract_bundle(archive, target)
    (folder / "stale.txt").write_text("from an older version")
    with pytest.raises(FileExistsError, match="overwrite"):
        extract_bundle(archive, target)
    assert (folder / "stale.txt").is_file()
    assert extract_bundle(archive, target, overwrite=True) == folder
    assert not (folder / "stale.txt").exists() and (folder / "configs" / "inference.yaml").is_file()
    assert sorted(path.name for path in target.iterdir()) == ["demo_bundle"]


def evil_zip(path: Path, member: str, link: bool = False) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("bundle/configs/metadata.json", "{}")
        info = zipfile.ZipInfo(member)
        if link:
            info.external_attr = (0o120777 << 16)  # a symbolic link
        archive.writestr(info, "/etc/passwd" if link else "escaped")
    return path


@pytest.mark.parametrize(
    "member, link",
    [("bundle/../../escaped.txt", False), ("/tmp/escaped.txt", False), ("C:/escaped.txt", False), ("bundle/link", True)],
)
def test_extraction_refuses_members_that_leave_the_target_and_writes_nothing(tmp_path, member, link):
    archive = evil_zip(tmp_path / "evil.zip", member, link)
    target = tmp_path / "deep" / "target"
    with pytest.raises(ValueError, match="refusing to extract") as error:
        extract_bundle(archive, target)
    assert repr(member) in str(error.value)
    assert not target.exists() and not (tmp_path / "escaped.txt").exists()


def test_extract_command_refuses_a_zip_with_a_parent_member(tmp_path):
    archive = evil_zip(tmp_path / "evil.zip", "bundle/../../escaped.txt")
    result = subprocess.run(
        [sys.executable, str(TOOL), "extract", str(archive), "--target_dir", str(tmp_path / "target")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "refusing to extract" in result.stderr and "bundle/../../escaped.txt" in result.stderr, result.stderr
    assert not (tmp_path / "target").exists()
