"""Glue between bundle configs and files: where the bundle is, which images train it, and running a bundle's
inference from Python."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from monai.data import load_decathlon_datalist

from common.datalist import build_datalist

__all__ = [
    "bundle_root_from_argv",
    "training_datalists",
    "unlabeled_datalist",
    "run_bundle",
    "inference_config",
    "loaded_network",
    "config_values",
    "flag",
    "command_line_json",
    "command_line_list",
]

DATALIST_NAME = "datalist.json"


def flag(value: Any) -> bool:
    """A yes/no setting from a config or the command line, where ``--x false`` arrives as the string 'false'.

    Raises:
        ValueError: anything but a bool, 0/1 or true/false/yes/no/on/off (any case).
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


_JSON_WORDS = {"true": True, "false": False, "null": None}


def command_line_list(value: str | list | tuple | None) -> list[str]:
    """Strings (folders, names) from a ``fire`` argument: None, one value, a list, or the text "[D1,D2]" that fire
    leaves unparsed when the items are not Python literals (e.g. paths with '/' or '-')."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(item) for item in value]
    text = str(value).strip()
    if text[:1] in "[(" and text[-1:] in "])":
        return [item.strip().strip("'\"") for item in text[1:-1].split(",") if item.strip()]
    return [text]


def command_line_json(value: Any) -> Any:
    """A JSON argument of a ``fire`` tool (``--overrides '{"test_time_flips": false}'``), as JSON says it.

    ``fire`` parses such an argument as a Python literal before the tool sees it and keeps JSON's bare ``true``,
    ``false`` and ``null`` as strings, where "false" counts as true: they are mapped back, in nested dicts and
    lists too. A string (from Python, or one ``fire`` could not parse) is read as JSON.
    """
    if isinstance(value, str):
        return json.loads(value)

    def restored(item: Any) -> Any:
        if isinstance(item, dict):
            return {key: restored(inner) for key, inner in item.items()}
        if isinstance(item, (list, tuple)):
            return [restored(inner) for inner in item]
        return _JSON_WORDS.get(item, item) if isinstance(item, str) else item

    return restored(value)


def published_model_path(bundle_root: str | Path) -> str:
    """Where training publishes its network: ``models/model.pt`` of an exported (or downloaded) copy of a bundle,
    the file MONAI Label serves and reloads after training, as model-zoo bundles do; '' for a bundle of this
    repository, whose shipped weights a training run never overwrites."""
    from common.bundle_export import VENDORED_PACKAGE

    exported = (Path(bundle_root) / Path(*VENDORED_PACKAGE.split(".")) / "__init__.py").is_file()
    return str(Path(bundle_root) / "models" / "model.pt") if exported else ""


def bundle_root_from_argv(argv: Sequence[str] | None = None, default: str = ".") -> str:
    """The bundle folder of the first ``--config_file`` on the command line (its ``configs/`` parent), so that
    ``python -m monai.bundle run ... --config_file bundles/<name>/configs/x.yaml`` works from any folder.
    Falls back to ``default`` (MONAI's convention: the current folder) when no config file is given, e.g. when
    MONAI Label or a script builds the workflow and sets ``bundle_root`` itself."""
    argv = list(sys.argv if argv is None else argv)
    for index, argument in enumerate(argv):
        if argument.startswith("--config_file"):
            value = argument.split("=", 1)[1] if "=" in argument else (argv[index + 1] if index + 1 < len(argv) else "")
            if value.startswith("["):
                value = ast.literal_eval(value)[0]
            config_dir = Path(value).resolve().parent
            return str(config_dir.parent if config_dir.name == "configs" else config_dir)
    return default


def training_datalists(dataset_dir: str | Path, val_fraction: float = 0.2, seed: int = 0) -> dict[str, list[dict]]:
    """Training, validation and unlabeled lists of absolute paths for ``dataset_dir``.

    ``dataset_dir`` holds either a MONAI datalist ``datalist.json`` (keys ``training``, ``validation``,
    optional ``unlabeled``; paths relative to ``dataset_dir``, as ``tools/make_datalist.py`` writes them) or the
    challenge folders ``images/`` + ``labels/`` (split by ``val_fraction`` and ``seed``) with an optional
    ``unlabeled/`` image folder.
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"dataset_dir {dataset_dir} is not a folder")
    datalist_file = dataset_dir / DATALIST_NAME
    if datalist_file.is_file():
        lists = {}
        for key in ("training", "validation", "unlabeled"):
            try:
                lists[key] = load_decathlon_datalist(datalist_file, data_list_key=key, base_dir=dataset_dir)
            except ValueError:  # MONAI raises when the key is absent; only "training" is required
                if key == "training":
                    raise
                lists[key] = []
        return lists
    unlabeled = [dataset_dir / "unlabeled"] if (dataset_dir / "unlabeled").is_dir() else []
    relative = build_datalist(dataset_dir, dataset_dir, unlabeled, val_fraction=val_fraction, seed=seed)
    return {key: [{k: str(dataset_dir / v) for k, v in item.items()} for item in items] for key, items in relative.items()}


def unlabeled_datalist(dataset_dir: str | Path) -> list[dict]:
    """The unlabeled images of ``dataset_dir`` (see :func:`training_datalists`), or none when ``dataset_dir`` is
    not a folder. MONAI Label trains a bundle from labeled lists it sets itself (``train#dataset#data``,
    ``validate#dataset#data``) and never sets ``dataset_dir``; a wrong ``dataset_dir`` on the command line still
    fails, on the labeled lists."""
    if not Path(dataset_dir).is_dir():
        return []
    return training_datalists(dataset_dir)["unlabeled"]


def run_bundle(bundle_root: str | Path, config: str = "inference.yaml", workflow_type: str = "infer", **overrides: Any):
    """Build, run and finalize a bundle config from Python, the way ``python -m monai.bundle run`` does.

    Args:
        bundle_root: the bundle folder (holding ``configs/``).
        config: config file name inside ``configs/``, or a list of them merged left to right.
        workflow_type: "infer" or "train" (for MONAI's property checks).
        overrides: config ids and values, e.g. ``dataset_dir=..., output_dir=...``.

    Returns:
        The ``monai.bundle.ConfigWorkflow`` after its run (its parser gives access to every component).
    """
    from monai.bundle import ConfigWorkflow

    bundle_root = Path(bundle_root).resolve()
    names = [config] if isinstance(config, str) else list(config)
    workflow = ConfigWorkflow(
        config_file=[str(bundle_root / "configs" / name) for name in names],
        workflow_type=workflow_type,
        bundle_root=str(bundle_root),
        **overrides,
    )
    workflow.initialize()
    try:
        workflow.run()
    finally:
        workflow.finalize()
    return workflow


def inference_config(bundle_root: str | Path, checkpoint: str | Path | None = None, **overrides: Any):
    """A bundle's ``configs/inference.yaml`` as a ``monai.bundle.ConfigParser``, with ``bundle_root`` set and
    ``checkpoint`` (when given) and ``overrides`` applied: the pieces of its inference (``preprocessing``,
    ``inferer``, ``postprocessing``, ...) without the engine, for tools that time or score them one by one."""
    from monai.bundle import ConfigParser

    bundle_root = Path(bundle_root).resolve()
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.yaml"))
    parser.update({"bundle_root": str(bundle_root), **({"checkpoint": str(checkpoint)} if checkpoint else {}), **overrides})
    return parser


def loaded_network(parser):
    """The ``network`` of an :func:`inference_config` with the weights of its ``checkpoint`` (tensor-only state
    dict), on its ``device``, in eval mode."""
    import torch

    network = parser.get_parsed_content("network")
    state = torch.load(parser.get_parsed_content("checkpoint"), map_location=parser.get_parsed_content("device"), weights_only=True)
    network.load_state_dict(state)
    return network.eval()


def config_values(config_file: str | Path, names: Sequence[str]) -> dict[str, Any]:
    """The literal top-level values ``names`` of a bundle config file (e.g. the post-processing settings an
    inference config ships), read without building the workflow."""
    from monai.bundle import ConfigParser

    config = ConfigParser.load_config_file(config_file)
    missing = [name for name in names if name not in config]
    if missing:
        raise KeyError(f"{config_file} does not define {missing}")
    return {name: config[name] for name in names}
