#!/usr/bin/env bash
# Idempotent set-up of robustbench_lab on a fresh machine (Debian, Python >= 3.10):
#   1. a virtual environment in .venv with the project installed editable (`--dev` adds the test extra);
#   2. the default dataset, Fashion-MNIST: the Debian package dataset-fashion-mnist where apt and root are
#      available, otherwise torchvision's download into data/ (needs a network).
# Re-running it is fast: pip is skipped while pyproject.toml is unchanged, data already present is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
EXTRA=""
[ "${1:-}" = "--dev" ] && EXTRA="[dev]"

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi

STAMP=".venv/.robustbench_lab-installed${EXTRA:+-dev}"
WANT="$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[setup] installing Python dependencies (torch 2.14.1 / torchvision 0.29.1 and the rest)"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${EXTRA}" -c scripts/constraints.txt 2>&1 \
        | { grep -v "^WARNING: Location" || true; }
    .venv/bin/python -c "import torch, torchvision, hydra, robustbench_lab" \
        || { echo "[setup] the Python environment is incomplete" >&2; exit 1; }
    echo "$WANT" > "$STAMP"
else
    echo "[setup] Python dependencies already installed (.venv)"
fi

SYS_DATA=/usr/share/datasets/fashion-mnist
if [ -f "$SYS_DATA/train-images-idx3-ubyte.gz" ] || [ -f "$SYS_DATA/train-images-idx3-ubyte" ]; then
    echo "[setup] Fashion-MNIST present in $SYS_DATA"
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "[setup] installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
else
    echo "[setup] no apt/root: downloading Fashion-MNIST with torchvision into data/ (needs a network)"
    .venv/bin/python -m robustbench_lab.core.data download fashion_mnist data \
        || echo "[setup] WARNING: download failed; run.py will explain how to provide the data" >&2
fi
echo "[setup] done"
