"""Every Triton kernel compiles for sm_90 (H100 / H200) with the real compiler -- on a CPU.

The other kernel tests run under Triton's interpreter, which accepts code the GPU compiler
rejects (layouts, shared-memory and register limits, ptxas errors) and never spills. This test
runs ``benchmarks/compile_kernels.py`` (over ``maws_kernels.compile_check``) -- each kernel as its
launcher calls it in its op's ``compile_scenarios`` at every model-zoo training shape, in fp32, bf16
and bf16 autocast -- and checks its JSON report. It runs in a subprocess without TRITON_INTERPRET:
tests/conftest.py sets it for this process, and kernels imported under it are interpreter functions
that cannot be compiled.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from maws_kernels.compile_check import check_launch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "compile_kernels.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("compile_sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out / "triton_cache")  # not the user's cache
    cmd = [sys.executable, str(SCRIPT), "--arch", "90", "--json", str(out / "report.json")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    path = out / "report.json"
    if not path.exists():
        pytest.fail(f"{' '.join(cmd[1:])} wrote no report (exit {proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90(report):
    assert report["results"], "no cases were compiled"
    by_error: dict[str, list[str]] = {}
    for r in report["results"]:
        if r["status"] == "FAIL":
            by_error.setdefault(r["error"], []).append(r["case"].strip())
    assert not by_error, f"cases that do not compile for sm_90, by error ({len(by_error)} distinct):\n" + "\n".join(
        f"--- {len(cases)} case(s), e.g. {cases[0]}\n{error[-2000:]}" for error, cases in list(by_error.items())[:5])


@pytest.mark.slow
def test_model_zoo_configs_do_not_spill_registers(report):
    spilled = [r for r in report["results"] if r["status"] == "SPILL"]
    assert not spilled, "model-zoo configs spill registers on sm_90 (bytes stored / loaded):\n" + "\n".join(
        f"{r['case'].strip()}: {r['spill_st']}/{r['spill_ld']} with {r['regs']} registers" for r in spilled)


@pytest.mark.slow
def test_every_kernel_is_compiled_in_fp32_and_bf16(report):
    assert not report["kernels_without_cases"], (
        f"kernels no scenario launches: {report['kernels_without_cases']}; add one to the compile_scenarios of "
        "their module in kernels/maws_kernels/ (see maws_kernels/_scenarios.py)")
    seen: dict[str, set[str]] = {}
    for r in report["results"]:
        if r["status"] != "FAIL":
            types = {v for v in r["signature"].values() if v.startswith("*")}
            # a kernel that reads its tensors through address tables names their dtype in a constexpr
            # (as a tl.dtype or its string, "triton.language.bfloat16")
            short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
            types |= {"*" + short.get(str(v).rsplit(".", 1)[-1], str(v)) for k, v in r.get("constexprs", {}).items()
                      if k.endswith("_DTYPE")}
            seen.setdefault(r["kernel"], set()).update(types)
    for kernel, ptr_types in seen.items():
        assert {"*fp32", "*bf16"} <= ptr_types, f"{kernel} was compiled with pointers {sorted(ptr_types)} only"


def test_a_wrong_argument_count_names_the_kernel_and_the_fix():
    import maws_kernels.patch as patch

    kernel = patch._masked_patchify_fwd_kernel  # (img, ids, out, K, L, C, grid_w, 4 strides; p, BLOCK_P)
    args = (None,) * 10  # one short, as a launcher that missed a new argument would be
    with pytest.raises(ValueError, match=r"kernel _masked_patchify_fwd_kernel takes 11 args .* gives 10: update"):
        check_launch("_masked_patchify_fwd_kernel", kernel, args, {"p": 16, "BLOCK_P": 1024}, "the test")
    with pytest.raises(ValueError, match=r"does not pass constexpr \['BLOCK_P'\]"):
        check_launch("_masked_patchify_fwd_kernel", kernel, (None,) * 11, {"p": 16}, "the test")
    check_launch("_masked_patchify_fwd_kernel", kernel, (None,) * 11, {"p": 16, "BLOCK_P": 1024}, "the test")
