"""Write a MONAI datalist JSON for a labeled CellSeg folder and optional unlabeled image folders.

Example::

    python tools/make_datalist.py --labeled_dir ../shared/data/cellseg-dev \
        --unlabeled_dirs "[../shared/data/cellseg-unlabeled]" --output data/datalist.json --val_fraction 0.2 --seed 0

    # the shipped weights' pool: the licensed dev rows split as before, plus all of cellseg-train for training
    python tools/make_datalist.py --labeled_dir ../shared/data/cellseg-dev --train_dirs "[../shared/data/cellseg-train]" \
        --unlabeled_dirs "[../shared/data/cellseg-unlabeled]" --output data/datalist.json --val_fraction 0.25 \
        --seed 0 --licenses "[CC0-1.0,MIT,BSD-3-Clause]"

Paths in the file are relative to ``--base_dir`` (default: the output file's folder).
"""

from __future__ import annotations

from pathlib import Path

import fire

from common.datalist import build_datalist, save_datalist
from common.workflows import command_line_list


def main(
    labeled_dir: str,
    output: str,
    unlabeled_dirs: str | list[str] | tuple[str, ...] | None = None,
    base_dir: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    licenses: str | list[str] | tuple[str, ...] | None = None,
    train_dirs: str | list[str] | tuple[str, ...] | None = None,
) -> None:
    """Build the datalist and write it to ``output``.

    Args:
        labeled_dir: folder with images/ and labels/ (<name>_label.tiff).
        output: JSON file to write.
        unlabeled_dirs: one folder or a list "[D1,D2]" of image folders for the "unlabeled" key.
        base_dir: folder the paths are relative to; default: the folder of ``output``.
        val_fraction: share of labeled images for "validation", in [0, 1).
        seed: seed of the split.
        licenses: keep only images whose licence in each folder's modalities.csv is one of these, e.g.
            "[CC0-1.0,MIT,BSD-3-Clause]"; the other labeled images are listed under "evaluation_only".
        train_dirs: more labeled folders "[D1,D2]" (images/ + labels/) added to "training" whole; the
            validation split stays that of ``labeled_dir``.
    """
    if base_dir is None:
        base_dir = Path(output).absolute().parent
    try:
        datalist = build_datalist(
            labeled_dir,
            base_dir,
            command_line_list(unlabeled_dirs),
            val_fraction=float(val_fraction),
            seed=int(seed),
            licenses=None if licenses is None else command_line_list(licenses),
            train_dirs=command_line_list(train_dirs),
        )
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"make_datalist: {error}") from error
    path = save_datalist(datalist, output)
    counts = ", ".join(f"{len(items)} {key}" for key, items in datalist.items())
    print(f"wrote {path} ({counts}; paths relative to {base_dir})")


if __name__ == "__main__":
    fire.Fire(main)
