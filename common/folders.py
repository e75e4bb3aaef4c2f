"""Segmenting folders of images: the data list of a folder, a dataset that survives unreadable files and sets
whole-slide images aside, and the transform that writes ``<name>_label.tiff`` files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import Dataset, list_data_collate
from monai.transforms import MapTransform

from common.io import ImageReadError, image_name, list_images, write_label

__all__ = [
    "folder_datalist",
    "TolerantDataset",
    "collate_skipping_failures",
    "unreadable_input_cause",
    "failure_message",
    "SaveInstanceLabeld",
]

logger = logging.getLogger(__name__)


def folder_datalist(folder: str | Path) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` for every image of ``folder`` (or of its ``images/`` subfolder)."""
    return [{"image": str(path)} for path in list_images(folder)]


class TolerantDataset(Dataset):
    """``monai.data.Dataset`` whose items that cannot be read (``ImageReadError``, or a ``ValueError`` such as
    a label that does not match its image) become ``{"failed": "<file>: <reason>"}`` instead of stopping the
    run; pair it with :func:`collate_skipping_failures`.

    Args:
        data, transform: as ``monai.data.Dataset``.
        whole_slide: an object whose ``applies(path)`` says which images are segmented tile by tile
            (``common.wholeslide.WholeSlideSegmenter``); those items become ``{"whole_slide": path}`` without
            being loaded, so a big image is read once, by the process that segments it. None = no such images.
    """

    def __init__(self, data, transform=None, whole_slide=None):
        super().__init__(data, transform)
        self.whole_slide = whole_slide

    def _transform(self, index: int):
        item = self.data[index]
        if self.whole_slide is not None and isinstance(item, Mapping) and "image" in item:
            if self.whole_slide.applies(item["image"]):
                return {"whole_slide": item["image"]}
        try:
            return super()._transform(index)
        except Exception as error:
            cause = unreadable_input_cause(error)
            if cause is None:
                raise
            source = item.get("image", index) if isinstance(item, Mapping) else index
            return {"failed": failure_message(source, cause)}


_UNREADABLE_INPUT = (ImageReadError, ValueError, OSError)


def unreadable_input_cause(error: BaseException) -> BaseException | None:
    """The first error in ``error``'s chain that says an input file is bad (MONAI wraps transform errors in
    RuntimeErrors), or None when the failure is something else, which must not be swallowed."""
    while error is not None:
        if isinstance(error, _UNREADABLE_INPUT):
            return error
        error = error.__cause__
    return None


def failure_message(source: object, cause: BaseException) -> str:
    """``"<file>: <reason>"``, without naming the file twice when the reason already does."""
    message = str(cause)
    return message if str(source) in message else f"{source}: {message}"


def collate_skipping_failures(batch: list[dict]) -> dict:
    """Collate the readable items of ``batch`` with MONAI's ``list_data_collate``; list the failed ones under
    ``"failed"`` and the paths of whole-slide images under ``"whole_slide"``. A batch with no loaded item is
    ``{"failed": [...], "whole_slide": [...]}`` alone."""
    set_aside = ("failed", "whole_slide")
    good = [item for item in batch if not any(key in item for key in set_aside)]
    collated = list_data_collate(good) if good else {}
    for key in set_aside:
        collated[key] = [item[key] for item in batch if key in item]
    return collated


class SaveInstanceLabeld(MapTransform):
    """Write each (1, H, W) or (H, W) instance label to ``output_dir/<name>_label.tiff`` (atomic, uint16 or
    uint32), ``<name>`` taken from the ``filename_or_obj`` metadata of ``meta_source_key`` (the image).

    Args:
        keys: the instance-label key(s) to write.
        output_dir: destination folder, created when missing.
        meta_source_key: key whose MetaTensor metadata names the source image.
        suffix: appended to the name before ``.tiff``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | Path,
        meta_source_key: str = "image",
        suffix: str = "_label",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.meta_source_key = meta_source_key
        self.suffix = suffix

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        source = d.get(self.meta_source_key)
        meta = getattr(source, "meta", None) or {}
        if "filename_or_obj" not in meta:
            raise ValueError(f"'{self.meta_source_key}' carries no filename_or_obj metadata to name the output")
        for key in self.key_iterator(d):
            label = d[key]
            array = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
            self.write(np.squeeze(array, axis=0) if array.ndim == 3 else array, meta["filename_or_obj"])
        return d

    def write(self, label: np.ndarray, source: str | Path) -> Path:
        """Write the (H, W) instance label of the image file ``source``; returns the written path."""
        path = write_label(self.output_dir / f"{image_name(source)}{self.suffix}.tiff", label)
        logger.debug("wrote %s", path)
        return path
