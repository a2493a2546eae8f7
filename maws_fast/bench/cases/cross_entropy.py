"""Soft-target cross-entropy cases at the WSP head: batch x vocabulary, dense and sparse targets.

The vocabulary is 30k, the upper end the issue names (hashtag vocabularies of the weakly
supervised pretraining literature); each image has 8 tags, weight 1/8.
"""
from __future__ import annotations

from typing import Iterator

import torch

import maws_kernels as mk
from maws_fast.bench.kernels import Case, MaeShape, dtype_name
from maws_kernels.cross_entropy import linear_soft_target_cross_entropy, sparse_to_dense

VOCAB = 30000
TAGS = 8


def cases(shapes: list[MaeShape], dtype: torch.dtype, device) -> Iterator[Case]:
    es = dtype.itemsize
    dt = dtype_name(dtype)
    V = VOCAB if torch.device(device).type == "cuda" else 1000  # interpreted on CPU: keep it small
    done_ce = False
    for s in shapes:
        B = s.batch
        ids = torch.randint(0, V, (B, TAGS), device=device)
        w = torch.full((B, TAGS), 1.0 / TAGS, device=device)
        dense = sparse_to_dense(ids, w, V).to(dtype)
        if not done_ce:  # the plain CE does not depend on the model width
            done_ce = True
            logits = (torch.randn(B, V, device=device) * 3).to(dtype).requires_grad_()
            io = B * V * es
            yield Case("soft_target_ce", f"b{B} V={V} dense", dt, (logits, dense),
                       {"ours": lambda x, t: mk.soft_target_cross_entropy(x, t, backend="triton"),
                        "torch": lambda x, t: mk.soft_target_cross_entropy_ref(x, t)},
                       bytes_fwd=2 * io, bytes_bwd=3 * io)
            yield Case("soft_target_ce", f"b{B} V={V} sparse T={TAGS}", dt, (logits, ids, w, dense),
                       {"ours": lambda x, i, ww, t: mk.soft_target_cross_entropy(x, target_ids=i, target_weights=ww,
                                                                               backend="triton"),
                        "torch": lambda x, i, ww, t: mk.soft_target_cross_entropy_ref(x, t)},
                       bytes_fwd=io, bytes_bwd=2 * io, note="torch gets the dense (B, V) target")
        D = s.width
        x = torch.randn(B, D, device=device, dtype=dtype, requires_grad=True)
        W = (torch.randn(V, D, device=device) * D**-0.5).to(dtype).requires_grad_()
        b = torch.zeros(V, device=device, dtype=dtype, requires_grad=True)
        yield Case("linear_soft_target_ce", f"{s.model} b{B} D={D} V={V} sparse T={TAGS}", dt, (x, W, b, ids, w, dense),
                   {"ours": lambda x, W, b, i, ww, t: linear_soft_target_cross_entropy(
                       x, W, b, target_ids=i, target_weights=ww, backend="triton"),
                    "torch": lambda x, W, b, i, ww, t: mk.soft_target_cross_entropy_ref(torch.addmm(b, x, W.t()), t)},
                   bytes_fwd=(V * D + B * D) * es + B * V * es, bytes_bwd=(V * D + B * D) * es,
                   note="head GEMMs included; ours computes the gradients in the forward")
