"""Every shell command in README.md runs as written: at tiny sizes on CPU, GPU ones in a dry-run form.

The commands come from README.md's fenced ``bash`` / ``sh`` blocks (``\\`` continuations joined, comments
dropped, ``a && b`` read as two commands run in order). ``ROWS`` says how each one is checked, by a regex on
the command; a README command that matches no row fails, naming itself, so a new command cannot go
unchecked. The checks:

* ``run``: run as written, as a subprocess (a bare ``maws-train`` or ``.venv/bin/maws-train`` is this
  venv's console script), with only the row's tiny-size overrides appended, in a scratch workspace (or, for
  the scripts that work on the checkout, a scratch mirror of it), so nothing is written into the checkout.
  Paths that name the user's data are swapped for tiny fixtures (``USER_DATA``); a command that reads what
  an earlier README command writes (``--out DIR``) gets that command run first.
* ``dry_setup`` / ``dry_train`` / ``dry_torchrun`` / ``collect``: the GPU-only or machine-changing
  commands in their dry-run form: ``scripts/setup.sh --dry-run`` (canned ``nvidia-smi`` for ``--cuda``),
  ``maws-train ... --print-config`` (the config, the overrides and the paths they name; under torchrun also
  the parallel layout for the world the launch asks for), ``pytest --collect-only``.
* ``parse_bench``: ``maws-bench`` arguments through its real parser.
* ``skip``: with the reason.

A README command that does not run as written is an ``xfail(strict=True)`` row whose reason gives the
README fix: the fix turns it into an XPASS, which fails until the xfail is removed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FMNIST_ROOT, needs_fmnist

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BIN = Path(sys.executable).parent  # the venv's bin/ (not resolved: a venv's python is a symlink)
SHELL_LANGS = {"bash", "sh", "shell"}
# not commands: ```python runs in tests/test_readme.py (```py: a snippet needing released files); bare ```: output
OTHER_LANGS = {"python", "py", ""}


# --- reading README.md ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Command:
    line: int  # the README line the command starts on
    words: tuple[str, ...]  # what the shell passes: quotes removed, comments dropped, $VARS not yet expanded

    @property
    def text(self) -> str:
        return " ".join(f'"{w}"' if re.search(r"[\s;'\"]", w) else w for w in self.words)

    @property
    def id(self) -> str:
        text = self.text if len(self.text) <= 70 else self.text[:67] + "..."
        return f"README.md:{self.line} {text}"


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, line number of its first body line, body lines) of every fenced block.

    Read line by line: inside a block only a line of backticks alone closes it, so a closing fence is never
    taken for the opening of the next block.
    """
    blocks, lang, first, body = [], None, 0, []
    for no, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if lang is None:
            if s.startswith("```"):
                lang, first, body = (s[3:].split() or [""])[0], no + 1, []
        elif s.startswith("```") and not s.strip("`"):
            blocks.append((lang, first, body))
            lang = None
        else:
            body.append(line)
    if lang is not None:
        raise ValueError(f"README.md:{first - 1}: a ```{lang} block is never closed")
    return blocks


def split_commands(first: int, lines: list[str]) -> list[Command]:
    """The commands of one shell block: continuations joined, comments and blank lines dropped, && split."""
    cmds, logical, start = [], "", None
    for no, line in enumerate(lines, first):
        start = no if start is None else start
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        lex = shlex.shlex(logical + line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True  # words as the shell splits them; ( ) ; < > | & come out as their own words
        words = list(lex)
        cmd: list[str] = []
        for w in words + ["&&"]:
            if w != "&&":
                if w and set(w) <= set("();<>|&"):
                    raise ValueError(f"README.md:{start}: shell operator {w!r} in `{logical + line.strip()}`: "
                                     "this test runs commands without a shell; only && is supported")
                cmd.append(w)
            elif cmd:
                cmds.append(Command(start, tuple(cmd)))
                cmd = []
        logical, start = "", None
    if logical:
        raise ValueError(f"README.md:{start}: the block ends inside a `\\` continuation: `{logical.strip()}`")
    return cmds


def readme_commands(text: str) -> tuple[list[Command], list[str]]:
    """Every command of the README's shell blocks, and what could not be read (unknown block languages)."""
    cmds, problems = [], []
    try:
        blocks = fenced_blocks(text)
    except ValueError as e:
        return [], [str(e)]
    for lang, first, body in blocks:
        if lang in SHELL_LANGS:
            try:
                cmds += split_commands(first, body)
            except ValueError as e:
                problems.append(str(e))
        elif lang not in OTHER_LANGS:
            problems.append(f"README.md:{first - 1}: a ```{lang} block: add its language to SHELL_LANGS (its "
                            f"lines are commands) or OTHER_LANGS (they are not) in {Path(__file__).name}")
    return cmds, problems


COMMANDS, PARSE_PROBLEMS = readme_commands(README.read_text())


# --- the tiny sizes appended to commands that train -------------------------------------------------------------
# Each changes a size only, never which code runs: every stage of run.stages still builds its model and loader,
# takes optimizer steps, writes final/ and is evaluated, and the results table is printed.
TINY = (
    # a 1-block, 32-wide encoder / decoder / text tower instead of the preset's (the same modules)
    "--model.embed_dim=32", "--model.num_heads=2", "--model.depth=1", "--model.decoder_embed_dim=16",
    "--model.decoder_num_heads=2", "--model.decoder_depth=1",
    "--lit.width=32", "--lit.depth=1", "--lit.num_heads=2", "--lit.embed_dim=32",
    # a sliver of each stage: a few steps each, warmup inside it (the config requires warmup <= epochs)
    "--mae.epochs=0.01", "--mae.warmup_epochs=0.005", "--wsp.num_samples=512", "--wsp.epochs=0.5",
    "--wsp.warmup_epochs=0.1", "--finetune.epochs=0.005", "--finetune.warmup_epochs=0.001",
    "--lit.num_samples=256", "--lit.epochs=1",
    # fewer probe images / epochs / trials (200 still holds the 5 shots of every class)
    "--eval.train_subset=200", "--eval.probe_epochs=1", "--eval.fewshot_trials=1",
    # one intra-op thread: at these sizes two threads only contend (about 3x the CPU time on 2 busy cores)
    "--run.threads=1",
    # output only: no progress bars in the captured log
    "--run.progress=false", "--run.log_every=2",
)
# The Fashion-MNIST shards hold 256 samples here (the --num / --weak-hashtags 256 of their rows): batches of 64
# and half an MAE epoch give each stage steps on them.
SHARD_SIZES = ("--mae.epochs=0.5", "--mae.batch_size=64", "--wsp.batch_size=64", "--lit.batch_size=64")

# README paths that name the user's data -> (the tiny fixture standing in for it, relative to the workspace,
# or absolute; how it is built). Substituted word by word: a whole word, or the value of --key=value.
USER_DATA = {
    "~/imagenet/train": ("fixtures/imagenet/train", "photo_folder"),  # labelled folder of real photos
    "imagenet/train": ("fixtures/imagenet/train", "photo_folder"),
    "imagenet/val": ("fixtures/imagenet/val", "photo_folder"),
    "/data/in1k/train": ("fixtures/imagenet/train", "photo_folder"),
    "/data/in1k/val": ("fixtures/imagenet/val", "photo_folder"),
    "files.txt": ("fixtures/ig/files.txt", "tagged_list"),  # real photos, one path a line
    "tags.jsonl": ("fixtures/ig/tags.jsonl", "tagged_list"),  # {"file": ..., "tags": [...]} per photo
    "~/fmnist": (FMNIST_ROOT, None),  # Debian's dataset-fashion-mnist (the needs_fmnist rows)
    # released checkpoints, named only by the GPU commands' dry runs, which check that the path exists
    "mae_pretrain_vit_base.pth": ("fixtures/mae_pretrain_vit_base.pth", "stand_in"),
    "maws_vit_b16.pt": ("fixtures/maws_vit_b16.pt", "stand_in"),
    "vit_b16_xlmr_b.pt": ("fixtures/vit_b16_xlmr_b.pt", "stand_in"),
}
SHELL_VARS = {"HEAD_NODE": "127.0.0.1", "HEAD": "127.0.0.1", "JOB_ID": "1"}  # what the user's shell would expand
# maws-train options whose value is a path the run reads (a dry run checks that it exists)
PATH_OPTIONS = {"--config", "--data", "--data.root", "--data.train", "--data.wsp_train", "--data.lit_train",
                "--data.eval_train", "--data.eval_val", "--data.captions", "--eval.init", "--eval.clip",
                "--finetune.init", "--wsp.init", "--lit.init", "--lit.tokenizer"}
RUN_NAMES = {"mae", "wsp", "wsp_scratch", "scratch"}  # the *.init values that name this run's encoders

@dataclasses.dataclass(frozen=True)
class Row:
    pattern: str  # re.fullmatch against Command.text; the first row that matches checks the command
    check: str  # run | dry_setup | dry_train | dry_torchrun | collect | parse_bench | skip
    why: str  # why this is the check (for skip: why the command is not run here)
    extra: tuple[str, ...] = ()  # appended to the command (run): tiny sizes only
    out_dir: bool = False  # append --run.out_dir=<a directory of its own> (maws-train's outputs)
    cwd: str = "workspace"  # or "mirror": a scratch mirror of the checkout, for scripts that work on it
    expect: str = ""  # stdout (run) must contain it
    fmnist: bool = False  # reads Debian's Fashion-MNIST
    slow: bool = False
    xfail: str = ""  # it does not run as written: why, and the README fix
    fails_with: str = ""  # (xfail) what its failure says; failing any other way fails the test


class NotAsWritten(AssertionError):
    """A README command failed the way its row's xfail says it does."""


ROWS = [
    # setup: installs packages, so its own --dry-run (prints the plan and the commands, installs nothing)
    Row(r"bash scripts/setup\.sh( --dev)?", "dry_setup",
        "installs into .venv (CI's first step runs it for real): --dry-run appended, from a scratch copy of "
        "scripts/ and requirements/"),
    Row(r"bash scripts/setup\.sh --cuda( --dev| --dry-run)*", "dry_setup",
        "the GPU install: --dry-run (where missing) against canned nvidia-smi headers of a CUDA 12.4 and a "
        "CUDA 13.0 driver"),
    Row(r"\.venv/bin/python -m pytest -q", "skip", "the test suite itself, which this test is part of"),
    Row(r"pip install (--no-build-isolation )?\./kernels", "skip",
        "installs into the environment: scripts/check_kernels_dist.sh (CI) builds the kernels wheel and installs "
        "it alone in a clean venv"),
    Row(r"pip install --no-build-isolation --no-deps -e \./kernels", "skip",
        "builds maws_kernels._C with nvcc on a GPU machine; scripts/gpu_tier.sh builds it there"),
    Row(r'python -c "from maws_kernels import _C; print\(_C\.__file__\)"', "skip",
        "_C exists only after the CUDA build; scripts/gpu_tier.sh imports it the same way once built"),
    Row(r"(\.venv/bin/)?(python -m )?pytest -q tests/csrc -m gpu", "collect",
        "GPU tests: --collect-only (the path exists and the marker selects tests), nothing run"),
    # maws-train on a GPU: the config, the overrides and the paths resolved (--print-config), nothing run
    Row(r"maws-train --config configs/linprobe_vit_b16\.yaml .*", "dry_train",
        "a paper-scale recipe (run.device: cuda in the config)"),
    Row(r"(\.venv/bin/)?maws-train .*--run\.device=cuda( .*)?", "dry_train", "run.device=cuda"),
    Row(r"maws-train --config configs/(mae|wsp|finetune|linprobe)_vit_\w+\.yaml( .*)?", "dry_train",
        "a paper-scale recipe (run.device: cuda in the config)"),
    Row(r"torchrun .*--max-restarts=3 .*", "dry_torchrun", "GPU ranks (--run.device=cuda)"),
    Row(r"torchrun --standalone --nproc_per_node=4 --no-python maws-train --config configs/demo_fmnist\.yaml( .*)?",
        "run", "4 gloo ranks on CPU, as written, at tiny sizes", extra=TINY, out_dir=True, expect="| MAE -> WSP",
        fmnist=True, slow=True),
    Row(r"torchrun .*--no-python maws-train .*", "dry_torchrun",
        "GPU ranks (the recipe's run.device: cuda): torchrun's own parser, then maws-train --print-config and the "
        "parallel layout for the world it launches"),
    # the demo and the other CPU maws-train commands: run, at tiny sizes where they train
    Row(r"(\.venv/bin/)?maws-train --config configs/demo_fmnist\.yaml", "run", "the demo, at tiny sizes",
        extra=TINY, out_dir=True, expect="| MAE -> WSP", fmnist=True, slow=True),
    Row(r"maws-train --config configs/demo_fmnist\.yaml --data\.loader=dali .*", "run",
        "the demo through DALI on CPU from the shards written above, at tiny sizes", extra=TINY + SHARD_SIZES,
        out_dir=True, expect="| MAE -> WSP", fmnist=True, slow=True),
    Row(r"maws-train --config configs/demo_fmnist\.yaml --mae\.epochs=1 --run\.stages=\[mae,wsp\] --out \S+ "
        r"--data \S+", "run", "MAE and WSP at tiny sizes (its --out keeps it in the workspace)", extra=TINY,
        expect="[wsp] done", fmnist=True),
    Row(r"maws-train --config configs/demo_fmnist\.yaml --print-config", "run", "as written: it writes nothing",
        expect='"stages"'),
    Row(r"maws-train --help-config \w+", "run", "as written", expect="--parallel.zero_stage"),
    # maws-data: run on real photos and on Fashion-MNIST
    Row(r"maws-data shards --folder \S+ --out \S+", "run", "on a folder of real photos", expect="wrote"),
    Row(r"maws-data vocab --tags \S+ --out \S+ --min-count \d+ --max-size \d+", "run",
        "on the string tags of the list of real photos", expect="distinct tags kept"),
    Row(r"maws-data shards --list \S+ --tags \S+ --vocab \S+ --resample inv_sqrt --out \S+", "run",
        "on a list of real photos with string tags", expect="wrote"),
    Row(r"maws-data shards --fmnist --out \S+", "run", "256 of the 60k images (--num 256 appended)",
        extra=("--num", "256"), expect="wrote 256", fmnist=True),
    Row(r"maws-data shards --fmnist --weak-hashtags \d+ --out \S+", "run",
        "256 mosaics (a later --weak-hashtags 256 wins)", extra=("--weak-hashtags", "256"), expect="wrote 256",
        fmnist=True),
    Row(r"maws-data verify --shards \S+ --write-clean \S+", "run", "on the shards written above"),
    Row(r"maws-data stats --shards \S+", "run", "on the shards written above"),
    Row(r"\.venv/bin/maws-doctor", "run",
        "the environment report (--skip-kernels appended): tests/test_doctor.py runs the kernel checks, which take "
        "20-50 s under the interpreter here", extra=("--skip-kernels",), expect="backends on"),
    # maws-bench on a GPU: parsed
    Row(r"maws-bench kernels .*", "parse_bench",
        "GPU timings (on a CPU Triton is interpreted and no timing is recorded): maws-bench's parser, and every "
        "--ops / --models name against the ops and presets"),
    # the GPU tier's commands for this machine: run, in a scratch mirror of the checkout (prepare writes .carry/)
    Row(r"bash scripts/gpu_tier\.sh prepare", "run", "as written", cwd="mirror", expect="ready", fmnist=True),
    Row(r"bash scripts/gpu_tier\.sh --dry-run (first|second|third)", "run", "as written (it is the dry run)",
        cwd="mirror", expect=": OK (", fmnist=True),
]


def row_for(cmd: Command) -> Row | None:
    return next((r for r in ROWS if re.fullmatch(r.pattern, cmd.text)), None)


def _param(cmd: Command):
    row = row_for(cmd)
    marks = []
    if row is not None:
        marks += [needs_fmnist] if row.fmnist else []
        marks += [pytest.mark.slow] if row.slow else []
        marks += [pytest.mark.xfail(reason=row.xfail, raises=NotAsWritten, strict=True)] if row.xfail else []
    return pytest.param(cmd, marks=marks, id=cmd.id)


# --- where commands run -----------------------------------------------------------------------------------------
PNG = b"\x89PNG"


def _build_fixture(kind: str, path: Path, images: dict[str, bytes]) -> None:
    from tests.data.photos import write_folder

    if path.exists():
        return
    if kind == "photo_folder":
        write_folder(path, images, classes=2)
    elif kind == "tagged_list":
        root = path.parent
        names = []
        for i, (name, data) in enumerate(sorted(images.items())):
            rel = f"img/{name}.png" if data.startswith(PNG) else f"img/{name}.jpg"
            (root / "img").mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
            names.append((rel, [["cat", "sky"], ["dog"], ["cat"], ["cat", "dog", "tree"]][i % 4]))
        (root / "files.txt").write_text("".join(f"{n}\n" for n, _ in names))
        (root / "tags.jsonl").write_text("".join(json.dumps({"file": n, "tags": t}) + "\n" for n, t in names))
    elif kind == "stand_in":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("stand-in: only the dry runs of GPU commands name it, and they check that it exists\n")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, real_images) -> Path:
    """The current directory of the commands: configs/ (the checkout's) and the user-data fixtures."""
    ws = tmp_path_factory.mktemp("readme")
    (ws / "configs").symlink_to(REPO / "configs")
    for rel, kind in USER_DATA.values():
        if kind:
            _build_fixture(kind, ws / rel, real_images)
    return ws


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    """The checkout as scripts that cd to it see it: its folders linked, its top-level files copied (git reads
    no symlinked .gitignore), without what those scripts write (.carry/)."""
    root = tmp_path_factory.mktemp("checkout")
    for p in REPO.iterdir():
        if p.name in (".carry", "gpu_out"):
            continue
        if p.is_dir():
            (root / p.name).symlink_to(p)
        else:
            shutil.copy(p, root / p.name)
    return root


def _env() -> dict[str, str]:
    """A user's shell with the venv on PATH: no test-session settings (TRITON_INTERPRET, a rank)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # nothing written into the checkout, not even __pycache__
    return env


def substitute(word: str, ws: Path) -> str:
    """``word`` as the command gets it here: $VARS expanded, a user-data path replaced by its fixture."""
    def var(m):
        if m.group(1) not in SHELL_VARS:
            pytest.fail(f"${m.group(1)}: add what it stands for to SHELL_VARS in {Path(__file__).name}")
        return SHELL_VARS[m.group(1)]

    word = re.sub(r"\$\{?(\w+)\}?", var, word)
    key, eq, value = word.partition("=") if word.startswith("--") else ("", "", word)
    if value in USER_DATA:
        value = str(ws / USER_DATA[value][0])
    return f"{key}{eq}{value}"


def program(word: str) -> str:
    """A bare console script (maws-train, torchrun, pytest, python) or .venv/bin/X: this venv's."""
    name = word.removeprefix(".venv/bin/")
    return str(BIN / name) if "/" not in name and (BIN / name).exists() else word


def outputs(cmd: Command) -> list[str]:
    w = cmd.words
    return [w[i + 1] for i in range(len(w) - 1) if w[i] in ("--out", "--write-clean")]


class Runner:
    """Runs commands once each (the same argv twice in README is run once), producers of their inputs first."""

    def __init__(self, ws: Path, mirror_root: Path):
        self.ws, self.mirror, self.done = ws, mirror_root, {}
        self.producers = {out: c for c in COMMANDS for out in outputs(c)
                          if (r := row_for(c)) and r.check == "run" and r.cwd == "workspace"}

    def argv(self, cmd: Command, row: Row) -> list[str]:
        argv = [program(cmd.words[0]), *(substitute(w, self.ws) for w in cmd.words[1:]), *row.extra]
        if row.out_dir and "--out" not in cmd.words:
            argv.append(f"--run.out_dir=runs/{hashlib.sha1(repr(argv).encode()).hexdigest()[:10]}")
        return argv

    def inputs_first(self, cmd: Command) -> None:
        """Runs the README commands that write what ``cmd`` reads (their --out), if not run yet."""
        for w in cmd.words:
            producer = self.producers.get(w.partition("=")[2] if w.startswith("--") else w)
            if producer is not None and producer != cmd:
                res = self.run(producer, row_for(producer))
                if res.returncode != 0:
                    pytest.fail(f"{cmd.id}: its input comes from {producer.id}, which failed:\n{_tail(res)}")

    def run(self, cmd: Command, row: Row) -> subprocess.CompletedProcess:
        self.inputs_first(cmd)
        argv = self.argv(cmd, row)
        key = (row.cwd, tuple(argv))
        if key not in self.done:
            cwd = self.ws if row.cwd == "workspace" else self.mirror
            self.done[key] = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
        return self.done[key]


@pytest.fixture(scope="module")
def runner(workspace, mirror) -> Runner:
    return Runner(workspace, mirror)


def _tail(res: subprocess.CompletedProcess, n: int = 3000) -> str:
    return f"exit {res.returncode}\n--- stdout ---\n{res.stdout[-n:]}\n--- stderr ---\n{res.stderr[-n:]}"


# --- the checks ---------------------------------------------------------------------------------------------------
def check_run(cmd: Command, row: Row, request) -> None:
    res = request.getfixturevalue("runner").run(cmd, row)
    assert res.returncode == 0, f"{cmd.id}\n{_tail(res)}"
    assert row.expect in res.stdout, f"{cmd.id}: {row.expect!r} not in its output\n{_tail(res)}"


SMI_HEADER = "| NVIDIA-SMI {drv}    Driver Version: {drv}    CUDA Version: {cuda}     |"
CANNED_DRIVERS = (("550.54.15", "12.4"), ("580.65.06", "13.0"))


def check_dry_setup(cmd: Command, row: Row, request) -> None:
    tree = request.getfixturevalue("tmp_path")
    for name in ("scripts", "requirements"):  # setup.sh cds to the folder above its own: the copy
        shutil.copytree(REPO / name, tree / name)
    argv = [*cmd.words, *([] if "--dry-run" in cmd.words else ["--dry-run"])]
    for drv, cuda in CANNED_DRIVERS if "--cuda" in cmd.words else ((None, None),):
        smi = tree / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\necho '{SMI_HEADER.format(drv=drv, cuda=cuda)}'\n")
        smi.chmod(0o755)
        env = dict(_env(), NVIDIA_SMI=str(smi if drv else tree / "no-nvidia-smi"))
        res = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, timeout=60)
        where = f"{cmd.id} (--dry-run{f', a CUDA {cuda} driver' if drv else ''})"
        assert res.returncode == 0, f"{where}\n{_tail(res)}"
        planned = [line[2:] for line in res.stdout.splitlines() if line.startswith("+ ")]
        assert "python3 -m venv .venv" in planned, where
        assert planned[-1].startswith(".venv/bin/python -c import torch, maws_fast, maws_kernels"), where
        assert any(c.endswith(".[dev]") for c in planned) == ("--dev" in cmd.words), where
        assert not (tree / ".venv").exists(), f"{where}: the dry run created .venv"


def check_dry_train(cmd: Command, row: Row, request, words: tuple[str, ...] | None = None, world: int = 1) -> None:
    """maws-train's own config resolution (--print-config), the paths its options name, and the parallel
    layout (ZeRO / TP / batch split) of a ``world``-process launch."""
    runner = request.getfixturevalue("runner")
    words = words or cmd.words
    runner.inputs_first(cmd)
    argv = [str(BIN / "maws-train"), *(substitute(w, runner.ws) for w in words[1:]), "--print-config"]
    res = subprocess.run(argv, cwd=runner.ws, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{cmd.id}\n{_tail(res)}"
    for i, w in enumerate(words[1:], 1):  # every path the run would read exists (here: its fixture)
        opt, eq, value = w.partition("=")
        if not eq and opt in PATH_OPTIONS and i + 1 < len(words):
            value = words[i + 1]
        if opt in PATH_OPTIONS and value not in RUN_NAMES:
            path = Path(substitute(value, runner.ws))
            assert (runner.ws / path).exists(), (
                f"{cmd.id}: {opt} {value}: no such file in the repository, and not a user-data path of USER_DATA")

    from maws_fast.config.binder import config_from_dict
    from maws_fast.config.resolve import resolve_defaults
    from maws_fast.data.loader import check_batch
    from maws_fast.parallel.mesh import ParallelDims, ParallelLayout

    cfg = config_from_dict(json.loads(res.stdout))
    dims = ParallelDims(world, cfg.parallel.tp)
    cfg, _ = resolve_defaults(cfg, dims.dp)
    if cfg.parallel.engine != "fsdp2":  # FSDP2's layout check needs a live process group
        ParallelLayout.of(cfg.parallel, dims)
    for stage in cfg.run.stages:
        batch = getattr(getattr(cfg, stage, None), "batch_size", None)
        if batch is not None:
            check_batch(batch, dims.dp, cfg.parallel.grad_accum)


def check_dry_torchrun(cmd: Command, row: Row, request) -> None:
    from torch.distributed.run import get_args_parser

    ws = request.getfixturevalue("runner").ws
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = get_args_parser().parse_args([substitute(w, ws) for w in cmd.words[1:]])
    except SystemExit:
        pytest.fail(f"{cmd.id}: torchrun does not parse it: {err.getvalue().strip().splitlines()[-1]}")
    assert args.no_python and args.training_script == "maws-train", f"{cmd.id}: not `--no-python maws-train`"
    world = max(int(n) for n in str(args.nnodes).split(":")) * int(args.nproc_per_node)
    check_dry_train(cmd, row, request, ("maws-train", *args.training_script_args), world)


def check_collect(cmd: Command, row: Row, request) -> None:
    argv = [program(cmd.words[0]), *cmd.words[1:], "--collect-only", "-p", "no:cacheprovider"]
    res = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{cmd.id}\n{_tail(res)}"
    m = re.search(r"(\d+)(/\d+)? tests? collected", res.stdout)
    assert m and int(m.group(1)) > 0, f"{cmd.id}: selects no test\n{_tail(res)}"


def check_parse_bench(cmd: Command, row: Row, request) -> None:
    from maws_fast.cli.bench import bench_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = bench_parser().parse_args(list(cmd.words[1:]))
    except SystemExit:
        pytest.fail(f"{cmd.id}: maws-bench does not parse it: {err.getvalue().strip()}")
    if args.cmd == "kernels":  # bench_kernels checks the names only once it runs
        from maws_fast.bench.kernels import OPS
        from maws_fast.config.presets import PRESETS

        assert not (bad := [o for o in args.ops.split(",") if o not in OPS]), f"{cmd.id}: unknown ops {bad}"
        assert not (bad := [m for m in args.models.split(",") if m not in PRESETS]), f"{cmd.id}: no presets {bad}"


CHECKS = {"run": check_run, "dry_setup": check_dry_setup, "dry_train": check_dry_train,
          "dry_torchrun": check_dry_torchrun, "collect": check_collect, "parse_bench": check_parse_bench}


# --- the tests ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", [_param(c) for c in COMMANDS])
def test_readme_command(cmd, request):
    row = row_for(cmd)
    if row is None:
        pytest.fail(f"{cmd.id}: no row of ROWS in tests/{Path(__file__).name} matches `{cmd.text}`: add one "
                    "saying how it is checked (run at tiny sizes, a dry run, parsed, or skipped with the reason)")
    if row.check == "skip":
        pytest.skip(row.why)
    try:
        CHECKS[row.check](cmd, row, request)
    except (Exception, pytest.fail.Exception) as e:
        if row.xfail and row.fails_with in str(e):
            raise NotAsWritten(f"{e}") from e
        raise


def test_readme_shell_blocks_are_read():
    assert not PARSE_PROBLEMS, "\n".join(PARSE_PROBLEMS)
    assert len(COMMANDS) >= 20, f"only {len(COMMANDS)} commands found in README.md's shell blocks"


def test_every_row_checks_a_readme_command():
    """A row whose command left README is stale: delete it (an xfail row: the README fix changed the command)."""
    stale = [r.pattern for r in ROWS if not any(re.fullmatch(r.pattern, c.text) for c in COMMANDS)]
    assert not stale, f"rows matching no README command: {stale}"
    assert all(r.check in CHECKS or r.check == "skip" for r in ROWS)
    assert all(bool(r.xfail) == bool(r.fails_with) for r in ROWS), "an xfail row names how it fails (fails_with)"


def test_commands_are_read_as_the_shell_reads_them():
    text = "\n".join([
        "```", "output", "```",  # a closing fence followed by a newline opens nothing
        "```bash",
        "# a comment",
        "a --x=1 \\", "  --y 'two words'   # trailing comment",
        "",
        "b && c --z=[1,2]",
        "```",
        "  ```sh", "  d $HOME:1", "  ```",
    ])
    cmds, problems = readme_commands(text)
    assert not problems
    assert [(c.line, c.words) for c in cmds] == [
        (6, ("a", "--x=1", "--y", "two words")), (9, ("b",)), (9, ("c", "--z=[1,2]")), (12, ("d", "$HOME:1"))]
    assert cmds[0].text == 'a --x=1 --y "two words"'
    for bad in ("```bash\nx | y\n```", "```console\n$ x\n```", "```bash\nx \\\n```", "```bash\nx\n"):
        assert readme_commands(bad)[1], bad
