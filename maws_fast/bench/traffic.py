"""Counted memory traffic, GEMM FLOPs and saved activations of one eager training step.

The rule (docs/ARCHITECTURE.md, "Performance physics"): over one forward + backward, every
non-GEMM, non-view op adds the bytes of its distinct tensor inputs and outputs -- what an unfused
GPU kernel reads and writes. A tensor counts its memory footprint (an expanded dim costs nothing),
an argument an op updates in place counts twice (read and write) unless the op only writes it
(``copy_``, ``fill_``, ``zero_``). A maws_kernels custom op counts what it actually runs: the
aten ops of its implementation plus, for every Triton launch, the footprint of each distinct
tensor argument. GEMMs (mm, addmm, bmm, convolution and their backward) are not memory traffic;
their FLOPs are counted instead (2 per multiply-add). Attention kernels count both.
Per image = (count at batch 2B - count at batch B) / B, so per-step costs (weight casts, bias
gradients' outputs, parameter-sized buffers) drop out.

Everything runs on fake tensors (``FakeTensorMode``): shapes and dtypes without a single FLOP, so a
ViT-L/16 step is counted in seconds on a laptop. The tensors are CPU tensors (a CPU build of torch
cannot run autograd on fake CUDA tensors), so the counter makes the CPU take the GPU's path:
maws_kernels ops are asked for the ``triton`` backend (their launches are recorded, not run) and
CPU bf16 autocast stands in for CUDA's. The two autocast policies agree on every op these models
call except LayerNorm, which CUDA autocast runs in fp32: the maws_kernels ops are not autocast
at all, and the baseline's LayerNorms already see fp32 inputs, so the dtype flow is the GPU's.
"""
from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
_GEMMS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.addbmm.default,
          aten.convolution.default, aten.convolution_backward.default}
# Ops that write their first argument without reading it.
_WRITE_ONLY = {"copy_", "fill_", "zero_", "uniform_", "normal_", "random_", "bernoulli_", "exponential_"}
# Allocation and metadata: no memory traffic.
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
         "device", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_local_scalar_dense", "set_", "resize_"}
_ATTENTION = ("scaled_dot_product", "attention")  # op-name fragments of attention kernels (aten and ours)


def footprint(t: torch.Tensor) -> int:
    """Bytes of memory ``t`` spans: stride-0 (expanded) dims are read once, not ``size`` times."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _distinct_bytes(tensors: list[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        k = _key(t)
        if k not in seen:
            seen.add(k)
            total += footprint(t)
    return total


def _attention_flops(name: str, args) -> float:
    """Model FLOPs of an attention op, 4*B*H*Nq*Nk*D forward and twice that backward (recomputation
    inside a flash backward is not model work), from q and k: the first two tensor arguments, or a
    packed (B, N, 3, H, D) qkv among them (``attention_qkvpacked``)."""
    ts = _tensors(args)
    packed = next((t for t in ts[:2] if t.dim() == 5 and t.shape[2] == 3), None)
    if packed is not None:
        B, N, _, H, D = packed.shape
        fwd = 4.0 * B * H * N * N * D
    elif len(ts) >= 2 and ts[0].dim() >= 3:
        fwd = 4.0 * ts[0].numel() * ts[1].shape[-2]
    else:
        return 0.0
    return 2 * fwd if "backward" in name or "bwd" in name else fwd


def gemm_flops(func, args, out) -> float:
    """2 x multiply-adds of a GEMM / convolution call."""
    if func in (aten.mm.default, aten.bmm.default):
        a, b = args[0], args[1]
        return 2.0 * a.numel() * b.shape[-1]
    if func in (aten.addmm.default, aten.baddbmm.default, aten.addbmm.default):
        a, b = args[1], args[2]
        return 2.0 * a.numel() * b.shape[-1]
    if func == aten.convolution.default:
        w = args[1]
        return 2.0 * out.numel() * w[0].numel()  # out elements x (C_in/groups * kh * kw)
    if func == aten.convolution_backward.default:
        grad_out, w, mask = args[0], args[2], args[-1]
        one = 2.0 * grad_out.numel() * w[0].numel()
        return one * (int(mask[0]) + int(mask[1]))  # grad input and / or grad weight
    return 0.0


@dataclass
class Tally:
    """What one counted region did: memory-bound bytes and FLOPs per op name."""

    bytes_by_op: dict = field(default_factory=lambda: defaultdict(int))
    gemm_flops: float = 0.0
    attn_flops: float = 0.0
    saved_bytes: int = 0  # what saved_tensors_hooks see autograd save (nothing inside a checkpointed region)
    live_bytes: int = 0  # storages made in forward and still alive when it returns: saved activations in any mode
    launches: int = 0
    # Per counted call: (bytes, flops) -- the roofline prediction takes the max of the two per call.
    calls: list = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(self.bytes_by_op.values())

    def add(self, name: str, nbytes: int, flops: float = 0.0) -> None:
        self.bytes_by_op[name] += nbytes
        self.calls.append((nbytes, flops))

    def roofline_seconds(self, tflops: float, tbps: float) -> float:
        """Predicted time: GEMMs at peak FLOP/s, each other kernel at max(bytes / bandwidth,
        FLOPs / peak), run one after another (no overlap)."""
        peak, bw = tflops * 1e12, tbps * 1e12
        return self.gemm_flops / peak + sum(max(b / bw, f / peak) for b, f in self.calls)


class TrafficCounter(TorchDispatchMode):
    """Counts every op dispatched while active into a :class:`Tally` (see the module docstring)."""

    def __init__(self, tally: Tally, target: list):
        super().__init__()
        self.tally, self.target = tally, target  # target: where recorded launches go, [tally, op]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "maws_kernels":
            return self._custom_op(func, args, kwargs)
        out = func(*args, **kwargs)
        self._count(func, args, kwargs, out)
        return out

    def _count(self, func, args, kwargs, out) -> None:
        name = func._schema.name.split("::")[-1]
        if func in _GEMMS:
            self.tally.gemm_flops += gemm_flops(func, args, out)
            return
        if name in _FREE:
            return
        ins, outs = _tensors((args, kwargs)), _tensors(out)
        in_storages = {t.untyped_storage()._cdata for t in ins}
        mutated = [a for a, arg in zip(args, func._schema.arguments)
                   if isinstance(a, torch.Tensor) and arg.alias_info is not None and arg.alias_info.is_write]
        if not mutated and outs and all(t.untyped_storage()._cdata in in_storages for t in outs):
            return  # a view: no data moves
        if name.rstrip("_") + "_" in _WRITE_ONLY and mutated:
            nbytes = _distinct_bytes(ins + outs)  # the destination is written, never read
        else:
            nbytes = _distinct_bytes(ins + outs) + sum(footprint(t) for t in mutated)  # read + write in place
        flops = _attention_flops(name, args) if any(f in name for f in _ATTENTION) else 0.0
        self.tally.attn_flops += flops
        self.tally.add(f"aten.{name}", nbytes, flops)

    def _custom_op(self, func, args, kwargs):
        """Run the op's real implementation with its Triton kernels recorded instead of launched."""
        from torch._library.custom_ops import OPDEFS

        qualname = func._schema.name
        opdef = OPDEFS.get(qualname)
        if opdef is None:
            out = func(*args, **kwargs)
            self._count(func, args, kwargs, out)
            return out
        name = qualname.replace("::", ".")
        inner = TrafficCounter(Tally(), self.target)
        outer = list(self.target)
        self.target[:] = [inner.tally, name]
        try:
            with inner:
                out = opdef._init_fn(*args, **kwargs)
        finally:
            self.target[:] = outer
        t = inner.tally
        self.tally.gemm_flops += t.gemm_flops
        self.tally.launches += t.launches
        for n, b in t.bytes_by_op.items():
            self.tally.bytes_by_op[n if n.startswith("triton") else f"{name}/{n}"] += b
        flops = _attention_flops(name, args) if "attention" in name else 0.0
        self.tally.attn_flops += flops
        self.tally.calls.extend(t.calls[:-1])
        if t.calls:  # the op's flops ride on its last call (its main kernel for attention)
            b, f = t.calls[-1]
            self.tally.calls.append((b, f + flops))
        elif flops:
            self.tally.calls.append((0, flops))
        return out


class _LaunchRecorder:
    """Stands in for a Triton kernel: ``rec[grid](*args)`` adds the launch's tensor footprints to
    the tally of the custom op running it (``target``: [tally, op name], set by the counter)."""

    def __init__(self, target: list, kernel: str):
        self.target, self.kernel = target, kernel.strip("_")

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            tally, op = self.target
            tally.launches += 1
            tally.add(f"triton {op}:{self.kernel}", _distinct_bytes(_tensors((args, kwargs))))
        return launch


def _kernels() -> list[tuple[object, str, object]]:
    """(module, name, kernel) of every ``*_kernel`` of maws_kernels -- jitted, autotuned or interpreted
    (the compile check's ``find_kernels`` accepts compilable ones only)."""
    from maws_kernels.compile_check import kernel_modules

    return [(mod, n, v) for mod in kernel_modules().values() for n, v in vars(mod).items()
            if n.endswith("_kernel") and hasattr(v, "fn")]


@contextlib.contextmanager
def _recording_launches(target: list) -> Iterator[None]:
    """Swap every maws_kernels kernel (a module global its launcher looks up at call time) for a
    recorder; everything is put back on exit."""
    saved = _kernels()
    try:
        for mod, name, _ in saved:
            setattr(mod, name, _LaunchRecorder(target, name))
        yield
    finally:
        for mod, name, k in saved:
            setattr(mod, name, k)


@contextlib.contextmanager
def _saved_activations(tally: Tally) -> Iterator[None]:
    """Sum the distinct storages autograd saves for backward."""
    seen: set = set()

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s._cdata not in seen:
            seen.add(s._cdata)
            tally.saved_bytes += s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


class LiveOutputs(TorchDispatchMode):
    """Holds every storage an op makes while active; :meth:`live_bytes` sums those something else
    still references (a tensor or view alive, autograd's saved copy, a checkpoint's inputs or its
    selective policy's cache). Right after a forward that is the activation memory it leaves for
    backward, whatever keeps it: the saved-tensor hooks see nothing inside a checkpointed region.
    On fake tensors holding the storages costs nothing."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, torch.UntypedStorage] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in _tensors(out):
            s = t.untyped_storage()
            self.storages.setdefault(s._cdata, s)
        return out

    def live_bytes(self) -> int:
        """Bytes of the held storages referenced from elsewhere; then lets go of them all."""
        import gc

        gc.collect()
        total = sum(s.nbytes() for s in self.storages.values() if torch._C._storage_Use_Count(s._cdata) > 1)
        self.storages.clear()
        return total


@contextlib.contextmanager
def gpu_path() -> Iterator[None]:
    """Let maws_kernels' ``triton`` backend be chosen for CPU (fake) tensors: the counter records
    its launches, so nothing is interpreted or run."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # read by maws_kernels' backend resolution at call time
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = old


def count_step(build: Callable[[], Callable[[int], Callable[[], torch.Tensor]]], batch: int) -> Tally:
    """Count one forward + backward on fake tensors.

    Args:
        build: called inside the fake mode, returns ``make(batch)``, which makes the inputs (not
            counted) and returns ``loss_fn()``: the counted forward (autocast applied inside).
        batch: the batch size to count at.
    """
    tally = Tally()
    with FakeTensorMode(allow_non_fake_inputs=True), gpu_path():
        loss_fn = build()(batch)
        target = [tally, "?"]
        live = LiveOutputs()
        with _recording_launches(target), live, TrafficCounter(tally, target), _saved_activations(tally):
            loss = loss_fn()
            tally.live_bytes = live.live_bytes() - loss.untyped_storage().nbytes()
            loss.backward()
    return tally


@dataclass
class PerImage:
    """Marginal cost of one more image in the batch, from counts at B and 2B."""

    bytes: float
    gemm_flops: float
    attn_flops: float
    saved_bytes: float
    live_bytes: float
    bytes_by_op: dict
    seconds: Callable[[float, float], float]  # (peak TFLOP/s, TB/s) -> predicted seconds per image


def per_image(build: Callable[[], Callable[[int], Callable[[], torch.Tensor]]], batch: int = 8) -> PerImage:
    """(count at 2*batch - count at batch) / batch, for every quantity of :class:`Tally`."""
    a, b = count_step(build, batch), count_step(build, 2 * batch)
    ops = {k: (b.bytes_by_op.get(k, 0) - a.bytes_by_op.get(k, 0)) / batch for k in set(a.bytes_by_op) | set(b.bytes_by_op)}
    ops = {k: v for k, v in sorted(ops.items(), key=lambda kv: -kv[1]) if v}
    return PerImage(
        bytes=(b.bytes - a.bytes) / batch, gemm_flops=(b.gemm_flops - a.gemm_flops) / batch,
        attn_flops=(b.attn_flops - a.attn_flops) / batch, saved_bytes=(b.saved_bytes - a.saved_bytes) / batch,
        live_bytes=(b.live_bytes - a.live_bytes) / batch,
        bytes_by_op=ops,
        seconds=lambda tf, bw: (b.roofline_seconds(tf, bw) - a.roofline_seconds(tf, bw)) / batch)
