"""Compile every maws_kernels Triton kernel for a real GPU target, without a GPU.

The CPU test suite runs the kernels under Triton's interpreter, which never lowers them: layout
conversions, shared-memory and register limits, spills and ptxas errors only appear in the real
compiler. Here each kernel goes the way a launch would -- the kernel's own binder specialises
the arguments (ints equal to 1 become constexpr; ints divisible by 16 and 16-byte-aligned pointers
get ``tt.divisibility``), then ``triton.compile`` runs ttir -> ttgir -> llir -> ptx -> ptxas (the
ptxas bundled in the triton wheel) for ``GPUTarget("cuda", arch, 32)``. Nothing is launched.

What to compile is not typed in by hand: each scenario calls the real implementation of a
maws_kernels custom op on fake CUDA tensors of a model's training shapes, and every kernel
launch it makes is recorded instead of run. The argument lists therefore follow the launchers,
and a launcher that disagrees with its kernel fails with a message naming both.

Per case: OK / SPILL (spilled where it must not) / FAIL, registers per thread, spill bytes,
static shared memory, and the widths of the global loads and stores (128 bits = fully vectorised).

CLI: ``benchmarks/compile_kernels.py``; ``tests/kernels/test_compile_sm90.py`` runs the default
(model-zoo) set on CPU. ``TRITON_INTERPRET`` must be unset when maws_kernels is first imported:
under the interpreter ``triton.jit`` makes functions that cannot be compiled. Triton 3.6 and 3.7.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import multiprocessing
import os
import pkgutil
import re
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, MockTensor, create_function_from_signature

from maws_fast.bench.common import env_info
from maws_fast.bench.kernels import MaeShape, mae_shape
from maws_fast.config import model_preset

F32, F16, BF16, I64 = torch.float32, torch.float16, torch.bfloat16, torch.int64
# (activation dtype, data / parameter dtype): "bf16+fp32" is bf16 autocast -- bf16 activations,
# fp32 weights, images and targets -- the mix the training loop feeds the kernels.
PRECISIONS = {"fp32": (F32, F32), "bf16": (BF16, BF16), "bf16+fp32": (BF16, F32),
              "fp16": (F16, F16), "fp16+fp32": (F16, F32)}
ZOO = ("tiny", "vit_b16", "vit_l16", "vit_h14", "vit_2b14", "vit_6.5b14")
TRAIN_BATCH = 256
WSP_VOCAB, WSP_TAGS = 30000, 8  # as maws_fast/bench/cases/cross_entropy.py
DEMO_VOCAB = 14  # len(maws_fast.data.fmnist.VOCAB): the demo's dense WSP targets
SPILL_FREE_MAX_D = 4096  # layer_norm wider than this (beyond the model zoo) may spill: reported only
# SMs per arch (SXM parts: H100 / H200 have 132): the layer_norm backward launches a fixed number
# of programs per SM, which sets its rows per program and the reduction's block sizes.
SMS = {80: 108, 89: 128, 90: 132, 100: 148}
_WHERE_TO_FIX = "maws_fast/bench/compile_check.py (driven by benchmarks/compile_kernels.py)"


@dataclass
class CompileCase:
    """One kernel launch to compile: the kernel, its arguments (tensors as :class:`_Ptr`) and options."""

    label: str
    module: str  # maws_kernels submodule, e.g. "layer_norm"
    kernel: str  # attribute name, e.g. "_layer_norm_fwd_kernel"
    args: tuple
    kwargs: dict  # constexprs and launch options (num_warps, ...)
    spill_free: bool  # a model-zoo config: any register spill is a failure
    also: int = 0  # further scenarios that produced the identical compilation
    error: str | None = None  # the launch itself was wrong (reported as a failed case, never compiled)


class _Ptr(MockTensor):
    """A tensor argument: dtype plus where it starts relative to a 16-byte-aligned allocation,
    which is all the binder reads (``data_ptr() % 16`` decides ``tt.divisibility``)."""

    def __init__(self, dtype: torch.dtype, byte_offset: int = 0):
        super().__init__(dtype)
        self.byte_offset = byte_offset

    def data_ptr(self) -> int:
        return self.byte_offset

    def __repr__(self) -> str:
        return f"*{str(self.dtype).replace('torch.', '')}" + (f"+{self.byte_offset}" if self.byte_offset else "")


# --- kernels and their signatures -------------------------------------------------------------
def kernel_modules() -> dict[str, object]:
    """maws_kernels' op modules by short name (``patch``, ``layer_norm``, ...)."""
    import maws_kernels

    out = {}
    for info in pkgutil.iter_modules(maws_kernels.__path__):
        if not info.name.startswith("_"):
            out[info.name] = importlib.import_module(f"maws_kernels.{info.name}")
    return out


def _jit(kernel):
    """The JITFunction of a kernel, itself or under a ``@triton.autotune`` wrapper."""
    return kernel.fn if isinstance(kernel, Autotuner) else kernel


def find_kernels(mod) -> dict[str, JITFunction | Autotuner]:
    """The ``*_kernel`` Triton kernels of a module (``@triton.jit`` helpers are not launched);
    autotuned kernels come as their Autotuner (every config of theirs is compiled)."""
    found = {n: v for n, v in vars(mod).items() if n.endswith("_kernel") and hasattr(v, "fn")}
    interpreted = [n for n, v in found.items() if not isinstance(_jit(v), JITFunction)]
    if interpreted:
        raise RuntimeError(f"{mod.__name__}.{interpreted[0]} is an interpreter function: maws_kernels was imported "
                           "with TRITON_INTERPRET=1, and interpreted kernels cannot be compiled. Run "
                           "benchmarks/compile_kernels.py in a process without TRITON_INTERPRET.")
    return found


def kernel_params(kernel) -> tuple[list[str], list[str]]:
    """(runtime parameter names, constexpr parameter names) in signature order."""
    runtime, const = [], []
    for name, p in inspect.signature(_jit(kernel).fn).parameters.items():
        # annotations are strings under `from __future__ import annotations`
        is_const = p.annotation is triton.language.constexpr or "constexpr" in str(p.annotation)
        (const if is_const else runtime).append(name)
    return runtime, const


def check_launch(name: str, kernel, args: tuple, kwargs: dict, where: str) -> None:
    """Raise a ValueError naming the kernel when a launch's arguments do not fit its signature."""
    runtime, const = kernel_params(kernel)
    given = len(args) + sum(k in runtime for k in kwargs)
    if given != len(runtime):
        raise ValueError(f"kernel {name} takes {len(runtime)} args ({', '.join(runtime)}), {where} gives {given}: "
                         f"update the launcher or {_WHERE_TO_FIX}")
    missing = [c for c in const if c not in kwargs]
    if missing:
        raise ValueError(f"kernel {name}: {where} does not pass constexpr {missing}: update the launcher or "
                         f"{_WHERE_TO_FIX}")


# --- capturing what the launchers pass --------------------------------------------------------
def _autotune_configs(tuner: Autotuner, args: tuple, kwargs: dict) -> list:
    """The configs an autotuned launch would benchmark (after the kernel's own early pruning)."""
    configs = tuner.configs
    if len(configs) > 1 and tuner.early_config_prune:
        configs = tuner.early_config_prune(configs, dict(zip(tuner.arg_names, args)), **kwargs)
    return list(configs)


class _Recorder:
    """Stands in for a kernel: ``rec[grid](*args, **kwargs)`` records the launch instead of running it.
    An autotuned kernel records one launch per config it could pick."""

    def __init__(self, module: str, name: str, kernel, sink: list):
        self.module, self.name, self.kernel, self.sink = module, name, kernel, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if isinstance(self.kernel, Autotuner):
                launches = [{**kwargs, **c.all_kwargs()} for c in _autotune_configs(self.kernel, args, kwargs)]
            else:
                launches = [dict(kwargs)]
            ptr_args = tuple(_Ptr(a.dtype, a.storage_offset() * a.element_size()) if isinstance(a, torch.Tensor)
                             else a for a in args)
            for kw in launches:
                try:
                    check_launch(self.name, self.kernel, args, kw, f"the launcher in kernels/maws_kernels/{self.module}.py")
                    error = None
                except ValueError as e:  # becomes a failed case; the other kernels still get compiled
                    error = str(e)
                self.sink.append((self.module, self.name, ptr_args, kw, error))

        return launch


@contextlib.contextmanager
def _recording(num_sms: int) -> Iterator[list]:
    """Swap every kernel of maws_kernels for a recorder while the scenarios run.

    The launchers look their kernel up as a module global at call time, so this records exactly
    what a real launch would pass. ``layer_norm._num_sms`` (a CUDA query) answers for the target.
    Everything is put back on exit.
    """
    sink: list = []
    saved = []
    try:
        for short, mod in kernel_modules().items():
            for name, k in find_kernels(mod).items():
                saved.append((mod, name, k))
                setattr(mod, name, _Recorder(short, name, k, sink))
            if hasattr(mod, "_num_sms"):
                saved.append((mod, "_num_sms", mod._num_sms))
                mod._num_sms = lambda index: num_sms
        yield sink
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


def _impl(mod, op_name: str) -> Callable:
    """The Python implementation behind custom op ``mod.<op_name>`` -- what runs on a CUDA device
    (calling the op itself on fake tensors would run its fake kernel instead)."""
    fn = getattr(getattr(mod, op_name), "_init_fn", None)
    if fn is None:
        raise RuntimeError(f"cannot reach the implementation of {mod.__name__}.{op_name} (torch's CustomOpDef "
                           f"has no _init_fn): update {_WHERE_TO_FIX}")
    return fn


# --- scenarios: the launches of one op at one training shape ----------------------------------
@dataclass
class Scenario:
    label: str
    run: Callable[[str], None]  # called with the device: "cuda" (fake tensors) or "meta"
    device: str = "cuda"  # "meta" where fake CUDA cannot run the launcher (see _linear_ce)
    spill_free: bool = True


def _empty(shape, dtype, dev, channels_last=False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=dev, memory_format=fmt)


def _patch(s: MaeShape, data, channels_last) -> Callable[[str], None]:
    def run(dev):
        m = importlib.import_module("maws_kernels.patch")
        img = _empty((s.batch, s.chans, s.img, s.img), data, dev, channels_last)
        ids = _empty((s.batch, s.keep), I64, dev)
        out = _impl(m, "_masked_patchify_op")(img, ids, s.patch, "triton")
        _impl(m, "_masked_patchify_bwd_op")(out, ids, s.patch, s.chans, s.img, s.img, "triton")
    return run


def _norm_pix(s: MaeShape, act, data, norm, cls_view) -> Callable[[str], None]:
    def run(dev):
        m = importlib.import_module("maws_kernels.norm_pix_loss")
        L, P = s.num_patches, s.patch * s.patch * s.chans
        img = _empty((s.batch, s.chans, s.img, s.img), data, dev)
        # cls_view: the official decoder's pred[:, 1:] (row stride (L + 1) * P, offset P)
        pred = _empty((s.batch, L + 1, P), act, dev).narrow(1, 1, L) if cls_view else _empty((s.batch, L, P), act, dev)
        mask = _empty((s.batch, L), F32, dev)
        rows = _impl(m, "_rows_op")(pred, img, mask, s.patch, norm, 1e-6, "triton")
        _impl(m, "_bwd_op")(rows, pred, img, mask, s.patch, norm, 1e-6, "triton")  # gscale (B, L) fp32
    return run


def _layer_norm(M: int, D: int, act, data, affine) -> Callable[[str], None]:
    def run(dev):
        m = importlib.import_module("maws_kernels.layer_norm")
        x = _empty((M, D), act, dev)
        w, b = (_empty((D,), data, dev), _empty((D,), data, dev)) if affine else (None, None)
        y, mean, rstd = _impl(m, "_layer_norm_fwd_op")(x, w, b, 1e-6)
        _impl(m, "_layer_norm_bwd_op")(y, x, w, mean, rstd, data if affine else act)
    return run


def _add_layer_norm(M: int, D: int, act, data, residual: bool, with_ds: bool) -> Callable[[str], None]:
    def run(dev):
        m = importlib.import_module("maws_kernels.add_layer_norm")
        x = _empty((M, D), act, dev)
        r = _empty((M, D), act, dev) if residual else None
        w, b, xb = (_empty((D,), data, dev) for _ in range(3))
        y, s_, mean, rstd = _impl(m, "_add_layer_norm_fwd_op")(x, r, w, b, xb, 1e-6)
        _impl(m, "_add_layer_norm_bwd_op")(y, s_ if with_ds else None, s_, w, mean, rstd, act,
                                           act if residual else None, data, data)
    return run


def _bias_gelu(M: int, N: int, act, data, has_bias, fuse) -> Callable[[str], None]:
    def run(dev):
        m = importlib.import_module("maws_kernels.bias_gelu")
        x = _empty((M, N), act, dev)
        b = _empty((N,), data, dev) if has_bias else None
        y = _impl(m, "_bias_gelu_fwd_op")(x, b, fuse)
        _impl(m, "_bias_gelu_bwd_op")(y, x, b, has_bias, fuse)
    return run


def _cross_entropy(B: int, V: int, T: int, act, data, sparse) -> Callable[[str], None]:
    def run(dev):
        m = importlib.import_module("maws_kernels.cross_entropy")
        logits = _empty((B, V), act, dev)
        tgt = None if sparse else _empty((B, V), data, dev)
        ids, wts = (_empty((B, T), I64, dev), _empty((B, T), data, dev)) if sparse else (None, None)
        loss, lse, tsum = _impl(m, "_ce_fwd_op")(logits, tgt, ids, wts)
        _impl(m, "_ce_bwd_op")(loss, logits, lse, tsum, tgt, ids, wts)
    return run


def _linear_ce(B: int, D: int, V: int, T: int, act, data, sparse) -> Callable[[str], None]:
    def run(dev):
        m = importlib.import_module("maws_kernels.cross_entropy")
        x, w, bias = _empty((B, D), act, dev), _empty((V, D), act, dev), _empty((V,), act, dev)
        tgt = None if sparse else _empty((B, V), data, dev)
        ids, wts = (_empty((B, T), I64, dev), _empty((B, T), data, dev)) if sparse else (None, None)
        chunk = max(1, (1 << 24) // V)  # the public function's default
        _impl(m, "_linear_ce_op")(x, w, bias, tgt, ids, wts, chunk, True)
    return run


def _adamw(n: int, grad_dt, copy_dt, beta1) -> Callable[[str], None]:
    def run(dev):
        m = importlib.import_module("maws_kernels.adamw")
        p, ea, eas = (_empty((n,), F32, dev) for _ in range(3))
        copy = _empty((n,), copy_dt, dev) if copy_dt is not None else None
        _impl(m, "_fused_adamw_op")(p, _empty((n,), grad_dt, dev), ea, eas, copy, 1, 1.5e-4, beta1, 0.95, 1e-8,
                                    0.05, None)
    return run


def _adamw_multi(numels: tuple[int, ...], grad_dt, beta1, aligned: bool = True) -> Callable[[str], None]:
    """FusedAdamW's multi-tensor step over tensors of these sizes (one param group)."""
    def run(dev):
        m = importlib.import_module("maws_kernels.adamw")
        block, _ = m._launch_config(torch.device("cuda"))
        chunks = sum(-(-n // block) for n in numels)
        tables = tuple(_empty((len(numels),), I64, dev) for _ in range(4))
        m._adamw_multi_launch_tables(tables, _empty((len(numels),), I64, dev), _empty((chunks,), torch.int32, dev), _empty((chunks,), I64, dev),
                                     grad_dt, 1, 1.5e-4, beta1, 0.95, 1e-8, 0.05, aligned)
    return run


def _attention(B: int, H: int, N: int, D: int, act, varlen: bool) -> Callable[[str], None]:
    """Forward + backward as the ViT calls it: q, k, v are (B, H, N, D) views of one packed
    (B, N, 3, H, D) qkv; varlen packs B sequences of N tokens as (B * N, H, D) slices of (T, 3, H, D)."""
    def run(dev):
        m = importlib.import_module("maws_kernels.attention")
        if varlen:
            q, k, v = _empty((B * N, 3, H, D), act, dev).unbind(1)
            cu = _empty((B + 1,), torch.int32, dev)
        else:
            q, k, v = _empty((B, N, 3, H, D), act, dev).permute(2, 0, 3, 1, 4).unbind(0)
            cu = None
        o, lse = _impl(m, "_attention_fwd_op")(q, k, v, cu, N, D ** -0.5)
        _impl(m, "_attention_bwd_op")(o, q, k, v, o, lse, cu, N, D ** -0.5)
    return run


def _attention_shapes(model: str, B: int) -> Iterator[tuple[str, int, int, int]]:
    """(where, heads, N, head dim) of every attention in a model's MAE / WSP / fine-tune steps."""
    cfg, s = model_preset(model), mae_shape(model, B)
    enc_d, dec_d = cfg.embed_dim // cfg.num_heads, cfg.decoder_embed_dim // cfg.decoder_num_heads
    yield "enc", cfg.num_heads, s.keep + 1, enc_d  # MAE encoder: kept patches + cls
    yield "dec", cfg.decoder_num_heads, s.num_patches + 1, dec_d  # MAE decoder
    yield "wsp", cfg.num_heads, s.num_patches + 1, enc_d  # WSP / fine-tuning, every patch
    yield "ft-hires", cfg.num_heads, 1025, enc_d  # high-resolution fine-tuning (e.g. 448 at /14)


_DT_NAMES = {F32: "fp32", F16: "fp16", BF16: "bf16"}


def _dt(d: torch.dtype) -> str:
    return _DT_NAMES[d]


def _scenarios(batches, precs, vocabs, variants: bool, spill_free: bool) -> Iterator[Scenario]:
    """Every op at every zoo preset x batch x precision; ``variants`` adds the layouts, views and
    sizes that training does not use but the launchers accept."""
    seen_attn: set = set()
    for model in ZOO:
        for B in batches:
            s = mae_shape(model, B)
            tag = f"{model} b{B}"
            for pn in precs:
                act, data = PRECISIONS[pn]
                for cl in (False, True) if variants else (False,):
                    yield Scenario(f"{tag} {_dt(data)}{' nhwc' if cl else ''}", _patch(s, data, cl),
                                   spill_free=spill_free)
                for norm in (True, False):
                    for view in (False, True) if variants else (False,):
                        yield Scenario(f"{tag} {pn} norm_pix={norm}{' cls-view' if view else ''}",
                                       _norm_pix(s, act, data, norm, view), spill_free=spill_free)
                for where, M, D in (("enc", B * (s.keep + 1), s.width), ("dec", B * (s.num_patches + 1), s.dec_width)):
                    for affine in (True, False):
                        yield Scenario(f"{tag} {where} M={M} D={D} {pn}{'' if affine else ' no-affine'}",
                                       _layer_norm(M, D, act, data, affine), spill_free=spill_free)
                for where, M, D in (("enc", B * (s.keep + 1), s.width), ("dec", B * (s.num_patches + 1), s.dec_width)):
                    for residual, with_ds in ((True, True), (True, False), (False, True)):
                        flags = ("" if with_ds else " no-ds") if residual else " no-residual"
                        yield Scenario(f"{tag} add-ln {where} M={M} D={D} {pn}{flags}",
                                       _add_layer_norm(M, D, act, data, residual, with_ds), spill_free=spill_free)
                r = model_preset(model).mlp_ratio
                for where, M, N in (("enc", B * (s.keep + 1), int(r * s.width)),
                                    ("dec", B * (s.num_patches + 1), int(r * s.dec_width)),
                                    ("wsp", B * (s.num_patches + 1), int(r * s.width))):
                    for has_bias, fuse in ((True, True), (True, False), (False, True)):
                        flags = ("" if fuse else " torch-dbias") if has_bias else " no-bias"
                        yield Scenario(f"{tag} mlp {where} M={M} N={N} {pn}{flags}",
                                       _bias_gelu(M, N, act, data, has_bias, fuse), spill_free=spill_free)
                for where, H, N, D in _attention_shapes(model, B):
                    for varlen in (False, True) if where == "enc" else (False,):
                        # The model-zoo set compiles each (head dim, dtype) once and varlen once per
                        # dtype (5 autotune configs x 3 kernels each; N and H barely change the binary).
                        key = (act, varlen) if varlen else (act, D)
                        if not variants and (key in seen_attn or (act == F32 and where != "enc")):
                            continue
                        seen_attn.add(key)
                        yield Scenario(f"{tag} attn {where} H={H} N={N} D={D} {_dt(act)}{' varlen' if varlen else ''}",
                                       _attention(B, H, N, D, act, varlen), spill_free=spill_free)
    for pn in precs:
        act, data = PRECISIONS[pn]
        for V, T in vocabs:
            for B in batches:
                for sparse in (True, False):
                    kind = f"sparse T={T}" if sparse else "dense"
                    yield Scenario(f"b{B} V={V} {kind} {pn}", _cross_entropy(B, V, T, act, data, sparse),
                                   spill_free=spill_free)
                    # linear CE slices x per chunk, which fake CUDA tensors cannot do (no CUDA device
                    # guard in a CPU torch); its launcher makes no device-dependent choice, so meta is exact.
                    yield Scenario(f"linear b{B} D=768 V={V} {kind} {pn}", _linear_ce(B, 768, V, T, act, data, sparse),
                                   device="meta", spill_free=spill_free)
        for D in (8192, 16384, 1000, 100, 1) if variants else ():
            yield Scenario(f"wide/odd M=50432 D={D} {pn}", _layer_norm(50432, D, act, data, True),
                           spill_free=spill_free and D <= SPILL_FREE_MAX_D)
    # AdamW: one flat fp32 master shard (ViT-B/16's 86M parameters), grads and the model copy in
    # the precisions given; beta1 < 0.5 flips torch's lerp formula (LERP_SMALL_W).
    grads = sorted({PRECISIONS[pn][0] for pn in precs} | {F32}, key=str)
    for n in (86_000_000, 86_000_003, 1) if variants else (86_000_000,):
        for g in grads:
            for copy in (None, BF16, F16) if variants else (None, BF16):
                for beta1 in (0.9, 0.3):
                    yield Scenario(f"n={n} grad={_dt(g)} copy={copy and _dt(copy)} beta1={beta1}",
                                   _adamw(n, g, copy, beta1), spill_free=spill_free)
    # FusedAdamW: the multi-tensor step over ViT-B/16's 152 parameter tensors (one group of them all).
    vit_b16 = (768 * 3 * 16 * 16, 768, 768, 197 * 768) + (768, 768, 2304 * 768, 2304, 768 * 768, 768, 768, 768,
                                                         3072 * 768, 3072, 768 * 3072, 768) * 12 + (768, 768)
    for g in grads:
        for beta1 in (0.9, 0.3):
            yield Scenario(f"multi ViT-B/16 tensors={len(vit_b16)} grad={_dt(g)} beta1={beta1}",
                           _adamw_multi(vit_b16, g, beta1), spill_free=spill_free)
        # a view off a 16-byte boundary somewhere in the list: the scalar-load path
        yield Scenario(f"multi ViT-B/16 tensors={len(vit_b16)} grad={_dt(g)} unaligned",
                       _adamw_multi(vit_b16, g, 0.9, aligned=False), spill_free=spill_free)


def scenarios(full: bool = False) -> Iterator[Scenario]:
    """The model-zoo set: every preset at batch 256 in fp32, bf16 and bf16 autocast, the WSP and
    demo vocabularies, every flag the launchers can set; none of it may spill registers. ``full``
    adds (spills reported, not failed) fp16, batch 1 and 32, channels-last images, the official
    pred view, layer_norm D up to 16384, tiny and odd vocabularies and sizes."""
    yield from _scenarios((TRAIN_BATCH,), ("fp32", "bf16", "bf16+fp32"), ((WSP_VOCAB, WSP_TAGS), (DEMO_VOCAB, 3)),
                          variants=False, spill_free=True)
    if full:
        vocabs = ((WSP_VOCAB, WSP_TAGS), (DEMO_VOCAB, 3), (1, 1), (10, 1), (4097, 3))
        yield from _scenarios((TRAIN_BATCH, 32, 1), tuple(PRECISIONS), vocabs, variants=True, spill_free=False)


# --- collecting the cases -----------------------------------------------------------------------
def _fake_cuda_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    try:
        with mode:
            torch.empty(1, device="cuda")
    except Exception as e:  # noqa: BLE001 -- say what torch said
        raise RuntimeError(f"this torch cannot make fake CUDA tensors ({e}); the launch configs depend on the "
                           "device, so the compile check needs them") from e
    return mode


def _consts(kwargs: dict) -> str:
    return " ".join(f"nw={v}" if k == "num_warps" else f"{k}={v}" for k, v in kwargs.items())


def collect_cases(full: bool = False, arch: int = 90, only: str = "") -> tuple[list[CompileCase], list[str]]:
    """Run the scenarios with recording kernels; returns (unique cases, kernels no scenario launched).

    Launches that specialise identically (same kernel, argument types, divisibility, constexprs and
    options) compile to the same binary and are kept once.
    """
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binders: dict = {}
    fake = _fake_cuda_mode()
    cases: dict = {}
    launched = set()
    everything = {f"{mod}.{name}": k for mod, m in kernel_modules().items() for name, k in find_kernels(m).items()}
    with _recording(SMS.get(arch, SMS[90])) as sink:
        for sc in scenarios(full):
            start = len(sink)
            try:
                with fake if sc.device == "cuda" else contextlib.nullcontext():
                    sc.run(sc.device)
            except Exception as e:  # noqa: BLE001 -- a failed case naming the scenario; carry on
                label = f"{'scenario':<21} {sc.label}"
                if only in label:
                    cases[label] = CompileCase(label, "", "", (), {}, sc.spill_free, error=(
                        f"running the launcher failed ({type(e).__name__}: {e}); if the launcher or custom op "
                        f"changed, update {_WHERE_TO_FIX}"))
            for mod, name, args, kwargs, error in sink[start:]:
                launched.add(f"{mod}.{name}")
                short = name.strip("_").removesuffix("_kernel")
                label = f"{short:<21} {sc.label:<44} {_consts(kwargs)}"
                if only not in label:
                    continue
                if error:
                    cases[label] = CompileCase(label, mod, name, args, kwargs, sc.spill_free, error=error)
                    continue
                if name not in binders:
                    k = _jit(everything[f"{mod}.{name}"])
                    binders[name] = create_function_from_signature(k.signature, k.params, backend)
                _, spec, _ = binders[name](*args, **kwargs)
                key = (mod, name, repr(spec), repr(sorted(kwargs.items())))
                if key in cases:
                    cases[key].also += 1
                    cases[key].spill_free |= sc.spill_free
                else:
                    cases[key] = CompileCase(label, mod, name, args, kwargs, sc.spill_free)
    return list(cases.values()), sorted(set(everything) - launched)


# --- compiling one case ---------------------------------------------------------------------------
_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_st": re.compile(r"(\d+) bytes spill stores"),
    "spill_ld": re.compile(r"(\d+) bytes spill loads"),
}


def _access_widths(ptx: str) -> dict[str, dict[int, int]]:
    """Global loads and stores by access width in bits: {"ld": {128: 6, 32: 2}, "st": {...}}."""
    out: dict[str, dict[int, int]] = {"ld": {}, "st": {}}
    for op, mods in re.findall(r"\b(ld|st)\.global((?:\.[\w:]+)+)", ptx):
        vec = re.search(r"\.v(\d+)", mods)
        bits = re.search(r"\.[bfsu](\d+)$", mods)
        if bits:
            w = int(bits.group(1)) * (int(vec.group(1)) if vec else 1)
            out[op][w] = out[op].get(w, 0) + 1
    return {op: dict(sorted(h.items(), reverse=True)) for op, h in out.items()}


def compile_case(case: CompileCase, arch: int = 90, asm_dir: str | None = None) -> dict:
    """Compile one case for sm_<arch>; returns a result row (never raises for compiler errors)."""
    res = {"case": case.label, "kernel": f"{case.module}.{case.kernel}", "spill_free": case.spill_free,
           "also": case.also, "args": repr(case.args), "constexprs": dict(case.kwargs)}
    if case.error:
        return {**res, "status": "FAIL", "error": case.error}
    try:
        kernel = _jit(getattr(importlib.import_module(f"maws_kernels.{case.module}"), case.kernel))
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, spec, opts = binder(*case.args, **case.kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, dict(case.kwargs), bound, spec, opts)
        res["signature"] = dict(signature)
        log = io.StringIO()
        # Triton prints ptxas's -v report (registers, spills) when asked; always_compile makes
        # sure ptxas really runs instead of a cached binary being returned.
        with triton.knobs.compilation.scope(), triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            triton.knobs.compilation.always_compile = True
            triton.knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
        for key, rx in _PTXAS.items():
            m = rx.search(log.getvalue())
            res[key] = int(m.group(1)) if m else None
        res["smem"] = getattr(compiled.metadata, "shared", None)
        res["gmem_bits"] = _access_widths(compiled.asm["ptx"])
        spilled = bool(res["spill_st"] or res["spill_ld"])
        res["status"] = "SPILL" if spilled and case.spill_free else "OK"
        if asm_dir:
            os.makedirs(asm_dir, exist_ok=True)
            stem = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", case.label.strip())
            for ext in ("ttgir", "ptx"):
                with open(os.path.join(asm_dir, f"{stem}.{ext}"), "w") as f:
                    f.write(compiled.asm[ext])
    except Exception as e:  # noqa: BLE001 -- report the compiler's own message, then carry on
        # the tail: a CompilationError quotes the source first and says what is wrong last
        res.update(status="FAIL", error=f"{type(e).__name__}: {e}".strip()[-4000:],
                   trace=traceback.format_exc()[-3000:])
    return res


def _compile_star(item):
    return compile_case(*item)


def compile_all(cases: list[CompileCase], arch: int, jobs: int, asm_dir: str | None = None) -> list[dict]:
    """Compile every case, ``jobs`` processes at a time (each case is independent)."""
    items = [(c, arch, asm_dir) for c in cases]
    if jobs <= 1 or len(items) <= 1:
        return [_compile_star(i) for i in items]
    # fork: the workers inherit the imported maws_kernels (no TRITON_INTERPRET re-check needed)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as ex:
        return list(ex.map(_compile_star, items))


# --- report ---------------------------------------------------------------------------------------
def _widths(h: dict) -> str:
    return ",".join(f"{w}x{n}" for w, n in h.items()) or "-"


def _reason(error: str) -> str:
    """The line of an error that says what is wrong (a CompilationError ends with it, after the source)."""
    lines = [ln.strip() for ln in error.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def format_row(r: dict) -> str:
    if r["status"] == "FAIL":
        return f"FAIL  {r['case']}\n      {_reason(r['error'])[:300]}"
    sp = f"{r['spill_st'] or 0}/{r['spill_ld'] or 0}"
    return (f"{r['status']:<5} {r['case']:<110} regs={r['regs']!s:>3} spill={sp:>7} smem={r['smem']!s:>6}"
            f"  ld={_widths(r['gmem_bits']['ld'])} st={_widths(r['gmem_bits']['st'])}")


def summarise(results: list[dict], uncovered: list[str]) -> str:
    """Counts, then each distinct failure once with its full message (one kernel bug fails many cases)."""
    count = {st: sum(r["status"] == st for r in results) for st in ("OK", "SPILL", "FAIL")}
    spilled = sum(r["status"] != "FAIL" and bool(r["spill_st"] or r["spill_ld"]) for r in results)
    out = [f"{len(results)} cases: {count['OK']} OK, {count['FAIL']} FAILED, {spilled} with spills "
           f"({count['SPILL']} in model-zoo configs, which must not spill)"]
    if uncovered:
        out.append(f"kernels no scenario launches (add one in {_WHERE_TO_FIX}): {', '.join(uncovered)}")
    groups: dict[str, list[dict]] = {}
    for r in results:
        if r["status"] == "FAIL":
            groups.setdefault(r["error"], []).append(r)
    for error, rs in groups.items():
        out.append(f"\n--- FAIL in {len(rs)} case(s), e.g. {rs[0]['case'].strip()}\n{error}")
    for r in results:
        if r["status"] == "SPILL":
            out.append(f"--- SPILL: {r['case'].strip()}: {r['spill_st']} / {r['spill_ld']} bytes spilled "
                       f"with {r['regs']} registers")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Compile every maws_kernels Triton kernel for a GPU target, no GPU "
                                            "needed; exit 1 if any case fails or a model-zoo case spills.")
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100 / H200")
    p.add_argument("--only", default="", help="compile only cases whose label contains this")
    p.add_argument("--json", default="", help="write the results (and the environment) to this file")
    p.add_argument("--full", action="store_true", help="also fp16, batch 1 / 32, channels-last, wide/odd sizes")
    p.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="compile processes")
    p.add_argument("--asm-dir", default="", help="write each case's .ttgir and .ptx here")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry (benchmarks/compile_kernels.py): 0 when every case compiles, 1 otherwise, 2 when it cannot run."""
    args = build_parser().parse_args(argv)
    try:
        cases, uncovered = collect_cases(args.full, args.arch, args.only)
    except RuntimeError as e:  # interpreted kernels, or a torch that cannot fake CUDA tensors
        print(f"compile_kernels: {e}", file=sys.stderr)
        return 2
    uncovered = [] if args.only else uncovered
    if not cases:
        print(f"compile_kernels: no case label contains {args.only!r}", file=sys.stderr)
        return 1
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}, "
          f"{len(cases)} cases ({'full' if args.full else 'model-zoo'} set)", flush=True)
    results = compile_all(cases, args.arch, args.jobs, args.asm_dir or None)
    for r in results:
        print(format_row(r))
    print("\n" + summarise(results, uncovered))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**env_info(), "triton": triton.__version__, "arch": args.arch, "full": args.full,
                       "kernels_without_cases": uncovered, "results": results}, f, indent=1, default=repr)
    return 1 if uncovered or any(r["status"] != "OK" for r in results) else 0
