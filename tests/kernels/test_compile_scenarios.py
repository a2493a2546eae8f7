"""The compile check's cases are declared by the op modules (``compile_scenarios``, see
maws_kernels/_scenarios.py): every module with a Triton kernel declares them, together they launch
every kernel without an error, and the model-zoo table of maws_kernels.compile_check is the
trainer's presets. Fast: the scenarios run with recording kernels on fake tensors, nothing is
compiled (test_compile_sm90.py compiles them)."""
import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import maws_kernels
from maws_kernels._scenarios import PRECISIONS, CompileShapes, Scenario

pytest.importorskip("triton")

from maws_kernels import compile_check  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _op_modules_with_kernels() -> dict[str, object]:
    """Modules defining a launchable (``*_kernel``) Triton kernel of their own, jitted or interpreted."""
    out = {}
    for info in pkgutil.iter_modules(maws_kernels.__path__):
        mod = importlib.import_module(f"maws_kernels.{info.name}")
        for name, v in vars(mod).items():
            inner = v
            while hasattr(inner, "fn"):
                inner = inner.fn
            if name.endswith("_kernel") and hasattr(v, "fn") and getattr(inner, "__module__", "") == mod.__name__:
                out[info.name] = mod
    return out


def test_every_module_with_a_kernel_declares_its_compile_scenarios():
    mods = _op_modules_with_kernels()
    assert {"patch", "layer_norm", "attention", "adamw"} <= set(mods), sorted(mods)
    missing = [name for name, mod in mods.items() if not callable(getattr(mod, "compile_scenarios", None))]
    assert not missing, f"op modules with Triton kernels but no compile_scenarios(shapes): {missing}"
    assert not any(n.startswith("_") for n in mods), "the compile check iterates public modules only"


@pytest.mark.parametrize("full", [False, True])
def test_every_op_yields_scenarios_for_both_sets(full):
    """Listing the scenarios makes no tensor (they are made when one runs, on fake or meta tensors)."""
    for shapes in compile_check.model_zoo_shapes(full):
        for name, mod in _op_modules_with_kernels().items():
            scs = list(mod.compile_scenarios(shapes))
            assert scs and all(isinstance(s, Scenario) and s.label and s.device in ("cuda", "meta") for s in scs), name


def test_model_zoo_rows_are_the_trainer_presets():
    from maws_fast.config import model_preset
    from maws_fast.data.fmnist import VOCAB

    for row in compile_check.MODEL_ZOO:
        cfg = model_preset(row.name)
        assert (row.img, row.patch, row.chans, row.width, row.heads, row.mlp_ratio, row.dec_width, row.dec_heads) == (
            cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio,
            cfg.decoder_embed_dim, cfg.decoder_num_heads), row.name
        assert row.num_patches == cfg.num_patches, row.name
    assert compile_check.DEMO_VOCAB == len(VOCAB)
    assert compile_check.HEAD_WIDTH == model_preset("vit_b16").embed_dim


def test_vit_b16_parameter_sizes_are_the_models():
    from maws_fast.models.vit import VisionTransformer

    with torch.device("meta"):
        model = VisionTransformer()  # ViT-B/16 without a head
    assert sorted(p.numel() for p in model.parameters()) == sorted(compile_check.VIT_B16_PARAMS)


def test_full_set_adds_to_the_model_zoo_set():
    zoo, full = compile_check.model_zoo_shapes(full=True)
    assert isinstance(full, CompileShapes) and zoo == compile_check.model_zoo_shapes()[0]
    assert zoo.spill_free and not zoo.variants and not full.spill_free and full.variants
    assert set(zoo.batches) < set(full.batches) and set(zoo.precisions) < set(full.precisions) <= set(PRECISIONS)


def test_scenarios_launch_every_kernel_without_an_error():
    """collect_cases in a process without TRITON_INTERPRET (interpreted kernels cannot be bound)."""
    code = ("import json; from maws_kernels.compile_check import collect_cases, model_zoo_shapes\n"
            "cases, uncovered = collect_cases(model_zoo_shapes())\n"
            "print(json.dumps({'n': len(cases), 'uncovered': uncovered, "
            "'errors': [(c.label, c.error) for c in cases if c.error],"
            "'kernels': sorted({c.module + '.' + c.kernel for c in cases})}))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["uncovered"], f"kernels no compile_scenarios launches: {out['uncovered']}"
    assert not out["errors"], out["errors"][:3]
    assert out["n"] > 100 and len(out["kernels"]) >= 20, out
