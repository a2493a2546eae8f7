"""What an op module's ``compile_scenarios`` is given and what it yields (for :mod:`maws_kernels.compile_check`).

Every op module with Triton kernels ends with one hook::

    def compile_scenarios(shapes: CompileShapes) -> Iterator[Scenario]:

Each :class:`Scenario` calls the op's own implementation (a custom op's Python body, reached with
:func:`op_impl`; forward and backward) at the training shapes it is given, on tensors made with
:func:`empty`. The compile check runs it on fake CUDA tensors with every ``*_kernel`` of the package
swapped for a recorder, so the launches it compiles are exactly what the launchers pass: the
scenario names shapes and flags, never a kernel's arguments.

The shapes are generic (image side, patch, widths, heads, token counts, vocabularies, parameter
sizes, dtypes): the package imports no trainer, and the model zoo is a table in compile_check.py.
Imports torch only, so every op module imports it without Triton.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import torch

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# name -> (activation dtype, data / parameter dtype). "bf16+fp32" is bf16 autocast: bf16 activations,
# fp32 weights, images and targets -- the mix a training loop under autocast feeds the kernels.
PRECISIONS = {"fp32": (F32, F32), "bf16": (BF16, BF16), "bf16+fp32": (BF16, F32),
              "fp16": (F16, F16), "fp16+fp32": (F16, F32)}
_DT_NAMES = {F32: "fp32", F16: "fp16", BF16: "bf16"}


def dt_name(dtype: torch.dtype) -> str:
    """The dtype as case labels name it: "fp32", "bf16" or "fp16"."""
    return _DT_NAMES[dtype]


@dataclass(frozen=True)
class ViTShape:
    """One ViT's shapes: its encoder (pretraining, WSP, fine-tuning) and its MAE decoder."""

    name: str  # the row's label, e.g. "vit_b16"
    img: int  # image side
    patch: int
    chans: int
    width: int  # encoder width D
    heads: int
    mlp_ratio: float
    dec_width: int  # MAE decoder width
    dec_heads: int

    @property
    def num_patches(self) -> int:  # L
        return (self.img // self.patch) ** 2

    @property
    def keep(self) -> int:  # K: the patches MAE's encoder sees at a 75% mask ratio
        return int(self.num_patches * 0.25)


class Step(NamedTuple):
    """One model's training step at one batch and precision."""

    model: ViTShape
    batch: int
    prec: str  # a key of PRECISIONS, e.g. "bf16+fp32"
    act: torch.dtype  # activations
    data: torch.dtype  # images, parameters, targets

    @property
    def tag(self) -> str:
        return f"{self.model.name} b{self.batch}"

    def blocks(self) -> tuple[tuple[str, int, int], ...]:
        """(where, token rows M, width D) of the transformer blocks: the MAE encoder on kept patches
        + cls, the MAE decoder and the WSP / fine-tuning encoder on every patch + cls."""
        m, B = self.model, self.batch
        return (("enc", B * (m.keep + 1), m.width), ("dec", B * (m.num_patches + 1), m.dec_width),
                ("wsp", B * (m.num_patches + 1), m.width))


@dataclass(frozen=True)
class CompileShapes:
    """The training shapes one compile-check run covers; every op's scenarios take their sizes from here."""

    models: tuple[ViTShape, ...]
    batches: tuple[int, ...]  # images per step
    precisions: tuple[str, ...]  # keys of PRECISIONS
    vocabs: tuple[tuple[int, int], ...]  # (classes V, tags per image T of the sparse targets)
    head_width: int  # the input width of the fused classifier head + CE
    hires_tokens: int  # tokens per image of high-resolution fine-tuning
    flat_numels: tuple[int, ...]  # AdamW: sizes of one flat fp32 master shard
    param_sets: tuple[tuple[str, tuple[int, ...]], ...]  # FusedAdamW: (name, numel of each parameter tensor)
    variants: bool  # also layouts, views and flags training does not use but the launchers accept
    spill_free: bool  # a register spill fails a case (else it is reported only)

    def steps(self) -> Iterator[Step]:
        """Every model x batch x precision, in that nesting."""
        for m in self.models:
            for B in self.batches:
                for prec in self.precisions:
                    yield Step(m, B, prec, *PRECISIONS[prec])


@dataclass(frozen=True)
class Scenario:
    """The launches of one op at one shape: ``run(device, *args)``, its tensors made with ``empty(..., device)``."""

    label: str  # names the case, with the kernel and its constexprs, e.g. "vit_b16 b256 enc M=12800 D=768 bf16"
    run: Callable[..., object]
    args: tuple = ()
    device: str = "cuda"  # "meta" where fake CUDA tensors cannot run the launcher (a CPU torch has no CUDA guard)


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: str, channels_last: bool = False) -> torch.Tensor:
    """An uninitialised tensor (fake or meta in the compile check: it owns no memory)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)


def op_impl(op) -> Callable:
    """The Python implementation behind custom op ``op`` -- what runs on a CUDA device. Calling the op
    itself on fake tensors would run its fake kernel instead, which launches nothing."""
    fn = getattr(op, "_init_fn", None)
    if fn is None:
        raise RuntimeError(f"cannot reach the implementation of custom op {op} (torch's CustomOpDef has no "
                           "_init_fn): update maws_kernels/_scenarios.py:op_impl")
    return fn
