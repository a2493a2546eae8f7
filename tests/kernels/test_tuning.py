"""maws_kernels.tuning: autotuned picks read as JSON-able data, restored into a fresh process's autotuners
(only as configs the kernel still has), cleared, and pinned to one config for a while."""
import json

import pytest

pytest.importorskip("triton")

from maws_kernels import tuning  # noqa: E402


@pytest.fixture
def fresh():
    """Every autotuner empty before and after (the picks are process-wide)."""
    tuning.clear()
    yield tuning.autotuners()
    tuning.clear()


def test_every_autotuned_kernel_is_found(fresh):
    # the three attention kernels are autotuned; each has a key and at least one config
    assert {"attention._attn_fwd_kernel", "attention._attn_bwd_dq_kernel", "attention._attn_bwd_dkdv_kernel"} <= set(fresh)
    for t in fresh.values():
        assert t.configs and t.keys


def test_choices_round_trip_through_json(fresh):
    fwd, dq = fresh["attention._attn_fwd_kernel"], fresh["attention._attn_bwd_dq_kernel"]
    fwd.cache[(197, 32, False, "torch.bfloat16", "torch.bfloat16")] = fwd.configs[-1]
    dq.cache[(50, 64, True, "torch.float16")] = dq.configs[0]
    saved = json.loads(json.dumps(tuning.choices()))
    assert set(saved["kernels"]) == {"attention._attn_fwd_kernel", "attention._attn_bwd_dq_kernel"}
    assert all(len(e["module"]) == 16 for e in saved["kernels"].values())
    tuning.clear()
    assert tuning.choices()["kernels"] == {}
    assert tuning.restore(saved) == []
    assert fwd.cache == {(197, 32, False, "torch.bfloat16", "torch.bfloat16"): fwd.configs[-1]}
    assert dq.cache[(50, 64, True, "torch.float16")] is dq.configs[0]  # the kernel's own Config object


def test_a_pick_the_prune_alone_decides_is_not_saved(fresh):
    """fp32 attention: the prune leaves one config that is not in the kernel's list (one small tile).
    Nothing to time there, so nothing to save, and a resume never warns about it."""
    import importlib

    attention = importlib.import_module("maws_kernels.attention")  # the package exports a function of that name
    fwd = fresh["attention._attn_fwd_kernel"]
    assert attention._FP32_CONFIG not in fwd.configs
    fwd.cache[(197, 32, False, "torch.float32")] = attention._FP32_CONFIG
    assert tuning.choices()["kernels"] == {}


def test_restore_refuses_what_the_kernel_no_longer_has(fresh):
    fwd = fresh["attention._attn_fwd_kernel"]
    module = tuning._fingerprint("attention._attn_fwd_kernel")
    good = [[197, 32, False, "torch.bfloat16"], tuning._config_dict(fwd.configs[0])]
    gone = [[65, 128, False, "torch.bfloat16"], {**tuning._config_dict(fwd.configs[0]), "BLOCK_M": 4096}]
    problems = tuning.restore({"triton": "0.0", "kernels": {
        "attention._attn_fwd_kernel": {"module": module, "picks": [good, gone]},
        "attention._no_such_kernel": {"module": module, "picks": [good]}}})
    assert len(problems) == 2
    assert any("BLOCK_M" in p and "4096" in p for p in problems)
    assert any("_no_such_kernel" in p for p in problems)
    assert list(fwd.cache) == [(197, 32, False, "torch.bfloat16")]  # the valid pick still landed
    assert tuning.restore(None) == [] and tuning.restore({}) == []


def test_picks_of_a_changed_module_are_dropped(fresh):
    """An old pick may be a config the new prune forbids at that key (a461c7d dropped the dK/dV tile that
    spills at head block 128): after any change to the kernel's module its picks are tuned again."""
    dkdv = fresh["attention._attn_bwd_dkdv_kernel"]
    pick = [[197, 128, False, "torch.bfloat16"], tuning._config_dict(dkdv.configs[0])]
    problems = tuning.restore({"kernels": {"attention._attn_bwd_dkdv_kernel": {"module": "0" * 16, "picks": [pick]}}})
    assert len(problems) == 1 and "module changed" in problems[0]
    assert dkdv.cache == {}


def test_pinned_launches_the_first_config_the_prune_allows(fresh):
    fwd = fresh["attention._attn_fwd_kernel"]
    configs, prune = list(fwd.configs), fwd.early_config_prune
    fwd.cache[(1, 16, False)] = configs[0]
    with tuning.pinned() as names:
        assert set(names) == set(fresh) and fwd.cache == {} and fwd.configs == configs
        if prune is not None:
            # whatever the prune keeps, the pinned prune keeps its first (fp32: the small tile, still)
            args = {"q_ptr": __import__("torch").empty(1)}
            assert fwd.early_config_prune(configs, args, BLOCK_D=32) == prune(configs, args, BLOCK_D=32)[:1]
    assert fwd.configs == configs and fwd.early_config_prune is prune and fwd.cache == {(1, 16, False): configs[0]}
