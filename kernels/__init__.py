"""maws_kernels: fused kernels for ViT training (MAE patch ops, attention, losses, optimizers).

Importable on its own (torch, plus triton where available): it never imports maws_fast, DALI or
torch.distributed, so other trainers can depend on it.

Each op has one public function with a ``backend=`` argument and a pure-torch ``<op>_ref``.
Backends: ``"triton"`` (CUDA), ``"cuda"`` (csrc twins), ``"torch"`` (the reference; the only
one on CPU). Selection: explicit argument, else env ``MAWS_KERNELS_BACKEND``, else the best
available for the tensor's device. The fused Triton/CUDA implementations land op by op; until an
op has one, asking for it raises :class:`BackendUnavailableError` rather than falling back.
"""
from maws_kernels._backend import BACKENDS, BackendUnavailableError, available_backends, resolve_backend
from maws_kernels.patch import masked_patchify, masked_patchify_ref, patchify, unpatchify
from maws_kernels.norm_pix_loss import norm_pix_loss, norm_pix_loss_ref
from maws_kernels.cross_entropy import soft_target_cross_entropy, soft_target_cross_entropy_ref

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "resolve_backend",
    "patchify",
    "unpatchify",
    "masked_patchify",
    "masked_patchify_ref",
    "norm_pix_loss",
    "norm_pix_loss_ref",
    "soft_target_cross_entropy",
    "soft_target_cross_entropy_ref",
]
__version__ = "0.1.0"
