"""Compile every maws_kernels Triton kernel for a real GPU target, without a GPU.

The CPU tests run the kernels under Triton's interpreter, which never lowers them: layout
conversions, shared-memory and register limits, spills and ptxas errors only appear in the real
compiler. Here each kernel goes the way a launch would -- the kernel's own binder specialises
the arguments (ints equal to 1 become constexpr; ints divisible by 16 and 16-byte-aligned pointers
get ``tt.divisibility``), then ``triton.compile`` runs ttir -> ttgir -> llir -> ptx -> ptxas (the
ptxas bundled in the triton wheel) for ``GPUTarget("cuda", arch, 32)``. Nothing is launched.

What to compile is declared by the op modules, next to their launchers: each op module with Triton
kernels ends with ``compile_scenarios(shapes)`` (the types are in ``_scenarios.py``), which yields
named scenarios that call the op's own implementation at the training shapes given. Here they run
on fake CUDA tensors, and every kernel launch they make is recorded instead of run; the argument
lists therefore follow the launchers, and a launcher that disagrees with its kernel fails with a
message naming both. This module touches an op module through these names only:

* ``compile_scenarios(shapes: CompileShapes) -> Iterator[Scenario]``: its scenarios;
* its ``*_kernel`` globals (the launchable kernels; ``@triton.jit`` helpers are named otherwise),
  swapped for recorders while the scenarios run -- launchers look their kernel up at call time;
* ``_num_sms(device_index)`` where the module has one (a CUDA query of the SM count that sets the
  persistent backward grids), answered with the target's count.

The shapes are :data:`MODEL_ZOO`, a table of generic rows (this package imports no trainer).

Per case: OK / SPILL (spilled where it must not) / FAIL, registers per thread, spill bytes,
static shared memory, and the widths of the global loads and stores (128 bits = fully vectorised).

CLI: ``python -m maws_kernels.compile_check`` (the trainer's ``benchmarks/compile_kernels.py``
adds its environment columns to the JSON). ``TRITON_INTERPRET`` must be unset when maws_kernels is
first imported: under the interpreter ``triton.jit`` makes functions that cannot be compiled.
Importable without Triton (:func:`main` then says what is missing). Triton 3.6 and 3.7.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import inspect
import io
import json
import multiprocessing
import os
import pkgutil
import re
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import torch

from maws_kernels._backend import TRITON_ERROR
from maws_kernels._scenarios import PRECISIONS, CompileShapes, Scenario, ViTShape
from maws_kernels._triton import HAS_TRITON, triton

if HAS_TRITON:  # the compiler itself; only the functions that compile need it
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction, create_function_from_signature

# --- the shapes: the model zoo ------------------------------------------------------------------
# One row per model of the maws_fast trainer's zoo (its presets; tests/kernels/test_compile_scenarios.py
# holds the rows equal to them): name, image side, patch, channels, width, heads, MLP ratio, MAE decoder
# width and heads.
MODEL_ZOO = (
    ViTShape("tiny", 28, 4, 1, 128, 4, 4.0, 64, 4),  # the Fashion-MNIST demo's ViT
    ViTShape("vit_b16", 224, 16, 3, 768, 12, 4.0, 512, 16),  # ViT-B/16
    ViTShape("vit_l16", 224, 16, 3, 1024, 16, 4.0, 512, 16),  # ViT-L/16
    ViTShape("vit_h14", 224, 14, 3, 1280, 16, 4.0, 512, 16),  # ViT-H/14
    ViTShape("vit_2b14", 224, 14, 3, 2560, 32, 4.0, 512, 16),  # MAWS ViT-2B/14
    ViTShape("vit_6.5b14", 224, 14, 3, 4096, 32, 4.0, 512, 16),  # MAWS ViT-6.5B/14
)
TRAIN_BATCH = 256
WSP_VOCAB, WSP_TAGS = 30000, 8  # the WSP classifier's hashtags, tags per image (sparse targets)
DEMO_VOCAB = 14  # the demo's 14 hashtags (dense WSP targets)
HEAD_WIDTH = 768  # the fused WSP head + CE on ViT-B/16's features
HIRES_TOKENS = 1025  # high-resolution fine-tuning: 448 px at /14 is 32 * 32 patches + cls
FLAT_NUMELS = 86_000_000  # AdamW: ViT-B/16's 86M parameters as one flat fp32 master shard
# FusedAdamW's one param group: ViT-B/16's 150 tensors (patch embed weight and bias, cls, pos-embed;
# per block norm1, qkv, proj, norm2, fc1, fc2 weights and biases; the final norm)
VIT_B16_PARAMS = ((768 * 3 * 16 * 16, 768, 768, 197 * 768)
                  + (768, 768, 2304 * 768, 2304, 768 * 768, 768, 768, 768, 3072 * 768, 3072, 768 * 3072, 768) * 12
                  + (768, 768))
# SMs per arch (SXM parts: H100 / H200 have 132): the persistent backward kernels launch a fixed
# number of programs per SM, which sets their rows per program and the reduction's block sizes.
SMS = {80: 108, 89: 128, 90: 132, 100: 148}
_SCENARIOS = "compile_scenarios in kernels/maws_kernels/{}.py (see maws_kernels/_scenarios.py)"


def model_zoo_shapes(full: bool = False) -> list[CompileShapes]:
    """The model-zoo set: every model at batch 256 in fp32, bf16 and bf16 autocast, the WSP and demo
    vocabularies, every flag the launchers can set; none of it may spill registers. ``full`` adds
    (spills reported, not failed) fp16, batch 1 and 32, tiny and odd vocabularies and sizes, and each
    op's variants (channels-last images, the official pred view, layer_norm D up to 16384, ...)."""
    zoo = CompileShapes(MODEL_ZOO, batches=(TRAIN_BATCH,), precisions=("fp32", "bf16", "bf16+fp32"),
                        vocabs=((WSP_VOCAB, WSP_TAGS), (DEMO_VOCAB, 3)), head_width=HEAD_WIDTH,
                        hires_tokens=HIRES_TOKENS, flat_numels=(FLAT_NUMELS,),
                        param_sets=(("ViT-B/16", VIT_B16_PARAMS),), variants=False, spill_free=True)
    if not full:
        return [zoo]
    return [zoo, dataclasses.replace(zoo, batches=(TRAIN_BATCH, 32, 1), precisions=tuple(PRECISIONS),
                                     vocabs=zoo.vocabs + ((1, 1), (10, 1), (4097, 3)),
                                     flat_numels=(FLAT_NUMELS, FLAT_NUMELS + 3, 1), variants=True, spill_free=False)]


@dataclass
class CompileCase:
    """One kernel launch to compile: the kernel, its arguments (tensors as :class:`_Ptr`) and options."""

    label: str
    module: str  # maws_kernels submodule, e.g. "layer_norm"
    kernel: str  # attribute name, e.g. "_layer_norm_fwd_kernel"
    args: tuple
    kwargs: dict  # constexprs and launch options (num_warps, ...)
    spill_free: bool  # a model-zoo config: any register spill is a failure
    also: int = 0  # further scenarios that produced the identical compilation
    error: str | None = None  # the launch itself was wrong (reported as a failed case, never compiled)


class _Ptr:
    """A tensor argument as Triton's binder sees it (the shape of its ``MockTensor``): dtype plus where
    it starts relative to a 16-byte-aligned allocation (``data_ptr() % 16`` decides ``tt.divisibility``)."""

    def __init__(self, dtype: torch.dtype, byte_offset: int = 0):
        self.dtype, self.shape, self.byte_offset = dtype, [1], byte_offset

    def data_ptr(self) -> int:
        return self.byte_offset

    @staticmethod
    def ptr_range() -> int:
        return 0  # a 32-bit pointer range, as MockTensor assumes

    def __repr__(self) -> str:
        return f"*{str(self.dtype).replace('torch.', '')}" + (f"+{self.byte_offset}" if self.byte_offset else "")


# --- kernels and their signatures -------------------------------------------------------------
def kernel_modules() -> dict[str, object]:
    """maws_kernels' public modules by short name (``patch``, ``layer_norm``, ...)."""
    import maws_kernels

    out = {}
    for info in pkgutil.iter_modules(maws_kernels.__path__):
        if not info.name.startswith("_"):
            out[info.name] = importlib.import_module(f"maws_kernels.{info.name}")
    return out


def _jit(kernel):
    """The JITFunction of a kernel, itself or under a ``@triton.autotune`` wrapper."""
    return kernel.fn if isinstance(kernel, Autotuner) else kernel


def find_kernels(mod) -> dict:
    """The ``*_kernel`` Triton kernels of a module (``@triton.jit`` helpers are not launched);
    autotuned kernels come as their Autotuner (every config of theirs is compiled)."""
    found = {n: v for n, v in vars(mod).items() if n.endswith("_kernel") and hasattr(v, "fn")}
    interpreted = [n for n, v in found.items() if not isinstance(_jit(v), JITFunction)]
    if interpreted:
        raise RuntimeError(f"{mod.__name__}.{interpreted[0]} is an interpreter function: maws_kernels was imported "
                           "with TRITON_INTERPRET=1, and interpreted kernels cannot be compiled. Run the compile "
                           "check in a process without TRITON_INTERPRET.")
    return found


def kernel_params(kernel) -> tuple[list[str], list[str]]:
    """(runtime parameter names, constexpr parameter names) in signature order."""
    runtime, const = [], []
    for name, p in inspect.signature(_jit(kernel).fn).parameters.items():
        # annotations are strings under `from __future__ import annotations`
        is_const = p.annotation is triton.language.constexpr or "constexpr" in str(p.annotation)
        (const if is_const else runtime).append(name)
    return runtime, const


def check_launch(name: str, kernel, args: tuple, kwargs: dict, where: str) -> None:
    """Raise a ValueError naming the kernel when a launch's arguments do not fit its signature."""
    runtime, const = kernel_params(kernel)
    given = len(args) + sum(k in runtime for k in kwargs)
    if given != len(runtime):
        raise ValueError(f"kernel {name} takes {len(runtime)} args ({', '.join(runtime)}), {where} gives {given}: "
                         "update the launcher to the kernel's signature")
    missing = [c for c in const if c not in kwargs]
    if missing:
        raise ValueError(f"kernel {name}: {where} does not pass constexpr {missing}: update the launcher to the "
                         "kernel's signature")


# --- capturing what the launchers pass --------------------------------------------------------
def _autotune_configs(tuner, args: tuple, kwargs: dict) -> list:
    """The configs an autotuned launch would benchmark (after the kernel's own early pruning)."""
    configs = tuner.configs
    if len(configs) > 1 and tuner.early_config_prune:
        configs = tuner.early_config_prune(configs, dict(zip(tuner.arg_names, args)), **kwargs)
    return list(configs)


class _Recorder:
    """Stands in for a kernel: ``rec[grid](*args, **kwargs)`` records the launch instead of running it.
    An autotuned kernel records one launch per config it could pick."""

    def __init__(self, module: str, name: str, kernel, sink: list):
        self.module, self.name, self.kernel, self.sink = module, name, kernel, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if isinstance(self.kernel, Autotuner):
                launches = [{**kwargs, **c.all_kwargs()} for c in _autotune_configs(self.kernel, args, kwargs)]
            else:
                launches = [dict(kwargs)]
            ptr_args = tuple(_Ptr(a.dtype, a.storage_offset() * a.element_size()) if isinstance(a, torch.Tensor)
                             else a for a in args)
            for kw in launches:
                try:
                    where = f"the launcher in kernels/maws_kernels/{self.module}.py"
                    check_launch(self.name, self.kernel, args, kw, where)
                    error = None
                except ValueError as e:  # becomes a failed case; the other kernels still get compiled
                    error = str(e)
                self.sink.append((self.module, self.name, ptr_args, kw, error))

        return launch


@contextlib.contextmanager
def _recording(num_sms: int) -> Iterator[list]:
    """Swap every kernel of maws_kernels for a recorder while the scenarios run, and answer each
    module's ``_num_sms`` (a CUDA query) for the target. Everything is put back on exit."""
    sink: list = []
    saved = []
    try:
        for short, mod in kernel_modules().items():
            for name, k in find_kernels(mod).items():
                saved.append((mod, name, k))
                setattr(mod, name, _Recorder(short, name, k, sink))
            if hasattr(mod, "_num_sms"):
                saved.append((mod, "_num_sms", mod._num_sms))
                mod._num_sms = lambda index: num_sms
        yield sink
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


def scenarios(shape_sets: list[CompileShapes]) -> Iterator[tuple[str, Scenario, bool]]:
    """(op module, scenario, spill-free) of every op module's ``compile_scenarios``, per shape set."""
    for shapes in shape_sets:
        for short, mod in kernel_modules().items():
            for sc in getattr(mod, "compile_scenarios", lambda _: ())(shapes):
                yield short, sc, shapes.spill_free


# --- collecting the cases -----------------------------------------------------------------------
def _fake_cuda_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    try:
        with mode:
            torch.empty(1, device="cuda")
    except Exception as e:  # noqa: BLE001 -- say what torch said
        raise RuntimeError(f"this torch cannot make fake CUDA tensors ({e}); the launch configs depend on the "
                           "device, so the compile check needs them") from e
    return mode


def _consts(kwargs: dict) -> str:
    return " ".join(f"nw={v}" if k == "num_warps" else f"{k}={v}" for k, v in kwargs.items())


def collect_cases(shape_sets: list[CompileShapes], arch: int = 90,
                  only: str = "") -> tuple[list[CompileCase], list[str]]:
    """Run the scenarios with recording kernels; returns (unique cases, kernels no scenario launched).

    Launches that specialise identically (same kernel, argument types, divisibility, constexprs and
    options) compile to the same binary and are kept once.
    """
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binders: dict = {}
    fake = _fake_cuda_mode()
    cases: dict = {}
    launched = set()
    everything = {f"{mod}.{name}": k for mod, m in kernel_modules().items() for name, k in find_kernels(m).items()}
    with _recording(SMS.get(arch, SMS[90])) as sink:
        for op, sc, spill_free in scenarios(shape_sets):
            start = len(sink)
            try:
                with fake if sc.device == "cuda" else contextlib.nullcontext():
                    sc.run(sc.device, *sc.args)
            except Exception as e:  # noqa: BLE001 -- a failed case naming the scenario; carry on
                label = f"{'scenario':<21} {sc.label}"
                if only in label:
                    cases[label] = CompileCase(label, "", "", (), {}, spill_free, error=(
                        f"running the launcher failed ({type(e).__name__}: {e}); if the launcher or custom op "
                        f"changed, update {_SCENARIOS.format(op)}"))
            for mod, name, args, kwargs, error in sink[start:]:
                launched.add(f"{mod}.{name}")
                short = name.strip("_").removesuffix("_kernel")
                label = f"{short:<21} {sc.label:<44} {_consts(kwargs)}"
                if only not in label:
                    continue
                if error:
                    cases[label] = CompileCase(label, mod, name, args, kwargs, spill_free, error=error)
                    continue
                if name not in binders:
                    k = _jit(everything[f"{mod}.{name}"])
                    binders[name] = create_function_from_signature(k.signature, k.params, backend)
                # by name: every `x[...](...)` of the package is a kernel launch to test_launch_grids.py
                bind = binders[name]
                _, spec, _ = bind(*args, **kwargs)
                key = (mod, name, repr(spec), repr(sorted(kwargs.items())))
                if key in cases:
                    cases[key].also += 1
                    cases[key].spill_free |= spill_free
                else:
                    cases[key] = CompileCase(label, mod, name, args, kwargs, spill_free)
    return list(cases.values()), sorted(set(everything) - launched)


# --- compiling one case ---------------------------------------------------------------------------
_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_st": re.compile(r"(\d+) bytes spill stores"),
    "spill_ld": re.compile(r"(\d+) bytes spill loads"),
}


def _access_widths(ptx: str) -> dict[str, dict[int, int]]:
    """Global loads and stores by access width in bits: {"ld": {128: 6, 32: 2}, "st": {...}}."""
    out: dict[str, dict[int, int]] = {"ld": {}, "st": {}}
    for op, mods in re.findall(r"\b(ld|st)\.global((?:\.[\w:]+)+)", ptx):
        vec = re.search(r"\.v(\d+)", mods)
        bits = re.search(r"\.[bfsu](\d+)$", mods)
        if bits:
            w = int(bits.group(1)) * (int(vec.group(1)) if vec else 1)
            out[op][w] = out[op].get(w, 0) + 1
    return {op: dict(sorted(h.items(), reverse=True)) for op, h in out.items()}


def compile_case(case: CompileCase, arch: int = 90, asm_dir: str | None = None) -> dict:
    """Compile one case for sm_<arch>; returns a result row (never raises for compiler errors)."""
    res = {"case": case.label, "kernel": f"{case.module}.{case.kernel}", "spill_free": case.spill_free,
           "also": case.also, "args": repr(case.args), "constexprs": dict(case.kwargs)}
    if case.error:
        return {**res, "status": "FAIL", "error": case.error}
    try:
        kernel = _jit(getattr(importlib.import_module(f"maws_kernels.{case.module}"), case.kernel))
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, spec, opts = binder(*case.args, **case.kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, dict(case.kwargs), bound, spec, opts)
        res["signature"] = dict(signature)
        log = io.StringIO()
        # Triton prints ptxas's -v report (registers, spills) when asked; always_compile makes
        # sure ptxas really runs instead of a cached binary being returned.
        with triton.knobs.compilation.scope(), triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            triton.knobs.compilation.always_compile = True
            triton.knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
        for key, rx in _PTXAS.items():
            m = rx.search(log.getvalue())
            res[key] = int(m.group(1)) if m else None
        res["smem"] = getattr(compiled.metadata, "shared", None)
        res["gmem_bits"] = _access_widths(compiled.asm["ptx"])
        spilled = bool(res["spill_st"] or res["spill_ld"])
        res["status"] = "SPILL" if spilled and case.spill_free else "OK"
        if asm_dir:
            os.makedirs(asm_dir, exist_ok=True)
            stem = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", case.label.strip())
            for ext in ("ttgir", "ptx"):
                with open(os.path.join(asm_dir, f"{stem}.{ext}"), "w") as f:
                    f.write(compiled.asm[ext])
    except Exception as e:  # noqa: BLE001 -- report the compiler's own message, then carry on
        # the tail: a CompilationError quotes the source first and says what is wrong last
        res.update(status="FAIL", error=f"{type(e).__name__}: {e}".strip()[-4000:],
                   trace=traceback.format_exc()[-3000:])
    return res


def _compile_star(item):
    return compile_case(*item)


def compile_all(cases: list[CompileCase], arch: int, jobs: int, asm_dir: str | None = None) -> list[dict]:
    """Compile every case, ``jobs`` processes at a time (each case is independent)."""
    items = [(c, arch, asm_dir) for c in cases]
    if jobs <= 1 or len(items) <= 1:
        return [_compile_star(i) for i in items]
    # fork: the workers inherit the imported maws_kernels (no TRITON_INTERPRET re-check needed)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as ex:
        return list(ex.map(_compile_star, items))


# --- report ---------------------------------------------------------------------------------------
def _widths(h: dict) -> str:
    return ",".join(f"{w}x{n}" for w, n in h.items()) or "-"


def _reason(error: str) -> str:
    """The line of an error that says what is wrong (a CompilationError ends with it, after the source)."""
    lines = [ln.strip() for ln in error.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def format_row(r: dict) -> str:
    if r["status"] == "FAIL":
        return f"FAIL  {r['case']}\n      {_reason(r['error'])[:300]}"
    sp = f"{r['spill_st'] or 0}/{r['spill_ld'] or 0}"
    return (f"{r['status']:<5} {r['case']:<110} regs={r['regs']!s:>3} spill={sp:>7} smem={r['smem']!s:>6}"
            f"  ld={_widths(r['gmem_bits']['ld'])} st={_widths(r['gmem_bits']['st'])}")


def summarise(results: list[dict], uncovered: list[str]) -> str:
    """Counts, then each distinct failure once with its full message (one kernel bug fails many cases)."""
    count = {st: sum(r["status"] == st for r in results) for st in ("OK", "SPILL", "FAIL")}
    spilled = sum(r["status"] != "FAIL" and bool(r["spill_st"] or r["spill_ld"]) for r in results)
    out = [f"{len(results)} cases: {count['OK']} OK, {count['FAIL']} FAILED, {spilled} with spills "
           f"({count['SPILL']} in model-zoo configs, which must not spill)"]
    if uncovered:
        out.append(f"kernels no scenario launches (add one to {_SCENARIOS.format('<op>')}): {', '.join(uncovered)}")
    groups: dict[str, list[dict]] = {}
    for r in results:
        if r["status"] == "FAIL":
            groups.setdefault(r["error"], []).append(r)
    for error, rs in groups.items():
        out.append(f"\n--- FAIL in {len(rs)} case(s), e.g. {rs[0]['case'].strip()}\n{error}")
    for r in results:
        if r["status"] == "SPILL":
            out.append(f"--- SPILL: {r['case'].strip()}: {r['spill_st']} / {r['spill_ld']} bytes spilled "
                       f"with {r['regs']} registers")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Compile every maws_kernels Triton kernel for a GPU target, no GPU "
                                            "needed; exit 1 if any case fails or a model-zoo case spills.")
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100 / H200")
    p.add_argument("--only", default="", help="compile only cases whose label contains this")
    p.add_argument("--json", default="", help="write the results (and the environment) to this file")
    p.add_argument("--full", action="store_true", help="also fp16, batch 1 / 32, channels-last, wide/odd sizes")
    p.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="compile processes")
    p.add_argument("--asm-dir", default="", help="write each case's .ttgir and .ptx here")
    return p


def main(argv: list[str] | None = None, env: dict | None = None) -> int:
    """CLI entry: 0 when every case compiles, 1 otherwise (or when a kernel has no scenario), 2 when it
    cannot run. ``env``: the caller's columns for the JSON (device, commit, date, ...)."""
    args = build_parser().parse_args(argv)
    if not HAS_TRITON:
        print(f"compile_kernels: the compile check needs the 'triton' package, which cannot be imported here "
              f"({TRITON_ERROR}); run it where Triton installs (Linux: pip install triton)", file=sys.stderr)
        return 2
    try:
        cases, uncovered = collect_cases(model_zoo_shapes(args.full), args.arch, args.only)
    except RuntimeError as e:  # interpreted kernels, or a torch that cannot fake CUDA tensors
        print(f"compile_kernels: {e}", file=sys.stderr)
        return 2
    uncovered = [] if args.only else uncovered
    if not cases:
        print(f"compile_kernels: no case label contains {args.only!r}", file=sys.stderr)
        return 1
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}, "
          f"{len(cases)} cases ({'full' if args.full else 'model-zoo'} set)", flush=True)
    results = compile_all(cases, args.arch, args.jobs, args.asm_dir or None)
    for r in results:
        print(format_row(r))
    print("\n" + summarise(results, uncovered))
    if args.json:
        env = env if env is not None else {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
                                           "command": " ".join(sys.argv)}
        with open(args.json, "w") as f:
            json.dump({**env, "triton": triton.__version__, "arch": args.arch, "full": args.full,
                       "kernels_without_cases": uncovered, "results": results}, f, indent=1, default=repr)
    return 1 if uncovered or any(r["status"] != "OK" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
