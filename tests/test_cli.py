"""The command line: one clear error line (exit 2) per user mistake, and an end-to-end demo run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from maws_fast.cli.bench import bench_main
from maws_fast.cli.data import data_main
from maws_fast.cli.train import train_main

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo_fmnist.yaml")
from conftest import needs_fmnist as has_data  # noqa: E402

# A run of seconds: tiny model, a sliver of an epoch per stage, few evaluation images.
FAST = [
    "--run.progress=false", "--run.log_every=2", "--model.embed_dim=32", "--model.num_heads=2", "--model.depth=1",
    "--model.decoder_embed_dim=16", "--model.decoder_num_heads=2", "--model.decoder_depth=1",
    "--mae.epochs=0.02", "--mae.warmup_epochs=0.01", "--wsp.num_samples=1024", "--wsp.epochs=0.5",
    "--wsp.warmup_epochs=0.1", "--eval.train_subset=300", "--eval.probe_epochs=2", "--eval.fewshot_trials=2",
    "--finetune.epochs=0.01", "--finetune.warmup_epochs=0.005",
]


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, f"expected one line, got: {err}"
    return err


def test_missing_dataset_says_how_to_install(tmp_path, capsys):
    rc = train_main(["--config", DEMO, "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run")])
    err = _err(capsys)
    assert rc == 2 and "apt-get install dataset-fashion-mnist" in err and "--data" in err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--mae.epochz=1"], "unknown key mae.epochz"),
        (["--wsp.batch_size=-3"], "wsp.batch_size: must be >= 1"),
        (["--eval.shots=[0]"], "eval.shots: every k must be >= 1"),
        (["--run.device=tpu"], "run.device: 'tpu'"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path, capsys, args, needle):
    rc = train_main(["--config", DEMO, "--out", str(tmp_path / "run"), *args])
    assert rc == 2 and needle in _err(capsys)
    assert not (tmp_path / "run").exists()  # nothing was started


def test_missing_config_file(tmp_path, capsys):
    assert train_main(["--config", str(tmp_path / "x.yaml")]) == 2
    assert "does not exist" in _err(capsys)


def test_unwritable_output_directory(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rc = train_main(["--config", DEMO, "--out", str(blocker / "run")])
    err = _err(capsys)
    assert rc == 2 and "is not writable" in err and "--run.out_dir" in err
    assert blocker.read_text() == "not a directory"


@has_data
def test_checkpoint_that_does_not_fit_names_the_keys_and_keeps_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["--config", DEMO, "--out", str(out), "--run.stages=[mae]", *FAST]) == 0
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    capsys.readouterr()
    rc = train_main(["--config", DEMO, "--out", str(out), "--run.stages=[mae]", *FAST, "--model.embed_dim=64"])
    err = _err(capsys)
    assert rc == 2 and "model.embed_dim: 32 -> 64" in err and "new --run.out_dir" in err
    after = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert before == after  # the finished MAE checkpoint is untouched


@has_data
def test_wsp_init_from_foreign_checkpoint_names_keys(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["--config", DEMO, "--out", str(tmp_path / "other"), "--run.stages=[mae]", *FAST]) == 0
    capsys.readouterr()
    ckpt = tmp_path / "other" / "mae" / "final" / "model.safetensors"
    rc = train_main(["--config", DEMO, "--out", str(out), "--run.stages=[wsp]", *FAST, "--model.embed_dim=64",
                     f"--wsp.init={ckpt}", "--wsp.compare_scratch=false"])
    err = _err(capsys)
    assert rc == 2 and "shape mismatch" in err and "vs model" in err and "cls_token" in err


@has_data
def test_wsp_init_reads_an_official_mae_pth(tmp_path, capsys):
    """A released-style MAE checkpoint ({"model": ..., "epoch", "args"}) initialises WSP from the CLI."""
    import argparse

    import torch
    from safetensors.torch import load_file

    assert train_main(["--config", DEMO, "--out", str(tmp_path / "other"), "--run.stages=[mae]", *FAST]) == 0
    sd = load_file(str(tmp_path / "other" / "mae" / "final" / "model.safetensors"))
    pth = tmp_path / "mae_pretrain.pth"
    torch.save({"model": sd, "epoch": 3, "args": argparse.Namespace(model="mae_vit_tiny")}, pth)
    capsys.readouterr()
    rc = train_main(["--config", DEMO, "--out", str(tmp_path / "run"), "--run.stages=[wsp]", *FAST,
                     f"--wsp.init={pth}", "--wsp.compare_scratch=false"])
    out = capsys.readouterr().out
    assert rc == 0 and f"encoder initialised from {pth}: loaded" in out and "dropped" in out


@has_data
def test_eval_init_probes_a_released_style_checkpoint_as_the_run_probed_its_own(tmp_path, capsys):
    """--eval.init: an MAE encoder saved as an official-style .pth, probed in a run that trained nothing,
    gets exactly the numbers the run that trained it reported for it."""
    import argparse

    import torch
    from safetensors.torch import load_file

    base = [*FAST, "--wsp.compare_scratch=false"]
    assert train_main(["--config", DEMO, "--out", str(tmp_path / "a"), "--run.stages=[mae,wsp,linprobe]", *base]) == 0
    rows = {r["stage"]: r for r in json.loads((tmp_path / "a" / "results.json").read_text())}
    pth = tmp_path / "mae.pth"
    torch.save({"model": load_file(str(tmp_path / "a" / "mae" / "final" / "model.safetensors")), "epoch": 0,
                "args": argparse.Namespace()}, pth)
    capsys.readouterr()
    assert train_main(["--config", DEMO, "--out", str(tmp_path / "b"), "--run.stages=[linprobe]", *base,
                       f"--eval.init={pth}"]) == 0
    (row,) = json.loads((tmp_path / "b" / "results.json").read_text())
    assert row["model"] == str(pth) and "token pooling" in capsys.readouterr().out
    assert row["linear_probe_top1"] == rows["mae"]["linear_probe_top1"]
    assert row["5shot_top1_mean"] == rows["mae"]["5shot_top1_mean"]


@has_data
def test_wsp_init_path_that_does_not_exist_fails_before_training(tmp_path, capsys):
    rc = train_main(["--config", DEMO, "--out", str(tmp_path / "run"), "--run.stages=[wsp]", *FAST,
                     f"--wsp.init={tmp_path / 'nope.pth'}"])
    err = _err(capsys)
    assert rc == 2 and "wsp.init" in err and "does not exist" in err
    assert not (tmp_path / "run" / "wsp").exists()


@has_data
def test_demo_end_to_end_through_the_console_script(tmp_path):
    """The README's main command, shrunk: maws-train runs MAE -> WSP -> linear probe + 5-shot."""
    exe = Path(sys.executable).with_name("maws-train")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "maws_fast.cli"]
    res = subprocess.run([*cmd, "--config", DEMO, "--out", str(tmp_path / "run"), *FAST],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "| MAE -> WSP" in res.stdout and "| WSP (random init)" in res.stdout and "5-shot top-1" in res.stdout
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["model"] for r in rows] == ["MAE -> WSP", "WSP (random init)", "MAE only (no WSP)"]
    for r in rows:
        assert 0.1 <= r["linear_probe_top1"] <= 1 and 0 < r["5shot_top1_mean"] <= 1
    # the demo's LiT runs: zero-shot on the two WSP encoders, next to their probe numbers
    assert [("zero_shot_top1" in r) for r in rows] == [True, True, False] and "zero-shot top-1" in res.stdout
    assert (tmp_path / "run" / "lit" / "tokenizer.json").exists()
    for stage in ("mae", "wsp", "wsp_scratch", "lit", "lit_wsp_scratch"):
        assert (tmp_path / "run" / stage / "final" / "model.safetensors").exists()
        assert not (tmp_path / "run" / stage / "ckpt").exists()
    # Running it again resumes nothing and trains nothing: every stage is finished.
    again = subprocess.run([*cmd, "--config", DEMO, "--out", str(tmp_path / "run"), *FAST, "--run.stages=[mae,wsp]"],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("already finished") == 3
    # Evaluating the run's models under a changed training config is refused, naming the key.
    changed = subprocess.run([*cmd, "--config", DEMO, "--out", str(tmp_path / "run"), *FAST, "--run.stages=[linprobe]",
                              "--mae.mask_ratio=0.5"], capture_output=True, text=True, timeout=600)
    assert changed.returncode == 2 and "mae.mask_ratio: 0.75 -> 0.5" in changed.stderr


@has_data
def test_eval_that_cannot_fit_fails_before_training(tmp_path, capsys):
    rc = train_main(["--config", DEMO, "--out", str(tmp_path / "run"), *FAST, "--eval.train_subset=20"])
    err = _err(capsys)
    assert rc == 2 and "eval.shots: 5-shot needs 5 images per class" in err
    assert not (tmp_path / "run" / "mae").exists()


@has_data
def test_maws_data_stats(capsys):
    assert data_main(["stats", "--num", "2000"]) == 0
    out = capsys.readouterr().out
    assert "train: 60000 images" in out and "test: 10000 images" in out and "footwear" in out


def test_maws_bench_train_compares_backends(tmp_path, capsys):
    out = tmp_path / "train.json"
    rc = bench_main(["train", "--preset", "tiny", "--batch-size", "8", "--steps", "2", "--warmup", "1", "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert {(r["stage"], r["provider"]) for r in rows} == {(s, f"attn={b}") for s in ("mae", "wsp") for b in ("sdpa", "manual")}
    assert all(r["images_per_s"] > 0 and r["commit"] and r["device"] and "speedup_vs_manual" in r for r in rows)
    assert all(r["baseline"] == "attn=manual" for r in rows)
    assert "vs attn=manual" in capsys.readouterr().out


@pytest.mark.interpreter
def test_maws_bench_train_compares_kernel_backends(tmp_path, capsys):
    """--kernels triton,torch: the Triton kernels (interpreted here) against the torch references."""
    out = tmp_path / "train.json"
    rc = bench_main(["train", "--preset", "tiny", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--stages", "wsp",
                     "--attn", "manual", "--kernels", "triton,torch", "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert [r["provider"] for r in rows] == ["attn=manual kernels=triton", "attn=manual kernels=torch"]
    assert all(r["baseline"] == "attn=manual kernels=torch" for r in rows)
    assert bench_main(["train", "--kernels", "tpu", "--out", ""]) == 2
    assert "unknown kernel backend(s) ['tpu']" in capsys.readouterr().err


def test_help_config_lists_fields_and_help_mentions_it(capsys):
    assert train_main(["--help-config", "parallel"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("parallel: ") and "--parallel.zero_stage" in out and "--mae." not in out
    assert train_main(["--help-config"]) == 0
    out = capsys.readouterr().out
    sections = ("run", "data", "model", "mae", "wsp", "finetune", "lit", "eval", "parallel")
    assert all(f"\n{s}: " in "\n" + out for s in (*sections, "data.dali", "mae.augment", "lit.augment"))
    with pytest.raises(SystemExit):
        train_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert "--help-config" in out and f"one section's: {', '.join(sections)})" in out
    assert train_main(["--help-config", "nope"]) == 2
    assert "no section 'nope'" in _err(capsys)
    assert train_main(["--help-config", "data.dali"]) == 0
    assert capsys.readouterr().out.startswith("data.dali: ")


def test_an_old_key_works_with_one_note(capsys):
    assert train_main(["--config", DEMO, "--print-config", "--data.dali_threads=8"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["data"]["dali"]["threads"] == 8
    assert err.strip() == ("[config] data.dali_threads is deprecated: use data.dali.threads "
                           "(the old key goes in the next release)")


def test_every_console_script_names_a_main_of_its_own_module():
    """setup.py's console scripts resolve, one cli module per command."""
    import importlib
    import re

    scripts = dict(re.findall(r'"(maws-[a-z]+)=([\w.:]+)"', (REPO / "setup.py").read_text()))
    assert scripts == {"maws-train": "maws_fast.cli.train:train_main", "maws-data": "maws_fast.cli.data:data_main",
                       "maws-bench": "maws_fast.cli.bench:bench_main", "maws-ckpt": "maws_fast.cli.ckpt:ckpt_main",
                       "maws-doctor": "maws_fast.cli.doctor:doctor_main"}
    for target in scripts.values():
        module, name = target.split(":")
        assert callable(getattr(importlib.import_module(module), name)), target


def test_python_m_maws_fast_cli_is_maws_train_and_imports_no_other_command():
    code = ("import runpy, sys; sys.argv = ['maws_fast.cli', '--help']\n"
            "try:\n    runpy.run_module('maws_fast.cli', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print(sorted(m for m in ('maws_fast.cli.data', 'maws_fast.cli.bench') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: maws-train") and res.stdout.strip().endswith("[]"), res.stdout


def test_train_help_describes_every_stage_of_the_recipe(capsys):
    """The description comes from maws_fast.config.STAGES: fine-tuning and LiT included."""
    from maws_fast.cli.train import _STAGE_WORDS
    from maws_fast.config import STAGES

    with pytest.raises(SystemExit) as e:
        train_main(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert set(STAGES) <= set(_STAGE_WORDS), "a stage without words in --help"
    assert "fine-tuning" in out and "LiT (zero-shot)" in out
    assert all(_STAGE_WORDS[s] in out for s in STAGES)


def test_help_config_into_head_exits_quietly():
    """`maws-train --help-config lit | head -2`: two lines, no BrokenPipeError traceback."""
    res = subprocess.run(["sh", "-c", f'"{sys.executable}" -m maws_fast.cli --help-config lit | head -2'],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert len(res.stdout.splitlines()) == 2 and res.stdout.startswith("lit:")


@pytest.mark.parametrize("args", [["--help-config", "lit"], ["--print-config"]])
def test_a_reader_gone_before_any_output_ends_in_141_and_no_traceback(args):
    """The reader closes before the first write, so the broken pipe is certain (head -2 races the writer)."""
    proc = subprocess.Popen([sys.executable, "-m", "maws_fast.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_a_broken_pipe_that_is_not_stdout_is_raised():
    from maws_fast.cli.common import quiet_broken_pipe

    @quiet_broken_pipe
    def main() -> int:
        raise BrokenPipeError("a worker's pipe")

    with pytest.raises(BrokenPipeError, match="worker"):
        main()


def test_every_maws_data_flag_has_help_and_shows_its_default():
    import argparse

    from maws_fast.cli.data import COMMANDS, _parser

    (sub,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) == set(COMMANDS)
    for cmd, parser in sub.choices.items():
        text = " ".join(parser.format_help().split())  # undo argparse's line wrapping
        for action in parser._actions:
            flag = f"maws-data {cmd} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{flag} has no help"
            if action.default is not None and action.default is not False and action.default != argparse.SUPPRESS:
                assert f"(default: {action.default})" in text, f"{flag} does not show its default {action.default}"


def test_data_dir_on_a_jpeg_run_names_data_train_instead(capsys):
    """``--data DIR`` is the Fashion-MNIST root: on a JPEG config it is refused with the flag that reads JPEGs."""
    code = train_main(["--config", str(REPO / "configs" / "mae_vit_b16.yaml"), "--data", "in1k/train"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--data in1k/train sets data.root, the Fashion-MNIST directory" in err and "--data.train=in1k/train" in err
