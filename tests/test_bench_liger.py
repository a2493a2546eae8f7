"""maws-bench kernels --providers liger: Liger-Kernel timed in the same harness as ours, checked
against the torch reference before it is timed, and a labelled skipped row (never a number) where
Liger has no equivalent of the op.

Liger's cross-entropy and fused linear cross-entropy run for real here, on CPU tensors under
Triton's interpreter. Its LayerNorm does not (Triton 3.7's interpreter passes the float ``eps`` as
a Python float and the kernel calls ``eps.to(tl.float32)``): its wrapping is tested with a stand-in
of Liger's signature, and it runs for real only on a GPU.
"""
import inspect
import json
import types

import pytest
import torch
import torch.nn.functional as F

import maws_fast.bench.kernels as kernels
from maws_fast.bench.kernels import OPS, Case, ProviderMismatch, check_against_torch, load_cases, mae_shape, run_cases
from maws_fast.cli.bench import bench_main

needs_liger = pytest.mark.skipif(not kernels.liger_installed(), reason="liger-kernel is not installed")


def _kernels(*argv: str) -> list:
    return ["kernels", "--models", "tiny", "--batch-size", "2", "--dtypes", "fp32", "--out", "", *argv]


def test_liger_without_the_package_is_one_line_naming_it(monkeypatch, capsys):
    monkeypatch.setattr(kernels, "liger_installed", lambda: False)
    assert bench_main(_kernels("--ops", "layer_norm", "--providers", "torch,liger")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "pip install liger-kernel" in err and "drop liger from --providers" in err


def test_liger_on_a_cpu_without_the_interpreter_says_how_to_run(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(kernels, "liger_installed", lambda: True)
    assert bench_main(_kernels("--ops", "layer_norm", "--device", "cpu", "--providers", "torch,liger")) == 2
    err = capsys.readouterr().err
    assert "liger run Triton kernels" in err and "TRITON_INTERPRET=1" in err


@pytest.mark.parametrize("installed", [True, False])
def test_liger_joins_the_default_providers_on_a_gpu_only_where_installed(monkeypatch, installed):
    import argparse

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "liger_installed", lambda: installed)
    p = argparse.ArgumentParser()
    kernels.add_kernel_args(p)
    assert p.parse_args([]).providers == "ours,cuda,torch,compile" + (",liger" if installed else "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    p = argparse.ArgumentParser()
    kernels.add_kernel_args(p)
    assert p.parse_args([]).providers == "ours,torch"  # CPU: interpreted, liger only when named


@pytest.mark.parametrize("op", OPS)
def test_every_case_gives_liger_a_function_or_a_reason(op):
    """A new op (or case) must decide: Liger's function of the same math, or why there is none."""
    for case in load_cases(op)([mae_shape("tiny", 1)], torch.float32, "cpu"):
        has_fn, reason = "liger" in case.fns, case.skip.get("liger")
        assert has_fn != bool(reason), (case.op, case.shape)
        assert has_fn or reason.startswith("Liger")
        if has_fn:
            assert "torch" in case.fns  # the check needs the reference


def test_na_rows_appear_only_when_liger_is_selected_and_carry_no_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "liger_installed", lambda: True)  # an n/a row needs no Liger to say so
    out = tmp_path / "kernels.json"
    assert bench_main(_kernels("--ops", "norm_pix_loss", "--providers", "torch", "--out", str(out))) == 0
    assert {r["provider"] for r in json.loads(out.read_text())} == {"torch"}
    out.unlink()
    assert bench_main(_kernels("--ops", "norm_pix_loss", "--providers", "torch,liger", "--out", str(out))) == 0
    rows = [r for r in json.loads(out.read_text()) if r["provider"] == "liger"]
    assert len(rows) == 1 and rows[0]["status"] == "skipped" and rows[0]["mode"] is None
    assert rows[0]["reason"] == "Liger has no masked per-patch-normalised pixel loss"
    assert not {"ms", "gbps", "speedup_vs_torch"} & rows[0].keys()


def test_a_case_with_a_liger_function_but_no_package_is_a_skipped_row_naming_it(monkeypatch):
    def never(x):
        raise AssertionError("liger was called without the package")

    monkeypatch.setattr(kernels, "liger_installed", lambda: False)
    x = torch.randn(4, 8, requires_grad=True)
    fns = {"torch": lambda x: x * 2, "liger": never}
    rows = run_cases([Case("layer_norm", "probe", "fp32", (x,), fns, bytes_fwd=1, bytes_bwd=1),
                      Case("adamw", "probe", "fp32", (x,), fns, bytes_fwd=1, skip={"liger": "Liger has no optimizer"})],
                     ("torch", "liger"), torch.device("cpu"))
    reasons = [r["reason"] for r in rows if r["provider"] == "liger"]
    assert reasons == ["liger-kernel is not installed (pip install liger-kernel)", "Liger has no optimizer"]
    assert all(r["status"] == "skipped" and "liger_kernel" not in r for r in rows if r["provider"] == "liger")


# ---- the check before timing --------------------------------------------------------------


def _ln_case(dtype=torch.float32, liger=None) -> Case:
    x = torch.randn(6, 32, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(32)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(32)).to(dtype).requires_grad_()
    fns = {"torch": lambda x, w, b: F.layer_norm(x, (32,), w, b, 1e-6)}
    return Case("layer_norm", "probe", kernels.dtype_name(dtype), (x, w, b), {**fns, "liger": liger or fns["torch"]},
                bytes_fwd=1, bytes_bwd=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_check_passes_rounding_differences(dtype):
    def same_in_fp32(x, w, b):  # exact math, another rounding path: what a fused kernel does
        return F.layer_norm(x.float(), (32,), w.float(), b.float(), 1e-6).to(x.dtype)

    check_against_torch("liger", same_in_fp32, _ln_case(dtype))


@pytest.mark.parametrize("wrong, what", [
    (lambda x, w, b: 2 * F.layer_norm(x, (32,), w, b, 1e-6), "the output differs"),
    (lambda x, w, b: F.layer_norm(x, (32,), w, b.detach(), 1e-6), "grad of input 2 is missing"),
    (lambda x, w, b: F.layer_norm(x, (32,), w, b, 1e-6) + 0 * w.sum() * float("nan"), "the output differs"),
    (lambda x, w, b: F.layer_norm(x, (32,), w, b, 1e-6).sum(), "has shape ()"),
])
def test_the_check_catches_a_wrong_wrapping(wrong, what):
    with pytest.raises(ProviderMismatch, match=what):
        check_against_torch("liger", wrong, _ln_case())


def test_a_mismatch_is_a_failed_row_and_the_provider_is_never_timed(monkeypatch):
    timed = []
    monkeypatch.setattr(kernels, "_timers", lambda fn, case, device, rep: timed.append(fn) or [])
    monkeypatch.setattr(kernels, "liger_installed", lambda: True)
    rows = run_cases([_ln_case(liger=lambda x, w, b: F.layer_norm(x, (32,), w, None, 1e-6))], ("torch", "liger"),
                     torch.device("cpu"))
    (row,) = [r for r in rows if r["provider"] == "liger"]
    assert row["status"] == "failed" and row["error"].startswith("ProviderMismatch: liger: the output differs")
    assert len(timed) == 1  # torch's timers only


def test_the_layer_norm_wrapping_matches_liger_and_passes_the_check(monkeypatch):
    """Liger's LayerNorm cannot run under the interpreter: a stand-in with its signature (X, W, B,
    eps) takes its place, so what is tested is that our wrapper passes ours' arguments in that order."""
    from maws_fast.bench.cases import layer_norm as ln_cases

    if kernels.liger_installed():
        real = kernels.liger_functional().liger_layer_norm
        assert list(inspect.signature(real).parameters) == ["X", "W", "B", "eps"]
    seen = []

    def stand_in(X, W, B, eps):
        seen.append(eps)
        return F.layer_norm(X, X.shape[-1:], W, B, eps)

    monkeypatch.setattr(ln_cases, "liger_functional", lambda: types.SimpleNamespace(liger_layer_norm=stand_in))
    case = next(ln_cases.cases([mae_shape("tiny", 1)], torch.float32, "cpu"))
    check_against_torch("liger", case.fns["liger"], case)
    assert seen and set(seen) == {ln_cases.EPS}


# ---- Liger for real (interpreted) ---------------------------------------------------------


@needs_liger
@pytest.mark.interpreter
def test_liger_cross_entropy_rows_are_measured_and_soft_targets_are_na(tmp_path, capsys):
    from importlib.metadata import version

    out = tmp_path / "kernels.json"
    assert bench_main(_kernels("--ops", "cross_entropy", "--providers", "torch,liger", "--out", str(out))) == 0
    rows = [r for r in json.loads(out.read_text()) if r["provider"] == "liger"]
    measured = {(r["op"], r["mode"]) for r in rows if "status" not in r}
    assert measured == {(op, m) for op in ("hard_target_ce", "linear_hard_target_ce") for m in ("fwd", "bwd", "both")}
    assert all(r["ms"] > 0 and "speedup_vs_torch" in r for r in rows if "status" not in r)
    assert {r["liger_kernel"] for r in rows} == {version("liger-kernel")}
    na = [r for r in rows if r.get("status") == "skipped"]
    assert {r["op"] for r in na} == {"soft_target_ce", "linear_soft_target_ce"}
    assert all(r["reason"].startswith("Liger's cross-entropy takes class indices") for r in na)
    assert "SKIPPED: Liger's cross-entropy" in capsys.readouterr().out


@needs_liger
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liger_losses_pass_the_check_and_a_sum_for_a_mean_does_not(monkeypatch, dtype):
    """Liger's losses really run here; its mean reduction is ours, and the same call with
    reduction="sum" (a wrapping mistake) is caught."""
    from maws_fast.bench.cases import contrastive as con_cases
    from maws_fast.bench.cases import cross_entropy as ce_cases

    shapes = [mae_shape("tiny", 3)]
    cases = [c for c in ce_cases.cases(shapes, dtype, "cpu") if "liger" in c.fns]
    cases += list(con_cases.cases(shapes, dtype, "cpu"))
    assert [c.op for c in cases] == ["hard_target_ce", "linear_hard_target_ce", "contrastive_loss"]
    for case in cases:
        logits = case.args[0].detach().clone()
        check_against_torch("liger", case.fns["liger"], case)
        assert torch.equal(case.args[0], logits)  # Liger wrote into a copy, not the timed inputs

    def summed(x, labels, ids, ones):
        return kernels.liger_functional().liger_cross_entropy(x, labels, reduction="sum")

    monkeypatch.setattr(ce_cases, "_liger_ce", summed)
    case = next(c for c in ce_cases.cases(shapes, dtype, "cpu") if c.op == "hard_target_ce")
    with pytest.raises(ProviderMismatch, match="the output differs"):
        check_against_torch("liger", case.fns["liger"], case)
