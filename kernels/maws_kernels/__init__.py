"""maws_kernels: fused kernels for ViT training (MAE patch ops, attention, losses, optimizers).

Importable on its own (torch, plus triton where available): it never imports maws_fast, DALI or
torch.distributed, so other trainers can depend on it.

Each op has one public function with a ``backend=`` argument and a pure-torch ``<op>_ref``.
Backends: ``"triton"`` (CUDA; on CPU only under ``TRITON_INTERPRET=1`` and only when asked for
by name), ``"cuda"`` (the csrc twins of masked_patchify and norm_pix_loss, in ``maws_kernels._C``),
``"torch"`` (the reference). Selection: explicit argument, else env ``MAWS_KERNELS_BACKEND``, else
the best available for the tensor's device. A backend that cannot run raises
:class:`BackendUnavailableError`; nothing falls back silently.

Ops: attention / attention_qkvpacked / attention_varlen (flash attention, any N, head dim <= 128), masked_patchify, norm_pix_loss, layer_norm, add_layer_norm (residual add + LayerNorm), bias_gelu (bias + exact GELU, dbias fused), soft_target_cross_entropy (dense or sparse
targets), linear_soft_target_cross_entropy (fused WSP head), contrastive_loss (symmetric
InfoNCE of CLIP / LiT on the fused linear CE: no B x B logits), fused_adamw_ (flat fp32 master
shards + bf16 model copy) and fused_adamw_multi_ (a list of tensors in one launch). Each op but
fused_adamw_multi_ is a torch.library custom op, so torch.compile traces through it.

Modules, for use in another trainer: ``maws_kernels.nn`` (LayerNorm, AddLayerNorm, Attention, Mlp,
SoftTargetCrossEntropy, NormPixLoss), ``maws_kernels.optim.FusedAdamW`` (a torch.optim.Optimizer,
state_dict-compatible with torch.optim.AdamW) and :func:`patch_timm` (swaps a timm ViT's norms,
attention and MLP for ours in place).

Triton is optional: where it cannot be imported every op runs its torch path and asking for the
"triton" backend raises BackendUnavailableError naming the missing package.
"""
from maws_kernels._backend import BACKENDS, BackendUnavailableError, available_backends, backend_problem, resolve_backend
from maws_kernels.patch import masked_patchify, masked_patchify_ref, patchify, unpatchify
from maws_kernels.norm_pix_loss import norm_pix_loss, norm_pix_loss_ref
from maws_kernels.cross_entropy import (
    linear_soft_target_cross_entropy,
    soft_target_cross_entropy,
    soft_target_cross_entropy_ref,
    sparse_to_dense,
)
from maws_kernels.layer_norm import layer_norm, layer_norm_ref
from maws_kernels.contrastive import contrastive_loss, contrastive_loss_ref
from maws_kernels.add_layer_norm import add_layer_norm, add_layer_norm_ref
from maws_kernels.bias_gelu import bias_gelu, bias_gelu_ref
from maws_kernels.adamw import fused_adamw_, fused_adamw_multi_, fused_adamw_ref
from maws_kernels.attention import (
    attention,
    attention_qkvpacked,
    attention_ref,
    attention_varlen,
    attention_varlen_ref,
)
from maws_kernels import nn, optim  # noqa: E402  (after the ops they wrap)
from maws_kernels.optim import FusedAdamW
from maws_kernels.patching import PatchReport, patch_timm

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "backend_problem",
    "resolve_backend",
    "patchify",
    "unpatchify",
    "masked_patchify",
    "masked_patchify_ref",
    "norm_pix_loss",
    "norm_pix_loss_ref",
    "soft_target_cross_entropy",
    "soft_target_cross_entropy_ref",
    "linear_soft_target_cross_entropy",
    "sparse_to_dense",
    "layer_norm",
    "layer_norm_ref",
    "contrastive_loss",
    "contrastive_loss_ref",
    "add_layer_norm",
    "add_layer_norm_ref",
    "bias_gelu",
    "bias_gelu_ref",
    "fused_adamw_",
    "fused_adamw_ref",
    "fused_adamw_multi_",
    "FusedAdamW",
    "nn",
    "optim",
    "patch_timm",
    "PatchReport",
    "attention",
    "attention_ref",
    "attention_qkvpacked",
    "attention_varlen",
    "attention_varlen_ref",
]
__version__ = "0.1.0"
