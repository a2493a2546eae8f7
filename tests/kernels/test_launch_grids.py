"""Every Triton launch in maws_kernels keeps CUDA's grid limits (x < 2**31, y and z <= 65535) at the
largest shapes the project runs -- without running a kernel or allocating a full-size tensor.

The shapes: for each model preset, stage and resolution of ``benchmarks/results/fit.json`` the
largest per-GPU batch on an H200 (e.g. MAE ViT-B/16 with full activation checkpointing: 20472 images,
so the 16-head decoder's attention has batch * heads = 327552, five times axis y's limit); tokens,
widths, heads, head dims from the presets; the 512-wide, 16-head MAE decoder; the WSP classifier's
30000 classes; the fine-tune's classifier at 224 to 518 px with 1000 classes; and LiT's text tower,
locked image tower and contrastive loss at a 32768 batch (above every LiT batch of the fit table).

How: every Triton kernel object of the package gets an instance-level ``run`` that records the launch
(``kernel[grid](...)`` calls ``run(*args, grid=grid, warmup=False, **kwargs)`` on a JITFunction,
an InterpretedFunction and an Autotuner alike) and returns without executing; a callable grid is
evaluated with every config the autotuner could pick, the Hopper ones included. The launchers run
on fake CUDA tensors (so they take their GPU branches: 132 SMs, GPU block sizes) -- or meta tensors
where fake CUDA cannot slice (the chunked linear CE) -- which own no memory.
"""
import ast
import importlib
import json
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import maws_kernels  # noqa: E402
from maws_fast.config import LiTConfig, MAEConfig, model_preset  # noqa: E402
from maws_kernels._grid import GRID_LIMITS, check_grid  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import KernelInterface  # noqa: E402

# The op modules (``maws_kernels.layer_norm`` etc. as attributes are the public functions).
adamw, add_layer_norm, attention, bias_gelu, cross_entropy, layer_norm, norm_pix_loss, patch = (
    importlib.import_module(f"maws_kernels.{m}") for m in ("adamw", "add_layer_norm", "attention", "bias_gelu",
                                                           "cross_entropy", "layer_norm", "norm_pix_loss", "patch"))

REPO = Path(__file__).resolve().parents[2]
FIT = REPO / "benchmarks" / "results" / "fit.json"
PKG_DIR = str(Path(maws_kernels.__file__).parent)
SMS = 132  # H100 / H200 SXM: the persistent backward kernels launch 2 programs per SM
WSP_CLASSES = 30000  # the WSP head the fit table was computed with (bench_step.py --num-classes)
FINETUNE_CLASSES = 1000  # the fine-tune head it was computed with (--fit-finetune-classes)
LIT_BATCH = 32768  # LiT / contrastive batch (the Inf-CL-style loss is built for batches this large)
BF16, F32, I64 = torch.bfloat16, torch.float32, torch.int64


# --- recording launches -----------------------------------------------------------------------
@dataclass
class Launch:
    kernel: str  # "module.name"
    site: tuple[str, int] | None  # (file name, line) of the ``kernel[grid](...)`` that launched it
    grids: list[tuple[int, ...]]  # one per config the launch could run with
    scenario: str


def _home(obj) -> str:
    """The module that defines a Triton kernel object (its innermost ``.fn``)."""
    while hasattr(obj, "fn"):
        obj = obj.fn
    return obj.__module__


def package_kernels() -> dict[str, KernelInterface]:
    """Every Triton kernel object (launchable or ``@triton.jit`` helper) defined in maws_kernels."""
    out = {}
    for info in pkgutil.iter_modules(maws_kernels.__path__):
        mod = importlib.import_module(f"maws_kernels.{info.name}")
        for name, v in vars(mod).items():
            if isinstance(v, KernelInterface) and _home(v) == mod.__name__:
                out[f"{info.name}.{name}"] = v
    return out


def launch_sites() -> dict[tuple[str, int, int], str]:
    """Every ``X[grid](...)`` call in the package's source: (file, first line, last line) -> X."""
    sites = {}
    for path in sorted(Path(PKG_DIR).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                sites[(path.name, node.lineno, node.end_lineno)] = ast.unparse(node.func.value)
    return sites


def _config_kwargs(kernel) -> list[dict]:
    """The meta-parameters a launch of ``kernel`` could run with: none for a plain kernel; for an
    autotuned one its own configs and every ``triton.Config`` of its module (the GPU configs too,
    which the interpreter's single config hides)."""
    if not isinstance(kernel, Autotuner):
        return [{}]
    mod = sys.modules[_home(kernel)]
    configs = list(kernel.configs)
    for v in vars(mod).values():
        for c in v if isinstance(v, (list, tuple)) else [v]:
            if type(c).__name__ == "Config" and hasattr(c, "all_kwargs"):
                configs.append(c)
    return [c.all_kwargs() for c in configs]


def _site() -> tuple[str, int] | None:
    frame = sys._getframe(2)
    while frame is not None and not frame.f_code.co_filename.startswith(PKG_DIR):
        frame = frame.f_back
    return (Path(frame.f_code.co_filename).name, frame.f_lineno) if frame else None


class Recorder:
    """While active, every kernel of the package records its launches instead of running."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.scenario = ""
        self.kernels = package_kernels()

    def _run(self, name: str, kernel):
        def run(*args, grid, warmup, **kwargs):
            named = {**dict(zip(kernel.arg_names, args)), **kwargs}
            grids = sorted({tuple(grid({**named, **cfg})) if callable(grid) else tuple(grid)
                            for cfg in _config_kwargs(kernel)})
            self.launches.append(Launch(name, _site(), grids, self.scenario))
        return run

    def __enter__(self):
        for name, k in self.kernels.items():
            k.run = self._run(name, k)  # an instance attribute: shadows the class's run
        return self

    def __exit__(self, *exc):
        for k in self.kernels.values():
            vars(k).pop("run", None)  # the class's run is seen again


# --- the shapes -------------------------------------------------------------------------------
def fit_batches() -> dict[tuple[str, str, int], int]:
    """(preset, stage, resolution) -> the largest per-GPU batch of the fit table on an H200 (a row
    without a resolution, from before the table had fine-tunes, is at its preset's own)."""
    out: dict[tuple[str, str, int], int] = {}
    for r in json.loads(FIT.read_text()):
        key = (r["preset"], r["stage"], r.get("resolution", model_preset(r["preset"]).img_size))
        out[key] = max(out.get(key, 0), int(r["max_batch_h200_141gb"]))
    return out


def _e(*shape, dtype=BF16, dev="cuda"):
    return torch.empty(shape, dtype=dtype, device=dev)


def _blocks(M: int, D: int, hidden: int) -> None:
    """The norms and MLP of transformer blocks over M tokens: layer_norm, add_layer_norm, bias_gelu."""
    x, w = _e(M, D), _e(D, dtype=F32)
    y, mean, rstd = layer_norm._fwd_triton(x, w, w, 1e-6)
    layer_norm._bwd_triton(y, x, w, mean, rstd, F32)
    y, s, mean, rstd = add_layer_norm._fwd_triton(x, x, w, w, w, 1e-6)
    add_layer_norm._bwd_triton(y, s, s, w, mean, rstd, BF16, None, F32, F32)
    h, b = _e(M, hidden), _e(hidden, dtype=F32)
    bias_gelu._fwd_triton(h, b)
    bias_gelu._bwd_triton(h, h, b, True, True)


def _attention(B: int, H: int, N: int, Dh: int, varlen: bool = False, backward: bool = True) -> None:
    if varlen:
        q, k, v = _e(B * N, 3, H, Dh).unbind(1)  # (T, H, Dh) slices of a packed (T, 3, H, Dh)
        cu = _e(B + 1, dtype=torch.int32)
    else:
        q, k, v = _e(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # the ViT's (B, H, N, Dh) views
        cu = None
    o, lse = attention._fwd_triton(q, k, v, cu, N, Dh ** -0.5)
    if backward:
        attention._bwd_triton(o, q, k, v, o, lse, cu, N, Dh ** -0.5)


def _adamw(numels: list[int]) -> None:
    n = sum(numels)  # one flat fp32 shard of the whole model (world size 1: the largest)
    p = _e(n, dtype=F32)
    adamw._fused_adamw_launch(p, _e(n), p, p, _e(n), 1, 1e-4, 0.9, 0.95, 1e-8, 0.05, None)
    block, _ = adamw._launch_config(torch.device("cuda"))
    chunks = sum(-(-m // block) for m in numels)  # FusedAdamW: the whole model as one param group
    tables = tuple(_e(len(numels), dtype=I64) for _ in range(4))
    adamw._adamw_multi_launch_tables(tables, _e(len(numels), dtype=I64), _e(chunks, dtype=torch.int32),
                                     _e(chunks, dtype=I64), BF16, 1, 1e-4, 0.9, 0.95, 1e-8, 0.05, True)


def _block_numels(D: int, hidden: int) -> list[int]:
    return [D, D, 3 * D * D, 3 * D, D * D, D, D, D, hidden * D, hidden, D * hidden, D]


def _soft_ce(B: int, V: int) -> None:
    """The soft-target CE, dense and sparse (forward and backward kernels)."""
    logits, ids, wts = _e(B, V), _e(B, 8, dtype=I64), _e(B, 8, dtype=F32)
    for tgt, i, w in ((_e(B, V, dtype=F32), None, None), (None, ids, wts)):
        loss, lse, tsum = cross_entropy._launch(logits, tgt, i, w, write_grad=False)
        cross_entropy._launch_bwd(loss, logits, lse, tsum, tgt, i, w)


def _linear_ce(B: int, D: int, V: int) -> None:
    """The fused head + CE (WSP) or one direction of the contrastive loss: meta tensors, whose chunk
    slicing fake CUDA cannot do on a CPU torch; the launcher makes no device-dependent choice."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        x, w = _e(B, D, dev="meta"), _e(V, D, dev="meta")
        ids, wts = _e(B, 1, dtype=I64, dev="meta"), _e(B, 1, dtype=F32, dev="meta")
        # the custom op's implementation (the op itself would run its fake kernel on meta tensors)
        cross_entropy._linear_ce_op._init_fn(x, w, None, None, ids, wts, max(1, (1 << 24) // V), True)


def mae_stage(preset: str, B: int) -> None:
    cfg = model_preset(preset)
    C, p, D, Dd = cfg.in_chans, cfg.patch_size, cfg.embed_dim, cfg.decoder_embed_dim
    L = cfg.num_patches
    K = int(L * (1 - MAEConfig().mask_ratio))
    hid, dhid = int(cfg.mlp_ratio * D), int(cfg.mlp_ratio * Dd)
    img, ids = _e(B, C, cfg.img_size, cfg.img_size, dtype=F32), _e(B, K, dtype=I64)
    patches = patch._fwd_triton(img, ids, p)
    patch._bwd_triton(patches, ids, p, C, cfg.img_size, cfg.img_size)
    _blocks(B * (K + 1), D, hid)  # encoder: kept patches + cls
    _attention(B, cfg.num_heads, K + 1, D // cfg.num_heads)
    _attention(B, cfg.num_heads, K + 1, D // cfg.num_heads, varlen=True)
    _blocks(B * (L + 1), Dd, dhid)  # decoder: every patch + cls
    _attention(B, cfg.decoder_num_heads, L + 1, Dd // cfg.decoder_num_heads)
    pred = _e(B, L + 1, p * p * C).narrow(1, 1, L)  # the decoder's output without its cls row
    mask = _e(B, L, dtype=F32)
    rows = norm_pix_loss._launch(norm_pix_loss._norm_pix_loss_fwd_kernel, pred, img, mask, p, True, 1e-6,
                                 out=_e(B, L, dtype=F32))
    norm_pix_loss._launch(norm_pix_loss._norm_pix_loss_bwd_kernel, pred, img, mask, p, True, 1e-6, rows,
                          out=_e(B, L, p * p * C), g_stride=1)
    enc = [D * C * p * p, D, D, (L + 1) * D] + _block_numels(D, hid) * cfg.depth + [D, D]
    dec = [Dd * D, Dd, Dd, (L + 1) * Dd] + _block_numels(Dd, dhid) * cfg.decoder_depth + [Dd, Dd, p * p * C * Dd,
                                                                                            p * p * C]
    _adamw(enc + dec)


def wsp_stage(preset: str, B: int, img_size: int | None = None, classes: int = WSP_CLASSES) -> None:
    """The WSP classifier; at ``img_size`` with ``classes`` outputs, the fine-tune's (same kernels)."""
    cfg = model_preset(preset, **({"img_size": img_size} if img_size else {}))
    C, p, D, L = cfg.in_chans, cfg.patch_size, cfg.embed_dim, cfg.num_patches
    hid = int(cfg.mlp_ratio * D)
    img, ids = _e(B, C, cfg.img_size, cfg.img_size, dtype=F32), _e(B, L, dtype=I64)
    patch._bwd_triton(patch._fwd_triton(img, ids, p), ids, p, C, cfg.img_size, cfg.img_size)  # every patch kept
    _blocks(B * (L + 1), D, hid)
    _attention(B, cfg.num_heads, L + 1, D // cfg.num_heads)
    _linear_ce(B, D, classes)  # the fused head + loss the trainer runs
    _soft_ce(B, classes)  # the plain soft-target CE on the same logits
    _adamw([D * C * p * p, D, D, (L + 1) * D] + _block_numels(D, hid) * cfg.depth
           + [D, D, classes * D, classes])


def lit_stage(preset: str, B: int) -> None:
    """The locked image tower (forward, every patch), the text tower (packed captions) and the loss."""
    cfg, lit = model_preset(preset), LiTConfig()
    D, L = cfg.embed_dim, cfg.num_patches
    layer_norm._fwd_triton(_e(B * (L + 1), cfg.embed_dim), _e(D, dtype=F32), _e(D, dtype=F32), 1e-6)
    add_layer_norm._fwd_triton(_e(B * (L + 1), D), _e(B * (L + 1), D), None, None, None, 1e-6)
    bias_gelu._fwd_triton(_e(B * (L + 1), int(cfg.mlp_ratio * D)), None)
    _attention(B, cfg.num_heads, L + 1, D // cfg.num_heads, backward=False)
    # the configured text tower, and one as wide as MAWS CLIP's (1024, 16 heads, 102 tokens)
    for width, heads, ctx in ((lit.width, lit.num_heads, lit.context_length), (1024, 16, 102)):
        _blocks(B * ctx, width, int(lit.mlp_ratio * width))
        _attention(B, heads, ctx, width // heads, varlen=True)
    _linear_ce(B, lit.embed_dim, B)  # contrastive_loss: each direction, "classes" = the batch


@pytest.fixture(scope="module")
def recorded() -> list[Launch]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    saved = {m: m._num_sms for m in (layer_norm, add_layer_norm, bias_gelu)}
    rec = Recorder()
    try:
        for m in saved:  # a CUDA query otherwise; module globals the launchers look up at call time
            m._num_sms = lambda index: SMS
        with rec, FakeTensorMode():
            for (preset, stage, res), B in sorted(fit_batches().items()):
                if stage == "lit":
                    assert B <= LIT_BATCH, f"the fit table's LiT {preset} batch {B} is above LIT_BATCH: raise it"
                    continue  # run below, at LIT_BATCH
                if stage == "finetune":
                    rec.scenario = f"finetune {preset} {res}px b{B}"
                    wsp_stage(preset, B, res, FINETUNE_CLASSES)
                else:
                    rec.scenario = f"{stage} {preset} b{B}"
                    {"mae": mae_stage, "wsp": wsp_stage}[stage](preset, B)
            for preset in ("vit_b16", "vit_h14", "vit_6.5b14"):
                rec.scenario = f"lit {preset} b{LIT_BATCH}"
                lit_stage(preset, LIT_BATCH)
    finally:
        for m, fn in saved.items():
            m._num_sms = fn
    return rec.launches


def test_every_launch_keeps_cuda_grid_limits_at_the_largest_batches(recorded):
    bad = [f"{ln.kernel} in {ln.scenario}: grid {g}" for ln in recorded for g in ln.grids
           if not 1 <= len(g) <= 3 or any(n > lim for n, lim in zip(g, GRID_LIMITS))]
    assert not bad, f"{len(bad)} launches past CUDA's grid limits {GRID_LIMITS}:\n" + "\n".join(bad[:20])


def test_the_mae_decoder_attention_at_20k_images_is_one_grid_axis(recorded):
    # the known failure: B/16 MAE at 20472 images, 16 heads x 197 tokens: batch * heads = 327552
    B = fit_batches()[("vit_b16", "mae", 224)]
    assert B * 16 > GRID_LIMITS[1]
    fwd = [ln for ln in recorded if ln.kernel == "attention._attn_fwd_kernel" and ln.scenario.startswith(
        f"mae vit_b16 b{B}")]
    assert fwd and all(len(g) == 1 for ln in fwd for g in ln.grids)
    assert max(g[0] for ln in fwd for g in ln.grids) == -(-197 // 16) * B * 16  # at the smallest tile of any config


def test_every_launcher_and_every_launch_site_is_recorded(recorded):
    kernels = package_kernels()
    sites = launch_sites()
    # launchable: the *_kernel naming rule (compile_check's too) plus whatever a launch site names
    launchable = {k for k in kernels if k.endswith("_kernel")}
    launchable |= {f"{f.removesuffix('.py')}.{name}" for (f, _, _), name in sites.items()
                   if f"{f.removesuffix('.py')}.{name}" in kernels}
    assert len(sites) >= 19 and len(launchable) >= 20, (sites, launchable)  # what the package had when written
    seen = {ln.kernel for ln in recorded}
    assert not launchable - seen, f"kernels no scenario launched: {sorted(launchable - seen)}; add them here"
    hit = {s for s in sites for ln in recorded if ln.site and ln.site[0] == s[0] and s[1] <= ln.site[1] <= s[2]}
    missed = [f"{f}:{a} {sites[(f, a, b)]}[...]" for (f, a, b) in sites if (f, a, b) not in hit]
    assert not missed, f"launch sites no scenario reached: {missed}; add them here"


def test_attention_grid_check_is_conservative_for_every_config():
    configs = [*attention._GPU_FWD_CONFIGS, *attention._GPU_BWD_CONFIGS, *attention._FWD_CONFIGS,
               *attention._BWD_CONFIGS, attention._FP32_CONFIG]
    assert attention._MIN_BLOCK <= min(c.kwargs[k] for c in configs for k in ("BLOCK_M", "BLOCK_N"))


def test_check_grid_names_the_kernel_the_shape_and_the_limit():
    assert check_grid("k", (2**31 - 1, 65535, 65535), "s") == (2**31 - 1, 65535, 65535)
    with pytest.raises(ValueError, match=r"my kernel at B=3 needs 65536 programs on grid axis y .*limit of 65535"):
        check_grid("my kernel", (1, 65536), "B=3")
    with pytest.raises(ValueError, match=r"axis x .*limit of 2147483647"):
        check_grid("k", (2**31,), "s")
    with pytest.raises(ValueError, match="1 to 3 axes"):
        check_grid("k", (1, 1, 1, 1), "s")


@pytest.mark.parametrize("what", ["attention varlen", "attention dense", "bias_gelu", "soft CE", "norm_pix_loss",
                                  "masked_patchify"])
def test_launchers_past_a_limit_raise_a_clear_error(what):
    # shapes that fit in a GPU's memory but not in one launch (meta tensors: nothing is allocated)
    m = dict(dev="meta")
    with Recorder() as rec:
        with pytest.raises(ValueError, match="CUDA's limit"):
            if what == "attention varlen":  # 2**20 captions of up to 8192 tokens, 16 heads
                q = _e(2**21, 16, 32, **m)
                attention._fwd_triton(q, q, q, _e(2**20 + 1, dtype=torch.int32, **m), 8192, 1.0)
            elif what == "attention dense":  # one token per (batch, head): 2**31 of them
                q = _e(2**27, 16, 1, 16, **m)
                attention._bwd_triton(q, q, q, q, q, _e(2**27, 16, 1, dtype=F32, **m), None, 1, 1.0)
            elif what == "bias_gelu":  # one row of 2**26 + 1 values: 65537 column tiles
                bias_gelu._fwd_triton(_e(1, 2**26 + 1, **m), None)
            elif what == "soft CE":  # V = 2**28 + 1 columns: 65537 chunks of 4096
                x = _e(2, 2**28 + 1, **m)
                cross_entropy._launch_bwd(_e(2, dtype=F32, **m), x, _e(2, dtype=F32, **m), _e(2, dtype=F32, **m),
                                          x, None, None)
            elif what == "norm_pix_loss":  # 1x1 patches: one program per pixel
                img, pred = _e(2**15, 1, 256, 256, **m), _e(2**15, 2**16, 1, **m)
                norm_pix_loss._launch(norm_pix_loss._norm_pix_loss_fwd_kernel, pred, img, _e(2**15, 2**16, **m), 1,
                                      True, 1e-6, out=_e(2**15, 2**16, dtype=F32, **m))
            else:
                img = _e(2**15, 1, 256, 256, **m)
                patch._fwd_triton(img, _e(2**15, 2**16, dtype=I64, **m), 1)
    assert not rec.launches  # raised before the launch
