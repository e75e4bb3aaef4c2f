"""Speed benchmarks of the shared code; each sub-command prints one JSON line per figure on stdout.

    python tools/benchmark.py targets [--size 2048] [--cells 600] [--seed 0] [--repeats 1] [--naive_cells 64]
    python tools/benchmark.py metric [--size 2048] [--cells 5000] [--seed 0] [--repeats 3]
    python tools/benchmark.py inference [--size 1024] [--threads N]
    python tools/benchmark.py wsi [--size 10000] [--bundles mt2,crossct] [--threads N] [--overrides '{...}']
    python tools/benchmark.py training [--bundles mt2,crossct] [--steps 10] [--force_bf16]   (tools/training_benchmark.py)
    python tools/benchmark.py processes [--bundles mt2,crossct] [--counts 1,2] [--images 12]   (tools/process_benchmark.py)
    python tools/benchmark.py tradeoff [--bundle mt2] [--dataset_dir D] [--settings '[{...}]'] [--output_dir O] [--rounds 3]   (tools/tradeoff_benchmark.py)

``inference`` and ``wsi`` use the bundles' inference configs with their default settings and the shipped
``models/model.pt`` when there is one, else randomly initialized weights (speed and memory do not depend on them).

Sub-commands are registered in ``COMMANDS`` at the bottom; add new ones there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import fire
import numpy as np
import tifffile
import torch
from monai.bundle import ConfigParser
from PIL import Image
from scipy.optimize import linear_sum_assignment
from skimage.draw import ellipse
from skimage.segmentation import expand_labels
from tqdm import tqdm

from common.io import label_path_for, read_image, read_label
from common.metrics import MatchCounts, challenge_counts, remove_border_instances
from common.targets import cell_distance_map, mt2_heatmaps, neighbor_distance_map, three_class_map
from common.workflows import inference_config, loaded_network

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/ itself, also when loaded by path (tests)
from process_benchmark import processes  # noqa: E402
from training_benchmark import training  # noqa: E402
from tradeoff_benchmark import tradeoff  # noqa: E402

# Share of the image the ellipses cover before they are grown into contact: far enough below the jamming limit
# of random sequential placement that rejection sampling finds room for every cell quickly.
_FILL = 0.35


def synthetic_label(size: int = 2048, cells: int = 600, seed: int = 0) -> np.ndarray:
    """A reproducible crowded instance label: random non-overlapping ellipses, then grown until many touch.

    Args:
        size: side of the square label (px).
        cells: number of instances.
        seed: random seed.

    Returns:
        (size, size) int32 label with ids 1..cells, 0 = background.
    """
    if size < 16 or cells < 1:
        raise ValueError(f"need size >= 16 and cells >= 1, got size={size}, cells={cells}")
    rng = np.random.default_rng(seed)
    mean_radius = np.sqrt(_FILL * size * size / cells / np.pi)
    if mean_radius < 3:
        raise ValueError(f"{cells} cells do not fit in {size}x{size} (mean radius {mean_radius:.1f} px < 3 px)")
    label = np.zeros((size, size), np.int32)
    placed, attempts = 0, 0
    while placed < cells:
        attempts += 1
        if attempts > 100 * cells:
            raise RuntimeError(f"placed only {placed} of {cells} cells in {attempts} attempts; lower --cells")
        radius = mean_radius * rng.uniform(0.6, 1.4)
        rows, cols = ellipse(*rng.uniform(0, size, 2), radius, radius * rng.uniform(0.6, 1.0),
                             shape=label.shape, rotation=rng.uniform(0, np.pi))
        if rows.size == 0 or label[rows, cols].any():
            continue
        placed += 1
        label[rows, cols] = placed
    # growing every cell into the background by half a radius closes most gaps between neighbours
    return expand_labels(label, distance=mean_radius / 2).astype(np.int32)


def mosaic_placements(sizes: Sequence[tuple[int, int]], height: int, width: int) -> list[tuple[int, int, int]]:
    """Where blocks go to fill a ``height`` x ``width`` canvas: left to right in rows, cycling through the blocks
    from the tallest to the shortest until the canvas is full, so that blocks of a row have similar heights (a row
    is as tall as its tallest block; blocks at the right and bottom edges are cropped there).

    Args:
        sizes: (h, w) of each block.
        height, width: canvas size (px).

    Returns:
        (block index, top, left) of each placement, in order.
    """
    if not sizes or min(min(size) for size in sizes) < 1:
        raise ValueError(f"need at least one block with positive sides, got {list(sizes)}")
    order = sorted(range(len(sizes)), key=lambda index: -sizes[index][0])
    placements, top, count = [], 0, 0
    while top < height:
        left, row_height = 0, 0
        while left < width:
            index = order[count % len(order)]
            placements.append((index, top, left))
            left += sizes[index][1]
            row_height = max(row_height, sizes[index][0])
            count += 1
        top += row_height
    return placements


def touching_fraction(label: np.ndarray) -> float:
    """Share of the instances that touch (4-neighbourhood) at least one other instance."""
    touching = set()
    for a, b in ((label[1:], label[:-1]), (label[:, 1:], label[:, :-1])):
        contact = (a != b) & (a > 0) & (b > 0)
        touching.update(np.unique(a[contact]).tolist(), np.unique(b[contact]).tolist())
    count = len(np.unique(label[label > 0]))
    return len(touching) / count if count else 0.0


def _timed(function: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    """Best wall time over ``repeats`` calls, and the last result."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def targets(size: int = 2048, cells: int = 600, seed: int = 0, repeats: int = 1, naive_cells: int | None = 64):
    """Cropped vs whole-image per-instance computation of the training targets on a synthetic label.

    Args:
        size: side of the synthetic label (px).
        cells: number of instances in it.
        seed: random seed of the label.
        repeats: timed runs per path; the best is reported (the whole-image path runs once).
        naive_cells: time the whole-image path on the instances with the N smallest ids only and
            extrapolate linearly (its cost per instance does not depend on the others); None or 0 times all
            of them (about 15 minutes for 600 cells on 2048^2). The equality check then runs on that subset.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if naive_cells is not None and naive_cells < 0:
        raise ValueError(f"naive_cells must be >= 0 or None, got {naive_cells}")
    label = synthetic_label(size, cells, seed)
    ids = np.unique(label[label > 0])
    subset = bool(naive_cells) and naive_cells < len(ids)
    naive_label = np.where(label <= ids[naive_cells - 1], label, 0) if subset else label
    common_fields = {"benchmark": "targets", "cells": int(len(ids)), "size": size, "seed": seed,
                     "touching_fraction": round(touching_fraction(label), 3)}
    functions = {"mt2_heatmaps": mt2_heatmaps, "cell_distance_map": cell_distance_map,
                 "neighbor_distance_map": neighbor_distance_map}
    for name, function in tqdm(functions.items(), desc="targets", unit="target"):
        cropped_s, cropped = _timed(lambda: function(label), repeats)
        naive_s, naive = _timed(lambda: function(naive_label, crop=False), 1)
        if subset:
            cropped = function(naive_label)
        line = dict(common_fields, target=name)
        if subset:
            line.update(naive_extrapolated_from=int(naive_cells), naive_measured_s=round(naive_s, 3))
            naive_s *= len(ids) / naive_cells
        line.update(naive_s=round(naive_s, 3), cropped_s=round(cropped_s, 4), ratio=round(naive_s / cropped_s, 1),
                    max_abs_diff=float(np.abs(naive - cropped).max()))
        tqdm.write(json.dumps(line))


# ---------------------------------------------------------------------------------------------- metric


def _perturbed(label: np.ndarray, seed: int) -> np.ndarray:
    """A prediction-like map of ``label``: shifted by (1, 2) px, 5 % of the cells erased, 5 % merged into the cell
    with the next id, and every cell grown by 1 px into the background."""
    rng = np.random.default_rng(seed)
    ids = np.arange(int(label.max()) + 1)
    lookup = ids.copy()
    erased, merged = rng.choice(ids[1:-1], size=(2, len(ids) // 20), replace=False)
    lookup[erased] = 0
    lookup[merged] = merged + 1
    return expand_labels(lookup[np.roll(label, (1, 2), axis=(0, 1))], 1).astype(np.int32)


def dense_challenge_counts(gt: np.ndarray, pred: np.ndarray) -> MatchCounts:
    """The organizers' way to the same counts: border removal, a dense (n_gt + 1) x (n_pred + 1) overlap matrix,
    dense IoU, and the Hungarian algorithm on every pair (cost ``-(iou >= 0.5) - iou / (2 min(n_gt, n_pred))``)."""
    gt, pred = remove_border_instances(gt), remove_border_instances(pred)
    n_gt, n_pred = int(gt.max()), int(pred.max())
    keys = gt.ravel().astype(np.int64) * (n_pred + 1) + pred.ravel()
    overlap = np.bincount(keys, minlength=(n_gt + 1) * (n_pred + 1)).reshape(n_gt + 1, n_pred + 1)
    union = overlap.sum(axis=1, keepdims=True) + overlap.sum(axis=0, keepdims=True) - overlap
    iou = (overlap / np.maximum(union, 1))[1:, 1:]
    rows, cols = linear_sum_assignment(-(iou >= 0.5).astype(np.float64) - iou / (2 * min(n_gt, n_pred)))
    tp = int(np.count_nonzero(iou[rows, cols] >= 0.5))
    return MatchCounts(tp=tp, fp=n_pred - tp, fn=n_gt - tp)


def metric(size: int = 2048, cells: int = 5000, seed: int = 0, repeats: int = 3):
    """The challenge F1 counts the organizers' dense way vs ``common.metrics.challenge_counts`` (sparse).

    Args:
        size: side of the synthetic label (px).
        cells: instances in it (the ground truth); the prediction is a perturbed copy (see ``_perturbed``).
        seed: random seed.
        repeats: timed runs of the sparse count; the best is reported (the dense one runs once).
    """
    gt = synthetic_label(size, cells, seed)
    pred = _perturbed(gt, seed)
    dense_s, dense = _timed(lambda: dense_challenge_counts(gt, pred), 1)
    sparse_s, sparse = _timed(lambda: challenge_counts(gt, pred), repeats)
    line = {"benchmark": "metric", "size": size, "gt_cells": int(gt.max()), "pred_cells": int(len(np.unique(pred)) - 1),
            "dense_s": round(dense_s, 3), "sparse_s": round(sparse_s, 4), "ratio": round(dense_s / sparse_s, 1),
            "dense_tp_fp_fn": [dense.tp, dense.fp, dense.fn], "sparse_tp_fp_fn": [sparse.tp, sparse.fp, sparse.fn],
            "identical": dense == sparse}
    print(json.dumps(line), flush=True)


# ---------------------------------------------------------------------------------------------- bundles

REPO = Path(__file__).resolve().parents[1]
BUNDLES = {"mt2": "mt2_cell_segmentation", "crossct": "crossct_cell_segmentation"}
DEV_DIR = Path(os.environ.get("CELLSEG_SHARED_DATA", REPO.parent / "shared" / "data")) / "cellseg-dev"


def dev_mosaic(height: int, width: int, min_cells_per_mpx: float = 0, dev_dir: str | Path = DEV_DIR):
    """An RGB image tiled from the real 8-bit RGB(A) dev images (their PNGs) and the matching instance label.

    Args:
        height, width: mosaic size (px).
        min_cells_per_mpx: use only the images whose labels hold at least this many cells per Mpx.
        dev_dir: the labeled dev set (``images/``, ``labels/``).

    Returns:
        (height, width, 3) uint8 image and (height, width) int32 label with unique ids.
    """
    names = sorted(path.stem for path in (Path(dev_dir) / "images").glob("*.png"))
    labels = [read_label(label_path_for(name + ".png", Path(dev_dir) / "labels")) for name in names]
    dense = [(name, label) for name, label in zip(names, labels)
             if np.unique(label).size - 1 >= min_cells_per_mpx * label.size / 1e6]
    if not dense:
        raise FileNotFoundError(f"no dev PNG images with labels under {dev_dir} (set CELLSEG_SHARED_DATA)")
    names, labels = zip(*dense)
    images = [read_image(Path(dev_dir) / "images" / f"{name}.png")[:3].astype(np.uint8) for name in names]
    mosaic = np.zeros((height, width, 3), np.uint8)
    label = np.zeros((height, width), np.int32)
    for index, top, left in mosaic_placements([image.shape[1:] for image in images], height, width):
        block = images[index][:, : height - top, : width - left]
        window = np.s_[top : top + block.shape[1], left : left + block.shape[2]]
        mosaic[window] = block.transpose(1, 2, 0)
        part = labels[index][: block.shape[1], : block.shape[2]]
        label[window] = np.where(part > 0, part + label.max(), 0)
    return mosaic, label


def _bundle_config(bundle: str, **overrides) -> ConfigParser:
    return inference_config(REPO / "bundles" / BUNDLES[bundle], **overrides)


def _checkpoint(bundle: str, folder: Path) -> tuple[Path, str]:
    """The bundle's models/model.pt, or randomly initialized weights saved in ``folder``; and which it is."""
    shipped = REPO / "bundles" / BUNDLES[bundle] / "models" / "model.pt"
    if shipped.is_file():
        return shipped, "models/model.pt"
    torch.manual_seed(0)
    path = folder / f"{bundle}_random.pt"
    torch.save(_bundle_config(bundle, network_output="ensemble").get_parsed_content("network_def").state_dict(), path)
    return path, "random"


class _TimedNetwork(torch.nn.Module):
    """Adds up the time spent in the wrapped network's forward passes."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network
        self.seconds = 0.0

    def forward(self, x):
        start = time.perf_counter()
        out = self.network(x)
        self.seconds += time.perf_counter() - start
        return out


def _label_maps(bundle: str, label: np.ndarray) -> torch.Tensor:
    """What a well-trained network would output for ``label``: the training targets as (5, H, W) float32 —
    MT²: 3-class probabilities + cell and boundary heat-maps; CrossCT: 3-class logits + distance maps."""
    classes = np.eye(3, dtype=np.float32)[three_class_map(label)].transpose(2, 0, 1)
    if bundle == "mt2":
        return torch.from_numpy(np.concatenate([classes, mt2_heatmaps(label)]))
    distances = np.stack([cell_distance_map(label), neighbor_distance_map(label)])
    return torch.from_numpy(np.concatenate([10 * (classes - 0.5), distances]).astype(np.float32))


def inference(size: int = 1024, threads: int | None = None, repeats: int = 3):
    """Segmentation speed of each bundle and network at its default window on a ``size``^2 mosaic of real dev
    images: network time (forward passes, and the whole inferer: windows, stitching, scales, activations) vs
    post-processing time, on the network's output and on label-derived maps (a trained network's output has
    cells; an untrained one's has few, which flatters the post-processing).

    Args:
        size: side of the mosaic (px); 1024 is about 1 Mpx.
        threads: torch CPU threads (default: torch's own choice).
        repeats: timed runs of each post-processing; the best is reported.
    """
    if threads:
        torch.set_num_threads(threads)
    image, label = dev_mosaic(size, size, min_cells_per_mpx=400)
    runs = [("mt2", "unetpp", {}), ("crossct", "unet", {"network_output": "unet"}),
            ("crossct", "swin", {"network_output": "swin"})]
    with tempfile.TemporaryDirectory(prefix="cellseg_benchmark_") as folder:
        path = Path(folder) / "mosaic.png"
        Image.fromarray(image).save(path)
        for bundle, network_name, overrides in runs:
            checkpoint, weights = _checkpoint(bundle, Path(folder))
            parser = _bundle_config(bundle, checkpoint=str(checkpoint), **overrides)
            timed = _TimedNetwork(loaded_network(parser))
            inputs = parser.get_parsed_content("preprocessing")({"image": str(path)})["image"][None]
            inferer = parser.get_parsed_content("inferer")
            with torch.no_grad():
                inferer_s, output = _timed(lambda: inferer(inputs, timed), 1)
            maps = _label_maps(bundle, label)
            choices = ("interior", "distance") if bundle == "crossct" else ("watershed",)
            for choice in choices:
                key = f"postprocessing_choices#{choice}" if bundle == "crossct" else "instance_postprocessing"
                postprocessing = parser.get_parsed_content(key)
                output_s, from_output = _timed(lambda: postprocessing({"pred": output[0], "image": inputs[0]})["pred"], repeats)
                maps_s, from_maps = _timed(lambda: postprocessing({"pred": maps, "image": inputs[0]})["pred"], repeats)
                slowest = max(output_s, maps_s)
                line = {"benchmark": "inference", "bundle": bundle, "network": network_name, "postprocess": choice,
                        "image_px": [size, size], "weights": weights, "threads": torch.get_num_threads(),
                        "network_forward_s": round(timed.seconds, 2), "inferer_s": round(inferer_s, 2),
                        "postprocess_s_network_output": round(output_s, 3),
                        "cells_network_output": int(from_output.max()),
                        "postprocess_s_label_maps": round(maps_s, 3), "cells_label_maps": int(from_maps.max()),
                        "mpx_per_s": round(size * size / 1e6 / (inferer_s + slowest), 4),
                        "postprocess_share_of_network": round(slowest / inferer_s, 4)}
                print(json.dumps(line), flush=True)


# ---------------------------------------------------------------------------------------------- whole slide


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        found.append(stack.pop())
        stack.extend(children.get(found[-1], []))
    return found


def _tree_pss_bytes(pid: int) -> int:
    """Proportional set size of a process and its descendants (shared pages counted once in all)."""
    total = 0
    for member in _descendants(pid):
        try:
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def _run_measured(command: list[str], environment: dict) -> dict:
    """Run ``command`` (its output goes to stderr); wall seconds, the peak resident memory of its main process
    (getrusage of the child) and the peak proportional memory of its whole process tree (sampled twice a second)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=sys.stderr, stderr=sys.stderr)
    peak_tree = [0]
    done = threading.Event()

    def sample():
        while not done.wait(0.5):
            peak_tree[0] = max(peak_tree[0], _tree_pss_bytes(process.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(process.pid, 0)
    done.set()
    sampler.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": process.returncode, "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3),
            "peak_tree_pss_gb_sampled": round(peak_tree[0] / 1e9, 3)}


def wsi(size: int = 10000, bundles: str | Sequence[str] = ("mt2", "crossct"), threads: int | None = None,
        overrides: dict | None = None):
    """Each bundle's inference config, as shipped, on a ``size`` x ``size`` x 3 image tiled from real dev images
    (written as a TIFF to a temporary folder), in a subprocess: seconds and peak memory.

    Args:
        size: side of the image (px); 10000 is a 100 Mpx whole-slide image.
        bundles: which bundles ("mt2", "crossct", or both comma-separated).
        threads: OMP_NUM_THREADS of the runs (default: inherited).
        overrides: per bundle, config overrides, e.g. ``{"mt2": {"scales": [1.0]}}`` (reported in the line).
    """
    bundles = bundles.split(",") if isinstance(bundles, str) else list(bundles)
    overrides = overrides or {}
    with tempfile.TemporaryDirectory(prefix="cellseg_wsi_") as folder:
        folder = Path(folder)
        image, _ = dev_mosaic(size, size)
        (folder / "images").mkdir()
        tifffile.imwrite(folder / "images" / "wsi_mosaic.tif", image, photometric="rgb")
        del image
        environment = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
        for bundle in bundles:
            checkpoint, weights = _checkpoint(bundle, folder)
            output = folder / f"out_{bundle}"
            command = [sys.executable, "-m", "monai.bundle", "run", "inference",
                       "--config_file", str(REPO / "bundles" / BUNDLES[bundle] / "configs" / "inference.yaml"),
                       "--dataset_dir", str(folder / "images"), "--output_dir", str(output),
                       "--checkpoint", str(checkpoint)]
            for key, value in overrides.get(bundle, {}).items():
                command += [f"--{key}", json.dumps(value)]
            measured = _run_measured(command, environment)
            label_path = output / "wsi_mosaic_label.tiff"
            cells = int(read_label(label_path).max()) if label_path.is_file() else None
            line = {"benchmark": "wsi", "bundle": bundle, "image_px": [size, size, 3], "weights": weights,
                    "threads": environment.get("OMP_NUM_THREADS"), "overrides": overrides.get(bundle, {}), **measured,
                    "label_written": label_path.is_file(), "cells": cells}
            print(json.dumps(line), flush=True)


COMMANDS = {"targets": targets, "metric": metric, "inference": inference, "wsi": wsi, "training": training, "processes": processes, "tradeoff": tradeoff}

if __name__ == "__main__":
    fire.Fire(COMMANDS)
