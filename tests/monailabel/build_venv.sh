#!/usr/bin/env bash
# Builds (or reuses) the virtualenv that runs a real MONAI Label 0.8.5 server for tests/test_monailabel_server.py.
# MONAI Label lives apart from the project's environment: it pins numpy < 2, and its torchvision needs a CUDA build
# of torch (which runs on CPU; PyPI's torchvision does not load beside the project's +cpu torch). torch 2.14.1 and
# torchvision 0.29.1 are the CUDA builds the project machines keep in their local package index (this takes about
# 8 minutes there; fetching torch 2.13.0's CUDA build from PyPI took 70); elsewhere pip downloads them. About 8 GB.
# Later runs find the finished venv and exit at once.
#   usage: build_venv.sh [VENV_DIR]  (default: $CELLSEG_MONAILABEL_VENV or ~/.cache/cellseg/monailabel-0.8.5-torch-2.14.1)
set -euo pipefail
venv_dir=${1:-${CELLSEG_MONAILABEL_VENV:-$HOME/.cache/cellseg/monailabel-0.8.5-torch-2.14.1}}
stamp="$venv_dir/.complete"
if [ -f "$stamp" ]; then
    echo "MONAI Label venv ready: $venv_dir"
    exit 0
fi
rm -rf "$venv_dir"  # a half-built venv from an interrupted run
mkdir -p "$(dirname "$venv_dir")"
python3 -m venv "$venv_dir"
pip=("$venv_dir/bin/python" -m pip install --quiet)
"${pip[@]}" --upgrade pip setuptools wheel
"${pip[@]}" torch==2.14.1 torchvision==0.29.1
# monailabel needs sam2, published as source only: built against the torch above (no isolated build environment,
# which would fetch a second torch) and without its optional CUDA extension
SAM2_BUILD_CUDA=0 "${pip[@]}" --no-build-isolation \
    torch==2.14.1 torchvision==0.29.1 monai==1.6.1 monailabel==0.8.5 \
    "pydicom<3" "pynetdicom<3" "dicomweb-client<0.60" \
    pytorch-ignite==0.5.5 scikit-image tifffile imagecodecs nibabel fire pyyaml einops scipy tqdm
touch "$stamp"
echo "MONAI Label venv built: $venv_dir"
