"""Patch layout ops: patchify / unpatchify and the masked patch gather.

Layout fact (official MAE): a patch is flattened in (row p, col q, channel c) order, channel
last -- NOT the (c, p, q) order of the Conv2d patch-embed weight. Every pixel-space target,
prediction and fused kernel in this package uses that order.

``masked_patchify`` reads only the kept patches (25% at MAE's mask ratio) straight from the
(B, C, H, W) image, so the encoder's patch-embed runs on the kept patches only. The official
code instead convolves all L patches and then gathers: 4x the patch-embed FLOPs and a full
(B, L, D) activation that is mostly thrown away.
"""
from __future__ import annotations

from typing import Iterator

import torch
from maws_kernels._triton import tl, triton

from maws_kernels._backend import extension, resolve_backend
from maws_kernels._grid import check_grid
from maws_kernels._scenarios import CompileShapes, Scenario, Step, dt_name, empty, op_impl

_IMPLEMENTED = ("triton", "cuda", "torch")
_NUM_WARPS = 4


@triton.jit
def _patch_pixel_offsets(b, patch, j, C, grid_w, s_b, s_c, s_h, s_w, p: tl.constexpr):
    """Element offsets, in a (B, C, H, W) image with strides s_*, of entries ``j`` of patch
    ``patch`` (raster index) of image ``b``, the entries in MAE's (p, q, c) order."""
    hi = patch // grid_w
    wi = patch % grid_w
    pi = j // (p * C)
    qi = (j // C) % p
    c = j % C
    return b * s_b + c * s_c + (hi * p + pi) * s_h + (wi * p + qi) * s_w


@triton.jit
def _masked_patchify_fwd_kernel(
    img_ptr,  # (B, C, H, W) any strides
    ids_ptr,  # (B, K) int64, contiguous
    out_ptr,  # (B, K, P) contiguous, P = p * p * C
    K, L, C, grid_w,
    s_b, s_c, s_h, s_w,  # image strides, in elements
    p: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # one kept patch: row = b * K + k
    b = row // K
    patch = tl.load(ids_ptr + row)  # raster index l of the kept patch
    j = tl.arange(0, BLOCK_P)
    P = p * p * C
    # An id outside [0, L) reads nothing and comes out as a NaN patch: the bug shows downstream
    # (the loss turns NaN) without an out-of-bounds read or a device trap, as in the CUDA twin.
    # (The id is broadcast first: the interpreter cannot AND a block with a scalar bool.)
    pv = tl.zeros([BLOCK_P], dtype=tl.int64) + patch
    valid = (j < P) & (pv >= 0) & (pv < L)
    src = img_ptr + _patch_pixel_offsets(b, patch, j, C, grid_w, s_b, s_c, s_h, s_w, p)
    vals = tl.load(src, mask=valid, other=float("nan"))
    tl.store(out_ptr + row * P + j, vals, mask=j < P)


@triton.jit
def _masked_patchify_bwd_kernel(
    grad_ptr,  # (B, K, P) contiguous: d(out)
    slot_ptr,  # (B, >= L) int64, row stride s_slot: k of patch l if kept, else -1
    dimg_ptr,  # (B, C, H, W) contiguous: d(images), written in full (zeros where not kept)
    L, C, H, W, grid_w, K, s_slot,
    p: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # one patch of the image: row = b * L + l
    b = row // L
    patch = row % L
    slot = tl.load(slot_ptr + b * s_slot + patch)
    j = tl.arange(0, BLOCK_P)
    P = p * p * C
    valid = j < P
    # One pass over d(images): every patch writes its gradient or zeros, so no memset is needed.
    g = tl.load(grad_ptr + (b * K + slot) * P + j, mask=valid & (slot >= 0), other=0.0)
    dst = dimg_ptr + _patch_pixel_offsets(b, patch, j, C, grid_w, C * H * W, H * W, W, 1, p)
    tl.store(dst, g, mask=valid)


def _check_images(images: torch.Tensor, patch_size: int) -> tuple[int, int]:
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point (normalise uint8 images first), got {images.dtype}")
    _, _, H, W = images.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"image size {H}x{W} is not divisible by patch_size {patch_size}")
    return H // patch_size, W // patch_size


def _check_ids(ids_keep: torch.Tensor, images: torch.Tensor, num_patches: int) -> None:
    if ids_keep.dim() != 2 or ids_keep.shape[0] != images.shape[0]:
        raise ValueError(f"ids_keep must be (B, K) with B = {images.shape[0]}, got {tuple(ids_keep.shape)}")
    if ids_keep.dtype != torch.int64:
        raise ValueError(f"ids_keep must be int64, got {ids_keep.dtype}")
    if ids_keep.device != images.device:
        raise ValueError(f"ids_keep is on {ids_keep.device} but images on {images.device}")
    if ids_keep.shape[1] > num_patches:
        raise ValueError(f"ids_keep keeps {ids_keep.shape[1]} patches of only {num_patches}")


def _block_p(P: int) -> int:
    return triton.next_power_of_2(P)


def _fwd_triton(images: torch.Tensor, ids_keep: torch.Tensor, p: int) -> torch.Tensor:
    B, C, H, W = images.shape
    K = ids_keep.shape[1]
    ids_keep = ids_keep.contiguous()
    out = torch.empty(B, K, p * p * C, device=images.device, dtype=images.dtype)
    if B * K:
        grid = check_grid("masked_patchify forward", (B * K,), f"{B} images x {K} kept patches")
        _masked_patchify_fwd_kernel[grid](
            images, ids_keep, out, K, (H // p) * (W // p), C, W // p, *images.stride(), p=p,
            BLOCK_P=_block_p(p * p * C), num_warps=_NUM_WARPS,
        )
    return out


def _bwd_triton(grad: torch.Tensor, ids_keep: torch.Tensor, p: int, C: int, H: int, W: int) -> torch.Tensor:
    B, K, _ = grad.shape
    L = (H // p) * (W // p)
    # slot[b, l] = k where ids_keep[b, k] == l, else -1 (a (B, L) int64 map: tiny next to the image).
    # Ids outside [0, L) land in a spare column L that is dropped: they get no gradient, and the
    # scatter never indexes out of bounds (a device-side assert would kill the CUDA context).
    ids = ids_keep.masked_fill((ids_keep < 0) | (ids_keep >= L), L)
    slot = torch.full((B, L + 1), -1, dtype=torch.int64, device=grad.device)
    slot.scatter_(1, ids, torch.arange(K, device=grad.device).expand(B, K))  # column L: never read
    dimg = torch.empty(B, C, H, W, device=grad.device, dtype=grad.dtype)
    if B * L:
        grid = check_grid("masked_patchify backward", (B * L,), f"{B} images x {L} patches")
        _masked_patchify_bwd_kernel[grid](
            grad.contiguous(), slot, dimg, L, C, H, W, W // p, K, slot.stride(0), p=p, BLOCK_P=_block_p(p * p * C),
            num_warps=_NUM_WARPS,
        )
    return dimg



@torch.library.custom_op("maws_kernels::masked_patchify", mutates_args=())
def _masked_patchify_op(images: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, backend: str) -> torch.Tensor:
    if backend == "cuda":
        return extension().masked_patchify_fwd(images, ids_keep, patch_size)  # any image strides
    return _fwd_triton(images, ids_keep, patch_size)


@_masked_patchify_op.register_fake
def _(images, ids_keep, patch_size, backend):
    B, C = images.shape[:2]
    return images.new_empty(B, ids_keep.shape[1], patch_size * patch_size * C)


@torch.library.custom_op("maws_kernels::masked_patchify_backward", mutates_args=())
def _masked_patchify_bwd_op(
    grad: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, C: int, H: int, W: int, backend: str
) -> torch.Tensor:
    if backend == "cuda":
        return extension().masked_patchify_bwd(grad.contiguous(), ids_keep.contiguous(), patch_size, C, H, W)
    return _bwd_triton(grad, ids_keep, patch_size, C, H, W)


@_masked_patchify_bwd_op.register_fake
def _(grad, ids_keep, patch_size, C, H, W, backend):
    return grad.new_empty(grad.shape[0], C, H, W)


def _setup_context(ctx, inputs, output):
    images, ids_keep, patch_size, backend = inputs
    ctx.save_for_backward(ids_keep)
    ctx.meta = (patch_size, *images.shape[1:], backend)


def _backward(ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    p, C, H, W, backend = ctx.meta
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    return _masked_patchify_bwd_op(grad, ids_keep, p, C, H, W, backend), None, None, None


_masked_patchify_op.register_autograd(_backward, setup_context=_setup_context)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches in raster order, (p, q, c) inside a patch."""
    h, w = _check_images(images, patch_size)
    B, C = images.shape[:2]
    p = patch_size
    x = images.reshape(B, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)  # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, L, p*p*C) -> (B, C, h*p, w*p). ``grid`` defaults to square."""
    B, L, _ = x.shape
    p = patch_size
    if grid is None:
        h = w = int(round(L**0.5))
    else:
        h, w = grid
    if h * w != L or x.shape[-1] != p * p * channels:
        raise ValueError(f"cannot unpatchify {tuple(x.shape)} with patch {p}, {channels} channels, grid {(h, w)}")
    x = x.reshape(B, h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, channels, h * p, w * p)


def masked_patchify(
    images: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, backend: str | None = None
) -> torch.Tensor:
    """Patchify + gather of the kept patches in one pass: (B,C,H,W), (B,K) int64 -> (B,K,p*p*C).

    Only the kept patches are read from the image. Differentiable in ``images`` (the backward
    writes every pixel once: the patch's gradient if it was kept, else zero).

    Args:
        images: (B, C, H, W) image batch, any strides, fp32 / fp16 / bf16.
        ids_keep: (B, K) int64 indices of kept patches in raster order (MAE's ``ids_shuffle[:, :K]``),
            distinct within a row and in [0, L). The kernels do not check this (that would cost a
            host sync): an id out of range yields a NaN patch and no gradient, never an
            out-of-bounds access (the torch backend raises instead).
        patch_size: patch side p; must divide H and W.
        backend: "triton" | "cuda" | "torch" | None (see maws_kernels._backend).
    """
    h, w = _check_images(images, patch_size)
    _check_ids(ids_keep, images, h * w)
    backend = resolve_backend("masked_patchify", backend, _IMPLEMENTED, images.device)
    if backend == "torch":
        return masked_patchify_ref(images, ids_keep, patch_size)
    return _masked_patchify_op(images, ids_keep, patch_size, backend)


def masked_patchify_ref(images: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Reference: patchify every patch, then gather the kept ones. (B,C,H,W), (B,K) -> (B,K,p*p*C)."""
    patches = patchify(images, patch_size)  # (B, L, P)
    idx = ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
    return torch.gather(patches, 1, idx)


# --- compile scenarios: what maws_kernels.compile_check compiles (see _scenarios.py) ---------------
def _compile_run(dev: str, s: Step, channels_last: bool) -> None:
    m = s.model
    img = empty((s.batch, m.chans, m.img, m.img), s.data, dev, channels_last)
    ids = empty((s.batch, m.keep), torch.int64, dev)
    out = op_impl(_masked_patchify_op)(img, ids, m.patch, "triton")
    op_impl(_masked_patchify_bwd_op)(out, ids, m.patch, m.chans, m.img, m.img, "triton")


def compile_scenarios(shapes: CompileShapes) -> Iterator[Scenario]:
    """masked_patchify forward + backward on each model's MAE images; variants: channels-last images."""
    for s in shapes.steps():
        for cl in (False, True) if shapes.variants else (False,):
            yield Scenario(f"{s.tag} {dt_name(s.data)}{' nhwc' if cl else ''}", _compile_run, (s, cl))
