"""Attention cases: the MAE encoder / decoder and WSP sequence lengths of each model, plus 1025.

Providers in one run: ours (maws_kernels Triton flash attention), torch = the manual reference
(matmul-softmax-matmul, softmax in fp32), and on a GPU each SDPA backend pinned on its own
(flash, efficient, cuDNN) and xformers; a provider without a kernel for the case's dtype (flash and
cuDNN on fp32) or not installed (xformers) gets a skipped row saying so. TFLOP/s counts the matmul FLOPs:
4 B H N^2 D forward, 2.5x that backward (dS, dP, dQ, dK, dV with P recomputed).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

import maws_kernels as mk
from maws_fast.bench.kernels import Case, MaeShape, dtype_name
from maws_fast.config import model_preset
from maws_kernels.nn import attention_manual


# SDPA backends that run fp16 / bf16 only: flash attention and cuDNN's fused attention.
SDPA_HALF_ONLY = {"FLASH_ATTENTION": "SDPA's flash backend", "CUDNN_ATTENTION": "SDPA's cuDNN backend"}
LIGER_NA = "Liger has no dense attention kernel (its attention ops are neighbourhood and multi-token attention)"


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def _providers(device, dtype) -> tuple[dict, dict[str, str]]:
    """(provider -> function, provider -> why it cannot run at ``dtype``): a pinned SDPA backend
    without a kernel for the dtype, or xformers without its op, is skipped with its reason rather
    than attempted (a pinned backend that cannot run only raises)."""
    fns = {"ours": lambda q, k, v: mk.attention(q, k, v, backend="triton"), "torch": attention_manual}
    skip: dict[str, str] = {}
    if torch.device(device).type == "cuda":
        names = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                 "sdpa-cudnn": "CUDNN_ATTENTION"}
        for label, name in names.items():
            if name in SDPA_HALF_ONLY and dtype == torch.float32:
                skip[label] = f"{SDPA_HALF_ONLY[name]} has no fp32 kernel (fp16 / bf16 only)"
                continue
            fns[label] = _sdpa(name)
        try:
            import xformers.ops as xops

            op = xops.memory_efficient_attention
        except (ImportError, AttributeError) as e:  # not installed, or built without the op
            skip["xformers"] = f"xformers.ops.memory_efficient_attention is not available ({type(e).__name__}: {e})"
        else:
            fns["xformers"] = lambda q, k, v: op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return fns, skip


def _sequences(shapes: list[MaeShape]) -> list[tuple[str, int, int, int, int]]:
    """(label, batch, heads, N, head dim) per model: encoder (kept + cls), decoder / WSP (all + cls)."""
    out, seen = [], set()
    for s in shapes:
        cfg = model_preset(s.model)
        for where, heads, n, width in (("mae-enc", cfg.num_heads, s.keep + 1, s.width),
                                       ("mae-dec", cfg.decoder_num_heads, s.num_patches + 1, s.dec_width),
                                       ("wsp", cfg.num_heads, s.num_patches + 1, s.width)):
            key = (s.batch, heads, n, width // heads)
            if key not in seen:
                seen.add(key)
                out.append((f"{s.model} {where}", s.batch, heads, n, width // heads))
    if shapes:  # high-resolution fine-tuning: 1025 tokens (B/16 at 512 px), a quarter of the batch
        s = shapes[0]
        cfg = model_preset(s.model)
        out.append((f"{s.model} ft-512px", max(1, s.batch // 4), cfg.num_heads, 1025, cfg.embed_dim // cfg.num_heads))
    return out


def cases(shapes: list[MaeShape], dtype: torch.dtype, device) -> Iterator[Case]:
    es = dtype.itemsize
    cpu = torch.device(device).type == "cpu"
    for label, B, H, N, D in _sequences(shapes):
        if cpu:  # interpreted: a smoke run, not a measurement
            B, N = min(B, 1), min(N, 65)
        q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        io = 4 * B * H * N * D * es  # q, k, v in, o out
        fwd = 4 * B * H * N * N * D
        fns, skip = _providers(device, dtype)
        yield Case("attention", f"{label} b{B} h{H} N={N} d{D}", dtype_name(dtype), (q, k, v), fns,
                   bytes_fwd=io, bytes_bwd=2 * io, flops_fwd=fwd, flops_bwd=int(2.5 * fwd),
                   extra={"N": N, "head_dim": D}, skip={**skip, "liger": LIGER_NA})
    yield from varlen_cases(shapes, dtype, device)


def varlen_cases(shapes: list[MaeShape], dtype: torch.dtype, device) -> Iterator[Case]:
    """Packed sequences of different lengths (samples keeping different token counts), no padding:
    ours (varlen kernel) against the per-sequence reference loop and against padding every sequence
    to the longest and running dense SDPA."""
    es = dtype.itemsize
    cpu = torch.device(device).type == "cpu"
    gen = torch.Generator().manual_seed(0)
    for s in shapes[:1]:
        cfg = model_preset(s.model)
        H, D = cfg.num_heads, s.width // cfg.num_heads
        B, n_max = (2, 17) if cpu else (s.batch, s.num_patches + 1)
        lens = torch.randint(max(1, n_max // 4), n_max + 1, (B,), generator=gen)
        cu = torch.zeros(B + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lens, 0)
        cu = cu.to(device)
        T = int(cu[-1])
        q, k, v = (torch.randn(T, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        n_max = int(lens.max())

        def padded_sdpa(q, k, v):
            # what a padded batch costs: scatter into (B, H, n_max, D), mask the padding, dense SDPA
            idx = torch.cat([torch.arange(n, device=device) + i * n_max for i, n in enumerate(lens.tolist())])
            def pad(t):
                out = t.new_zeros(B * n_max, H, D).index_copy(0, idx, t)
                return out.view(B, n_max, H, D).transpose(1, 2)
            keep = torch.zeros(B, n_max, dtype=torch.bool, device=device).view(-1).index_fill(0, idx, True)
            mask = keep.view(B, 1, 1, n_max)
            o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask)
            return o.transpose(1, 2).reshape(B * n_max, H, D).index_select(0, idx)

        fwd = int(4 * H * D * (lens.double() ** 2).sum().item())
        yield Case("attention", f"{s.model} varlen b{B} h{H} N<={n_max} d{D} T={T}", dtype_name(dtype), (q, k, v),
                   {"ours": lambda q, k, v: mk.attention_varlen(q, k, v, cu, n_max, backend="triton"),
                    "torch": lambda q, k, v: mk.attention_varlen_ref(q, k, v, cu),
                    "sdpa-padded": padded_sdpa},
                   bytes_fwd=4 * T * H * D * es, bytes_bwd=8 * T * H * D * es, flops_fwd=fwd, flops_bwd=int(2.5 * fwd),
                   note="FLOPs count only the real (block-diagonal) tokens", extra={"N": n_max, "head_dim": D},
                   skip={"liger": LIGER_NA})
