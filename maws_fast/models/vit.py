"""Vision Transformer encoder with timm's state-dict keys.

Keys: ``cls_token, pos_embed, patch_embed.proj.*, blocks.N.{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}.*, norm.*, head.*`` -- the names every MAE / MAWS / timm checkpoint uses.
Blocks are pre-norm with qkv bias, exact GELU, LayerNorm eps 1e-6, no drop-path, no layer-scale.

The norms, attention and MLP are :mod:`maws_kernels.nn`'s modules (the LayerNorm with eps 1e-6,
:func:`vit_norm`); this file composes them into blocks that fuse their residual adds into the
norms (:class:`Block`, :func:`run_blocks`). Weight loading is :mod:`maws_fast.models.weights`.

Pure model code: no data, no torch.distributed. Parallelism is applied from outside.
"""
from __future__ import annotations

import torch
import torch.nn as nn

import maws_kernels
from maws_fast.config import CHECKPOINT_MODES
from maws_fast.models.pos_embed import sincos_2d
from maws_kernels.nn import Attention, LayerNorm, Mlp, Packed, check_attention_backend

__all__ = ["Block", "DropPath", "Packed", "PatchEmbed", "VisionTransformer", "init_vit_weights", "op_backend",
           "route_kernel_backend", "run_blocks", "set_block_options", "vit_norm"]


def op_backend(model_backend: str | None, has_cuda_twin: bool) -> str | None:
    """The maws_kernels backend one op of a model runs with.

    A model-level ``"cuda"`` selects the CUDA C++ twins (patch gather and loss); ops without a
    twin (LayerNorm, bias-GELU, cross-entropy) then use their best backend for the device, as
    documented for ``model.kernel_backend``. Any other choice applies to every op as given.
    """
    return None if model_backend == "cuda" and not has_cuda_twin else model_backend


def vit_norm(dim: int) -> LayerNorm:
    """The blocks' default ``norm_layer``: :class:`maws_kernels.nn.LayerNorm` with eps 1e-6, as
    every MAE / MAWS / timm ViT."""
    return LayerNorm(dim, eps=1e-6)


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
                 norm_layer=vit_norm, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, backend=check_attention_backend(attn_backend))
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
            x = x + DropPath.apply(self.attn(self.norm1(x), seq=seq), m1)
            x = x + DropPath.apply(self.mlp(self.norm2(x)), m2)
            return (x, None) if defer else x
        if branch is None:
            h = self.norm1(x)
        else:
            h, x = self.norm1(branch, x, backend=backend)
        if m1 is not None:  # the dropped branch includes the projection's bias
            a, a_bias = self.attn(h, seq=seq) * m1, None
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
    with the parameters the pre-backward hook gathered. Compilation is lazy (at a block's first
    call), so the options may be set before an engine shards the parameters: both are instance
    attributes, which FSDP2's swap of the block's class leaves in place. Blocks share one compiled
    graph per distinct shape. ``backend``: the dynamo backend (a name or a callable).

    The training loop and the step benchmark call this through
    :func:`maws_fast.train.parallelize.parallelize`, in torchtitan's order: after tensor parallelism
    has split the blocks, before the data-parallel engine. Every block of every model shares the
    code object dynamo caches its variants on, so a process that trains several models must scope
    those caches per model: with ``compile`` they do it inside
    :func:`maws_fast.train.regional_compile.compile_scope`, which resets them and sizes dynamo's
    recompile limit for the stage. Returns the number of blocks set.
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
    """``model.kernel_backend = backend`` (the model's choice, read by the ops with a CUDA twin),
    and the ``backend`` of each of its LayerNorms and MLPs: that choice for ops without a twin
    (:func:`op_backend`; ``"cuda"`` leaves them at their best for the device)."""
    if backend not in (None, *maws_kernels.BACKENDS):
        raise ValueError(f"kernel backend {backend!r} is not one of {maws_kernels.BACKENDS} or None")
    model.kernel_backend = backend
    for m in model.modules():
        if isinstance(m, (LayerNorm, Mlp)):
            m.backend = op_backend(backend, has_cuda_twin=False)


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
        attn_backend: one of ``maws_kernels.nn.ATTENTION_BACKENDS`` (see :func:`maws_kernels.nn.attend`).
        norm_layer: LayerNorm factory (:func:`vit_norm`, eps 1e-6, by default, as every MAE model).
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
        norm_layer=vit_norm,
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
        """Route every block's attention to ``backend`` (one of ``maws_kernels.nn.ATTENTION_BACKENDS``)."""
        check_attention_backend(backend)
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend = backend

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

