"""The CUDA C++ twins in csrc/: they compile wherever the tests run, and match torch on a GPU.

* Compile checks, no GPU needed: every ``csrc/*.cu`` compiles with nvcc for sm_90, both
  standalone exactly as documented (``nvcc -arch=sm_90 -std=c++17 -c``, no torch headers) and
  with the flags torch's extension build adds (``-D__CUDA_NO_HALF_CONVERSIONS__`` and friends,
  which remove the implicit half/bfloat16 conversions; C++20 as recent torch uses). Without nvcc
  these skip on a dev machine but FAIL in CI (env ``CI`` set): CI has nvcc and must compile them.
  All compiles start at once (module fixture) and run in parallel.
* ``csrc/bindings.cpp`` is syntax-checked with g++ against the installed torch's headers. The CPU
  wheel ships the c10/cuda headers but not the CMake-generated ``c10/cuda/impl/cuda_cmake_macros.h``;
  torch's own switch ``C10_CUDA_NO_CMAKE_CONFIGURE_FILE`` skips it (the macro it would define only
  matters for Windows DLL exports). Needs the CUDA runtime headers and Python.h; skips without them.
* GPU (``@pytest.mark.gpu``): each function of ``maws_kernels._C`` against a pure-torch reference
  written here, at awkward shapes, fp32 / fp16 / bf16.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

CSRC = Path(__file__).resolve().parents[2] / "kernels" / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
IN_CI = bool(os.environ.get("CI"))


# ---------------------------------------------------------------------------------------------
# compile checks (CPU)
# ---------------------------------------------------------------------------------------------


def _find_nvcc() -> str | None:
    for cand in (
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc") if os.environ.get("CUDA_HOME") else None,
        "/usr/local/cuda/bin/nvcc",
    ):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def _cuda_include_dir(nvcc: str | None) -> str | None:
    """The CUDA toolkit's include dir (cuda_runtime_api.h), for the host-compiler syntax check."""
    cands = [os.path.join(os.environ["CUDA_HOME"], "include")] if os.environ.get("CUDA_HOME") else []
    cands.append("/usr/local/cuda/include")
    if nvcc:
        # nvcc may be a wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc): also try
        # the directory of the resolved path.
        cands.append(str(Path(nvcc).resolve().parents[1] / "include"))
    return next((d for d in cands if os.path.isfile(os.path.join(d, "cuda_runtime_api.h"))), None)


def _nvcc_variants() -> dict[str, list[str]]:
    from torch.utils import cpp_extension

    torch_macros = [f for f in getattr(cpp_extension, "COMMON_NVCC_FLAGS", []) if f.startswith("-D")]
    return {
        "standalone": ["-arch=sm_90", "-std=c++17"],
        "torch_flags": ["-arch=sm_90", "-std=c++20", "-O3", *torch_macros],
    }


def _bindings_cmd(nvcc: str | None) -> tuple[list[str] | None, str]:
    """g++ -fsyntax-only command for bindings.cpp, or (None, why it cannot run here)."""
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("g++") or shutil.which("c++")
    py_inc = sysconfig.get_paths().get("include")
    cuda_inc = _cuda_include_dir(nvcc)
    if cxx is None:
        return None, "no g++"
    if not py_inc or not os.path.isfile(os.path.join(py_inc, "Python.h")):
        return None, f"no Python.h in {py_inc} (install the python headers)"
    if cuda_inc is None:
        return None, "no CUDA runtime headers (cuda_runtime_api.h) found"
    torch_incs = include_paths()
    cmd = [cxx, "-fsyntax-only", "-std=c++20", "-DTORCH_EXTENSION_NAME=_C"]
    if not any(os.path.isfile(os.path.join(d, "c10/cuda/impl/cuda_cmake_macros.h")) for d in torch_incs):
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # CPU wheel: see the module docstring
    cmd += [f"-I{d}" for d in [*torch_incs, py_inc, cuda_inc]]
    cmd.append(str(CSRC / "bindings.cpp"))
    return cmd, ""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Starts every compile at once; maps a job name to (command, returncode, compiler output)."""
    nvcc = _find_nvcc()
    out_dir = tmp_path_factory.mktemp("csrc_build")
    cmds: dict[str, list[str]] = {}
    if nvcc is not None:
        for variant, flags in _nvcc_variants().items():
            for cu in CU_FILES:
                obj = out_dir / f"{cu.stem}.{variant}.o"
                cmds[f"{cu.name}:{variant}"] = [nvcc, *flags, "-c", str(cu), "-o", str(obj)]
    bcmd, why = _bindings_cmd(nvcc)
    if bcmd is not None:
        cmds["bindings.cpp"] = bcmd
    procs = {
        name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, cmd in cmds.items()
    }
    results: dict[str, tuple[list[str], int, str]] = {}
    for name, proc in procs.items():
        log, _ = proc.communicate(timeout=600)
        results[name] = (cmds[name], proc.returncode, log or "")
    return {"nvcc": nvcc, "bindings_skip": why, "results": results}


def test_csrc_sources_are_standalone():
    assert {"masked_patchify.cu", "norm_pix_loss.cu"} <= {p.name for p in CU_FILES}
    for cu in CU_FILES:
        assert "torch" not in "".join(
            line for line in cu.read_text().splitlines() if line.startswith("#include")
        ), f"{cu.name} must not include torch headers"


@pytest.mark.parametrize("variant", ["standalone", "torch_flags"])
@pytest.mark.parametrize("cu", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cu_compiles_for_sm90(compiled, cu, variant):
    if compiled["nvcc"] is None:
        msg = "nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)"
        if IN_CI:
            pytest.fail(f"{msg}: CI must compile csrc/*.cu")
        pytest.skip(msg)
    cmd, rc, log = compiled["results"][f"{cu.name}:{variant}"]
    assert rc == 0, f"{' '.join(cmd)}\nexited {rc}:\n{log}"


def test_bindings_cpp_syntax(compiled):
    if "bindings.cpp" not in compiled["results"]:
        pytest.skip(f"cannot syntax-check bindings.cpp here: {compiled['bindings_skip']}")
    cmd, rc, log = compiled["results"]["bindings.cpp"]
    assert rc == 0, f"{' '.join(cmd)}\nexited {rc}:\n{log}"


# ---------------------------------------------------------------------------------------------
# GPU: maws_kernels._C against pure torch
# ---------------------------------------------------------------------------------------------


def _ext():
    try:
        from maws_kernels import _C
    except ImportError as e:
        pytest.skip(f"maws_kernels._C is not built ({e}); build: pip install --no-build-isolation -e ./kernels")
    return _C


def patchify_ref(images: torch.Tensor, p: int) -> torch.Tensor:
    B, C, H, W = images.shape
    h, w = H // p, W // p
    x = images.reshape(B, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, h * w, p * p * C)


def masked_patchify_ref(images: torch.Tensor, ids_keep: torch.Tensor, p: int) -> torch.Tensor:
    patches = patchify_ref(images, p)
    return torch.gather(patches, 1, ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))


def row_loss_ref(pred, images, mask, p, norm_pix, eps):
    """(B, L) fp32: mask * per-patch MSE against the (normalised) target, the official MAE formula."""
    target = patchify_ref(images.float(), p)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    return ((pred.float() - target) ** 2).mean(dim=-1) * mask


def _random_ids(B, L, K, device):
    return torch.stack([torch.randperm(L, device=device)[:K] for _ in range(B)])


# (B, C, H, W, p): batch 1 and 3, patch 14 and 16, non-square, C = 1 and 3, one real MAE shape.
GPU_SHAPES = [
    (1, 3, 28, 42, 14),
    (3, 3, 32, 48, 16),
    (3, 1, 42, 28, 14),
    (1, 3, 16, 16, 16),
    (8, 3, 224, 224, 16),
    (3, 3, 224, 224, 14),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,C,H,W,p", GPU_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_masked_patchify_matches_torch(seeded, B, C, H, W, p, dtype, layout):
    _C = _ext()
    images = torch.randn(B, C, H, W, device="cuda").to(dtype)
    if layout == "channels_last":
        images = images.to(memory_format=torch.channels_last)  # the kernel reads through strides
    L = (H // p) * (W // p)
    K = max(1, L // 4)
    ids = _random_ids(B, L, K, "cuda")

    out = _C.masked_patchify_fwd(images, ids, p)
    assert out.dtype == dtype and out.shape == (B, K, p * p * C)
    assert torch.equal(out, masked_patchify_ref(images, ids, p))  # pure data movement: exact

    grad = torch.randn(B, K, p * p * C, device="cuda").to(dtype)
    leaf = images.detach().requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(masked_patchify_ref(leaf, ids, p), leaf, grad)
    dimages = _C.masked_patchify_bwd(grad, ids, p, C, H, W)
    assert dimages.shape == (B, C, H, W) and dimages.is_contiguous()
    assert torch.equal(dimages, ref_grad)


@pytest.mark.gpu
def test_masked_patchify_edge_cases(seeded):
    _C = _ext()
    images = torch.randn(2, 3, 32, 32, device="cuda")
    # A slice of a bigger batch (non-trivial storage offset and strides).
    big = torch.randn(4, 3, 40, 48, device="cuda")
    view = big[1:3, :, 4:36, 8:40]
    ids = _random_ids(2, 4, 3, "cuda")
    assert torch.equal(_C.masked_patchify_fwd(view, ids, 16), masked_patchify_ref(view, ids, 16))
    # K = 0: the backward still writes every pixel (zeros).
    empty_ids = torch.zeros(2, 0, dtype=torch.long, device="cuda")
    dimg = _C.masked_patchify_bwd(torch.zeros(2, 0, 768, device="cuda"), empty_ids, 16, 3, 32, 32)
    assert torch.equal(dimg, torch.zeros_like(dimg))
    # An id out of range reads nothing and yields a NaN patch, the others stay right.
    bad = torch.tensor([[0, 99], [-1, 3]], device="cuda")
    out = _C.masked_patchify_fwd(images, bad, 16)
    assert torch.isnan(out[0, 1]).all() and torch.isnan(out[1, 0]).all()
    assert torch.equal(out[0, 0], patchify_ref(images, 16)[0, 0])
    # Bad inputs: ValueError with the function's name.
    with pytest.raises(ValueError, match="not divisible by patch size"):
        _C.masked_patchify_fwd(images, ids, 14)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        _C.masked_patchify_fwd(images.cpu(), ids, 16)
    with pytest.raises(ValueError, match="ids_keep must be int64"):
        _C.masked_patchify_fwd(images, ids.int(), 16)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        _C.masked_patchify_fwd(images.double(), ids, 16)
    with pytest.raises(ValueError, match="grad must be"):
        _C.masked_patchify_bwd(torch.zeros(2, 3, 700, device="cuda"), ids, 16, 3, 32, 32)


# (pred dtype, image dtype): the autocast case is bf16 pred against fp32 images.
LOSS_DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("pred_dtype,img_dtype", LOSS_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("B,C,H,W,p", GPU_SHAPES)
@pytest.mark.parametrize("norm_pix", [True, False])
def test_norm_pix_loss_matches_torch(seeded, B, C, H, W, p, pred_dtype, img_dtype, norm_pix):
    _C = _ext()
    eps = 1e-6
    L, P = (H // p) * (W // p), p * p * C
    # A non-zero image mean per channel: the variance must not cancel (two-pass in the kernel).
    images = (torch.randn(B, C, H, W, device="cuda") * 2 + 3).to(img_dtype)
    pred = torch.randn(B, L, P, device="cuda").to(pred_dtype)
    mask = (torch.rand(B, L, device="cuda") < 0.75).float()
    mask[:, 0] = 1.0
    if L > 1:
        mask[:, -1] = 0.0

    # Forward. The kernel does fp32 math on the given values, so the reference is the fp32
    # formula on the same (upcast) values: only summation order differs.
    loss = _C.norm_pix_loss_fwd(pred, images, mask, p, norm_pix, eps)
    ref = row_loss_ref(pred, images, mask, p, norm_pix, eps)
    assert loss.dtype == torch.float32 and loss.shape == (B, L)
    torch.testing.assert_close(loss, ref, rtol=2e-5, atol=1e-6)
    assert torch.equal(loss[mask == 0], torch.zeros_like(loss[mask == 0]))

    # Backward of (loss * mask).sum() / mask.sum() with an upstream gradient g.
    g = torch.tensor(0.7, device="cuda")
    gscale = g / mask.sum()  # stays on the device: no host sync
    leaf = pred.detach().float().requires_grad_(True)
    total = row_loss_ref(leaf, images, mask, p, norm_pix, eps).sum() / mask.sum()
    (ref_grad,) = torch.autograd.grad(total, leaf, g)
    dpred = _C.norm_pix_loss_bwd(gscale, pred, images, mask, p, norm_pix, eps)
    assert dpred.dtype == pred_dtype and dpred.shape == pred.shape
    if pred_dtype == torch.float32:
        torch.testing.assert_close(dpred, ref_grad, rtol=2e-5, atol=1e-9)
    else:
        # Both round the same fp32 value to 16 bits: allow one ulp of the format.
        ulp = 2.0**-7 if pred_dtype == torch.bfloat16 else 2.0**-10
        torch.testing.assert_close(dpred.float(), ref_grad, rtol=ulp, atol=1e-3 * ref_grad.abs().max().item())
    assert torch.equal(dpred[mask == 0], torch.zeros_like(dpred[mask == 0]))

    # A different upstream gradient per patch (gscale of shape (B, L)).
    gw = torch.rand(B, L, device="cuda") + 0.1
    (ref_w,) = torch.autograd.grad((row_loss_ref(leaf, images, mask, p, norm_pix, eps) * gw).sum(), leaf)
    dpred_w = _C.norm_pix_loss_bwd(gw, pred, images, mask, p, norm_pix, eps).float()
    torch.testing.assert_close(dpred_w, ref_w, rtol=2e-5 if pred_dtype == torch.float32 else 2.0**-7,
                               atol=1e-3 * ref_w.abs().max().item())


@pytest.mark.gpu
def test_norm_pix_loss_strided_deterministic_and_checked(seeded):
    _C = _ext()
    B, C, H, W, p = 2, 3, 64, 48, 16
    L, P = (H // p) * (W // p), p * p * C
    images = torch.randn(B, C, H, W, device="cuda").to(memory_format=torch.channels_last)
    pred = torch.randn(B, L, P, device="cuda")
    mask = (torch.rand(B, L, device="cuda") < 0.75).float()
    loss = _C.norm_pix_loss_fwd(pred, images, mask, p, True, 1e-6)
    torch.testing.assert_close(loss, row_loss_ref(pred, images, mask, p, True, 1e-6), rtol=2e-5, atol=1e-6)
    assert torch.equal(loss, _C.norm_pix_loss_fwd(pred, images, mask, p, True, 1e-6))  # fixed order
    gscale = torch.tensor(0.01, device="cuda")
    d1 = _C.norm_pix_loss_bwd(gscale, pred, images, mask, p, True, 1e-6)
    assert torch.equal(d1, _C.norm_pix_loss_bwd(gscale, pred, images, mask, p, True, 1e-6))
    with pytest.raises(ValueError, match="mask must be float32"):
        _C.norm_pix_loss_fwd(pred, images, mask.bool(), p, True, 1e-6)
    with pytest.raises(ValueError, match=r"pred must be \(B, L, p\*p\*C\)"):
        _C.norm_pix_loss_fwd(pred[:, :-1], images, mask, p, True, 1e-6)
    with pytest.raises(ValueError, match="gscale must be a float32 tensor of one element or one per patch"):
        _C.norm_pix_loss_bwd(gscale.double(), pred, images, mask, p, True, 1e-6)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        _C.norm_pix_loss_fwd(pred, images, mask.cpu(), p, True, 1e-6)
