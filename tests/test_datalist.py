"""common.datalist and tools/make_datalist.py: split, relative paths, determinism, MONAI loading, errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import fire
import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from bundle_runs import tool_module
from common.datalist import build_datalist, save_datalist, split_names
from common.io import list_images

REPO_ROOT = Path(__file__).resolve().parents[1]


def _tool():
    return tool_module("make_datalist")


def _names(items: list[dict[str, str]]) -> set[str]:
    return {Path(item["image"]).stem for item in items}


def _expected_validation_count(count: int, fraction: float) -> int:
    return min(max(int(round(count * fraction)), 1), count - 1)


def test_split_names_rules():
    names = [f"img{i:02d}" for i in range(10)]
    training, validation = split_names(list(reversed(names)), 0.3, seed=4)
    assert len(validation) == 3 and len(training) == 7
    assert sorted(training + validation) == names
    assert training == sorted(training) and validation == sorted(validation)
    assert split_names(names, 0.3, seed=4) == (training, validation)  # input order does not matter

    assert split_names(names, 0.0, seed=0) == (names, [])
    assert len(split_names(["a", "b"], 0.05, seed=0)[1]) == 1  # at least one validation item
    assert len(split_names(["a", "b"], 0.9, seed=0)[0]) == 1  # never all of them
    assert split_names(["a"], 0.5, seed=0) == (["a"], [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_names(names, 1.0)
    with pytest.raises(ValueError, match="distinct"):
        split_names(["a", "a"], 0.5)


def test_real_datalist(tmp_path, dev_pairs, dev_dir, unlabeled_dir):
    datalist = build_datalist(dev_dir, tmp_path, [unlabeled_dir], val_fraction=0.2, seed=0)
    output = save_datalist(datalist, tmp_path / "lists" / "datalist.json")

    dev_names = {image.stem for image, _ in dev_pairs}
    training, validation = _names(datalist["training"]), _names(datalist["validation"])
    assert len(validation) == _expected_validation_count(len(dev_names), 0.2)
    assert training | validation == dev_names and not training & validation
    assert len(datalist["training"]) + len(datalist["validation"]) == len(dev_pairs)
    assert [Path(item["image"]).name for item in datalist["unlabeled"]] == [p.name for p in list_images(unlabeled_dir)]

    pairs = {image.stem: (image, label) for image, label in dev_pairs}
    for item in datalist["training"] + datalist["validation"]:
        assert "\\" not in item["image"] and not Path(item["image"]).is_absolute()
        image, label = pairs[Path(item["image"]).stem]
        assert (tmp_path / item["image"]).resolve() == image.resolve()
        assert (tmp_path / item["label"]).resolve() == label.resolve()
    for item in datalist["unlabeled"]:
        assert set(item) == {"image"} and (tmp_path / item["image"]).is_file()

    counts = {"training": len(training), "validation": len(validation), "unlabeled": len(datalist["unlabeled"])}
    for key, count in counts.items():
        loaded = load_decathlon_datalist(output, is_segmentation=True, data_list_key=key, base_dir=tmp_path)
        assert len(loaded) == count
        assert all(Path(item["image"]).is_file() for item in loaded)
        assert all(Path(item["label"]).is_file() for item in loaded if "label" in item)


def test_determinism(tmp_path, dev_dir, unlabeled_dir):
    first = save_datalist(build_datalist(dev_dir, tmp_path, [unlabeled_dir], seed=0), tmp_path / "a.json")
    second = save_datalist(build_datalist(dev_dir, tmp_path, [unlabeled_dir], seed=0), tmp_path / "b.json")
    assert first.read_bytes() == second.read_bytes()
    other = build_datalist(dev_dir, tmp_path, [unlabeled_dir], seed=1)
    assert _names(other["validation"]) != _names(json.loads(first.read_text())["validation"])


def test_command_line_tool(tmp_path, dev_dir, unlabeled_dir):
    output = tmp_path / "out" / "datalist.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "tools" / "make_datalist.py"),
            "--labeled_dir", str(dev_dir),
            "--unlabeled_dirs", f"[{unlabeled_dir},{unlabeled_dir}]",
            "--output", str(output),
            "--val_fraction", "0.3",
            "--seed", "2",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    written = json.loads(output.read_text())
    # base_dir defaults to the output's folder
    assert written == build_datalist(dev_dir, output.parent, [unlabeled_dir, unlabeled_dir], val_fraction=0.3, seed=2)
    assert len(written["unlabeled"]) == 2 * len(list_images(unlabeled_dir))


def _small_labeled_folder(root: Path, image_names: list[str], label_names: list[str]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name in image_names:
        (root / "images" / name).write_bytes(np.zeros(16, dtype=np.uint8).tobytes())
    for name in label_names:
        (root / "labels" / name).write_bytes(b"label")
    return root


def test_image_without_label_is_an_error(tmp_path):
    folder = _small_labeled_folder(tmp_path / "set", ["a.png", "b.tif", "c.png"], ["a_label.tiff", "c_label.tiff"])
    with pytest.raises(FileNotFoundError, match="b.tif"):
        build_datalist(folder, tmp_path)
    # the tool's own error path, in-process through fire (a second interpreter start costs seconds)
    with pytest.raises(SystemExit, match="b.tif"):
        fire.Fire(_tool().main, command=["--labeled_dir", str(folder), "--output", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_label_without_image_is_a_warning(tmp_path):
    labels = ["a_label.tiff", "b_label.tiff", "z_label.tiff"]
    folder = _small_labeled_folder(tmp_path / "set", ["a.png", "b.png"], labels)
    with pytest.warns(UserWarning, match="z_label.tiff"):
        datalist = build_datalist(folder, tmp_path / "set", val_fraction=0.5, seed=0)
    assert len(datalist["training"]) == len(datalist["validation"]) == 1
    assert datalist["unlabeled"] == []
    assert {item["label"] for item in datalist["training"] + datalist["validation"]} == {
        "labels/a_label.tiff",
        "labels/b_label.tiff",
    }


def test_missing_folders_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_datalist(tmp_path / "nowhere", tmp_path)
    folder = _small_labeled_folder(tmp_path / "set", ["a.png"], ["a_label.tiff"])
    with pytest.raises(FileNotFoundError, match="pool"):
        build_datalist(folder, tmp_path, [tmp_path / "pool"])


def test_licence_filter_keeps_unlicensed_images_out_of_training(tmp_path, dev_dir, unlabeled_dir):
    allowed = ["CC0-1.0", "MIT", "BSD-3-Clause"]
    datalist = build_datalist(dev_dir, tmp_path, [unlabeled_dir], val_fraction=0.25, seed=0, licenses=allowed)
    with open(dev_dir / "modalities.csv", newline="") as handle:
        licence_of = {row["name"]: row["license"] for row in csv.DictReader(handle)}
    used = _names(datalist["training"]) | _names(datalist["validation"])
    assert used == {name for name, licence in licence_of.items() if licence in allowed}
    held_out = _names(datalist["evaluation_only"])
    assert held_out and held_out == {name for name, licence in licence_of.items() if licence not in allowed}
    assert all(name.startswith("he_") for name in held_out)
    # without the filter nothing is held out and the key is absent
    assert "evaluation_only" not in build_datalist(dev_dir, tmp_path, seed=0)


def test_licence_filter_needs_a_modalities_file(tmp_path):
    folder = _small_labeled_folder(tmp_path / "set", ["a.png", "b.png"], ["a_label.tiff", "b_label.tiff"])
    with pytest.raises(FileNotFoundError, match="modalities.csv"):
        build_datalist(folder, tmp_path, licenses=["MIT"])
    (folder / "modalities.csv").write_text("name,license\na,MIT\nb,unknown\n")
    datalist = build_datalist(folder, tmp_path, val_fraction=0.0, licenses=["MIT"])
    assert _names(datalist["training"]) == {"a"} and _names(datalist["evaluation_only"]) == {"b"}
    with pytest.raises(ValueError, match="no labeled image"):
        build_datalist(folder, tmp_path, licenses=["CC0-1.0"])


def test_train_dirs_add_training_images_and_leave_the_validation_split_alone(tmp_path, dev_dir, unlabeled_dir):
    allowed = ["CC0-1.0", "MIT", "BSD-3-Clause"]
    pool = _small_labeled_folder(tmp_path / "pool", ["p1.png", "p2.tif", "p3.png"], ["p1_label.tiff", "p2_label.tiff", "p3_label.tiff"])
    (pool / "modalities.csv").write_text(
        "name,modality,source,license\np1,fluorescence (nuclei),x,CC0-1.0\np2,phase-contrast (whole cells),x,MIT\np3,brightfield (H&E),x,unknown\n"
    )
    alone = build_datalist(dev_dir, tmp_path, [unlabeled_dir], val_fraction=0.25, seed=0, licenses=allowed)
    pooled = build_datalist(dev_dir, tmp_path, [unlabeled_dir], val_fraction=0.25, seed=0, licenses=allowed, train_dirs=[pool])
    assert pooled["validation"] == alone["validation"]
    assert _names(pooled["training"]) == _names(alone["training"]) | {"p1", "p2"}  # p3's licence keeps it out
    modality = {Path(item["image"]).stem: item.get("modality") for item in pooled["training"]}
    assert modality["p1"] == "fluorescence (nuclei)" and modality["p2"] == "phase-contrast (whole cells)"
    assert all(item.get("modality") for item in pooled["training"])  # dev's own rows carry theirs too
    # a pool that repeats a name of the labeled folder would put one image in training and validation
    clash = _small_labeled_folder(tmp_path / "clash", ["dsb_52a6b8ae4c8e.png"], ["dsb_52a6b8ae4c8e_label.tiff"])
    with pytest.raises(ValueError, match="repeats image names"):
        build_datalist(dev_dir, tmp_path, train_dirs=[clash])
    # the tool takes a list of pool folders
    output = tmp_path / "tool" / "datalist.json"
    fire.Fire(_tool().main, command=["--labeled_dir", str(dev_dir), "--output", str(output), "--val_fraction", "0.25",
                                     "--train_dirs", f"[{pool}]", "--licenses", "[CC0-1.0,MIT,BSD-3-Clause]"])
    written = json.loads(output.read_text())
    assert len(written["training"]) == len(alone["training"]) + 2
