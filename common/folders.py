"""Segmenting folders of images: the data list of a folder, a dataset that survives unreadable files, and
the transform that writes ``<name>_label.tiff`` files."""

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

__all__ = ["folder_datalist", "TolerantDataset", "collate_skipping_failures", "SaveInstanceLabeld"]

logger = logging.getLogger(__name__)


def folder_datalist(folder: str | Path) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` for every image of ``folder`` (or of its ``images/`` subfolder)."""
    return [{"image": str(path)} for path in list_images(folder)]


class TolerantDataset(Dataset):
    """``monai.data.Dataset`` whose items that cannot be read (``ImageReadError``, or a ``ValueError`` such as
    a label that does not match its image) become ``{"failed": "<file>: <reason>"}`` instead of stopping the
    run; pair it with :func:`collate_skipping_failures`."""

    def _transform(self, index: int):
        try:
            return super()._transform(index)
        except Exception as error:
            cause = _unreadable_input_cause(error)
            if cause is None:
                raise
            item = self.data[index]
            source = item.get("image", index) if isinstance(item, Mapping) else index
            message = str(cause)
            return {"failed": message if str(source) in message else f"{source}: {message}"}


_UNREADABLE_INPUT = (ImageReadError, ValueError, OSError)


def _unreadable_input_cause(error: BaseException) -> BaseException | None:
    """The first error in ``error``'s chain that says an input file is bad (MONAI wraps transform errors in
    RuntimeErrors), or None when the failure is something else, which must not be swallowed."""
    while error is not None:
        if isinstance(error, _UNREADABLE_INPUT):
            return error
        error = error.__cause__
    return None


def collate_skipping_failures(batch: list[dict]) -> dict:
    """Collate the readable items of ``batch`` with MONAI's ``list_data_collate`` and list the failed ones under
    ``"failed"``; a batch with no readable item is ``{"failed": [...]}`` alone."""
    failed = [item["failed"] for item in batch if "failed" in item]
    good = [item for item in batch if "failed" not in item]
    collated = list_data_collate(good) if good else {}
    collated["failed"] = failed
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
        name = image_name(meta["filename_or_obj"])
        for key in self.key_iterator(d):
            label = d[key]
            array = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
            path = write_label(self.output_dir / f"{name}{self.suffix}.tiff", np.squeeze(array, axis=0) if array.ndim == 3 else array)
            logger.debug("wrote %s (%d cells)", path, int(np.count_nonzero(np.bincount(array.ravel())[1:])))
        return d
