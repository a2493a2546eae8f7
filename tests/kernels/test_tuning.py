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
    tuning.clear()
    assert tuning.choices()["kernels"] == {}
    assert tuning.restore(saved) == []
    assert fwd.cache == {(197, 32, False, "torch.bfloat16", "torch.bfloat16"): fwd.configs[-1]}
    assert dq.cache[(50, 64, True, "torch.float16")] is dq.configs[0]  # the kernel's own Config object


def test_restore_refuses_what_the_kernel_no_longer_has(fresh):
    fwd = fresh["attention._attn_fwd_kernel"]
    good = [[197, 32, False, "torch.bfloat16"], {**tuning._config_dict(fwd.configs[0])}]
    gone = [[65, 128, False, "torch.bfloat16"], {**tuning._config_dict(fwd.configs[0]), "BLOCK_M": 4096}]
    problems = tuning.restore({"triton": "0.0", "kernels": {"attention._attn_fwd_kernel": [good, gone],
                                                            "attention._no_such_kernel": [good]}})
    assert len(problems) == 2
    assert any("BLOCK_M" in p and "4096" in p for p in problems)
    assert any("_no_such_kernel" in p for p in problems)
    assert list(fwd.cache) == [(197, 32, False, "torch.bfloat16")]  # the valid pick still landed
    assert tuning.restore(None) == [] and tuning.restore({}) == []


def test_pinned_is_one_config_then_everything_comes_back(fresh):
    fwd = fresh["attention._attn_fwd_kernel"]
    configs = list(fwd.configs)
    fwd.cache[(1, 16, False)] = configs[0]
    with tuning.pinned(1) as pins:
        assert all(len(t.configs) == 1 for t in fresh.values())
        assert fwd.configs == [configs[min(1, len(configs) - 1)]] and fwd.cache == {}
        assert set(pins) == set(fresh) and all("num_warps" in v for v in pins.values())
    assert fwd.configs == configs and fwd.cache == {(1, 16, False): configs[0]}
