"""Bundle inference from Python, and the one-line-per-image report of a segmentation run.

Example (a few lines, from any working directory)::

    from common.segment import segment_images

    labels = segment_images("bundles/mt2_cell_segmentation", ["cells.tif", "more_cells.png"])
    labels[0].shape, labels[0].max()   # (H, W) int32 instance ids, 0 = background

The bundle's own ``configs/inference.yaml`` does the work (its weights, its settings), exactly as
``python -m monai.bundle run inference`` would; nothing is written unless ``output_dir`` is given.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from common.io import image_name

__all__ = ["segment_images", "SegmentationSummary"]

logger = logging.getLogger(__name__)


def _items(output: Any) -> list[dict]:
    """The per-image dicts of an engine output (MONAI decollates batches into a list of dicts)."""
    if isinstance(output, dict):
        return [output] if output else []
    return [item for item in output or [] if isinstance(item, dict)]


def _source_name(item: dict, image_key: str) -> str:
    meta = getattr(item.get(image_key), "meta", None) or {}
    source = meta.get("filename_or_obj")
    return image_name(source) if source else "?"


def _as_label(pred: Any) -> np.ndarray:
    array = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    return array[0] if array.ndim == 3 and array.shape[0] == 1 else array


class SegmentationSummary:
    """Ignite handler: after each image, log ``<name>: <n> cells, <s> s (<k>/<N>, about <t> left)`` (seconds include
    reading the file; the time left is the mean time per image so far times the images still to do).

    Args:
        pred_key: the instance-label key of the engine output.
        image_key: the key whose metadata names the image.
    """

    def __init__(self, pred_key: str = "pred", image_key: str = "image"):
        self.pred_key = pred_key
        self.image_key = image_key
        self._started = 0.0
        self._run_started = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start_run)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._report)

    def _start_run(self, engine: Engine) -> None:
        self._run_started = time.perf_counter()

    def _start(self, engine: Engine) -> None:
        self._started = time.perf_counter()

    def _report(self, engine: Engine) -> None:
        now = time.perf_counter()
        seconds = now - self._started
        progress = _progress(engine.state.iteration, engine.state.epoch_length, now - self._run_started)
        for item in _items(engine.state.output):
            if self.pred_key not in item:
                continue
            cells = int(np.count_nonzero(np.bincount(_as_label(item[self.pred_key]).ravel())[1:]))
            logger.info("%s: %d cells, %.1f s%s", _source_name(item, self.image_key), cells, seconds, progress)


def _progress(done: int, total: int | None, elapsed: float) -> str:
    """`` (k/N, about <t> left)`` for ``done`` of ``total`` batches after ``elapsed`` seconds; '' without a total."""
    if not total or done <= 0:
        return ""
    left = elapsed / done * max(0, total - done)
    if left < 90:
        duration = f"{left:.0f} s"
    elif left < 5400:
        duration = f"{left / 60:.0f} min"
    else:
        duration = f"{left / 3600:.1f} h"
    return f" ({done}/{total}, about {duration} left)"


def segment_images(
    bundle_root: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike | None = None,
    **overrides: Any,
) -> list[np.ndarray]:
    """Segment image files with a bundle's inference config and return their instance labels.

    Args:
        bundle_root: the bundle folder (holding ``configs/inference.yaml`` and ``models/model.pt``).
        images: image files (any format :func:`common.io.read_image` reads).
        output_dir: where to also write ``<name>_label.tiff`` and ``<name>_overlay.png``; None writes nothing.
        overrides: config ids and values, e.g. ``checkpoint="my_model.pt"``, ``device="cpu"``.

    Returns:
        One (H, W) int32 instance label per image, in the order given.

    Raises:
        FileNotFoundError: an image does not exist.
        ValueError: two images share a name.
        RuntimeError: some images could not be read (the message names them).
    """
    from monai.bundle import ConfigWorkflow

    paths = [Path(image) for image in images]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError("no such image file(s): " + ", ".join(missing))
    names = [image_name(path) for path in paths]
    if len(set(names)) != len(names):
        raise ValueError("images must have distinct names (outputs are named after them): " + ", ".join(map(str, paths)))
    overrides.setdefault("write_overlays", output_dir is not None)
    bundle_root = Path(bundle_root).resolve()
    labels: dict[str, np.ndarray] = {}

    def collect(engine: Engine) -> None:
        for item in _items(engine.state.output):
            if "pred" in item:
                labels[_source_name(item, "image")] = _as_label(item["pred"]).astype(np.int32, copy=False)

    with tempfile.TemporaryDirectory(prefix="cellseg_") as scratch:
        workflow = ConfigWorkflow(
            config_file=str(bundle_root / "configs" / "inference.yaml"),
            workflow_type="infer",
            bundle_root=str(bundle_root),
            datalist=[{"image": str(path)} for path in paths],
            output_dir=str(output_dir if output_dir is not None else scratch),
            **overrides,
        )
        workflow.initialize()
        workflow.evaluator.add_event_handler(Events.ITERATION_COMPLETED, collect)
        try:
            workflow.run()
        finally:
            workflow.finalize()
    return [labels[name] for name in names]
