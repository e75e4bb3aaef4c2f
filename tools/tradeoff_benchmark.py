"""What each inference setting costs and buys: challenge F1 against seconds per megapixel, per bundle
(``python tools/benchmark.py tradeoff BUNDLE``; one JSON line per setting on stdout, a JSONL file and a PNG plot).

For every setting (a dict of ``inference.yaml`` overrides) the bundle's own preprocessing, inferer, weights and
post-processing segment each labeled image; the time from reading the file to the instance label counts (the
weights are loaded before the clock starts). F1 is the challenge F1 per image, averaged. All settings run in one
process, one after another, on the same images: their speeds compare; ``--rounds N`` times the whole grid N times
and reports each setting's median.

The default images are the dev validation split of the model cards (``tools/make_datalist.py`` on cellseg-dev
with ``--val_fraction 0.25 --seed 0`` and the open licences): 7 images.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CELLSEG_SHARED_DATA", REPO.parent / "shared" / "data"))
BUNDLE_DIRS = {"mt2": "mt2_cell_segmentation", "crossct": "crossct_cell_segmentation"}
VALIDATION_SPLIT = {"val_fraction": 0.25, "seed": 0, "licenses": ["CC0-1.0", "MIT", "BSD-3-Clause"]}

# the settings that matter, per bundle; {} is the shipped default
def _override_file(bundle: str, name: str) -> dict[str, Any]:
    """The settings of one of a bundle's override files (``configs/inference_*.yaml``), so the grid measures what
    ships rather than a copy of it."""
    return yaml.safe_load((REPO / "bundles" / BUNDLE_DIRS[bundle] / "configs" / name).read_text())


_MT2_SINGLE = {"scales": [1.0]}
_CROSSCT_NO_FLIPS = {"test_time_flips": False}
MT2_PAPER = _override_file("mt2", "inference_paper.yaml")
SETTINGS = {
    "mt2": [
        {},
        _override_file("mt2", "inference_quality.yaml"),  # overlap 0.5
        {"blend_mode": "constant"},
        {"roi_size": [512, 512]},
        {"roi_size": [512, 512], "blend_mode": "constant"},
        MT2_PAPER,
        {"test_time_flips": True},
        {"scales": [0.8, 1.0]},
        {"scales": [1.0, 1.2]},
        {"scales": [1.2]},
        _override_file("mt2", "inference_fast.yaml"),  # scales 0.8/1.2, overlap 0.125
        {"scales": [0.8, 1.2]},
        _MT2_SINGLE,
        {**_MT2_SINGLE, "overlap": 0.5},
        {**_MT2_SINGLE, "blend_mode": "constant"},
        {**_MT2_SINGLE, "test_time_flips": True},
        {**_MT2_SINGLE, "fluorescence_rule": False},
    ],
    "crossct": [
        {},
        _CROSSCT_NO_FLIPS,
        {**_CROSSCT_NO_FLIPS, "interior_threshold": 0.5, "expand_px": 0},  # the organizers' interior components
        {**_CROSSCT_NO_FLIPS, "overlap": 0.5},
        {**_CROSSCT_NO_FLIPS, "blend_mode": "constant"},
        {**_CROSSCT_NO_FLIPS, "roi_size": [512, 512]},
        {**_CROSSCT_NO_FLIPS, "postprocess": "distance"},
        {**_CROSSCT_NO_FLIPS, "network_output": "swin"},
        {**_CROSSCT_NO_FLIPS, "network_output": "ensemble"},
        {"network_output": "ensemble"},  # both networks, with the default's flips (inference_quality.yaml up to 0.6.0)
        _override_file("crossct", "inference_quality.yaml"),  # float32 throughout
    ],
}


def dev_validation_items(dev_dir: str | Path = SHARED_DATA / "cellseg-dev") -> list[dict[str, str]]:
    """``[{"image", "label"}]`` of the dev validation split the model cards report (absolute paths)."""
    from common.datalist import build_datalist

    dev_dir = Path(dev_dir)
    if not dev_dir.is_dir():
        raise FileNotFoundError(f"{dev_dir} is absent (set CELLSEG_SHARED_DATA)")
    items = build_datalist(dev_dir, dev_dir, **VALIDATION_SPLIT)["validation"]
    return [{key: str(dev_dir / item[key]) for key in ("image", "label")} for item in items]


def folder_items(dataset_dir: str | Path) -> list[dict[str, str]]:
    """``[{"image", "label"}]`` of a folder with ``images/`` and ``labels/<name>_label.tiff``."""
    from common.io import label_path_for, list_images

    dataset_dir = Path(dataset_dir)
    return [{"image": str(path), "label": str(label_path_for(path, dataset_dir / "labels"))}
            for path in list_images(dataset_dir / "images")]


def pareto_front(seconds: Sequence[float], f1: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats: none is at least as fast and as accurate and better in one.

    Args:
        seconds: cost of each point (lower is better), e.g. s/Mpx.
        f1: quality of each point (higher is better).

    Returns:
        The indices on the front, fastest first.
    """
    points = list(zip(seconds, f1))
    front = [
        i for i, (s, q) in enumerate(points)
        if not any(s2 <= s and q2 >= q and (s2 < s or q2 > q) for s2, q2 in points)
    ]
    return sorted(front, key=lambda i: (seconds[i], -f1[i]))


def recommended(seconds: Sequence[float], f1: Sequence[float], tolerance: float = 0.01) -> int:
    """The fastest point whose F1 is within ``tolerance`` of the best F1 (it lies on the front)."""
    best = max(f1)
    return min((i for i in range(len(f1)) if f1[i] >= best - tolerance), key=lambda i: (seconds[i], -f1[i]))


class _Segmenter:
    """One setting of a bundle's inference config, built once: image file -> (H, W) int32 instance label."""

    def __init__(self, bundle: str, checkpoint: str | None, overrides: dict[str, Any]):
        from common.workflows import inference_config, loaded_network

        parser = inference_config(REPO / "bundles" / BUNDLE_DIRS[bundle], checkpoint, **overrides)
        self.device = parser.get_parsed_content("device")
        self.network = loaded_network(parser)
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.inferer = parser.get_parsed_content("inferer")
        self.postprocessing = parser.get_parsed_content("instance_postprocessing")

    def __call__(self, image_path: str) -> np.ndarray:
        image = self.preprocessing({"image": image_path})["image"]
        with torch.no_grad():
            output = self.inferer(torch.as_tensor(image)[None].to(self.device), self.network)[0]
        label = self.postprocessing({"pred": output, "image": image})["pred"]
        label = label.cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
        return label[0] if label.ndim == 3 else label


def measure(bundle: str, items: list[dict[str, str]], overrides: dict[str, Any], checkpoint: str | None = None) -> dict:
    """Segment every item with one setting: mean challenge F1, seconds per Mpx, per-image F1."""
    from common.io import read_label
    from common.metrics import challenge_counts, f1_from_counts

    segment = _Segmenter(bundle, checkpoint, overrides)
    seconds, pixels, f1s = 0.0, 0, {}
    for item in items:
        label = read_label(item["label"])
        start = time.perf_counter()
        found = segment(item["image"])
        seconds += time.perf_counter() - start
        pixels += label.size
        f1s[Path(item["image"]).stem] = round(float(f1_from_counts(challenge_counts(label, found))), 4)
    return {"bundle": bundle, "setting": overrides, "default": not overrides,
            "f1": round(float(np.mean(list(f1s.values()))), 4), "s_per_mpx": round(seconds / (pixels / 1e6), 3),
            "images": len(items), "per_image_f1": f1s}


def setting_name(setting: dict[str, Any]) -> str:
    """A setting's overrides as ``key=value, ...``; ``default`` for none."""
    return ", ".join(f"{k}={v}" for k, v in setting.items()) or "default"


def plain_log_ticks(low: float, high: float):
    """A tick formatter for a log axis from ``low`` to ``high``: plain numbers (6, 10, 20), at every tick when the
    axis spans less than a decade, else at mantissas 1, 2 and 5 only, so the labels never crowd."""
    from matplotlib.ticker import FuncFormatter

    mantissas = range(1, 10) if high < 10 * low else (1, 2, 5)

    def label(value: float, _position: int) -> str:
        mantissa = round(value / 10 ** np.floor(np.log10(value)), 6)
        return f"{value:g}" if mantissa in mantissas else ""

    return FuncFormatter(label)


def plot_figure(lines: list[dict], title: str):
    """The trade-off figure: F1 against s/Mpx (log scale), every setting a dot numbered as its JSON line (1 = the
    first), the front joined (its numbers in blue), the default circled, and a key naming the settings on the front
    (fastest first) and off it. Returns the matplotlib figure; :func:`plot` saves it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = [line["s_per_mpx"] for line in lines]
    f1 = [line["f1"] for line in lines]
    front = pareto_front(seconds, f1)
    figure, axes = plt.subplots(figsize=(9, 6))
    axes.scatter(seconds, f1, color="0.6", zorder=2, label="setting")
    axes.plot([seconds[i] for i in front], [f1[i] for i in front], "-o", color="tab:blue", zorder=3, label="Pareto front")
    names = [f"{i + 1}: {setting_name(line['setting'])}" for i, line in enumerate(lines)]
    default_label = "shipped default"
    for i, line in enumerate(lines):
        # numbers only beside the points (names of nearby settings overlapped); the key below names them
        axes.annotate(str(i + 1), (seconds[i], f1[i]), textcoords="offset points", xytext=(4, -11), fontsize=7,
                      color="tab:blue" if i in front else "0.35")
        if line["default"]:
            axes.scatter([seconds[i]], [f1[i]], s=250, facecolors="none", edgecolors="tab:red", linewidths=2,
                         zorder=4, label=default_label)
            default_label = None  # a grid that measures the default twice (to see the timing drift) has one entry
    axes.set_xscale("log")
    low, high = axes.get_xlim()
    axes.xaxis.set_major_formatter(plain_log_ticks(low, high))
    axes.xaxis.set_minor_formatter(plain_log_ticks(low, high))
    axes.set_xlabel("seconds per megapixel (log scale)")
    axes.set_ylabel("mean challenge F1")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside the axes: it never hides a setting
    key = "on the front, fastest first:\n" + "\n".join(names[i] for i in front)  # pareto_front's order
    off_front = [name for i, name in enumerate(names) if i not in front]
    if off_front:
        key += "\n\noff the front:\n" + "\n".join(off_front)
    axes.text(1.01, 0.0, key, transform=axes.transAxes, fontsize=7, va="bottom", ha="left")
    return figure


def plot(lines: list[dict], path: str | Path, title: str) -> Path:
    """Save :func:`plot_figure` of ``lines`` to ``path`` (PNG), the key and legend included."""
    import matplotlib.pyplot as plt

    figure = plot_figure(lines, title)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return Path(path)


def tradeoff(bundle: str = "mt2", dataset_dir: str | None = None, settings: str | list | None = None,
             output_dir: str = ".", checkpoint: str | None = None, images: int | None = None, rounds: int = 1):
    """Score and time each setting of ``bundle`` on a labeled folder; write JSON lines and a plot.

    Args:
        bundle: "mt2" or "crossct".
        dataset_dir: a folder with images/ and labels/; default: the dev validation split of the model cards.
        settings: a JSON list of override dicts; default: the bundle's grid in ``SETTINGS`` ({} = the shipped one).
        output_dir: where ``tradeoff_<bundle>.jsonl`` and ``tradeoff_<bundle>.png`` go.
        checkpoint: weights other than the bundle's ``models/model.pt``.
        images: use only the first N images.
        rounds: time the whole grid this many times, one pass after another (settings 1..N, then again), and
            report each setting's median s/Mpx with every pass's figure (``s_per_mpx_rounds``): on a shared 2-core
            VM one pass's timings drift by 20-30 %, which a ratio between settings read from one pass inherits.
    """
    from common.workflows import command_line_json

    items = folder_items(dataset_dir) if dataset_dir else dev_validation_items()
    items = items[:images] if images else items
    if not items:
        raise SystemExit(f"tradeoff: no labeled images in {dataset_dir}")
    grid = command_line_json(settings) if settings is not None else SETTINGS[bundle]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if rounds < 1:
        raise SystemExit(f"tradeoff: rounds must be at least 1, got {rounds}")
    lines = []
    measure(bundle, items[:1], dict(grid[0]), checkpoint)  # untimed: one-time start-up costs are no setting's
    for round_index in range(rounds):
        for i, overrides in enumerate(grid):
            result = measure(bundle, items, dict(overrides), checkpoint)
            if round_index == 0:
                lines.append({"benchmark": "tradeoff", **result, "threads": torch.get_num_threads(),
                              "s_per_mpx_rounds": []})
            lines[i]["s_per_mpx_rounds"].append(result["s_per_mpx"])
            if rounds == 1:
                print(json.dumps(lines[i]), flush=True)
            else:
                print(f"round {round_index + 1}/{rounds}, setting {i + 1}/{len(grid)} "
                      f"({setting_name(overrides)}): {result['s_per_mpx']} s/Mpx", file=sys.stderr, flush=True)
    for line in lines:
        line["s_per_mpx"] = round(float(np.median(line["s_per_mpx_rounds"])), 3)
        if rounds > 1:
            print(json.dumps(line), flush=True)
    seconds, f1 = [line["s_per_mpx"] for line in lines], [line["f1"] for line in lines]
    front, pick = pareto_front(seconds, f1), recommended(seconds, f1)
    for i, line in enumerate(lines):
        line.update(on_front=i in front, recommended=i == pick)
    jsonl = output_dir / f"tradeoff_{bundle}.jsonl"
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    picture = plot(lines, output_dir / f"tradeoff_{bundle}.png", f"{bundle}: {len(items)} images, {lines[0]['threads']} threads")
    print(json.dumps({"benchmark": "tradeoff", "bundle": bundle, "front": [lines[i]["setting"] for i in front],
                      "recommended": lines[pick]["setting"], "jsonl": str(jsonl), "plot": str(picture)}), flush=True)
