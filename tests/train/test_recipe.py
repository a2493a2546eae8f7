"""The recipe is a table: one row per stage kind, in config.STAGES's order."""
import re

import pytest

from maws_fast.config import STAGES, load_config
from maws_fast.errors import ConfigError
from maws_fast.train import recipe
from maws_fast.train.recipe import RECIPE


def test_the_table_names_every_stage_kind_of_the_config_in_its_order():
    assert tuple(k.name for k in RECIPE) == STAGES
    trains = {k.name for k in RECIPE if k.build is not None}
    assert trains == {"mae", "wsp", "finetune", "lit"}  # linprobe only evaluates
    assert {k.name for k in RECIPE if k.report is not None} == {"finetune", "lit"}


def test_runs_of_the_demo_config():
    cfg = load_config("configs/demo_fmnist.yaml")
    names = [name for k in RECIPE if k.name in cfg.run.stages for name, _, _ in k.runs(cfg)]
    assert names == ["mae", "wsp", "wsp_scratch", "finetune", "finetune_wsp_scratch", "finetune_mae", "lit",
                     "lit_wsp_scratch"]


def test_every_kind_is_checked_before_any_stage_trains(tmp_path, monkeypatch):
    """A bad wsp.init fails the pre-flight checks: the mae stage before it never starts."""
    built = []
    monkeypatch.setattr(recipe, "load_data", lambda cfg: None)
    monkeypatch.setattr(recipe, "RECIPE", tuple(
        recipe.StageKind(k.name, k.runs, (lambda i, n, init: built.append(n)), k.check, None, None)
        if k.name == "mae" else k for k in RECIPE))
    cfg = load_config(None, [f"--run.out_dir={tmp_path}", "--run.stages=[mae,wsp]",
                             f"--wsp.init={tmp_path / 'missing.safetensors'}"])
    with pytest.raises(ConfigError, match="wsp.init: .*missing.safetensors does not exist"):
        recipe.run_recipe(cfg, echo=lambda s: None)
    assert built == []


@pytest.mark.parametrize("option, names", [
    ("--model.kernel_backend=cuda", "model.kernel_backend: cuda cannot run on cpu here: the CUDA twins need a CUDA device"),
    ("--model.kernel_backend=triton", "model.kernel_backend: triton cannot run on cpu here: Triton kernels need a CUDA"),
    ("--model.attn_backend=triton", "model.attn_backend: triton cannot run on cpu here: Triton kernels need a CUDA"),
    ("--model.attn_backend=xformers", "model.attn_backend: xformers cannot run on cpu here: xformers"),
])
def test_a_backend_the_device_cannot_run_is_one_error_before_anything_is_written(tmp_path, monkeypatch, option,
                                                                                   names):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a real CPU run: Triton's interpreter is not on
    out = tmp_path / "run"
    cfg = load_config(None, [f"--run.out_dir={out}", "--run.device=cpu", option])
    with pytest.raises(ConfigError, match=re.escape(names)):
        recipe.run_recipe(cfg, echo=lambda s: None)
    assert not out.exists()


def test_triton_under_the_interpreter_and_the_torch_paths_pass_the_device_check():
    import torch

    recipe.check_device(load_config(None, ["--model.kernel_backend=triton", "--model.attn_backend=triton"]),
                        torch.device("cpu"))  # conftest set TRITON_INTERPRET=1
    recipe.check_device(load_config(None, ["--model.kernel_backend=torch", "--model.attn_backend=sdpa"]),
                        torch.device("cpu"))


def test_lit_on_shards_without_captions_is_refused_before_any_stage_trains(tmp_path, monkeypatch):
    """The lit stage's shards are checked at pre-flight from their manifest: MAE is never built when the
    shards LiT would read hold no captions (the DALI demo without --data.lit_train)."""
    from maws_fast.data.shards import MANIFEST

    built = []
    monkeypatch.setattr(recipe, "load_data", lambda cfg: None)
    monkeypatch.setattr(recipe, "RECIPE", tuple(
        recipe.StageKind(k.name, k.runs, (lambda i, n, init: built.append(n)), k.check, None, None)
        if k.name == "mae" else k for k in RECIPE))
    shards = tmp_path / "plain"
    shards.mkdir()
    (shards / MANIFEST).write_text('{"format": "maws-shards", "num_samples": 256, "shards": []}')
    cfg = load_config(None, [f"--run.out_dir={tmp_path / 'run'}", "--run.stages=[mae,lit]", "--data.dataset=jpeg",
                             "--data.loader=pil", f"--data.train={shards}", "--lit.init=scratch"])
    with pytest.raises(ConfigError, match=r"data.lit_train: .* hold 0 captions for 256 samples; point --data.lit_train"):
        recipe.run_recipe(cfg, echo=lambda s: None)
    assert built == []
