"""The recipe is a table: one row per stage kind, in config.STAGES's order."""
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
