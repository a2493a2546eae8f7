"""Our engine on a GPU, one process: the fused Triton AdamW over bucket runs, the bf16 model copy.

One GPU cannot shard (NCCL refuses two ranks on one device), so this checks the CUDA path of the
optimizer and the buffers; the sharding itself is tested with gloo on CPU (test_engines.py).
"""
import pytest
import torch

from tests.parallel.dist_harness import BETAS, CLIP, LR, STEPS, WD, build

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)


def _run(task: str, stage: int, param_dtype: str, backend: str):
    from maws_fast.parallel.engine import AdamWSpec, build_engine
    from maws_fast.parallel.mesh import ParallelDims, ParallelLayout, single_process
    from maws_fast.train.optim import param_groups

    model, make, imgs, targets = build(task)
    model.cuda()
    layout = ParallelLayout(ParallelDims(1), "ours", stage, param_dtype, bucket_mb=0.05)
    engine = build_engine(make(model, 0, 1), single_process(), layout, AdamWSpec.of(model, param_groups(model, WD), BETAS),
                          device="cuda", kernel_backend=backend)
    losses = []
    for s in range(STEPS):
        engine.zero_grad()
        t = None if targets[s] is None else targets[s].cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=param_dtype == "bf16"):
            loss = engine.objective(imgs[s].cuda(), t, s)
        engine.backward(loss)
        engine.step(LR, CLIP)
        losses.append(loss.item())
    return losses, {k: v.cpu() for k, v in engine.full_state_dict().items()}


@pytest.mark.parametrize("task", ["mae", "wsp"])
@pytest.mark.parametrize("stage", [2, 3])
def test_triton_adamw_engine_matches_torch_backend_on_gpu(task, stage):
    ref_l, ref_p = _run(task, stage, "fp32", "torch")
    got_l, got_p = _run(task, stage, "fp32", "triton")
    torch.testing.assert_close(torch.tensor(got_l), torch.tensor(ref_l), rtol=1e-5, atol=1e-6)
    for k in ref_p:
        torch.testing.assert_close(got_p[k], ref_p[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("task", ["mae", "wsp"])
def test_bf16_model_copy_trains_close_to_fp32_on_gpu(task):
    ref_l, _ = _run(task, 2, "fp32", "triton")
    got_l, got_p = _run(task, 2, "bf16", "triton")
    torch.testing.assert_close(torch.tensor(got_l), torch.tensor(ref_l), rtol=2e-2, atol=1e-3)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in got_p.values())  # the fp32 master
