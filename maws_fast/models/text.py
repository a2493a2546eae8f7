"""The LiT text tower: a pre-norm transformer built from the ViT's own blocks and kernels.

Choices (documented in the README's LiT section):

* **Bidirectional, CLS-pooled.** Every caption starts with a CLS token and ends with EOS; each
  token attends to its whole caption (not causally), and the caption's embedding is the CLS
  token after the final LayerNorm. This is how MAWS's released CLIP text towers (XLM-R, pooled at
  ``<s>``) read text, and it lets one tokenizer and one pooling rule serve both towers.
* **No padding is computed.** A batch arrives padded, (B, N) ids with ``pad_id`` after each
  caption's EOS; the tower packs the real tokens back to back into one (1, T, W) stream and every
  block attends within each caption (:class:`maws_kernels.nn.Packed`): our Triton
  varlen flash attention on a GPU, masked SDPA elsewhere. Norms and MLPs are per token, so they
  run on the T real tokens only. Packing waits for the device twice per forward: to check that no
  caption is empty, and for T (the boolean-mask index).
* Learned absolute position embeddings (``context_length`` of them), token embeddings with
  std 0.02 and positions with std 0.01 (CLIP's init), the blocks with the ViT's init.

Keys: ``token_embedding.weight, pos_embed, blocks.N.*`` (the ViT block's), ``norm.*``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from maws_fast.models.vit import Block, init_vit_weights, route_kernel_backend, run_blocks, vit_norm
from maws_kernels.nn import Packed


class TextTransformer(nn.Module):
    """Caption ids (B, N) -> (B, width) embeddings, CLS-pooled after the final norm.

    Args:
        vocab_size: tokenizer vocabulary size.
        context_length: the longest caption in tokens, CLS and EOS included (position table size).
        width, depth, num_heads, mlp_ratio: the transformer's shape.
        pad_id: the padding id (never embedded: padded positions are dropped before the blocks).
        attn_backend: attention backend of every block (one of ``maws_kernels.nn.ATTENTION_BACKENDS``).
        kernel_backend: maws_kernels backend of the norms and MLPs (None = best for the device).
    """

    def __init__(self, vocab_size: int, context_length: int, width: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, pad_id: int = 0, attn_backend: str = "sdpa", kernel_backend: str | None = None):
        super().__init__()
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id {pad_id} is not an id of the {vocab_size}-token vocabulary")
        self.vocab_size, self.context_length, self.width, self.pad_id = vocab_size, context_length, width, pad_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, width))
        self.blocks = nn.ModuleList([Block(width, num_heads, mlp_ratio, attn_backend) for _ in range(depth)])
        self.norm = vit_norm(width)
        for m in self.modules():
            init_vit_weights(m)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        self.set_kernel_backend(kernel_backend)

    def set_kernel_backend(self, backend: str | None) -> None:
        route_kernel_backend(self, backend)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, N) int ids, each row CLS ... EOS then ``pad_id`` to N -> (B, width)."""
        if ids.ndim != 2 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"text ids must be (B, N) int32 / int64, got {ids.dtype} {tuple(ids.shape)}")
        B, N = ids.shape
        if N > self.context_length:
            raise ValueError(f"captions of {N} tokens exceed the tower's context_length {self.context_length}; "
                             "tokenize with truncation to it")
        real = ids != self.pad_id
        lengths = real.sum(1)
        if B and not bool(lengths.all()):  # one host read; packing below needs one anyway
            raise ValueError(f"caption {int((lengths == 0).nonzero()[0])} has no token that is not pad_id "
                             f"{self.pad_id}; every caption needs at least [CLS]")
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        x, dtype = self.embed(ids)
        return self.encode_packed(x[real].to(dtype).unsqueeze(0), cu, N)  # (1, T, W): the real tokens only

    def embed(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
        """(B, N, W) token + position embeddings of the padded batch, and the dtype the blocks run in.
        Embedded padded, then packed: the position table's gradient is then a sum over the batch, not an
        accumulation into repeated rows (whose order a CPU index_put does not fix: runs would differ)."""
        x = self.token_embedding(ids) + self.pos_embed[:, :ids.shape[1]]
        dtype = torch.get_autocast_dtype(ids.device.type) if torch.is_autocast_enabled(ids.device.type) else x.dtype
        return x, dtype

    def encode_packed(self, x: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
        """(1, T, W) packed tokens, caption after caption (``cu``: their (B + 1,) int32 offsets) -> (B, W),
        each caption's first token (CLS) after the blocks and the final norm."""
        x = run_blocks(self.blocks, x, self.norm, seq=Packed(cu, max_len))
        return x[0, cu[:-1].long()]
