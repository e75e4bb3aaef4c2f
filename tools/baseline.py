"""Segment a folder with the classical baseline (Otsu threshold + distance-transform watershed).

    python tools/baseline.py --input_dir IMAGES --output_dir OUT

Writes ``OUT/<name>_label.tiff`` for every image (``common.classical.otsu_distance_watershed``), the numbers the
bundles' model cards compare with; score them with ``tools/evaluate.py``. Unreadable images are named and
skipped, and the tool then exits non-zero after writing the others.
"""

from __future__ import annotations

import fire
from tqdm import tqdm

from common.classical import otsu_distance_watershed
from common.io import ImageReadError, image_name, list_images, read_image, write_label


def baseline(input_dir: str, output_dir: str, sigma: float = 1.0, min_size: int = 16, min_distance: int = 4) -> None:
    """Segment every image of ``input_dir`` (its images/ subfolder when there is one) into ``output_dir``.

    Args:
        input_dir: folder of images.
        output_dir: folder for ``<name>_label.tiff``, created when missing.
        sigma, min_size, min_distance: see :func:`common.classical.otsu_distance_watershed`.
    """
    failures = []
    for path in tqdm(list_images(input_dir), desc="baseline", unit="image"):
        try:
            image = read_image(path)
        except (ImageReadError, OSError) as error:
            failures.append(f"{path}: {error}")
            continue
        label = otsu_distance_watershed(image, sigma=sigma, min_size=min_size, min_distance=min_distance)
        write_label(f"{output_dir}/{image_name(path)}_label.tiff", label)
        tqdm.write(f"{image_name(path)}: {int(label.max())} cells")
    if failures:
        raise SystemExit(f"{len(failures)} image(s) could not be read: " + "; ".join(failures))


if __name__ == "__main__":
    fire.Fire(baseline)
