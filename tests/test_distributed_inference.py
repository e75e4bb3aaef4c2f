"""Multi-process inference and evaluation (``multi_gpu_inference.yaml``, ``multi_gpu_evaluate.yaml``) under
``torchrun --nproc_per_node 2`` with gloo on CPU, on real images, against a single-process run of the same
bundle: the same bytes, each file written by one process once, the same failure report and exit status, the
same scores. Shipped weights, smallest settings (the question is sharding, not accuracy)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import bundle_runs as runs

from common.distributed import torchrun_launcher

IMAGES = ["dsb_0121d6759c5a.png", "dsb_1c8b905c9519.png", "dsb_52a6b8ae4c8e.png", "dsb_54793624413c.png", "dsb_55f98f43c152.png"]
UNREADABLE = "broken.png"  # sorts first: rank 0 meets it, rank 1 only hears of it


def torchrun(arguments: list[str], folder: Path, audit: Path | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m monai.bundle ARGUMENTS`` (behind the write audit of ``audit``)."""
    launch = ["-m", "monai.bundle"]
    if audit is not None:
        launcher = folder / "launcher.py"
        launcher.write_text(runs.WRITE_AUDIT_LAUNCHER)
        probe = folder / "probe"
        probe.mkdir()
        launch = [str(launcher), str(audit), str(probe)]
    command = [*torchrun_launcher(2), *launch, *arguments]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=folder, env=environment, capture_output=True, text=True, timeout=600)


def replaced_files(probe: Path) -> list[str]:
    """The final names every rank's atomic writes moved into place (one entry per write; os.replace audits as
    os.rename)."""
    names = []
    for record in probe.glob("writes_rank*.json"):
        writes = json.loads(record.read_text())["writes"]
        names += [Path(entry.split(" ", 1)[1]).name for entry in writes if entry.startswith(("os.rename ", "os.replace "))]
    return [name for name in names if not name.startswith(".")]  # the temporary side of each replace


def test_two_processes_write_what_one_writes_and_name_the_unreadable_file_once(dev_dir, tmp_path):
    bundle = runs.REPO / "bundles" / "crossct_cell_segmentation"
    configs = bundle / "configs"
    folder = runs.folder_of_links(dev_dir, IMAGES, tmp_path / "input")
    (folder / "images" / UNREADABLE).write_bytes(b"not an image")

    def arguments(config_files, output):
        return ["run", "inference", "--config_file", repr([str(configs / name) for name in config_files]),
                "--dataset_dir", str(folder), "--output_dir", str(output)]  # fmt: skip

    single = runs.run_bundle_command(*arguments(["inference.yaml"], tmp_path / "one")[1:], cwd=tmp_path)
    (tmp_path / "two").mkdir()
    double = torchrun(arguments(["inference.yaml", "multi_gpu_inference.yaml"], tmp_path / "two"), tmp_path, tmp_path / "two")
    single_log, double_log = single.stdout + single.stderr, double.stdout + double.stderr

    assert single.returncode != 0 and double.returncode != 0, double_log[-3000:]
    assert "1 image(s) could not be segmented" in double_log, double_log[-3000:]
    assert double_log.count(UNREADABLE) == single_log.count(UNREADABLE) > 0, double_log[-3000:]
    expected = sorted(f"{Path(name).stem}{suffix}" for name in IMAGES for suffix in ("_label.tiff", "_overlay.png"))
    assert sorted(path.name for path in (tmp_path / "one").iterdir()) == expected
    assert sorted(path.name for path in (tmp_path / "two").iterdir()) == expected  # nothing partial, no temporaries
    for name in expected:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert sorted(replaced_files(tmp_path / "probe")) == expected  # each file written once, by one rank
    # both ranks segmented: each logs its own images
    assert all(f"{Path(name).stem}: " in double_log for name in IMAGES), double_log[-3000:]


def test_two_process_evaluation_gathers_the_rows_of_one(dev_dir, tmp_path):
    bundle = runs.REPO / "bundles" / "mt2_cell_segmentation"
    configs = bundle / "configs"
    names = IMAGES[:3]  # rank 0 scores two images, rank 1 one
    dataset = runs.folder_of_links(dev_dir, names, tmp_path / "labeled", with_labels=True)
    settings = json.dumps({"scales": [1.0], "write_overlays": False})

    def arguments(config_files, output):
        return ["run", "evaluating", "--config_file", repr([str(configs / name) for name in config_files]),
                "--dataset_dir", str(dataset), "--output_dir", str(output), "--inference_overrides", settings]  # fmt: skip

    single = runs.run_bundle_command(*arguments(["evaluate.yaml"], tmp_path / "one")[1:], cwd=tmp_path)
    double = torchrun(arguments(["evaluate.yaml", "multi_gpu_evaluate.yaml"], tmp_path / "two"), tmp_path)
    double_log = double.stdout + double.stderr
    assert single.returncode == 0, (single.stdout + single.stderr)[-3000:]
    assert double.returncode == 0, double_log[-3000:]

    rows = (tmp_path / "two" / "f1_scores.csv").read_text()
    assert rows == (tmp_path / "one" / "f1_scores.csv").read_text()
    assert sorted(line.split(",")[0] for line in rows.strip().splitlines()[1:]) == [Path(n).stem for n in names]
    mean_line = next(line for line in single.stdout.splitlines() if line.startswith("all: mean F1"))
    assert double.stdout.count(mean_line) == 1, double_log[-3000:]  # one summary, printed by rank 0


def test_shard_sampler_gives_every_item_to_exactly_one_rank():
    from common.distributed import ShardSampler

    for length, world_size in ((5, 2), (2, 4), (0, 3), (9, 3)):
        shares = [list(ShardSampler(range(length), rank, world_size)) for rank in range(world_size)]
        assert sorted(index for share in shares for index in share) == list(range(length))
        assert [len(ShardSampler(range(length), rank, world_size)) for rank in range(world_size)] == list(map(len, shares))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert list(ShardSampler(range(5), 1, 2)) == [1, 3]
    assert list(ShardSampler(range(7))) == list(range(7))  # no process group: one process takes all


def test_validation_sampler_counts_each_image_once_and_pads_only_when_a_rank_would_be_empty():
    from common.distributed import validation_sampler

    shares = [list(validation_sampler(range(7), rank, 2)) for rank in range(2)]
    assert shares == [[0, 2, 4, 6], [1, 3, 5]]  # MONAI's padded sampler gives rank 1 [1, 3, 5, 0]: image 0 twice
    padded = [list(validation_sampler(range(1), rank, 2)) for rank in range(2)]
    assert padded == [[0], [0]]  # one image, two ranks: both validate it rather than one running an empty loader
    assert list(validation_sampler(range(3))) == [0, 1, 2]  # no process group
