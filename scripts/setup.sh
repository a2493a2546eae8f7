#!/usr/bin/env bash
# Sets up a fresh machine for maws_fast: the Fashion-MNIST demo data (Debian package), a virtual
# environment in .venv with CPU torch 2.13.0 + triton 3.7.1 (pinned in requirements/cpu.txt),
# and the package in editable mode. `--dev` adds the test dependencies (pytest, timm).
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "setup: installing Debian's dataset-fashion-mnist" >&2
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist
fi

python3 -m venv .venv
# torch first and alone: with torch 2.13.0 (the CPU build) in place nothing later pulls a CUDA build.
.venv/bin/pip install -q --disable-pip-version-check -c requirements/cpu.txt torch triton
# The kernels distribution first: the trainer requires it by name and version, and finds it here.
.venv/bin/pip install -q --disable-pip-version-check -c requirements/cpu.txt -e ./kernels
.venv/bin/pip install -q --disable-pip-version-check -c requirements/cpu.txt -e ".${extras}"
.venv/bin/python -c "import torch, maws_fast, maws_kernels; print('setup: ok, torch', torch.__version__)"
