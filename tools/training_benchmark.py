"""Training speed of both bundles, per phase and precision, against the settings that trained the weights shipped
before the training pool (``python tools/benchmark.py training``; one JSON line per case on stdout).

Each case runs in its own process (torch's thread count is per process) and trains ``steps`` optimizer steps of
the bundle's own ``configs/train.yaml`` on the licensed training rows of ``cellseg-dev`` (plus
``cellseg-unlabeled`` for the semi-supervised phases); :class:`common.throughput.ThroughputMonitor` gives steps/s,
patches/s and the share of iteration time spent waiting for data (the first step, which forks the loaders, is
left out).

Presets:
- ``previous``: how the weights before the pool were trained: batch 2, one thread, one loader worker, the random
  zoom on the whole image (no region crop first), float32.
- ``current``: the shipped training settings: batch 4, every core, a zoom region around the patch, ``amp: auto``.
- ``bf16``: ``current`` with ``amp: true``; skipped unless the CPU runs bfloat16 natively or ``force_bf16`` is set
  (emulated bfloat16 is many times slower than float32).
- ``processes``: ``current`` as two single-thread processes (``torchrun``, the bundle's ``multi_gpu_train.yaml``)
  with batch 2 each, the same 4 patches a step; on a 2-core CPU processes use the cores better than threads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CELLSEG_SHARED_DATA", REPO.parent / "shared" / "data"))

# bundle, phase -> (config entry that runs it, overrides that select it)
PHASES = {
    ("mt2", "warmup"): ("training", {"warmup_epochs": 1000, "semi_supervised": True}),
    ("mt2", "mean_teacher"): ("training", {"warmup_epochs": 0, "semi_supervised": True}),
    ("crossct", "stage1"): ("pretraining", {}),
    ("crossct", "stage2"): ("training", {"semi_supervised": True}),
}
BUNDLE_DIRS = {"mt2": "mt2_cell_segmentation", "crossct": "crossct_cell_segmentation"}
# the network sizes of the shipped weights
NETWORKS = {"mt2": {"features": [16, 16, 32, 64, 128, 16]}, "crossct": {"unet_features": [16, 16, 32, 64, 128, 16]}}
# batch_size is per process
_SHIPPED = {"threads": None, "num_workers": None, "whole_image_zoom": False, "processes": 1}
PRESETS = {
    "previous": {"batch_size": 2, "threads": 1, "num_workers": 1, "whole_image_zoom": True, "amp": False,
                 "processes": 1},
    "current": {**_SHIPPED, "batch_size": 4, "amp": "auto"},
    "bf16": {**_SHIPPED, "batch_size": 4, "amp": True},
    "processes": {**_SHIPPED, "batch_size": 2, "threads": 1, "amp": "auto", "processes": 2},
}


def _datalist(folder: Path) -> Path:
    """The licensed dev training rows (seed 0, val_fraction 0.25) and the unlabeled pool, as the shipped runs."""
    from common.datalist import build_datalist, save_datalist

    datalist = build_datalist(
        SHARED_DATA / "cellseg-dev",
        folder,
        [SHARED_DATA / "cellseg-unlabeled"],
        val_fraction=0.25,
        seed=0,
        licenses=["CC0-1.0", "MIT", "BSD-3-Clause"],
    )
    return save_datalist(datalist, folder / "datalist.json")


def training_case(bundle: str, phase: str, preset: str, steps: int = 10, dataset_dir: str | None = None) -> dict:
    """One case, in this process: train ``steps`` steps and return its figures (also printed as JSON)."""
    import torch

    from common.precision import autocast_dtype
    from monai.bundle import ConfigWorkflow

    settings = PRESETS[preset]
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    entry, phase_overrides = PHASES[(bundle, phase)]
    root = REPO / "bundles" / BUNDLE_DIRS[bundle]
    with tempfile.TemporaryDirectory() as run_dir:
        data = Path(dataset_dir) if dataset_dir else _datalist(Path(run_dir) / "data").parent
        overrides = {
            **NETWORKS[bundle],
            **phase_overrides,
            "dataset_dir": str(data),
            "run_dir": str(Path(run_dir) / "run"),
            "patch_size": [256, 256],
            "batch_size": settings["batch_size"],
            "unlabeled_batch_size": settings["batch_size"],
            "epochs": 1,
            "pretrain_epochs": 1,
            "val_interval": 1000,
            "amp": settings["amp"],
            "train#sampler#num_samples": settings["batch_size"] * settings["processes"] * (steps + 1),
        }
        if settings["num_workers"] is not None:
            overrides["num_workers"] = settings["num_workers"]
        if settings["whole_image_zoom"]:
            overrides["geometry#0#roi_size"] = [1_000_000, 1_000_000]  # the region crop keeps the whole image
        configs = [str(root / "configs" / "train.yaml")]
        if settings["processes"] > 1:  # run under torchrun by training()
            configs.append(str(root / "configs" / "multi_gpu_train.yaml"))
        workflow = ConfigWorkflow(config_file=configs, workflow_type="train", bundle_root=str(root), **overrides)
        workflow.initialize()
        trainer_id = "pretrain#trainer" if entry == "pretraining" else "train#trainer"
        trainer = workflow.parser.get_parsed_content(trainer_id)
        trainer.run()
        figures = dict(getattr(trainer.state, "throughput", {}))  # rank 0's monitor counts every rank's patches
        workflow.finalize()
    if not figures:  # a rank other than 0
        return {}
    dtype = autocast_dtype(settings["amp"], "cpu")
    line = {
        "benchmark": "training",
        "bundle": bundle,
        "phase": phase,
        "preset": preset,
        "precision": str(dtype).replace("torch.", "") if dtype else "float32",
        "threads": torch.get_num_threads(),
        "batch_size": settings["batch_size"],
        "processes": settings["processes"],
        "steps_per_s": round(figures["steps_per_s"], 4),
        "patches_per_s": round(figures["patches_per_s"], 3),
        "data_wait_share": round(figures["data_wait_share"], 4),
        "steps_timed": figures["iterations"],
    }
    print(json.dumps(line), flush=True)
    return line


def training(bundles: str = "mt2,crossct", steps: int = 10, force_bf16: bool = False):
    """Every phase of ``bundles`` under each preset, each in its own process; then, per phase, the ratio of the
    current settings' patches/s to the previous ones'."""
    from common.distributed import torchrun_launcher
    from common.precision import cpu_has_native_bfloat16

    wanted = [name.strip() for name in (bundles.split(",") if isinstance(bundles, str) else bundles)]
    native = cpu_has_native_bfloat16()
    with tempfile.TemporaryDirectory() as folder:
        data = _datalist(Path(folder)).parent
        for bundle, phase in PHASES:
            if bundle not in wanted:
                continue
            results = {}
            for preset in PRESETS:
                if preset == "bf16" and not (native or force_bf16):
                    print(json.dumps({"benchmark": "training", "bundle": bundle, "phase": phase, "preset": preset,
                                      "skipped": "this CPU has no native bfloat16 (amp auto runs float32 here)"}), flush=True)
                    continue
                command = [sys.executable, __file__, bundle, phase, preset, "--steps", str(steps),
                           "--dataset_dir", str(data)]
                environment = None
                processes = PRESETS[preset]["processes"]
                if processes > 1:
                    command[:1] = torchrun_launcher(processes)
                    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
                done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=environment)
                lines = [line for line in done.stdout.splitlines() if line.startswith('{"benchmark"')]
                if done.returncode != 0 or not lines:
                    raise RuntimeError(f"{bundle} {phase} {preset} failed:\n{done.stderr[-3000:]}")
                results[preset] = json.loads(lines[-1])
                print(lines[-1], flush=True)
            if "previous" in results and "current" in results:
                previous = max(results["previous"]["patches_per_s"], 1e-9)
                ratios = {}
                for name in ("current", "processes"):
                    if name in results:
                        ratios[f"patches_per_s_ratio_{name}_vs_previous"] = round(
                            results[name]["patches_per_s"] / previous, 2)
                print(json.dumps({"benchmark": "training", "bundle": bundle, "phase": phase, **ratios,
                                  "data_wait_share_current": results["current"]["data_wait_share"]}), flush=True)


if __name__ == "__main__":
    import fire

    fire.Fire(training_case)
