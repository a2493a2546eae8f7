"""Parallel settings a user can get wrong end in one line naming the setting and the fix (exit 2)."""
import pytest

import torch.distributed as dist

from maws_fast.cli.train import train_main
from maws_fast.config import ParallelConfig
from maws_fast.errors import ConfigError
from maws_fast.parallel.mesh import ParallelDims, ParallelLayout
from tests.conftest import FMNIST_ROOT, needs_fmnist


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, f"expected one line, got: {err}"
    return err


@pytest.mark.parametrize("args, needle", [
    (["--parallel.tp=3"], "parallel.tp: 3 must divide the encoder and decoder head counts (4, 4)"),
    (["--parallel.engine=fsdp2", "--parallel.tp=2"], "tensor parallel runs with engine=ours"),
    (["--parallel.engine=ddp", "--parallel.param_dtype=bf16"], "ddp keeps fp32 weights"),
    (["--parallel.zero_stage=4"], "parallel.zero_stage: 4: use 0, 1, 2, 3 or null (auto)"),
    (["--parallel.engine=megatron"], "parallel.engine: 'megatron': choose from"),
    (["--parallel.backend=mpi"], "parallel.backend: 'mpi'"),
    (["--parallel.zero_stage=3", "--run.precision=bf16", "--parallel.param_dtype=fp32"],
     "set --parallel.param_dtype=bf16"),
    (["--parallel.engine=fsdp2", "--run.precision=bf16", "--parallel.param_dtype=fp32"],
     "autocast keeps a bf16 copy of every weight"),
])
def test_bad_parallel_config_is_one_line(tmp_path, capsys, args, needle):
    assert train_main([f"--run.out_dir={tmp_path}", *args]) == 2
    assert needle in _err(capsys)


@needs_fmnist
def test_batch_that_does_not_split_into_micro_batches_is_refused_before_training(tmp_path, capsys):
    argv = [f"--run.out_dir={tmp_path}", f"--data.root={FMNIST_ROOT}", "--run.stages=[mae]", "--mae.batch_size=100",
            "--parallel.grad_accum=3", "--run.progress=false"]
    assert train_main(argv) == 2
    assert "batch_size 100 does not divide over 1 data-parallel ranks" in _err(capsys)
    assert not (tmp_path / "mae").exists()


def test_world_that_tp_does_not_divide():
    with pytest.raises(ConfigError, match=r"parallel.tp=2 does not divide the world size 3"):
        ParallelDims(3, 2)


def test_tp_in_one_process_says_how_to_launch(tmp_path, capsys):
    assert train_main([f"--run.out_dir={tmp_path}", "--parallel.tp=2"]) == 2
    assert "torchrun --nproc_per_node" in _err(capsys)


@pytest.mark.parametrize("make, needle", [
    (lambda: ParallelDims(3, 2), "config: parallel.tp=2 does not divide the world size 3"),
    (lambda: ParallelDims(0), "config: parallel.tp: world size 0 and tp 1 must be >= 1"),
    (lambda: ParallelLayout(ParallelDims(2), engine="megatron"), "config: parallel.engine: 'megatron': choose from"),
    (lambda: ParallelLayout(ParallelDims(2), zero_stage=4), "config: parallel.zero_stage: 4: use 0, 1, 2, 3"),
    (lambda: ParallelLayout(ParallelDims(2, 2), engine="ddp"),
     "config: parallel.tp: tensor parallel runs with engine=ours; engine=ddp is data parallel only"),
    (lambda: ParallelLayout(ParallelDims(2), engine="ddp", param_dtype="bf16"), "config: parallel.param_dtype: ddp keeps fp32"),
    (lambda: ParallelLayout(ParallelDims(2), param_dtype="fp16"), "config: parallel.param_dtype: 'fp16'"),
    (lambda: ParallelLayout(ParallelDims(2), bucket_mb=0), "config: parallel.bucket_mb: must be > 0"),
    (lambda: ParallelLayout.of(ParallelConfig(zero_stage=0, param_dtype="fp32"), ParallelDims(2, 2)),
     "config: parallel.tp=1 but the process mesh was built with tp=2"),
])
def test_the_layout_refuses_each_bad_combination_with_its_message(make, needle):
    with pytest.raises(ConfigError) as e:
        make()
    assert needle in str(e.value)


def test_fsdp2_without_a_process_group_says_how_to_launch():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is up in this process")
    with pytest.raises(ConfigError, match=r"parallel.engine=fsdp2 needs torch.distributed: launch with torchrun"):
        ParallelLayout(ParallelDims(1), engine="fsdp2")


@pytest.mark.parametrize("settings", [
    {"engine": "megatron"}, {"zero_stage": 4}, {"engine": "fsdp2", "tp": 2}, {"engine": "ddp", "param_dtype": "bf16"},
    {"param_dtype": "fp16"}, {"bucket_mb": 0},
])
def test_the_layout_and_the_config_say_the_same_words(settings):
    """A mistake the config catches as it is read and the layout catches at run time is one message."""
    with pytest.raises(ConfigError) as from_config:
        ParallelConfig(**settings)
    tp = settings.get("tp", 1)
    with pytest.raises(ConfigError) as from_layout:
        ParallelLayout(ParallelDims(2 * tp, tp), **{k: v for k, v in settings.items() if k != "tp"})
    assert str(from_layout.value) == str(from_config.value)


def test_a_layout_holds_resolved_settings_only():
    with pytest.raises(ValueError, match="resolve_parallel"):
        ParallelLayout.of(ParallelConfig(), ParallelDims(1))  # zero_stage null, param_dtype auto
    layout = ParallelLayout.of(ParallelConfig(engine="ddp", zero_stage=0, param_dtype="fp32", bucket_mb=5.0),
                               ParallelDims(4))
    assert (layout.engine, layout.zero_stage, layout.dims.dp, layout.bucket_mb) == ("ddp", 0, 4, 5.0)
