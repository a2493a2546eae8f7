"""Compile every maws_kernels Triton kernel for a real GPU target, on any machine (no GPU needed).

    python benchmarks/compile_kernels.py                    # model-zoo set for sm_90 (what CI runs)
    python benchmarks/compile_kernels.py --full --json out.json
    python benchmarks/compile_kernels.py --only layer_norm_bwd --asm-dir /tmp/asm

Prints one row per case: OK / SPILL / FAIL, registers, spill bytes, shared memory and the widths
of the global loads / stores in bits. Exits 1 if any case fails to compile, a model-zoo case
spills registers, or a kernel has no case. The checker and the model-zoo shapes are
kernels/maws_kernels/compile_check.py; each op declares its cases in its own module
(``compile_scenarios``). This entry adds the trainer's environment columns (device, commit, date)
to the JSON.
"""
import os
import sys

# The real compiler, never the interpreter: under TRITON_INTERPRET=1 triton.jit makes functions
# that cannot be compiled, and maws_kernels is imported below. This is this script's own process.
os.environ.pop("TRITON_INTERPRET", None)

from maws_fast.bench.common import env_info  # noqa: E402
from maws_kernels.compile_check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], env=env_info()))
