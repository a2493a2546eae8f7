"""Config tree: YAML + dotted overrides, presets, and one clear error per bad key or value."""
import re
from pathlib import Path

import pytest

from maws_fast.config import Config, load_config, parse_overrides
from maws_fast.errors import ConfigError

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo_fmnist.yaml"


def test_demo_config_loads_and_overrides_apply():
    cfg = load_config(DEMO, ["--mae.epochs=0.5", "--run.stages", "[mae]", "--eval.shots=[1,5]", "--wsp.clip_grad=1.0"])
    assert cfg.mae.epochs == 0.5 and cfg.run.stages == ["mae"] and cfg.eval.shots == [1, 5]
    assert cfg.wsp.clip_grad == 1.0 and cfg.model.embed_dim == 128
    assert cfg.mae.abs_lr == pytest.approx(1.5e-3 * 256 / 256)  # lr = blr * batch / 256


def test_preset_fills_model_and_fields_override_it():
    cfg = load_config(None, ["--model.preset=vit_b16", "--model.depth=2", "--model.in_chans=1"])
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.model.patch_size, cfg.model.img_size) == (768, 2, 16, 224)


@pytest.mark.parametrize(
    "override, match",
    [
        (["--mae.epoch=2"], r"unknown key mae\.epoch\b.*valid keys under mae"),
        (["--bogus.x=1"], r"unknown key bogus"),
        (["--mae.mask_ratio=1.5"], r"mae\.mask_ratio: must be in \(0, 1\)"),
        (["--mae.batch_size=abc"], r"mae\.batch_size: expected int, got 'abc'"),
        (["--mae.batch_size=2.5"], r"mae\.batch_size: expected int"),
        (["--wsp.epochs=0"], r"wsp\.epochs: must be > 0"),
        (["--model.num_heads=3"], r"model\.embed_dim: 128 is not divisible by model\.num_heads=3"),
        (["--model.preset=vit_z"], r"model\.preset: unknown preset 'vit_z'"),
        (["--model.attn_backend=flash"], r"model\.attn_backend: 'flash' is not one of"),
        (["--run.stages=[mae,deploy]"], r"run\.stages: unknown stage\(s\) \[.deploy.\]"),
        (["--run.progress=maybe"], r"run\.progress: expected true/false"),
        (["--data.mean=[0.5,0.5]", "--data.std=[0.5,0.5]"], r"data\.mean: has 2 values but model\.in_chans is 1"),
        (["--mae.warmup_epochs=5"], r"mae\.warmup_epochs: must be in \[0, epochs"),
        (["--mae=3"], r"must name a section and key"),
        (["--mae.epochs"], r"override --mae.epochs has no value"),
        (["mae.epochs=2"], r"overrides look like --section\.key=value"),
    ],
)
def test_bad_config_names_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(DEMO, override)


def test_bad_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "unknown.yaml").write_text("mae:\n  epochz: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key mae\.epochz"):
        load_config(tmp_path / "unknown.yaml")


def test_parse_overrides_nests_and_keeps_raw_text():
    out = parse_overrides(["--a.b=1", "--a.c", "x", "--d.e.f=[1, 2]"])
    assert (out["a"]["b"].raw, out["a"]["b"].parsed, out["a"]["c"].parsed) == ("1", 1, "x")
    assert out["d"]["e"]["f"].parsed == [1, 2]


def test_string_fields_keep_the_exact_cli_text():
    cfg = load_config(DEMO, ["--run.out_dir=0.10", "--data.root=007", "--wsp.init=1_000"])
    assert (cfg.run.out_dir, cfg.data.root, cfg.wsp.init) == ("0.10", "007", "1_000")
    assert load_config(DEMO, ["--data.root=null"]).data.root is None
    assert load_config(DEMO, ["--eval.shots=5"]).eval.shots == [5]  # a scalar where a list is wanted


@pytest.mark.parametrize(
    "override, match",
    [
        (["--mae.lr=-1"], r"mae\.lr: must be > 0 or null"),
        (["--run.device=cudafoo"], r"run\.device: 'cudafoo'"),
        (["--run.threads=-2"], r"run\.threads: must be >= 0"),
        (["--run.stages=[]"], r"run\.stages: is empty"),
        (["--mae.mask_ratio=0.99"], r"mae\.mask_ratio: 0\.99 keeps no patch of 49"),
        (["--eval.batch_size=0"], r"eval\.batch_size: must be >= 1"),
        (["--eval.probe_batch_size=1"], r"eval\.probe_batch_size: must be >= 2"),
    ],
)
def test_more_bad_values_are_caught_up_front(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(DEMO, override)


def test_config_round_trips_through_json():
    import json

    from maws_fast.config import config_from_dict

    cfg = load_config(DEMO)
    again = config_from_dict(json.loads(cfg.to_json()))
    assert again == cfg and isinstance(again, Config)


def test_mae_recipe_defaults_follow_the_official_recipe():
    """The official recipe (docs/ARCHITECTURE.md, Facts): AdamW (0.9, 0.95), wd 0.05, blr 1.5e-4
    (lr = blr * batch / 256), 75% masking, RandomResizedCrop scale (0.2, 1.0) with h-flip, norm-pix loss."""
    from maws_fast.config import MAEConfig

    m = MAEConfig()
    assert (m.beta1, m.beta2, m.weight_decay, m.blr, m.mask_ratio) == (0.9, 0.95, 0.05, 1.5e-4, 0.75)
    assert m.augment.crop_scale == (0.2, 1.0) and m.augment.flip_p == 0.5 and m.norm_pix_loss
    assert MAEConfig(batch_size=4096).abs_lr == pytest.approx(1.5e-4 * 4096 / 256)


def test_invalid_yaml_is_one_line_with_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  seed: 1\n  out_dir: [unclosed\nmae:\n  epochs: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"config: {bad}:4:4: not valid YAML (while parsing a flow sequence: ")
    tab = tmp_path / "tab.yaml"
    tab.write_text("run:\n\tseed: 1\n")
    with pytest.raises(ConfigError, match=re.escape(f"config: {tab}:2:1: not valid YAML (") + ".*indent with spaces") as e:
        load_config(tab)
    assert "\n" not in str(e.value)
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(b"\x80\x81\xfe\xff" * 8)
    with pytest.raises(ConfigError, match="not a text .* file"):
        load_config(binary)


def test_every_field_has_its_help_and_help_config_lists_it():
    import dataclasses
    import typing

    from maws_fast.config import Config, config_help

    text = config_help()

    def walk(cls, prefix):  # every field of the tree, nested sections (data.dali, mae.augment) included
        for f in dataclasses.fields(cls):
            helptext = f.metadata.get("help", "")
            assert helptext.strip(), f"{prefix}{f.name} has no help"
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                assert f"\n{prefix}{f.name}: {helptext}\n" in "\n" + text  # a section: its own block
                walk(tp, f"{prefix}{f.name}.")
            elif prefix:
                line = next(x for x in text.splitlines() if x.split()[:1] == [f"--{prefix}{f.name}"])
                assert helptext in line

    walk(Config, "")
    mae = config_help("mae").splitlines()
    assert mae[0] == "mae: MAE pre-pretraining" and all(x.startswith(("  --mae.", "mae.augment: ")) for x in mae[1:] if x)
    assert "--mae.augment.crop_scale  [float, float]  [0.2, 1.0]" in config_help("mae.augment")
    assert "[0.9, 1.0]" in next(x for x in text.splitlines() if x.split()[:1] == ["--lit.augment.crop_scale"])
    epochs = next(x for x in mae if x.split()[0] == "--mae.epochs").split()
    assert epochs[1:3] == ["float", "1.0"]
    assert "float | null" in next(x for x in mae if x.split()[0] == "--mae.clip_grad")
    with pytest.raises(ConfigError, match="no section 'optim'.*'mae'"):
        config_help("optim")


def test_unknown_key_points_at_help_config():
    with pytest.raises(ConfigError, match=r"unknown key mae\.epochz.*maws-train --help-config mae"):
        load_config(DEMO, ["--mae.epochz=1"])


# --- defaults that depend on the device and the world ------------------------------------------
def test_auto_defaults_on_cpu_keep_fp32_and_replicate_one_process():
    from maws_fast.config import Config, resolve_defaults

    cfg, lines = resolve_defaults(Config(), dp_world=1)
    assert (cfg.run.precision, cfg.parallel.param_dtype, cfg.parallel.zero_stage) == ("fp32", "fp32", 0)
    assert lines == ["run.precision=fp32 (auto for cpu)",
                     "parallel.param_dtype=fp32 (auto: run.precision=fp32; master weights and AdamW state fp32)",
                     "parallel.zero_stage=0 (auto: data-parallel world 1)"]


def test_auto_defaults_on_cuda_are_the_fast_path():
    from maws_fast.config import Config, ParallelConfig, RunConfig, resolve_defaults

    cfg, lines = resolve_defaults(Config(run=RunConfig(device="cuda")), dp_world=4)
    assert (cfg.run.precision, cfg.parallel.param_dtype, cfg.parallel.zero_stage) == ("bf16", "bf16", 2)
    assert any("tf32=on" in line and "pinned" in line for line in lines)
    # DDP keeps fp32 weights (autocast does the bf16 compute); fsdp2 gets a bf16 copy
    ddp, _ = resolve_defaults(Config(run=RunConfig(device="cuda"), parallel=ParallelConfig(engine="ddp")), 2)
    assert (ddp.run.precision, ddp.parallel.param_dtype) == ("bf16", "fp32")
    fsdp, _ = resolve_defaults(Config(run=RunConfig(device="cuda"), parallel=ParallelConfig(engine="fsdp2")), 2)
    assert fsdp.parallel.param_dtype == "bf16"


def test_explicit_settings_are_kept_and_resolution_is_idempotent():
    from maws_fast.config import Config, ParallelConfig, RunConfig, resolve_defaults

    cfg = Config(run=RunConfig(device="cuda", precision="fp32"), parallel=ParallelConfig(zero_stage=1, param_dtype="fp32"))
    out, lines = resolve_defaults(cfg, dp_world=1)
    assert out == cfg and all("auto" not in line for line in lines)
    again, more = resolve_defaults(out, dp_world=1)
    assert again == out and not [line for line in more if "auto" in line]


def test_resolved_sharded_fp32_weights_under_bf16_still_refused():
    from maws_fast.config import Config, ParallelConfig, RunConfig, resolve_defaults

    cfg = Config(run=RunConfig(device="cuda"), parallel=ParallelConfig(engine="fsdp2", param_dtype="fp32"))
    with pytest.raises(ConfigError, match="autocast keeps a bf16 copy"):
        resolve_defaults(cfg, dp_world=2)


# --- renamed keys, nested sections, section names from the tree --------------------------------
RENAMED_VALUES = {"threads": 8, "hw_decoder_load": 0.5, "device_memory_padding": 1024, "host_memory_padding": 2048,
                  "preallocate_width_hint": 640, "preallocate_height_hint": 480, "shuffle_buffer": 64,
                  "output": "uint8", "crop_scale": [0.3, 0.9], "flip_p": 0.25}


def _renamed_cases():
    from maws_fast.config import RENAMED

    return sorted(RENAMED.items())


@pytest.mark.parametrize("old, new", _renamed_cases(), ids=lambda k: k)
def test_an_old_key_reads_as_its_new_one_with_one_note(tmp_path, old, new):
    value = RENAMED_VALUES[new.rsplit(".", 1)[1]]
    text = f"[{value[0]},{value[1]}]" if isinstance(value, list) else str(value)
    notes = []
    want = load_config(DEMO, [f"--{new}={text}"], echo=notes.append)
    assert notes == []
    assert load_config(DEMO, [f"--{old}={text}"], echo=notes.append) == want
    assert notes == [f"[config] {old} is deprecated: use {new} (the old key goes in the next release)"]
    # the same key in a YAML file and on the command line: still one note
    section, leaf = old.split(".")
    (tmp_path / "old.yaml").write_text(f"{section}:\n  {leaf}: {text}\n")
    notes.clear()
    assert load_config(tmp_path / "old.yaml", [f"--{old}={text}"], echo=notes.append) == load_config(None, [f"--{new}={text}"])
    assert len(notes) == 1


def test_old_keys_note_on_stderr_by_default(capsys):
    cfg = load_config(DEMO, ["--data.dali_threads=8", "--mae.crop_scale=[0.3,1.0]"])
    assert cfg.data.dali.threads == 8 and cfg.mae.augment.crop_scale == (0.3, 1.0)
    assert capsys.readouterr().err.splitlines() == [
        "[config] data.dali_threads is deprecated: use data.dali.threads (the old key goes in the next release)",
        "[config] mae.crop_scale is deprecated: use mae.augment.crop_scale (the old key goes in the next release)"]


def test_an_old_key_on_the_command_line_still_beats_the_file(tmp_path):
    (tmp_path / "new.yaml").write_text("data:\n  dali:\n    threads: 2\nlit:\n  augment:\n    flip_p: 0.5\n")
    cfg = load_config(tmp_path / "new.yaml", ["--data.dali_threads=6", "--lit.flip_p=0.1"], echo=lambda _: None)
    assert (cfg.data.dali.threads, cfg.lit.augment.flip_p) == (6, 0.1)
    assert cfg.lit.augment.crop_scale == (0.9, 1.0)  # the rest of lit.augment keeps LiT's defaults
    with pytest.raises(ConfigError, match=r"data\.dali_threads and data\.dali\.threads are both set; keep data\.dali\.threads"):
        load_config(DEMO, ["--data.dali_threads=6", "--data.dali.threads=3"], echo=lambda _: None)


def test_a_saved_config_with_old_keys_still_reads():
    from maws_fast.config import config_from_dict

    saved = {"data": {"shuffle_buffer": 128, "dali_output": "uint8"}, "wsp": {"flip_p": 0.0}}
    notes = []
    cfg = config_from_dict(saved, echo=notes.append)
    assert (cfg.data.dali.shuffle_buffer, cfg.data.dali.output, cfg.wsp.augment.flip_p) == (128, "uint8", 0.0)
    assert len(notes) == 3 and saved == {"data": {"shuffle_buffer": 128, "dali_output": "uint8"}, "wsp": {"flip_p": 0.0}}


@pytest.mark.parametrize("override, key", [
    ("--data.dali.threads=0", "data.dali.threads"),
    ("--data.dali.prefetch=0", "data.dali.prefetch"),
    ("--data.dali.shuffle_buffer=0", "data.dali.shuffle_buffer"),
    ("--data.dali.hw_decoder_load=1.5", "data.dali.hw_decoder_load"),
    ("--data.dali.output=int4", "data.dali.output"),
    ("--data.dali_output=int4", "data.dali.output"),  # an old key: the new one is named
])
def test_data_dali_is_validated_once_naming_its_field(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, [override], echo=lambda _: None)
    assert str(e.value).startswith(f"config: {key}: ") and str(e.value).count(key) == 1


def test_data_dali_is_the_loaders_dali_settings():
    from maws_fast.config import DaliSettings

    cfg = load_config(DEMO, ["--data.dali.threads=3", "--data.dali.output=uint8"])
    assert cfg.data.dali == DaliSettings(threads=3, output="uint8")  # what DaliLoader takes, as is
    assert DaliSettings() == cfg.data.dali.__class__()
    with pytest.raises(ConfigError, match=r"^config: data\.dali\.threads: must be >= 1$"):
        DaliSettings(threads=0)  # built on its own (benchmarks, tests): the same check, the same key


def test_every_stage_has_the_one_augment_section_with_its_own_defaults():
    from maws_fast.config import Augment

    cfg = Config()
    assert all(type(getattr(cfg, s).augment) is Augment for s in ("mae", "wsp", "finetune", "lit"))
    assert [(getattr(cfg, s).augment.crop_scale, getattr(cfg, s).augment.flip_p) for s in ("mae", "wsp", "finetune", "lit")] \
        == [((0.2, 1.0), 0.5), ((0.08, 1.0), 0.5), ((0.08, 1.0), 0.5), ((0.9, 1.0), 0.0)]
    for stage in ("mae", "wsp", "finetune", "lit"):
        with pytest.raises(ConfigError, match=rf"^config: {stage}\.augment\.crop_scale: must satisfy 0 < lo <= hi <= 1$"):
            load_config(DEMO, [f"--{stage}.augment.crop_scale=[0.5,0.2]"])
        with pytest.raises(ConfigError, match=rf"^config: {stage}\.augment\.flip_p: must be in \[0, 1\]$"):
            load_config(DEMO, [f"--{stage}.augment.flip_p=2"])


def test_section_names_come_from_the_tree(tmp_path):
    import dataclasses

    from maws_fast.config import config_help, section_names

    assert section_names() == tuple(f.name for f in dataclasses.fields(Config))
    assert {"finetune", "lit", "parallel"} <= set(section_names())
    assert {"data.dali", "mae.augment", "lit.augment"} <= set(section_names(nested=True))
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(ConfigError, match=r"mapping of sections \(run, data, model, mae, wsp, finetune, lit, eval, parallel\)"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match=r"'finetune'.*'lit'.*'parallel'"):
        config_help("nope")
    assert config_help("lit").startswith("lit: ") and "\nlit.augment: " in config_help("lit")
