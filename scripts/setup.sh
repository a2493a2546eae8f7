#!/usr/bin/env bash
# Sets up a fresh machine for maws_fast: the Fashion-MNIST demo data (Debian package), a virtual
# environment in .venv with CPU torch 2.13.0 + triton 3.7.1 (pinned in requirements/cpu.txt),
# and the package in editable mode. `--dev` adds the test dependencies (pytest, timm).
# Idempotent: a second run only checks what is there.
#
# `--cuda` (combinable with `--dev`) is the GPU install instead: it reads the driver's CUDA version
# from the header of `nvidia-smi` (or $NVIDIA_SMI, or `--nvidia-smi PATH`) and installs from
# requirements/cuda<major>.txt the CUDA torch build with its Triton, the DALI wheel for that CUDA
# major, and xformers where that file pins one. `--dry-run` prints the plan and the commands it
# would run, and runs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
cuda=0
dry_run=0
nvidia_smi="${NVIDIA_SMI:-nvidia-smi}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) extras="[dev]" ;;
    --cuda) cuda=1 ;;
    --dry-run) dry_run=1 ;;
    --nvidia-smi) nvidia_smi="${2:-}"; shift || true ;;
    --nvidia-smi=*) nvidia_smi="${1#*=}" ;;
    *) echo "setup: unknown option '$1' (options: --dev, --cuda, --dry-run, --nvidia-smi PATH)" >&2; exit 2 ;;
  esac
  shift
done

# Runs a command, or under --dry-run prints it (prefixed with '+ ') instead.
run() {
  if [ "$dry_run" = 1 ]; then echo "+ $*"; else "$@"; fi
}
pip_install=(.venv/bin/pip install -q --disable-pip-version-check)

if [ "$cuda" = 1 ]; then
  # Everything about the driver is checked before anything is installed.
  if ! command -v "$nvidia_smi" >/dev/null 2>&1; then
    echo "setup: --cuda needs nvidia-smi, and '$nvidia_smi' was not found: install the NVIDIA driver, or point NVIDIA_SMI (or --nvidia-smi) at it" >&2
    exit 2
  fi
  # The header reads e.g. "| NVIDIA-SMI 550.54.15  Driver Version: 550.54.15  CUDA Version: 12.4 |":
  # the newest CUDA this driver runs, not an installed toolkit.
  smi_out="$("$nvidia_smi" 2>&1)" || true
  driver_cuda="$(printf '%s\n' "$smi_out" | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1)"
  driver_version="$(printf '%s\n' "$smi_out" | sed -n 's/.*Driver Version: *\([0-9.][0-9.]*\).*/\1/p' | head -n 1)"
  if [ -z "$driver_cuda" ]; then
    echo "setup: '$nvidia_smi' printed no 'CUDA Version: X.Y' header (is the NVIDIA driver loaded? run it by hand to see)" >&2
    exit 2
  fi
  driver_major="${driver_cuda%%.*}"
  # The CUDA 12 builds rely on CUDA minor-version compatibility (any 12.x driver, >= 525.60.13),
  # as DALI documents for its cuda120 wheel; torch's 12.8 build on a 12.0-12.7 driver is not
  # verified on hardware. A driver newer than 13.x still runs the CUDA 13 builds.
  if [ "$driver_major" -lt 12 ]; then
    echo "setup: the NVIDIA driver ${driver_version:-?} supports CUDA $driver_cuda; --cuda needs CUDA 12.0 or newer (driver >= 525.60.13, for torch 2.10.0's CUDA 12.8 build): upgrade the driver" >&2
    exit 2
  elif [ "$driver_major" -eq 12 ]; then
    req=requirements/cuda12.txt; torch_build="CUDA 12.8"; min_driver="CUDA 12.0, driver >= 525.60.13"
  else
    req=requirements/cuda13.txt; torch_build="CUDA 13.0"; min_driver="CUDA 13.0, driver >= 580"
  fi
  pinned() { sed -n "s/^$1=\{2,3\}\([^ ;#]*\).*/\1/p" "$req"; }
  dali="$(sed -n 's/^\(nvidia-dali-cuda[0-9]*\)==.*/\1/p' "$req")"
  xformers="$(pinned xformers)"
  echo "setup: plan for --cuda${extras:+ --dev}"
  echo "setup: nvidia-smi ($nvidia_smi): driver ${driver_version:-?}, CUDA $driver_cuda -> $req (needs $min_driver)"
  echo "setup: torch $(pinned torch) from the default index, whose Linux wheel is the $torch_build build; triton $(pinned triton)"
  echo "setup: DALI wheel $dali==$(pinned "$dali"): the driver's CUDA major is $driver_major"
  if [ -n "$xformers" ]; then
    echo "setup: xformers $xformers (built for that torch)"
  else
    echo "setup: xformers skipped: $req pins none built for this torch"
  fi
fi

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "setup: installing Debian's dataset-fashion-mnist" >&2
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  run $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get update -q
  run $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist
fi

run python3 -m venv .venv
if [ "$cuda" = 0 ]; then
  # torch first and alone: with torch 2.13.0 (the CPU build) in place nothing later pulls a CUDA build.
  run "${pip_install[@]}" -c requirements/cpu.txt torch triton
  # The kernels distribution first: the trainer requires it by name and version, and finds it here.
  run "${pip_install[@]}" -c requirements/cpu.txt -e ./kernels
  run "${pip_install[@]}" -c requirements/cpu.txt -e ".${extras}"
  run .venv/bin/python -c "import torch, maws_fast, maws_kernels; print('setup: ok, torch', torch.__version__)"
  # timm ([dev]) imports torchvision. The torchvision wheel for torch 2.13.0 that the default index
  # serves is linked against the CUDA torch (libtorch_cuda.so), and no CPU build or source release of
  # it is there; it fails to import beside CPU torch ("operator torchvision::nms does not exist").
  # The tests define its two missing op schemas (tests/conftest.py); a timm script of one's own needs
  # the CPU build, so say how to get it.
  if [ -n "$extras" ] && [ "$dry_run" = 0 ] && ! .venv/bin/python -c "import torchvision" >/dev/null 2>&1; then
    echo "setup: note: torchvision from this index is the CUDA build and cannot load beside CPU torch, so timm outside the tests fails with 'operator torchvision::nms does not exist'; the tests do not need it. To run timm here: .venv/bin/pip install --no-deps --force-reinstall torchvision==0.28.0+cpu --extra-index-url URL, with URL PyTorch's CPU wheel index (the one its install selector names for 'CPU')" >&2
  fi
  exit 0
fi

# torch first and alone, the CUDA build: `torch===X` in $req matches no `+cpu` wheel, and with it in
# place every later install keeps it (each one is constrained by $req).
run "${pip_install[@]}" -c "$req" torch triton
# Without build isolation, so that kernels/setup.py sees this CUDA torch and builds maws_kernels._C
# (it skips the extension with one line where no nvcc is found); that needs its build backend here.
run "${pip_install[@]}" -c "$req" "setuptools>=64" wheel
run "${pip_install[@]}" -c "$req" --no-build-isolation -e ./kernels
if [ -n "$extras" ]; then
  run "${pip_install[@]}" -c "$req" -e ".${extras}"
  # setup.py's [dev] extra names nvidia-dali-cuda130; on another CUDA major it comes out before
  # the right wheel goes in (both install the same nvidia.dali package).
  if [ "$dali" != nvidia-dali-cuda130 ]; then run .venv/bin/pip uninstall -y -q nvidia-dali-cuda130; fi
else
  run "${pip_install[@]}" -c "$req" -e .
fi
run "${pip_install[@]}" -c "$req" "$dali"
if [ -n "$xformers" ]; then run "${pip_install[@]}" -c "$req" xformers; fi
run .venv/bin/python -c "import torch, maws_fast, maws_kernels, nvidia.dali; assert torch.version.cuda, 'torch ' + torch.__version__ + ' is not a CUDA build'; print('setup: ok, torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU', torch.cuda.is_available())"
