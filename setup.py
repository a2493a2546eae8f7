"""Installs two packages from this repository.

* ``maws_fast``    -- the trainer (models, data, loop, CLI).
* ``maws_kernels`` -- the kernels in ``kernels/``; importable on its own (torch + triton only),
  so other trainers can depend on it without pulling in the trainer.

The CUDA C++ twins in ``csrc/`` are built into ``maws_kernels._C`` once they exist; until then
nothing here needs a compiler.
"""
from setuptools import find_packages, setup

trainer_packages = [p for p in find_packages(include=["maws_fast", "maws_fast.*"])]

setup(
    name="maws_fast",
    version="0.1.0",
    description="Performance-engineered MAE -> WSP -> transfer trainer for Vision Transformers",
    python_requires=">=3.10",
    packages=trainer_packages + ["maws_kernels"],
    package_dir={"maws_kernels": "kernels"},
    install_requires=[
        # CI and the README pin the CPU builds through requirements/cpu.txt (torch 2.13.0,
        # triton 3.7.1); the ranges here only say what the code needs, so that a CUDA machine
        # keeps its own torch.
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy>=1.24",
        "pyyaml>=6",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        # test-only: timm is the parity reference for the ViT (it imports torchvision).
        "dev": ["pytest>=8", "pytest-timeout>=2", "timm>=1.0"],
        # GPU-only: not installable or not useful on a CPU machine.
        "gpu": ["xformers", "nvidia-dali-cuda130"],
    },
    entry_points={
        "console_scripts": [
            "maws-train=maws_fast.cli:train_main",
            "maws-data=maws_fast.cli:data_main",
            "maws-bench=maws_fast.cli:bench_main",
        ]
    },
)
