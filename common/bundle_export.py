"""Self-contained copies of a bundle, and safe extraction of bundle zips.

A bundle in this repository imports the shared package ``common``. MONAI Label and ``monai.bundle download``
use a bundle on its own: they put the bundle folder on ``sys.path`` and import its ``scripts`` package (MONAI
Label unloads ``scripts`` between bundles). :func:`export_bundle` therefore copies ``common`` into the copy as
``scripts/common`` and rewrites every reference to ``common`` in the copy's configs and Python files to
``scripts.common``, so the copy needs only third-party packages. The copy is made at export time from the
installed ``common``: the repository holds one implementation.

:func:`extract_bundle` unpacks a bundle zip and refuses, before writing anything, a member whose path would
leave the target folder (absolute, ``..``, a drive, or a symbolic link).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

__all__ = ["VENDORED_PACKAGE", "rewrite_references", "bundle_version", "export_bundle", "unsafe_zip_members", "extract_bundle"]

SHARED_PACKAGE = "common"
VENDORED_PACKAGE = "scripts.common"
SHARED_PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
# build outputs and training artefacts that never belong in a distributed bundle
SKIPPED_NAMES = {"__pycache__", ".pytest_cache", "runs", "eval", ".DS_Store"}
SKIPPED_SUFFIXES = (".pyc", ".pyo")

# `common.<name>` used as a dotted name (in `_target_`, `$` expressions, Python code), not `x.common.<name>`
_DOTTED = re.compile(rf"(?<![\w.]){SHARED_PACKAGE}(?=\.[A-Za-z_])")
# `from common import x`
_FROM_PACKAGE = re.compile(rf"(?<=\bfrom ){SHARED_PACKAGE}(?=\s+import\b)")
# `import common` alone, with or without `as name`
_IMPORT_PACKAGE = re.compile(rf"(?<=\bimport ){SHARED_PACKAGE}\b(?![\w.])")
_IMPORT_UNALIASED = re.compile(rf"(?<=\bimport ){SHARED_PACKAGE}\b(?![\w.])(?!\s+as\b)")
# what is left of a reference to the top-level package after rewriting, in a `$` expression or `_target_`
_LEFTOVER = re.compile(rf"(?<![\w.]){SHARED_PACKAGE}(?![\w])")


def rewrite_references(text: str, config: bool) -> str:
    """``text`` with every reference to the top-level ``common`` package pointed at ``scripts.common``.

    Args:
        text: a bundle config (YAML/JSON) or a Python source file.
        config: True for a bundle config. A config's ``$import common`` binds the name ``scripts`` (MONAI's
            parser binds the full dotted name of ``$import a.b``, so ``scripts.common.x`` expressions need the
            top-level name); in Python, ``import common`` becomes ``import scripts.common``, which binds
            ``scripts`` too.

    Returns:
        The rewritten text; everything else (comments included) is unchanged.
    """
    text = _DOTTED.sub(VENDORED_PACKAGE, text)
    text = _FROM_PACKAGE.sub(VENDORED_PACKAGE, text)
    if config:
        text = _IMPORT_UNALIASED.sub("scripts", text)
    return _IMPORT_PACKAGE.sub(VENDORED_PACKAGE, text)


def _python_leftovers(path: Path) -> list[str]:
    """``file:line`` of every absolute import of the top-level ``common`` package left in a Python file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules = [node.module or ""]
        else:
            continue
        if any(module == SHARED_PACKAGE or module.startswith(f"{SHARED_PACKAGE}.") for module in modules):
            found.append(f"{path}:{node.lineno}")
    return found


def _config_leftovers(path: Path) -> list[str]:
    """``file: value`` of every ``$`` expression or ``_target_`` of a config still naming ``common``."""
    from monai.bundle import ConfigParser

    found = []

    def walk(value, key=None):
        if isinstance(value, dict):
            for child_key, child in value.items():
                walk(child, child_key)
        elif isinstance(value, list):
            for child in value:
                walk(child)
        elif isinstance(value, str) and (value.startswith("$") or key == "_target_") and _LEFTOVER.search(value):
            found.append(f"{path}: {value}")

    walk(ConfigParser.load_config_file(path))
    return found


def _skipped(_: str, names: list[str]) -> set[str]:
    return {name for name in names if name in SKIPPED_NAMES or name.endswith(SKIPPED_SUFFIXES)}


def _check_checkpoint(checkpoint: Path) -> None:
    """Raise unless ``checkpoint`` is a tensor-only state dict (what inference and MONAI Label load)."""
    import torch

    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"checkpoint {checkpoint} is not a tensor-only state dict: {error}") from error
    if not isinstance(state, dict) or not state or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"checkpoint {checkpoint} is not a network state dict (name -> tensor)")


def _write_zip(folder: Path, zip_path: Path) -> None:
    """``folder`` as ``zip_path`` with the folder's name as the single top-level entry (model-zoo layout),
    members sorted so the archive lists the same way every time; written atomically."""
    temporary = zip_path.with_name(f".{zip_path.name}.tmp")
    try:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(folder.rglob("*")):
                archive.write(path, str(PurePosixPath(folder.name, *path.relative_to(folder).parts)))
        os.replace(temporary, zip_path)
    finally:
        temporary.unlink(missing_ok=True)


def bundle_version(bundle_dir: str | os.PathLike) -> str:
    """The ``version`` of a bundle's ``configs/metadata.json``.

    Raises:
        ValueError: the metadata has no version, or one that is not a plain dotted version (it names a file).
    """
    metadata_path = Path(bundle_dir) / "configs" / "metadata.json"
    version = json.loads(metadata_path.read_text(encoding="utf-8")).get("version")
    if not isinstance(version, str) or not re.fullmatch(r"\d+(\.\d+)*", version):
        raise ValueError(f"{metadata_path}: version {version!r} is not a dotted version such as 0.3.1")
    return version


def export_bundle(
    bundle_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write a self-contained copy of a bundle: ``output_dir/<name>/`` and ``output_dir/<name>_v<version>.zip``.

    The zip is named as the model zoo names its release assets (version from ``configs/metadata.json``), so a
    GitHub release holding it serves ``python -m monai.bundle download --source github --repo OWNER/REPO/TAG
    --name <name> --version <version>`` and MONAI Label's ``--conf zoo_source github``.

    The copy holds the bundle (configs, scripts, docs, models, LICENSE; no ``runs/``, ``eval/`` or caches) and
    the shared package as ``scripts/common``; its configs and Python files refer to ``scripts.common``. It runs
    wherever its folder is on ``sys.path`` (MONAI Label puts it there; from a shell, run from the folder or set
    ``PYTHONPATH``), with only third-party packages installed.

    Args:
        bundle_dir: the bundle folder (``configs/metadata.json``, ``scripts/__init__.py``).
        output_dir: where the folder and the zip go (created).
        checkpoint: a tensor-only state dict to ship as ``models/model.pt`` (e.g. a training run's model.pt);
            None keeps whatever ``models/`` holds.
        overwrite: replace an earlier export of the same bundle in ``output_dir``.

    Returns:
        (the exported folder, the zip).

    Raises:
        FileNotFoundError: ``bundle_dir`` is not a bundle, or ``checkpoint`` is missing.
        FileExistsError: the export exists and ``overwrite`` is False.
        ValueError: the bundle already carries ``scripts/common``, ``checkpoint`` is not a tensor-only state
            dict, or a reference to ``common`` could not be rewritten (each named with its file).
    """
    bundle_dir = Path(bundle_dir).resolve()
    for required in ("configs/metadata.json", "scripts/__init__.py"):
        if not (bundle_dir / required).is_file():
            raise FileNotFoundError(f"{bundle_dir} is not a bundle: {required} is missing")
    if (bundle_dir / "scripts" / SHARED_PACKAGE).exists():
        raise ValueError(f"{bundle_dir} already carries scripts/{SHARED_PACKAGE}: it is an export, not a bundle of this repository")
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        _check_checkpoint(checkpoint)
    output_dir = Path(output_dir)
    name = bundle_dir.name
    target, zip_path = output_dir / name, output_dir / f"{name}_v{bundle_version(bundle_dir)}.zip"
    output_dir.mkdir(parents=True, exist_ok=True)
    if not overwrite and (target.exists() or zip_path.exists()):
        raise FileExistsError(f"{target} or {zip_path} exists; pass overwrite=True to replace them")

    # built beside the target and moved into place at the end, so a failed export leaves the old one intact
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=output_dir))
    try:
        copy = staging / name
        shutil.copytree(bundle_dir, copy, ignore=_skipped)
        shutil.copytree(SHARED_PACKAGE_DIR, copy / "scripts" / SHARED_PACKAGE, ignore=_skipped)
        if checkpoint is not None:
            (copy / "models").mkdir(exist_ok=True)
            shutil.copyfile(checkpoint, copy / "models" / "model.pt")
        leftovers = []
        for path in sorted((copy / "scripts").rglob("*.py")):
            path.write_text(rewrite_references(path.read_text(encoding="utf-8"), config=False), encoding="utf-8")
            leftovers += _python_leftovers(path)
        for path in sorted((copy / "configs").iterdir()):
            if path.suffix in CONFIG_SUFFIXES:
                path.write_text(rewrite_references(path.read_text(encoding="utf-8"), config=True), encoding="utf-8")
                leftovers += _config_leftovers(path)
        if leftovers:
            shown = [item.replace(str(copy), name) for item in leftovers]
            raise ValueError(f"references to '{SHARED_PACKAGE}' the export cannot rewrite: " + "; ".join(shown))
        _write_zip(copy, staging / zip_path.name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(copy, target)
        os.replace(staging / zip_path.name, zip_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, zip_path


def unsafe_zip_members(archive: zipfile.ZipFile, target_dir: str | os.PathLike) -> list[str]:
    """Names of the members of ``archive`` that extraction into ``target_dir`` must refuse: absolute paths,
    drive letters, ``..`` components, symbolic links, and anything that resolves outside ``target_dir``."""
    root = Path(target_dir).resolve()
    unsafe = []
    for member in archive.infolist():
        name = member.filename.replace("\\", "/")
        parts = PurePosixPath(name).parts
        is_link = stat.S_ISLNK(member.external_attr >> 16)
        escapes = name.startswith("/") or re.match(r"^[A-Za-z]:", name) is not None or ".." in parts
        if escapes or is_link or not (root / name).resolve().is_relative_to(root):
            unsafe.append(member.filename)
    return unsafe


def extract_bundle(zip_path: str | os.PathLike, target_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Unpack a bundle zip into ``target_dir`` after checking every member.

    The zip is unpacked beside its destination first and moved into place, so a failure leaves ``target_dir`` as
    it was, and an existing bundle of the same name is never mixed with the new one's files.

    Args:
        zip_path: the zip, e.g. one written by :func:`export_bundle`.
        target_dir: destination folder (created).
        overwrite: replace what ``target_dir`` already holds under the zip's top-level names.

    Returns:
        The bundle folder: ``target_dir/<name>`` when the zip has a single top-level folder (the model-zoo
        layout), else ``target_dir``.

    Raises:
        ValueError: a member would be written outside ``target_dir`` (all such members are named); nothing
            is extracted then.
        FileExistsError: ``target_dir`` already holds one of the zip's top-level names and ``overwrite`` is False.
        FileNotFoundError, zipfile.BadZipFile: ``zip_path`` is missing or not a zip.
    """
    zip_path, target_dir = Path(zip_path), Path(target_dir)
    with zipfile.ZipFile(zip_path) as archive:
        unsafe = unsafe_zip_members(archive, target_dir)
        if unsafe:
            raise ValueError(f"{zip_path}: refusing to extract, these members would leave {target_dir}: {unsafe}")
        tops = sorted({PurePosixPath(name.replace("\\", "/")).parts[0] for name in archive.namelist()})
        existing = [str(target_dir / top) for top in tops if os.path.lexists(target_dir / top)]
        if existing and not overwrite:
            raise FileExistsError(f"{zip_path}: {existing} already exist; pass overwrite=True to replace them")
        target_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".extracting.", dir=target_dir))
        try:
            archive.extractall(staging)
            for top in tops:
                destination = target_dir / top
                if destination.is_dir() and not destination.is_symlink():
                    shutil.rmtree(destination)
                elif os.path.lexists(destination):
                    destination.unlink()
                os.replace(staging / top, destination)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if len(tops) == 1 and (target_dir / tops[0]).is_dir():
        return target_dir / tops[0]
    return target_dir
