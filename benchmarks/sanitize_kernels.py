"""Every fused kernel once, forward and every gradient, against its torch reference on the GPU.

    python benchmarks/sanitize_kernels.py --json out.json          # compiled kernels vs references
    compute-sanitizer --tool memcheck  python benchmarks/sanitize_kernels.py --pin-attention
    compute-sanitizer --tool racecheck python benchmarks/sanitize_kernels.py --only cuda

It is the workload for compute-sanitizer and, on its own, the check that the compiled kernels agree
with their references (fp32 and bf16 / fp16). The checks live in ``maws_kernels.selfcheck`` (also
``python -m maws_kernels.selfcheck``, the small version of which ``maws-doctor`` runs); this entry point
runs them at its ``full`` size: shapes real but small (ragged tails, patch 14 and 16) so a sanitizer run
takes minutes, not hours. Each backend ("triton", and "cuda" where maws_kernels._C is built) is
exercised; ``--backends triton,cuda,torch`` adds the torch paths.

Each check prints one line (ok / FAIL, max error, scale) and, with ``--json``, becomes a row of a
file rewritten after every row, so a run killed half-way keeps what it checked. A section that
raises (a kernel that does not compile, an illegal address) is one FAIL row naming the error and the
next section runs. Exit 1 if any check failed. Device ``cpu`` runs the Triton kernels under the
interpreter (a fresh Python with ``TRITON_INTERPRET=1`` unless this one has it): the script's logic only.

``--only cuda``: only the CUDA C++ twins (racecheck: Triton kernels use shared memory through the
compiler's own barriers, which racecheck can misreport; the twins are ours). ``--pin-attention``:
each autotuned kernel launches the first config its prune allows per key (one candidate timed under
the sanitizer, not five), fp32 included.
"""
from __future__ import annotations

import sys
import types

from maws_kernels import selfcheck
from maws_kernels.selfcheck import (
    DTYPES, SECTIONS, Checks, _adamw, _attention, _bias_gelu, _contrastive, _cross_entropy, _norms,
    _patch_and_loss,
)

# The sections run as this module's names when main is called (a test of this script can stand one in).
__all__ = ["main", "Checks", "DTYPES", "SECTIONS", "_patch_and_loss", "_bias_gelu", "_norms", "_cross_entropy",
           "_contrastive", "_attention", "_adamw"]


def main(argv: list[str]) -> int:
    """The selfcheck at its full size on the GPU; the same flags and rows as before the checks moved."""
    return selfcheck.main(argv, prog="sanitize_kernels", device="cuda", size="full",
                          backends=selfcheck.sanitizer_backends, impl=types.SimpleNamespace(**globals()),
                          description=__doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
