"""Parallel settings a user can get wrong end in one line naming the setting and the fix (exit 2)."""
import pytest

from maws_fast.cli.train import train_main
from maws_fast.errors import ConfigError
from maws_fast.parallel.mesh import ParallelDims
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
