"""The contrastive loss under data parallelism: features all-gathered with gradient, each rank
computing its rows, gradients averaged over ranks, equal the one-process run of the global batch.

2 and 4 gloo ranks; two tiny towers (a Linear each) so the gradients reach parameters through the
gather's backward; the loss on the torch backend and on the Triton kernels (interpreted).
"""
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.parallel.dist_harness import spawn_ranks

B, D_IN, D = 8, 12, 16


def _towers():
    g = torch.Generator().manual_seed(0)
    img_w = torch.randn(D, D_IN, generator=g) * 0.3
    txt_w = torch.randn(D, D_IN, generator=g) * 0.3
    x_img, x_txt = torch.randn(B, D_IN, generator=g), torch.randn(B, D_IN, generator=g)
    return img_w, txt_w, torch.tensor(2.5), x_img, x_txt  # logit scale before exp: e^2.5 ~ 12


def _loss(img_w, txt_w, log_scale, x_img, x_txt, backend, mesh=None):
    import maws_kernels as mk

    img = F.normalize(x_img @ img_w.T, dim=-1)
    txt = F.normalize(x_txt @ txt_w.T, dim=-1)
    scale = log_scale.exp().clamp(max=100)
    if mesh is None:
        return mk.contrastive_loss(img, txt, scale, backend=backend, chunk_rows=3)
    from maws_fast.parallel.mesh import gather_with_grad

    all_img, off = gather_with_grad(img, mesh)
    all_txt, _ = gather_with_grad(txt, mesh)
    return mk.contrastive_loss(img, txt, scale, all_image_features=all_img, all_text_features=all_txt, offset=off,
                               backend=backend, chunk_rows=3)


def _worker(rank, world, port, backend, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    error, out = None, {}
    try:
        from maws_fast.parallel.mesh import all_reduce_mean, destroy, init_distributed

        mesh = init_distributed(tp=1, device="cpu")
        img_w, txt_w, log_scale, x_img, x_txt = _towers()
        params = [t.requires_grad_() for t in (img_w, txt_w, log_scale)]
        b = B // world
        rows = slice(rank * b, (rank + 1) * b)
        loss = _loss(*params, x_img[rows], x_txt[rows], backend, mesh)
        loss.backward()
        out["loss"] = all_reduce_mean(loss.detach().clone(), mesh)
        out["grads"] = [all_reduce_mean(p.grad.clone(), mesh) for p in params]
    except Exception:
        error = traceback.format_exc()
    if rank == 0 or error:
        torch.save({"out": out, "error": error}, Path(out_dir) / f"rank{rank}.pt")
    if error is None:
        destroy()
    os._exit(0 if error is None else 1)


@pytest.mark.interpreter
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gathered_loss_matches_one_process(world, backend, tmp_path):
    procs = spawn_ranks(_worker, world, (backend, str(tmp_path)), timeout=300)
    errors = [torch.load(f, weights_only=False)["error"] for f in sorted(tmp_path.glob("rank*.pt"))]
    assert not any(errors), "\n".join(e for e in errors if e)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    got = torch.load(tmp_path / "rank0.pt", weights_only=False)["out"]

    params = [t.requires_grad_() for t in _towers()[:3]]
    x_img, x_txt = _towers()[3:]
    loss = _loss(*params, x_img, x_txt, backend)
    loss.backward()
    assert torch.allclose(got["loss"], loss.detach(), rtol=1e-6, atol=1e-6), (got["loss"], loss)
    for name, g, p in zip(("image tower", "text tower", "logit scale"), got["grads"], params):
        assert torch.allclose(g, p.grad, rtol=1e-5, atol=1e-6), (name, (g - p.grad).abs().max())
