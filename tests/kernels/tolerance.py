"""Tolerances shared by the kernel tests.

The low-precision rule (the house style, from flash-attention): a kernel's error against an fp32
reference may be at most twice the error of the same-dtype torch op, plus a small atol.
Under Triton's interpreter, fp32 -> fp16/bf16 stores TRUNCATE instead of rounding (docs/ARCHITECTURE.md),
so interpreted outputs get one extra ulp of their magnitude; a GPU run gets no such slack.
"""
import math
import os

import torch

ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}
LOWP = (torch.float16, torch.bfloat16)


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def interpreter_ulp(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """One ``dtype`` ulp at the magnitude of ``ref`` when the kernel ran interpreted, else 0."""
    if dtype == torch.float32 or ref.is_cuda or os.environ.get("TRITON_INTERPRET") != "1":
        return 0.0
    top = ref.detach().abs().max().item()
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(top)) if top > 0 else 0.0


def assert_rule(ours: torch.Tensor, ref32: torch.Tensor, torch_lowp: torch.Tensor, dtype: torch.dtype, what: str,
                atol: float | None = None) -> None:
    """``ours`` vs fp32 reference within 2x the same-dtype torch error + atol (+ interpreter ulp)."""
    atol = (ATOL[dtype] if atol is None else atol) + interpreter_ulp(ref32, dtype)
    e_ours, e_torch = err(ours, ref32), err(torch_lowp, ref32)
    assert e_ours <= 2 * e_torch + atol, f"{what}: kernel error {e_ours:.3g} > 2 x torch {dtype} error {e_torch:.3g} + {atol:.3g}"
