"""Export a bundle as a self-contained folder and zip (for MONAI Label and ``monai.bundle``), or unpack one.

    python tools/export_bundle.py export bundles/mt2_cell_segmentation --output_dir dist [--checkpoint runs/model.pt] [--overwrite]
    python tools/export_bundle.py extract dist/mt2_cell_segmentation_v0.3.1.zip --target_dir apps/monaibundle/model [--overwrite]

``export`` copies the shared ``common`` package into the copy's ``scripts`` package and rewrites the configs to
use it, so the copy runs with only third-party packages installed, from any folder, once its folder is on the
Python path (MONAI Label does that; from a shell: ``PYTHONPATH=<copy> python -m monai.bundle run ...``).
``extract`` refuses a zip with a member that would land outside the target folder.
"""

from __future__ import annotations

import zipfile

import fire

from common.bundle_export import export_bundle, extract_bundle
from common.workflows import flag


def export(bundle_dir: str, output_dir: str = "dist", checkpoint: str | None = None, overwrite: bool = False) -> None:
    """Write ``output_dir/<name>/`` and ``output_dir/<name>_v<version>.zip`` (the model zoo's release asset name).

    Args:
        bundle_dir: the bundle folder, e.g. bundles/mt2_cell_segmentation.
        output_dir: destination folder (created).
        checkpoint: tensor-only state dict to ship as models/model.pt (default: what models/ holds).
        overwrite: replace an earlier export in ``output_dir``.
    """
    try:
        folder, archive = export_bundle(bundle_dir, output_dir, checkpoint=checkpoint, overwrite=flag(overwrite))
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        raise SystemExit(f"export_bundle: {error}") from error
    model = folder / "models" / "model.pt"
    print(f"wrote {folder} and {archive}" + ("" if model.is_file() else " (no models/model.pt: inference needs --checkpoint)"))


def extract(zip_path: str, target_dir: str = ".", overwrite: bool = False) -> None:
    """Unpack a bundle zip into ``target_dir``, refusing members that would leave it.

    Args:
        zip_path: the bundle zip.
        target_dir: destination folder (created), e.g. a MONAI Label app's model/ folder.
        overwrite: replace a bundle of the same name already in ``target_dir``.
    """
    try:
        folder = extract_bundle(zip_path, target_dir, overwrite=flag(overwrite))
    except (FileNotFoundError, FileExistsError, ValueError, zipfile.BadZipFile) as error:
        raise SystemExit(f"export_bundle: {error}") from error
    print(f"extracted {folder}")


if __name__ == "__main__":
    fire.Fire({"export": export, "extract": extract})
