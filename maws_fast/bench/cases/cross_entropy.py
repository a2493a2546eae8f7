"""Cross-entropy cases at the WSP head: batch x vocabulary, soft targets (dense and sparse) and hard
labels, the loss alone and fused with the head's linear layer.

The vocabulary is 30k, the upper end the issue names (hashtag vocabularies of the weakly
supervised pretraining literature); each image has 8 tags, weight 1/8. The hard-label cases (one
class index per row, as a fine-tune or a linear probe without mixup has) are ours' sparse form with
one tag of weight 1, so they can be timed against torch's ``F.cross_entropy`` and against Liger.

"liger" (where liger-kernel is installed): ``liger_cross_entropy`` and
``liger_fused_linear_cross_entropy`` on the hard-label cases (the weight gradient accumulated in
fp32, ``accum_dtype=torch.float32``, as ours does); the soft-target cases are n/a for it. Liger's
cross-entropy writes the logits' gradient into the logits it is given: the hard-label case has its
own logits, and liger runs last on it.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

import maws_kernels as mk
from maws_fast.bench.kernels import Case, MaeShape, dtype_name, liger_functional
from maws_kernels.cross_entropy import linear_soft_target_cross_entropy, sparse_to_dense

VOCAB = 30000
TAGS = 8
LIGER_NA = "Liger's cross-entropy takes class indices, not soft targets (a distribution over the vocabulary)"


def _liger_ce(x, labels, ids, ones):
    return liger_functional().liger_cross_entropy(x, labels)


def _liger_linear_ce(x, W, b, labels, ids, ones):
    return liger_functional().liger_fused_linear_cross_entropy(x, W, labels, b, accum_dtype=torch.float32)


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
        labels = torch.randint(0, V, (B,), device=device)
        one = torch.ones(B, 1, device=device)  # the hard labels as ours' sparse targets: one tag, weight 1
        if not done_ce:  # the plain CE does not depend on the model width
            done_ce = True
            logits = (torch.randn(B, V, device=device) * 3).to(dtype).requires_grad_()
            io = B * V * es
            yield Case("soft_target_ce", f"b{B} V={V} dense", dt, (logits, dense),
                       {"ours": lambda x, t: mk.soft_target_cross_entropy(x, t, backend="triton"),
                        "torch": lambda x, t: mk.soft_target_cross_entropy_ref(x, t)},
                       bytes_fwd=2 * io, bytes_bwd=3 * io, skip={"liger": LIGER_NA})
            yield Case("soft_target_ce", f"b{B} V={V} sparse T={TAGS}", dt, (logits, ids, w, dense),
                       {"ours": lambda x, i, ww, t: mk.soft_target_cross_entropy(x, target_ids=i, target_weights=ww,
                                                                               backend="triton"),
                        "torch": lambda x, i, ww, t: mk.soft_target_cross_entropy_ref(x, t)},
                       bytes_fwd=io, bytes_bwd=2 * io, note="torch gets the dense (B, V) target",
                       skip={"liger": LIGER_NA})
            hard = (torch.randn(B, V, device=device) * 3).to(dtype).requires_grad_()  # its own: Liger writes into it
            yield Case("hard_target_ce", f"b{B} V={V} class index", dt, (hard, labels, labels[:, None], one),
                       {"ours": lambda x, y, i, o: mk.soft_target_cross_entropy(x, target_ids=i, target_weights=o,
                                                                              backend="triton"),
                        "torch": lambda x, y, i, o: F.cross_entropy(x, y), "liger": _liger_ce},
                       bytes_fwd=io, bytes_bwd=2 * io, note="ours: the sparse soft-target kernel, one tag of weight 1")
        D = s.width
        x = torch.randn(B, D, device=device, dtype=dtype, requires_grad=True)
        W = (torch.randn(V, D, device=device) * D**-0.5).to(dtype).requires_grad_()
        b = torch.zeros(V, device=device, dtype=dtype, requires_grad=True)
        head_bytes = (V * D + B * D) * es
        yield Case("linear_soft_target_ce", f"{s.model} b{B} D={D} V={V} sparse T={TAGS}", dt, (x, W, b, ids, w, dense),
                   {"ours": lambda x, W, b, i, ww, t: linear_soft_target_cross_entropy(
                       x, W, b, target_ids=i, target_weights=ww, backend="triton"),
                    "torch": lambda x, W, b, i, ww, t: mk.soft_target_cross_entropy_ref(torch.addmm(b, x, W.t()), t)},
                   bytes_fwd=head_bytes + B * V * es, bytes_bwd=head_bytes,
                   note="head GEMMs included; ours computes the gradients in the forward", skip={"liger": LIGER_NA})
        yield Case("linear_hard_target_ce", f"{s.model} b{B} D={D} V={V} class index", dt,
                   (x, W, b, labels, labels[:, None], one),
                   {"ours": lambda x, W, b, y, i, o: linear_soft_target_cross_entropy(
                       x, W, b, target_ids=i, target_weights=o, backend="triton"),
                    "torch": lambda x, W, b, y, i, o: F.cross_entropy(torch.addmm(b, x, W.t()), y),
                    "liger": _liger_linear_ce},
                   bytes_fwd=head_bytes + B * V * es, bytes_bwd=head_bytes,
                   note="head GEMMs included; ours and Liger compute the gradients in the forward")
