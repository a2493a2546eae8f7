"""Vision Transformer encoder with timm's state-dict keys.

Keys: ``cls_token, pos_embed, patch_embed.proj.*, blocks.N.{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}.*, norm.*, head.*`` -- the names every MAE / MAWS / timm checkpoint uses.
Blocks are pre-norm with qkv bias, exact GELU, LayerNorm eps 1e-6, no drop-path, no layer-scale.

Pure model code: no data, no torch.distributed. Parallelism is applied from outside.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import maws_kernels
from maws_fast.config import CHECKPOINT_MODES
from maws_fast.errors import CheckpointError
from maws_fast.models.attention import attention_packed, attention_varlen, check_attn_backend
from maws_fast.models.pos_embed import resample_pos_embed, sincos_2d

def op_backend(model_backend: str | None, has_cuda_twin: bool) -> str | None:
    """The maws_kernels backend one op of a model runs with.

    A model-level ``"cuda"`` selects the CUDA C++ twins (patch gather and loss); ops without a
    twin (LayerNorm, cross-entropy) then use their best backend for the device, as documented for
    ``model.kernel_backend``. Any other choice applies to every op as given.
    """
    return None if model_backend == "cuda" and not has_cuda_twin else model_backend


def _no_autocast(x: torch.Tensor):
    """Autocast off for an op that keeps its input dtype (a no-op context when autocast is off)."""
    return torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) else nullcontext()


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same keys, eps 1e-6 by default) that runs maws_kernels.layer_norm.

    ``kernel_backend`` picks the maws_kernels backend (None = best for the device: the fused
    Triton kernel on a GPU, torch's native kernel on a CPU).
    """

    def __init__(self, normalized_shape, eps: float = 1e-6, kernel_backend: str | None = None, **kwargs):
        super().__init__(normalized_shape, eps=eps, **kwargs)
        self.kernel_backend = kernel_backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, x_bias: torch.Tensor | None = None,
                backend: str | None = None):
        """This norm of ``x``; with a ``residual`` (the stream ``x`` is to be added to), the pair
        (norm of s, s) for ``s = residual + x + x_bias``, in one pass (:meth:`forward_add`)."""
        if residual is not None:
            return self.forward_add(x, residual, x_bias, backend)
        if len(self.normalized_shape) != 1:
            return super().forward(x)
        # Input and output in the compute dtype, statistics in fp32, whatever the backend: CUDA autocast
        # would run torch's layer_norm in fp32 and hand an fp32 tensor to the next block.
        with _no_autocast(x):
            return maws_kernels.layer_norm(x, self.weight, self.bias, self.eps,
                                           backend=op_backend(self.kernel_backend, has_cuda_twin=False))

    def add_backend(self, x: torch.Tensor) -> str | None:
        """The backend of :meth:`forward_add` on ``x``'s device when it is a fused kernel; None when
        it would be torch's add then layer_norm (callers then keep the unfused code, bit for bit)."""
        if len(self.normalized_shape) != 1:
            return None
        backend = maws_kernels.resolve_backend("add_layer_norm", op_backend(self.kernel_backend, has_cuda_twin=False),
                                               ("triton", "torch"), x.device)
        return None if backend == "torch" else backend

    def forward_add(self, branch: torch.Tensor, residual: torch.Tensor, branch_bias: torch.Tensor | None = None,
                    backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(this norm of s, s) with ``s = residual + branch + branch_bias`` in one pass (maws_kernels.add_layer_norm):
        the residual add of a block and the LayerNorm after it, backward fused as well."""
        with _no_autocast(branch):
            return maws_kernels.add_layer_norm(branch, residual, self.weight, self.bias, self.eps, x_bias=branch_bias,
                                               backend=backend or op_backend(self.kernel_backend, has_cuda_twin=False))


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D channels. (B, C, H, W) -> (B, L, D)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        # tuples, as timm's PatchEmbed: official MAE code reads patch_embed.patch_size[0]
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"expected {self.img_size[0]}x{self.img_size[1]} images, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, L, D)


class Packed(NamedTuple):
    """Sequences of different lengths packed back to back as one (1, T, D) stream: each token
    attends only within its sequence (the text tower's captions; no padding is computed).

    ``cu_seqlens``: (S + 1,) int32 prefix sums of the S lengths; ``max_seqlen``: a bound on them
    (a Python int, so nothing waits for the device)."""

    cu_seqlens: torch.Tensor
    max_seqlen: int


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_backend: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_backend = check_attn_backend(attn_backend)
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def _mix(self, x: torch.Tensor, seq: Packed | None = None) -> torch.Tensor:
        """(B, N, D) -> the heads' outputs (B, N, H * Dh), before the output projection; with
        ``seq``, x is (1, T, D) of packed sequences, each attending within itself."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # a view of the projection
        if seq is not None:
            q, k, v = qkv[0].unbind(1)  # each (T, H, Dh)
            return attention_varlen(q, k, v, seq.cu_seqlens, seq.max_seqlen, self.attn_backend).reshape(B, N, -1)
        return attention_packed(qkv, self.attn_backend).reshape(B, N, -1)

    def forward(self, x: torch.Tensor, seq: Packed | None = None) -> torch.Tensor:
        return self.proj(self._mix(x, seq))  # (B, N, D), or D / tp under tensor parallel

    def forward_without_bias(self, x: torch.Tensor, seq: Packed | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the output without the projection's bias, that bias), for the residual-add kernel to add."""
        return linear_without_bias(self.proj, self._mix(x, seq))


def linear_without_bias(linear: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(``linear(x)`` without its bias, the bias) for a fused kernel to add; a parallel layer that
    knows how says so with ``forward_without_bias``, anything else runs whole (bias None)."""
    if type(linear) is nn.Linear:
        return F.linear(x, linear.weight), linear.bias
    if hasattr(linear, "forward_without_bias"):
        return linear.forward_without_bias(x)
    return linear(x), None


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, kernel_backend: str | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as timm's default
        self.fc2 = nn.Linear(hidden, dim)
        self.kernel_backend = kernel_backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = maws_kernels.resolve_backend("bias_gelu", op_backend(self.kernel_backend, False),
                                               ("triton", "torch"), x.device)
        if backend == "torch":  # the reference path, bit for bit the official one
            return self.fc2(self.act(self.fc1(x)))
        # fc1 without its bias; bias + GELU in one kernel whose backward also reduces the bias gradient
        h, b = linear_without_bias(self.fc1, x)
        return self.fc2(maws_kernels.bias_gelu(h, b, backend=backend))


class DropPath(nn.Module):
    """Stochastic depth (timm's ``drop_path``): in training each sample's branch is zeroed with
    probability ``p`` and the kept ones scaled by ``1 / (1 - p)``; the identity otherwise.

    ``generator``, when set, is where the per-sample draws come from (the fine-tune objective
    seeds one per step, so a resumed run drops the same branches as an uninterrupted one).
    :meth:`draw` and :meth:`apply` split the two halves: a block draws its masks before its
    checkpointed or compiled body, which then holds no random op (a recomputation multiplies by the
    same masks, and the compiled graph needs no generator).
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability {p} is not in [0, 1)")
        self.p = p
        self.generator: torch.Generator | None = None

    def draw(self, x: torch.Tensor) -> torch.Tensor | None:
        """The (B, 1, ...) keep mask, already divided by the keep rate, in ``x``'s dtype; None when
        nothing is dropped (``p`` 0 or evaluation)."""
        if self.p == 0.0 or not self.training:
            return None
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device)
        return mask.bernoulli_(keep, generator=self.generator).div_(keep).to(x.dtype)

    @staticmethod
    def apply(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return x if mask is None else x * mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x, self.draw(x))

    def extra_repr(self) -> str:
        return f"p={self.p}"


# The GEMMs a block runs, in order: qkv, the attention projection, fc1, fc2 (mm without a bias,
# addmm with one; the same four under tensor parallelism). Selective checkpointing keeps the
# outputs of the two up-projections and recomputes the rest: the norms, attention, GELU and the
# attention projection (1/36 of a block's step FLOPs). fc2 is not recomputed either: its output is
# the block's, and backward needs only its input, which the recomputation stops at.
_GEMM_OPS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
SELECTIVE_SAVED_GEMMS = (0, 2)


def _selective_contexts():
    """torch's selective-checkpoint contexts for one block call: MUST_SAVE for the outputs of the
    block's 1st and 3rd GEMM (qkv, fc1), PREFER_RECOMPUTE for every other op."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    seen = {False: 0, True: 0}  # GEMMs met so far in the forward / the recomputation

    def policy(ctx, func, *args, **kwargs):
        if func in _GEMM_OPS:
            i = seen[ctx.is_recompute]
            seen[ctx.is_recompute] = i + 1
            if i in SELECTIVE_SAVED_GEMMS:
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    Where the norms' kernel backend is a fused one (Triton on a GPU), each residual add happens
    inside the LayerNorm after it (``maws_kernels.add_layer_norm``, which also adds the attention
    projection's bias and reduces its gradient). :func:`run_blocks` goes further and hands each
    block's MLP output to the next block unadded (``defer``), so that add too lands in a norm. On the
    torch backend the block is the official arithmetic, bit for bit.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attn_backend: str = "sdpa",
                 norm_layer=LayerNorm, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, attn_backend)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path1, self.drop_path2 = DropPath(drop_path), DropPath(drop_path)  # no parameters, no keys
        self.activation_checkpoint = "none"  # see set_block_options
        self._compiled = None

    def fused_add_backend(self, x: torch.Tensor) -> str | None:
        """The add_layer_norm backend this block fuses its residual adds with on ``x``, or None (unfused)."""
        if not (isinstance(self.norm1, LayerNorm) and isinstance(self.norm2, LayerNorm)):
            return None
        return self.norm2.add_backend(x)

    def forward(self, x: torch.Tensor, branch: torch.Tensor | None = None, defer: bool = False,
                seq: Packed | None = None):
        """One block on the residual stream ``x`` (+ ``branch``, the previous block's MLP output still
        to be added, when the caller deferred it); ``seq``: x holds packed sequences (:class:`Packed`).

        Returns the new stream, or with ``defer`` the pair (stream, MLP output) for the next norm to
        add (the MLP output is None when this block did the add itself, unfused).

        The drop-path masks are drawn here, in eager mode; the rest runs as :meth:`_run`, or its
        compiled twin after :func:`set_block_options` (``compile=True``).
        """
        m1, m2 = self.drop_path1.draw(x), self.drop_path2.draw(x)
        return (self._compiled or self._run)(x, branch, m1, m2, defer, seq)

    def _run(self, x, branch, m1, m2, defer: bool, seq: Packed | None = None):
        """:meth:`_body`, under activation checkpointing when it is on and a graph is being recorded."""
        mode = self.activation_checkpoint
        if mode == "none" or not torch.is_grad_enabled():
            return self._body(x, branch, m1, m2, defer, seq)
        from torch.utils.checkpoint import checkpoint

        # No RNG state to keep: the body has no random op (the masks are arguments). Two calls, not
        # one with a chosen context_fn: dynamo traces a context_fn only when it is passed as it is.
        if mode == "selective":
            return checkpoint(self._body, x, branch, m1, m2, defer, seq, use_reentrant=False,
                              preserve_rng_state=False, context_fn=_selective_contexts)
        return checkpoint(self._body, x, branch, m1, m2, defer, seq, use_reentrant=False, preserve_rng_state=False)

    def _body(self, x, branch, m1, m2, defer: bool, seq: Packed | None = None):
        backend = self.fused_add_backend(x)
        if backend is None:
            if branch is not None:
                x = x + branch
            x = x + DropPath.apply(self.attn(self.norm1(x), seq), m1)
            x = x + DropPath.apply(self.mlp(self.norm2(x)), m2)
            return (x, None) if defer else x
        if branch is None:
            h = self.norm1(x)
        else:
            h, x = self.norm1(branch, x, backend=backend)
        if m1 is not None:  # the dropped branch includes the projection's bias
            a, a_bias = self.attn(h, seq) * m1, None
        else:
            a, a_bias = self.attn.forward_without_bias(h, seq)
        h, x = self.norm2(a, x, a_bias, backend)
        m = DropPath.apply(self.mlp(h), m2)
        return (x, m) if defer else x + m


def set_block_options(model: nn.Module, activation_checkpoint: str = "none", compile: bool = False,
                      fullgraph: bool = True, backend="inductor") -> int:
    """Activation checkpointing and regional compilation for every :class:`Block` of ``model``.

    ``activation_checkpoint``: ``none``; ``full`` (a block keeps only its inputs, backward reruns
    its forward); ``selective`` (it keeps its qkv and fc1 GEMM outputs too, see
    ``SELECTIVE_SAVED_GEMMS``). Checkpointing applies only while autograd records.

    ``compile``: each block's body (checkpoint included, the drop-path draws left eager) goes
    through ``torch.compile`` on its own, as torchtitan compiles per block; the module's own
    ``__call__`` stays eager, so the hooks that parallel engines put on a block (ZeRO-3 gathers,
    FSDP2) run around the compiled region, and a recomputation in backward reruns only the body,
    with the parameters the pre-backward hook gathered. Blocks share one compiled graph per
    distinct shape. ``backend``: the dynamo backend (a name or a callable).

    Every block of every model shares the code object dynamo caches its variants on, so a process
    that trains several models must scope those caches per model: the training loop and the
    benchmarks call this through :func:`maws_fast.train.regional_compile.regional_compile`, which
    resets them and sizes dynamo's recompile limit for the stage. Returns the number of blocks set.
    """
    if activation_checkpoint not in CHECKPOINT_MODES:
        raise ValueError(f"activation checkpoint {activation_checkpoint!r} is not one of {CHECKPOINT_MODES}")
    n = 0
    for m in model.modules():
        if isinstance(m, Block):
            m.activation_checkpoint = activation_checkpoint
            m._compiled = torch.compile(m._run, fullgraph=fullgraph, backend=backend) if compile else None
            n += 1
    return n


def run_blocks(blocks, x: torch.Tensor, norm: nn.Module | None, seq: Packed | None = None) -> torch.Tensor:
    """``norm(blocks(x))`` (just ``blocks(x)`` when ``norm`` is None), each block called as a module
    (so parallel engines' hooks see it); ``seq``: x holds packed sequences (:class:`Packed`).

    With fused norms every residual add happens inside a LayerNorm kernel: a block returns its
    stream and its unadded MLP output, the next block's first norm (or ``norm``) adds them. Under
    activation checkpointing each block adds its MLP output itself (its inputs are what it keeps).
    """
    first = blocks[0] if len(blocks) else None
    # A checkpointed block adds its own MLP output: the next block's checkpoint then keeps one
    # stream tensor as its input, not the stream and the unadded branch (one (N, D) tensor per block).
    fuse = (isinstance(first, Block) and first.fused_add_backend(x) is not None
            and not (first.activation_checkpoint != "none" and torch.is_grad_enabled()))
    if not fuse:
        for blk in blocks:
            x = blk(x) if seq is None else blk(x, seq=seq)
        return x if norm is None else norm(x)
    branch = None
    for blk in blocks:
        x, branch = blk(x, branch, True) if seq is None else blk(x, branch, True, seq=seq)
    if branch is None:
        return x if norm is None else norm(x)
    if norm is None:
        return x + branch
    if isinstance(norm, LayerNorm):
        return norm(branch, x)[0]
    return norm(x + branch)


def route_kernel_backend(model: nn.Module, backend: str | None) -> None:
    """``model.kernel_backend = backend``, and the same for each of its LayerNorms and MLPs."""
    if backend not in (None, *maws_kernels.BACKENDS):
        raise ValueError(f"kernel backend {backend!r} is not one of {maws_kernels.BACKENDS} or None")
    model.kernel_backend = backend
    for m in model.modules():
        if isinstance(m, (LayerNorm, Mlp)):
            m.kernel_backend = backend


def init_vit_weights(module: nn.Module) -> None:
    """Official MAE init for one module: Linear xavier_uniform / bias 0, LayerNorm 1 / 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class VisionTransformer(nn.Module):
    """ViT encoder (+ optional linear head) with a cls token and fixed or learned 2D sin-cos pos-embed.

    Args:
        img_size, patch_size, in_chans: input geometry.
        embed_dim, depth, num_heads, mlp_ratio: width, blocks, heads, MLP expansion.
        num_classes: 0 for no head (``head`` is Identity and has no keys).
        pos_embed_learnable: False keeps the sin-cos table fixed (MAE); True trains it.
        attn_backend: see :mod:`maws_fast.models.attention`.
        norm_layer: LayerNorm factory (eps 1e-6 by default, as every MAE model).
        kernel_backend: maws_kernels backend of the fused ops (LayerNorm here; patch gather and
            loss in the MAE); None = best available for the device.
        global_pool: ``"token"``: the cls token after the final ``norm`` (MAE / WSP / probes);
            ``"avg"``: the mean of the patch tokens through ``fc_norm``, with no final ``norm``
            (the official MAE fine-tune's default; its checkpoints have ``fc_norm.*``, no ``norm.*``).
        drop_path_rate: stochastic depth of the last block; block i gets ``rate * i / (depth - 1)``
            (timm's linear rule: ``torch.linspace(0, rate, depth)``).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        pos_embed_learnable: bool = False,
        attn_backend: str = "sdpa",
        norm_layer=LayerNorm,
        kernel_backend: str | None = None,
        global_pool: str = "token",
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool {global_pool!r} is not 'token' or 'avg'")
        self.global_pool = global_pool
        self.in_chans, self.embed_dim, self.num_classes = in_chans, embed_dim, num_classes
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        L = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, embed_dim), requires_grad=pos_embed_learnable)
        # timm's linspace(0, rate, depth) rule, in Python (the model may be built on the meta device)
        rates = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, attn_backend, norm_layer, rate) for rate in rates]
        )
        # "avg" pooling: fc_norm after the pool replaces the final norm (the official fine-tune model)
        self.norm = norm_layer(embed_dim) if global_pool == "token" else None
        self.fc_norm = norm_layer(embed_dim) if global_pool == "avg" else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.set_kernel_backend(kernel_backend)
        self._init_encoder()

    def _init_encoder(self) -> None:
        g = self.patch_embed.grid_size
        self.pos_embed.data.copy_(sincos_2d(self.embed_dim, g, g, cls_token=True).unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear on the (out, in*p*p) view
        nn.init.normal_(self.cls_token, std=0.02)
        for name, m in self.named_modules():
            if name.startswith("decoder") or name == "head":
                continue  # subclasses and heads initialise their own
            init_vit_weights(m)
        if isinstance(self.head, nn.Linear):
            # A small head keeps the first WSP / probe steps close to the uniform prediction.
            nn.init.normal_(self.head.weight, std=0.01)
            nn.init.zeros_(self.head.bias)

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    def set_kernel_backend(self, backend: str | None) -> None:
        """Route every fused op of this model (LayerNorms, and the MAE's patch gather / loss) to ``backend``."""
        route_kernel_backend(self, backend)

    def set_attn_backend(self, backend: str) -> None:
        check_attn_backend(backend)
        for m in self.modules():
            if isinstance(m, Attention):
                m.attn_backend = backend

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1+L, D) tokens after the final norm (``avg`` pooling: no final norm)."""
        x = self.patch_embed(x)  # (B, L, D) in the compute dtype
        # pos-embed and cls token in the activations' dtype: an fp32 table would promote the whole
        # residual stream to fp32 (twice the bytes in every add, norm and cast after it)
        x = x + self.pos_embed[:, 1:, :].to(x.dtype)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        return run_blocks(self.blocks, x, self.norm)

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D): the cls token after the final norm (``token``), or fc_norm of the
        patch tokens' mean (``avg``, the cls token left out as in the official fine-tune)."""
        if self.global_pool == "avg":
            return self.fc_norm(self.forward_features(x)[:, 1:].mean(dim=1))
        return self.forward_features(x)[:, 0]

    def set_drop_path_generator(self, generator: torch.Generator | None) -> None:
        """Where every block's stochastic-depth draws come from (None: torch's default generator)."""
        for m in self.modules():
            if isinstance(m, DropPath):
                m.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_pooled(x))


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did with a checkpoint."""

    loaded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    initialised: list[str] = field(default_factory=list)  # in the model, kept at its fresh init
    resampled: list[str] = field(default_factory=list)  # learned pos-embeds resized to the model's grid ("key g0 -> g")
    # fixed sin-cos tables of another grid ("key g0 -> g"): the model's own table is kept
    regenerated: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def short(keys: list[str]) -> str:
            prefixes = sorted({k.split(".")[0] for k in keys})
            return ", ".join(prefixes) if prefixes else "none"

        out = (f"loaded {len(self.loaded)} tensors; dropped {len(self.dropped)} ({short(self.dropped)}); "
               f"initialised {len(self.initialised)} ({short(self.initialised)})")
        if self.resampled:
            out += f"; resampled bicubically: {', '.join(self.resampled)}"
        if self.regenerated:
            out += f"; sin-cos regenerated for the model's grid: {', '.join(self.regenerated)}"
        return out


WRAPPER_KEYS = ("model", "state_dict", "module")  # official MAE / lightning-style / DeepSpeed-style wrappers
PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers in saved key names


def unwrap_state_dict(sd: dict) -> dict:
    """The model's tensors inside a checkpoint: ``{"model": sd}`` (official MAE), ``{"state_dict": sd}``
    or a bare state dict (ours, timm's, MAWS's), with a DDP ``module.`` or compile ``_orig_mod.``
    prefix on every key removed. Non-tensor entries (an epoch, args) are left out."""
    for key in WRAPPER_KEYS:
        if isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    for prefix in PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


POS_EMBED_KEYS = ("pos_embed", "decoder_pos_embed")


def _fit_pos_embeds(model: nn.Module, sd: dict, own: dict) -> tuple[dict, list[str], dict[str, str]]:
    """``sd`` with each position embedding of another patch grid made to fit ``model``'s grid.

    A learned table is resampled (:func:`resample_pos_embed`, the official rule); a fixed sin-cos
    one is dropped from ``sd``, the model keeping the table it built for its own grid. Tables that
    cannot be fitted (another width, not a square grid) are left for the shape check to report.
    Returns (state dict, what was resampled, {regenerated key: what}), each "key g0xg0 -> gxg".
    """
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None:
        return sd, [], {}
    params = dict(model.named_parameters())
    sd, resampled, regenerated = dict(sd), [], {}
    for key in POS_EMBED_KEYS:
        if key not in sd or key not in own or sd[key].shape == own[key].shape:
            continue
        src, dst = sd[key], own[key]
        extra = dst.shape[-2] - grid * grid
        if src.ndim != 3 or dst.ndim != 3 or src.shape[-1] != dst.shape[-1] or extra < 0:
            continue
        try:
            fitted = resample_pos_embed(src, grid, extra)
        except ValueError:
            continue
        g0 = math.isqrt(src.shape[-2] - extra)
        what = f"{key} {g0}x{g0} -> {grid}x{grid}"
        if key in params and not params[key].requires_grad:
            del sd[key]
            regenerated[key] = what
        else:
            sd[key] = fitted
            resampled.append(what)
    return sd, resampled, regenerated


def load_pretrained(model: nn.Module, state_dict: dict, strict: bool = False, source: str = "checkpoint") -> LoadReport:
    """Load matching keys of ``state_dict`` into ``model`` and say what was dropped / initialised.

    Every shared key must have the same shape: a mismatch raises CheckpointError naming the keys
    (a silent partial load would train a different model than the one asked for). The one
    exception is a position embedding of another patch grid (a checkpoint of another resolution):
    a learned table is resampled bicubically as the official MAE does, a fixed sin-cos table is the
    model's own for its grid; the report lists both.

    Args:
        model: the destination module.
        state_dict: source tensors (a bare state dict or ``{"model": ...}``).
        strict: also fail when a key is dropped or left initialised.
        source: name of the checkpoint for messages.
    """
    sd = unwrap_state_dict(state_dict)
    own = model.state_dict()
    sd, resampled, regenerated = _fit_pos_embeds(model, sd, own)
    # in the model's own key order, so the message starts where the model does (cls_token, ...)
    bad = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if bad:
        raise CheckpointError(
            f"{source} does not fit the model; shape mismatch in {len(bad)} key(s): " + "; ".join(bad[:8])
            + (" ..." if len(bad) > 8 else "") + ". Use the model config the checkpoint was trained with."
        )
    report = LoadReport(
        loaded=[k for k in sd if k in own],
        dropped=[k for k in sd if k not in own],
        initialised=[k for k in own if k not in sd and k not in regenerated],
        resampled=resampled,
        regenerated=list(regenerated.values()),
    )
    if strict and (report.dropped or report.initialised):
        raise CheckpointError(
            f"{source} does not match the model: unexpected keys {report.dropped[:8]}, missing keys {report.initialised[:8]}"
        )
    with torch.no_grad():
        for k in report.loaded:
            own[k].copy_(sd[k])
    return report


def load_encoder(model: nn.Module, state_dict: dict, source: str, new: tuple[str, ...] = (),
                 hint: str = "") -> LoadReport:
    """:func:`load_pretrained` that refuses a checkpoint leaving any of the model's tensors at their
    fresh init except those in ``new`` (a head, a fine-tune's ``fc_norm``): a file that fits nothing
    would otherwise train or probe a random encoder under another one's name. ``hint`` says what
    to point at instead."""
    report = load_pretrained(model, state_dict, source=source)
    missing = [k for k in report.initialised if k not in new]
    if missing:
        raise CheckpointError(f"{source} lacks encoder tensors {missing[:6]} ({len(missing)} in all); {hint}")
    return report
