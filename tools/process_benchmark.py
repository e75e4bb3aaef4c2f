"""Images per second of each bundle's folder inference in one process and under ``torchrun`` with several
(``python tools/benchmark.py processes``; one JSON line per bundle and process count on stdout).

Every run is the user's command as documented: ``python -m monai.bundle run inference`` with the bundle's
``inference.yaml`` (one process), or ``torchrun --nproc_per_node N`` with ``multi_gpu_inference.yaml`` merged
(gloo on CPU). The cores are split evenly between the processes (``OMP_NUM_THREADS``). The wall time includes
starting the processes and loading the weights, as a user waits for them. Each line also says whether the label
files equal the one-process run's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CELLSEG_SHARED_DATA", REPO.parent / "shared" / "data"))
BUNDLE_DIRS = {"mt2": "mt2_cell_segmentation", "crossct": "crossct_cell_segmentation"}


def _command(bundle: str, processes: int, images: Path, output: Path) -> list[str]:
    from common.distributed import torchrun_launcher

    configs = REPO / "bundles" / BUNDLE_DIRS[bundle] / "configs"
    config_files = [str(configs / "inference.yaml")]
    launch = [sys.executable, "-m", "monai.bundle"]
    if processes > 1:
        config_files.append(str(configs / "multi_gpu_inference.yaml"))
        launch = [*torchrun_launcher(processes), "-m", "monai.bundle"]
    return [*launch, "run", "inference", "--config_file", repr(config_files), "--dataset_dir", str(images),
            "--output_dir", str(output), "--write_overlays", "false"]


def _labels(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*_label.tiff"))}


def processes(bundles: str = "mt2,crossct", counts: str = "1,2", images: int = 12,
              folder: str | Path = SHARED_DATA / "cellseg-dev" / "images"):
    """Segment the first ``images`` images of ``folder`` with each bundle in 1, 2, ... processes.

    Args:
        bundles: "mt2", "crossct" or both, comma-separated.
        counts: process counts, comma-separated; 1 is the single-process command.
        images: how many images of the folder (sorted by name) to segment.
        folder: a folder of images; default the dev images of ``../shared/data``.
    """
    bundles = bundles.split(",") if isinstance(bundles, str) else list(bundles)
    counts = [int(count) for count in (counts.split(",") if isinstance(counts, str) else counts)]
    sources = sorted(path for path in Path(folder).iterdir() if not path.name.startswith("."))[:images]
    if not sources:
        raise FileNotFoundError(f"no images in {folder} (set CELLSEG_SHARED_DATA)")
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="cellseg_processes_") as scratch:
        scratch = Path(scratch)
        (scratch / "images").mkdir()
        for source in sources:
            (scratch / "images" / source.name).symlink_to(source.resolve())
        for bundle in bundles:
            reference = None
            for count in counts:
                output = scratch / f"{bundle}_{count}"
                threads = max(1, cores // count)
                environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                start = time.perf_counter()
                result = subprocess.run(_command(bundle, count, scratch / "images", output), cwd=REPO,
                                        env=environment, stdout=sys.stderr, stderr=sys.stderr)
                seconds = time.perf_counter() - start
                labels = _labels(output)
                reference = labels if reference is None else reference
                print(json.dumps({
                    "benchmark": "processes", "bundle": bundle, "processes": count, "threads_per_process": threads,
                    "images": len(sources), "returncode": result.returncode, "seconds": round(seconds, 1),
                    "images_per_s": round(len(sources) / seconds, 3), "labels_written": len(labels),
                    "labels_equal_first_run": labels == reference,
                }), flush=True)
