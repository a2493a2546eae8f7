"""The attention-backend switch every ViT block goes through: ``maws_kernels.nn``'s, under the
names the trainer uses.

``attention(q, k, v, backend)`` with q, k, v of shape (B, H, N, Dh); ``attention_varlen(q, k, v,
cu_seqlens, max_seqlen, backend)`` on packed (T, H, Dh) sequences of different lengths (the text
tower's captions). Backends:

* ``"triton"``   -- ``maws_kernels.attention``: our flash attention (any N, head dim <= 128). On a
  CPU it runs only under Triton's interpreter (``TRITON_INTERPRET=1``), a correctness tool.
* ``"sdpa"``     -- torch.nn.functional.scaled_dot_product_attention (picks flash / efficient /
  cuDNN / math itself).
* ``"xformers"`` -- ``xformers.ops.memory_efficient_attention`` (BMHK layout; GPU only).
* ``"manual"``   -- plain matmul-softmax-matmul in the input dtype with an fp32 softmax; the
  reference the others are tested against.

A backend that cannot run raises :class:`maws_kernels.BackendUnavailableError` naming why; it
never falls back silently. The names are ``maws_fast.config.ATTN_BACKENDS`` (config imports no
torch, so it keeps its own copy; a test holds the two equal).
"""
from __future__ import annotations

from maws_kernels.nn import attend as attention
from maws_kernels.nn import attend_packed as attention_packed
from maws_kernels.nn import attend_varlen as attention_varlen
from maws_kernels.nn import attention_manual
from maws_kernels.nn import available_attention_backends as available_attn_backends
from maws_kernels.nn import check_attention_backend as check_attn_backend

__all__ = ["attention", "attention_packed", "attention_varlen", "attention_manual", "available_attn_backends", "check_attn_backend"]
