"""MONAI datalists (JSON) for CellSeg folders: a deterministic train/validation split plus an unlabeled pool.

The file has the layout ``monai.data.load_decathlon_datalist`` reads::

    {"training":   [{"image": "dev/images/a.png", "label": "dev/labels/a_label.tiff"}, ...],
     "validation": [{"image": ..., "label": ...}, ...],
     "unlabeled":  [{"image": "pool/images/x.tif"}, ...]}

with POSIX paths relative to a base folder (by default the JSON file's own folder).
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePath

import numpy as np

from common.evaluation import read_modalities
from common.io import image_name, label_path_for, list_images

__all__ = ["build_datalist", "read_licenses", "relative_posix", "save_datalist", "split_names"]


def relative_posix(path: str | os.PathLike, base_dir: str | os.PathLike) -> str:
    """``path`` relative to ``base_dir`` with '/' separators (symlinks are not resolved)."""
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(base_dir))
    return PurePath(relative).as_posix()


def split_names(names: Sequence[str], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split of image names.

    The names are sorted, permuted with ``numpy.random.default_rng(seed)``, and the first
    ``round(n * val_fraction)`` of the permutation go to validation -- at least one when ``val_fraction > 0``
    and n >= 2, and never all of them.

    Args:
        names: distinct image names.
        val_fraction: share of validation images, 0 <= val_fraction < 1.
        seed: seed of the permutation.

    Returns:
        (training names, validation names), each sorted.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ordered = sorted(names)
    if len(set(ordered)) != len(ordered):
        raise ValueError("image names must be distinct")
    count = len(ordered)
    n_val = int(round(count * val_fraction))
    if val_fraction > 0 and count >= 2:
        n_val = min(max(n_val, 1), count - 1)
    else:
        n_val = 0
    permutation = np.random.default_rng(seed).permutation(count)
    validation = {ordered[i] for i in permutation[:n_val]}
    return [n for n in ordered if n not in validation], [n for n in ordered if n in validation]


def read_licenses(folder: str | os.PathLike) -> dict[str, str]:
    """name -> licence from ``<folder>/modalities.csv`` (columns ``name`` and ``license``).

    Raises:
        FileNotFoundError: the folder has no modalities.csv.
        ValueError: the file lacks a ``name`` or ``license`` column.
    """
    path = Path(folder) / "modalities.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no modalities.csv to read the images' licences from")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"name", "license"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} lacks the column(s) {sorted(missing)}")
        return {row["name"]: row["license"].strip() for row in reader}


def _folder_modalities(folder: str | os.PathLike) -> dict[str, str]:
    """name -> modality from ``<folder>/modalities.csv``; empty when the folder has none or the file
    lists licences only (no ``modality`` column)."""
    path = Path(folder) / "modalities.csv"
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle), [])
    return read_modalities(path) if "modality" in header else {}


def _licensed(names: Iterable[str], folder: Path, licenses: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(names whose licence is in ``licenses``, the others); everything is licensed when ``licenses`` is None."""
    names = list(names)
    if licenses is None:
        return names, []
    known = read_licenses(folder)
    allowed = set(licenses)
    kept = [name for name in names if known.get(name) in allowed]
    return kept, [name for name in names if known.get(name) not in allowed]


def _labeled_pairs(labeled_dir: Path) -> dict[str, tuple[Path, Path]]:
    """name -> (image, label) for a folder with images/ and labels/; errors on images without a label."""
    label_dir = labeled_dir / "labels"
    if not label_dir.is_dir():
        raise FileNotFoundError(f"labeled folder {labeled_dir} has no labels/ subfolder")
    pairs: dict[str, tuple[Path, Path]] = {}
    missing = []
    for image in list_images(labeled_dir):
        name = image_name(image)
        if name in pairs:
            raise ValueError(f"images {pairs[name][0]} and {image} share the name {name!r} (one label each)")
        label = label_path_for(image, label_dir)
        if not label.is_file():
            missing.append(f"{image} (expected {label})")
        pairs[name] = (image, label)
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) without a label: " + "; ".join(missing))
    if not pairs:
        raise ValueError(f"labeled folder {labeled_dir} holds no images")
    used = {label.name for _, label in pairs.values()}
    for orphan in sorted(p.name for p in label_dir.iterdir() if p.is_file() and not p.name.startswith(".")):
        if orphan not in used:
            warnings.warn(f"label {label_dir / orphan} has no image in {labeled_dir}; it is left out", stacklevel=3)
    return pairs


def build_datalist(
    labeled_dir: str | os.PathLike,
    base_dir: str | os.PathLike,
    unlabeled_dirs: Iterable[str | os.PathLike] = (),
    val_fraction: float = 0.2,
    seed: int = 0,
    licenses: Sequence[str] | None = None,
    train_dirs: Iterable[str | os.PathLike] = (),
) -> dict[str, list[dict[str, str]]]:
    """Datalist of a labeled CellSeg folder (split by :func:`split_names`) and unlabeled image folders.

    With ``licenses``, only images whose licence (from each folder's ``modalities.csv``) is listed are used for
    training, validation and the unlabeled pool; the other labeled images go to ``"evaluation_only"``, so that
    shipped weights never see them while they can still be scored.

    Args:
        labeled_dir: folder with ``images/<name>.<ext>`` and ``labels/<name>_label.tiff``.
        base_dir: folder the paths are written relative to.
        unlabeled_dirs: image folders (their ``images/`` subfolder when present), in the order given.
        val_fraction, seed: see :func:`split_names`.
        licenses: licence names to keep (e.g. ``["CC0-1.0", "MIT", "BSD-3-Clause"]``); None keeps all images.
        train_dirs: more labeled folders whose (licensed) images all go to training: a larger training pool
            that leaves the validation split of ``labeled_dir`` as it is.

    Returns:
        {"training": [{"image", "label"}], "validation": [{"image", "label"}], "unlabeled": [{"image"}]}, plus
        "evaluation_only": [{"image", "label"}] when ``licenses`` is given. Labeled entries also carry
        "modality" when their folder's modalities.csv names it (for balanced sampling).

    Raises:
        FileNotFoundError: a missing folder, images without a label (all named), or, with ``licenses``, a
            folder without modalities.csv.
        ValueError: no labeled images, or two images with the same name.
    """
    if isinstance(unlabeled_dirs, (str, os.PathLike)):
        unlabeled_dirs = [unlabeled_dirs]
    if isinstance(train_dirs, (str, os.PathLike)):
        train_dirs = [train_dirs]
    pairs = _labeled_pairs(Path(labeled_dir))
    usable, evaluation_only = _licensed(pairs, Path(labeled_dir), licenses)
    if not usable:
        raise ValueError(f"no labeled image in {labeled_dir} has one of the licences {list(licenses or [])}")
    training, validation = split_names(usable, val_fraction, seed)
    modalities = _folder_modalities(labeled_dir)

    def labeled_entry(image: Path, label: Path, modality: str | None) -> dict[str, str]:
        item = {"image": relative_posix(image, base_dir), "label": relative_posix(label, base_dir)}
        if modality:
            item["modality"] = modality
        return item

    def entry(name: str) -> dict[str, str]:
        return labeled_entry(*pairs[name], modalities.get(name))

    extra_training = []
    for folder in train_dirs:
        folder_pairs = _labeled_pairs(Path(folder))
        clashes = sorted(set(folder_pairs) & set(pairs))
        if clashes:
            raise ValueError(f"{folder} repeats image names of {labeled_dir}: {clashes[:5]}")
        kept, _ = _licensed(folder_pairs, Path(folder), licenses)
        folder_modalities = _folder_modalities(folder)
        extra_training += [labeled_entry(*folder_pairs[name], folder_modalities.get(name)) for name in sorted(kept)]

    unlabeled = []
    for folder in unlabeled_dirs:
        images = {image_name(image): image for image in list_images(folder)}
        kept, _ = _licensed(images, Path(folder), licenses)
        unlabeled += [{"image": relative_posix(images[name], base_dir)} for name in kept]
    datalist = {
        "training": [entry(name) for name in training] + extra_training,
        "validation": [entry(name) for name in validation],
        "unlabeled": unlabeled,
    }
    if licenses is not None:
        datalist["evaluation_only"] = [entry(name) for name in evaluation_only]
    return datalist


def save_datalist(datalist: dict, output: str | os.PathLike) -> Path:
    """Write a datalist as indented JSON (byte-identical for identical input); parent folders are created."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(datalist, indent=2) + "\n", encoding="utf-8")
    return output
