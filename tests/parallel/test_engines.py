"""Every parallel layout trains exactly like one process on the same global batch (gloo, CPU).

For DDP, ZeRO-1/2/3, TP=2 and ZeRO-2 with TP=2, at 2 and 4 ranks, a tiny MAE and a tiny WSP
model take a few AdamW steps with global-norm clipping; the per-step losses and the final
parameters (DP- and TP-gathered) must match a one-process torch.optim.AdamW run. Also: gradient
accumulation, per-rank memory at 1/N, and sharded checkpoints that load into other layouts and
world sizes.

Tolerances: losses to 1e-6 relative; the global grad norm of every step (before clipping) to 1e-5
relative -- Adam is blind to a wrongly scaled gradient, the norm is not; parameters to 1e-6
absolute after 3 steps at lr 1e-5 (they move by up to 3e-5). Adam divides by sqrt(v), so a
gradient element that nearly cancels turns fp32 rounding of the per-rank partial sums into a step
difference proportional to lr; FSDP2 (torch's own engine) deviates by ~1e-7 here, and each DP test
also checks ours is within twice FSDP2's deviation (+1e-7) on the same task.
"""
from __future__ import annotations

import pytest
import torch

from tests.parallel.dist_harness import STEPS, Layout, reference, run_world

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LAYOUTS = {
    "ddp": Layout("ddp", 0),
    "fsdp2": Layout("fsdp2", 0),
    "zero1": Layout("ours", 1),
    "zero2": Layout("ours", 2),
    "zero3": Layout("ours", 3),
    "tp2": Layout("ours", 0, tp=2),
    "zero2_tp2": Layout("ours", 2, tp=2),
    "zero2_accum": Layout("ours", 2, accum=2),
    "zero3_accum": Layout("ours", 3, accum=2),
    "zero3_bf16": Layout("ours", 3, param_dtype="bf16"),
    "fsdp2_bf16": Layout("fsdp2", 0, param_dtype="bf16"),
}
# The Triton kernels (interpreted): blocks hand (stream, MLP output) pairs to each other and fuse the
# residual adds into their norms, through the engines' block hooks. Two ranks only (the interpreter is slow).
FUSED = {
    "fsdp2_fused": Layout("fsdp2", 0, kernels="triton"),
    "zero3_fused": Layout("ours", 3, kernels="triton"),
    "tp2_fused": Layout("ours", 0, tp=2, kernels="triton"),
}
# The fine-tune's layer-wise lr decay (a group per layer, lr_scale 0.5 ** depth-to-top) in every engine.
LRD = {
    "fsdp2_lrd": Layout("fsdp2", 0, layer_decay=0.5),
    "ddp_lrd": Layout("ddp", 0, layer_decay=0.5),
    "zero2_lrd": Layout("ours", 2, layer_decay=0.5),
    "zero3_lrd": Layout("ours", 3, layer_decay=0.5),
    "zero2_tp2_lrd": Layout("ours", 2, tp=2, layer_decay=0.5),
}
# Activation checkpointing (a recomputed block runs on the parameters its pre-backward hook
# gathered) and regional compilation, on the engines and TP. Two ranks.
BLOCK_OPTIONS = {
    "fsdp2_selective": Layout("fsdp2", 0, ckpt="selective"),
    "zero3_full": Layout("ours", 3, ckpt="full"),
    "zero3_selective": Layout("ours", 3, ckpt="selective"),
    "zero3_fused_selective": Layout("ours", 3, kernels="triton", ckpt="selective"),
    "tp2_full": Layout("ours", 0, tp=2, ckpt="full"),
    "zero2_selective_accum": Layout("ours", 2, accum=2, ckpt="selective"),
    "zero3_compiled_selective": Layout("ours", 3, ckpt="selective", compile=True),
    "fsdp2_compiled_full": Layout("fsdp2", 0, ckpt="full", compile=True),
    "tp2_compiled_selective": Layout("ours", 0, tp=2, ckpt="selective", compile=True),
}
TASKS = ("mae", "wsp")
_RESULTS: dict[int, dict] = {}
_REFS: dict[str, tuple] = {}


def results(world: int, tmp_path_factory, layouts: dict = LAYOUTS) -> dict:
    key = world if layouts is LAYOUTS else (world, tuple(layouts))
    if key not in _RESULTS:
        jobs = [(task, lay) for lay in layouts.values() for task in TASKS]
        _RESULTS[key] = run_world(world, jobs, tmp_path_factory.mktemp(f"world{world}"))
    return _RESULTS[key]


def ref(task: str, kernels: str = "torch", layer_decay: float | None = None):
    if (task, kernels, layer_decay) not in _REFS:
        _REFS[task, kernels, layer_decay] = reference(task, kernels, layer_decay)
    return _REFS[task, kernels, layer_decay]


def max_param_diff(params: dict, ref_params: dict) -> float:
    assert set(params) == set(ref_params)
    for k in ref_params:
        assert params[k].shape == ref_params[k].shape, k
    return max((params[k].float() - ref_params[k]).abs().max().item() for k in ref_params)


def check_matches(world: int, name: str, task: str, tmp_path_factory, layouts: dict = LAYOUTS) -> None:
    res = results(world, tmp_path_factory, layouts)[("train", task, layouts[name].key)]
    ref_losses, ref_norms, ref_params = ref(task, layouts[name].kernels, layouts[name].layer_decay)
    assert len(res["losses"]) == STEPS
    torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(ref_losses), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.tensor(res["norms"]), torch.tensor(ref_norms), rtol=1e-5, atol=0)
    assert min(ref_norms) > 1.0  # so clipping was active in every step
    diff = max_param_diff(res["params"], ref_params)
    assert diff < 1e-6, f"{name} at {world} ranks: params off by {diff}"
    if layouts[name].tp == 1 and layouts[name].engine != "fsdp2":
        fsdp2_name = next(n for n, lay in layouts.items() if lay.engine == "fsdp2")
        fsdp2 = max_param_diff(results(world, tmp_path_factory, layouts)[("train", task, layouts[fsdp2_name].key)]["params"],
                               ref_params)
        assert diff <= 2 * fsdp2 + 1e-7, f"{name}: {diff} vs FSDP2 {fsdp2}"
    # the run moved the weights: a layout that skipped its updates could not pass
    start = build_start(task)
    assert max((res["params"][k] - start[k]).abs().max().item() for k in start) > 1e-5


def build_start(task: str) -> dict:
    from tests.parallel.dist_harness import build

    model = build(task)[0]
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


WORLDS = [2, 4]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("world", WORLDS)
def test_ddp_matches_unsharded(world, task, tmp_path_factory):
    check_matches(world, "ddp", task, tmp_path_factory)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("world", WORLDS)
def test_fsdp2_matches_unsharded(world, task, tmp_path_factory):
    check_matches(world, "fsdp2", task, tmp_path_factory)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("world", WORLDS)
def test_zero1_matches_unsharded(world, task, tmp_path_factory):
    check_matches(world, "zero1", task, tmp_path_factory)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("world", WORLDS)
def test_zero2_matches_unsharded(world, task, tmp_path_factory):
    check_matches(world, "zero2", task, tmp_path_factory)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("world", WORLDS)
def test_zero3_matches_unsharded(world, task, tmp_path_factory):
    check_matches(world, "zero3", task, tmp_path_factory)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("world", WORLDS)
def test_tp2_matches_unsharded(world, task, tmp_path_factory):
    check_matches(world, "tp2", task, tmp_path_factory)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("world", WORLDS)
def test_zero2_tp2_matches_unsharded(world, task, tmp_path_factory):
    check_matches(world, "zero2_tp2", task, tmp_path_factory)


@pytest.mark.interpreter
@pytest.mark.parametrize("name", list(FUSED))
@pytest.mark.parametrize("task", TASKS)
def test_fused_blocks_match_unsharded(name, task, tmp_path_factory):
    check_matches(2, name, task, tmp_path_factory, FUSED)


@pytest.mark.interpreter
@pytest.mark.parametrize("name", list(BLOCK_OPTIONS))
@pytest.mark.parametrize("task", TASKS)
def test_checkpointed_and_compiled_blocks_match_unsharded(name, task, tmp_path_factory):
    """Same losses, grad norms and parameters as the plain one-process run (no checkpointing)."""
    check_matches(2, name, task, tmp_path_factory, BLOCK_OPTIONS)


@pytest.mark.parametrize("name", list(LRD))
@pytest.mark.parametrize("task", TASKS)
def test_layer_decay_groups_match_unsharded(name, task, tmp_path_factory):
    """Each group at lr * lr_scale, in every engine (the MAE's decoder sits in the top layer)."""
    check_matches(2, name, task, tmp_path_factory, LRD)


@pytest.mark.parametrize("name", ["zero2_accum", "zero3_accum"])
@pytest.mark.parametrize("task", TASKS)
def test_grad_accumulation_matches_unsharded(name, task, tmp_path_factory):
    check_matches(4, name, task, tmp_path_factory)


@pytest.mark.parametrize("task", TASKS)
def test_zero3_bf16_matches_fsdp2_bf16(task, tmp_path_factory):
    """bf16 model copy + fp32 master: ours and FSDP2's MixedPrecisionPolicy(bf16) compute the same thing.

    Both reduce bf16 gradients, so the fp32 masters differ by bf16 rounding turned into Adam steps
    (up to about one lr per step where a small gradient's sign flips). FSDP2 also casts the WSP
    targets to bf16 (ours casts only the images), hence the loss tolerance."""
    res = results(2, tmp_path_factory)
    ours, theirs = res[("train", task, LAYOUTS["zero3_bf16"].key)], res[("train", task, LAYOUTS["fsdp2_bf16"].key)]
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(theirs["losses"]), rtol=2e-3, atol=0)
    torch.testing.assert_close(torch.tensor(ours["norms"]), torch.tensor(theirs["norms"]), rtol=2e-2, atol=0)
    assert max_param_diff(ours["params"], theirs["params"]) < 5e-5  # the fp32 masters (they move by up to 3e-5 + decay)
    assert all(v.dtype == torch.float32 for v in ours["params"].values())


@pytest.mark.parametrize("task", TASKS)
def test_memory_per_rank_is_one_nth(task, tmp_path_factory):
    """Optimizer state (ZeRO-1), + grads (2), + params (3) are 1/N per rank, within bucket padding."""
    res = results(4, tmp_path_factory)
    psi = sum(p.numel() for p in build_start(task).values())
    full = {"params": 4 * psi, "grads": 4 * psi, "optim": 8 * psi}  # fp32: weights, grads, Adam m + v
    ddp = res[("train", task, LAYOUTS["ddp"].key)]["mem"]
    assert all(m == full for m in ddp), ddp  # DDP: everything whole on every rank (the baseline)
    for name, sharded in (("zero1", {"optim"}), ("zero2", {"optim", "grads"}), ("zero3", {"optim", "grads", "params"})):
        r = res[("train", task, LAYOUTS[name].key)]
        n, slack = r["dp"], r["n_buckets"]  # each bucket pads by < N elements, i.e. < 1 element per rank
        assert n == 4 and r["padded"] - psi < n * slack
        for rank_mem in r["mem"]:
            for what, whole in full.items():
                per_elem = whole // psi
                if what in sharded:
                    assert whole / n <= rank_mem[what] <= (psi / n + slack) * per_elem, (name, what, rank_mem)
                else:
                    assert rank_mem[what] >= whole, (name, what, rank_mem)


@pytest.mark.parametrize("prefetch", [True, False])
def test_zero3_with_a_block_that_never_runs_matches_unsharded(prefetch, tmp_path_factory):
    """Its params get no grad: like torch AdamW they are not updated (no decay either); its prefetched
    all-gather is waited for and the block is freed, not left gathered."""
    import dataclasses

    lay = dataclasses.replace(LAYOUTS["zero3"], prefetch=prefetch)
    res = run_world(2, [("wsp_skip", lay)], tmp_path_factory.mktemp("skip"))
    got = next(iter(res.values()))
    _, _, ref_params = ref("wsp_skip")
    assert max_param_diff(got["params"], ref_params) < 1e-6
    start = build_start("wsp_skip")
    assert all(torch.equal(got["params"][k], start[k]) for k in start if k.startswith("blocks.2."))
    assert got["gathered_bytes"] == 0


def test_zero3_network_forward_right_after_step(tmp_path_factory):
    """An evaluation between step() and the next zero_grad() gathers the root (and each block) itself."""
    res = run_world(2, [("wsp", LAYOUTS["zero3"], "eval", None)], tmp_path_factory.mktemp("eval"))
    got = next(iter(res.values()))
    from tests.parallel.dist_harness import build

    model, _, imgs, _ = build("wsp")
    model.load_state_dict({**model.state_dict(), **got["params"]})
    with torch.no_grad():
        want = model(imgs[0][:2])
    torch.testing.assert_close(got["eval"], want, rtol=1e-5, atol=1e-6)


# --- sharded checkpoints across layouts and world sizes -------------------------------------------
SAVE = Layout("ours", 3, tp=2)  # saved at world 4: dp 2 x tp 2, ZeRO-3
LOADS_AT_2 = [Layout("ours", 2), Layout("ddp", 0), Layout("ours", 1, tp=2)]
LOADS_AT_1 = [Layout("ours", 0), Layout("ours", 3)]


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    saved = run_world(4, [("mae", SAVE, "save", str(ckpt))], tmp_path_factory.mktemp("save4"))
    loaded = run_world(2, [("mae", lay, "load", str(ckpt)) for lay in LOADS_AT_2], tmp_path_factory.mktemp("load2"))
    from tests.parallel.dist_harness import run_layout

    for lay in LOADS_AT_1:  # one process, no torch.distributed
        loaded[("load", "mae", lay.key)] = run_layout("mae", lay, "load", str(ckpt))
    return saved[("save", "mae", SAVE.key)], loaded


@pytest.mark.parametrize("layout", LOADS_AT_2 + LOADS_AT_1, ids=lambda lay: lay.key)
def test_checkpoint_reshards_to_another_layout(resharded, layout):
    """Saved at 4 ranks (ZeRO-3, TP 2); loaded at 2 ranks and 1 process under other stages / TP / engines:
    the weights are bit-identical, and the next step (which needs the Adam moments and step count)
    matches the saver's next step."""
    saved, loaded = resharded
    key = [k for k in loaded if k[2] == layout.key][0]
    got = loaded[key]
    for k, v in saved["params"].items():
        assert torch.equal(got["loaded"][k], v), k
    assert max_param_diff(got["next"], saved["next"]) < 1e-6
    assert max_param_diff(got["next"], saved["params"]) > 5e-6  # the step did move the weights
