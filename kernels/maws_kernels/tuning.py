"""Autotuned choices as data: saved with a checkpoint, restored in a resumed process, pinned for tools.

Triton's ``@triton.autotune`` picks a config (tile sizes, warps, stages) per process, the first time a
kernel meets a key (sequence length, head block, dtypes, ...), by timing every candidate. Two processes
can pick differently (timings are noisy), and two tiles round differently: a resumed run would then
not reproduce the uninterrupted one bit for bit. :func:`choices` reads every autotuned kernel's picks
as JSON-able data; :func:`restore` puts them back into a fresh process's autotuners before the first
launch, so the resumed process reuses them and benchmarks nothing it already decided.

:func:`pinned` restricts every autotuned kernel to one of its configs for a while (a sanitizer run,
which would otherwise time every candidate under instrumentation).

Only the autotuners' own public-ish attributes are used (``configs``, ``cache``, ``Config.all_kwargs``),
which Triton 3.6 and 3.7 share. A choice is restored only as one of the kernel's current configs (an
upgrade that dropped a config drops that choice: the kernel tunes that key again).
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Any, Iterator

# The modules that define autotuned kernels. Scanned by attribute, so a new autotuned kernel in one of
# them is found without a list of kernel names.
_MODULES = ("maws_kernels.attention", "maws_kernels.layer_norm", "maws_kernels.add_layer_norm",
            "maws_kernels.bias_gelu", "maws_kernels.cross_entropy", "maws_kernels.norm_pix_loss",
            "maws_kernels.patch", "maws_kernels.adamw", "maws_kernels.contrastive")


def _is_autotuner(obj: Any) -> bool:
    return (type(obj).__name__ == "Autotuner" and isinstance(getattr(obj, "cache", None), dict)
            and isinstance(getattr(obj, "configs", None), list))


def autotuners() -> dict[str, Any]:
    """``{"<module>.<kernel>": Autotuner}`` of every autotuned maws_kernels kernel (none without Triton)."""
    found = {}
    for name in _MODULES:
        mod = importlib.import_module(name)
        for attr, obj in vars(mod).items():
            if _is_autotuner(obj):
                found[f"{name.rsplit('.', 1)[1]}.{attr}"] = obj
    return found


def _config_dict(config) -> dict:
    return {k: v for k, v in config.all_kwargs().items() if isinstance(v, (int, float, str, bool))}


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def choices() -> dict:
    """Every autotuned kernel's picks so far: ``{"triton": version, "kernels": {name: [[key, config], ...]}}``
    with each key a list (sequence length, head block, flags, dtype names, ...) and each config the
    launch parameters (``BLOCK_M``, ``num_warps``, ...). JSON-able; empty lists where nothing was tuned."""
    kernels = {}
    for name, tuner in autotuners().items():
        picks = [[list(key), _config_dict(cfg)] for key, cfg in tuner.cache.items()]
        if picks:
            kernels[name] = picks
    return {"triton": _triton_version(), "kernels": kernels}


def restore(saved: dict | None) -> list[str]:
    """Put :func:`choices` of an earlier process back into this process's autotuners (before their
    first launch, or over what they picked since). Returns one line per choice that could not be
    restored (an unknown kernel, or a config the kernel no longer has): those keys are tuned again,
    so the resumed run may round differently there. A choice saved under another Triton version is
    restored all the same where the kernel still has that config."""
    if not saved:
        return []
    tuners, problems = autotuners(), []
    for name, picks in (saved.get("kernels") or {}).items():
        tuner = tuners.get(name)
        if tuner is None:
            problems.append(f"{name}: no such autotuned kernel in this maws_kernels; its {len(picks)} choice(s) "
                            "are tuned again")
            continue
        by_params = {tuple(sorted(_config_dict(c).items())): c for c in tuner.configs}
        for key, params in picks:
            config = by_params.get(tuple(sorted(params.items())))
            if config is None:
                problems.append(f"{name}: config {params} for key {key} is not among the kernel's configs now; "
                                "that key is tuned again")
                continue
            tuner.cache[tuple(key)] = config
    return problems


def clear() -> None:
    """Forget every pick (as a fresh process): the next launch of each key tunes again."""
    for tuner in autotuners().values():
        tuner.cache.clear()


@contextlib.contextmanager
def pinned(index: int = 0) -> Iterator[dict[str, str]]:
    """Within the block, every autotuned kernel has one config, its ``index``-th (clamped to the last),
    so no candidate is timed and each launch compiles one variant; picks made before are set aside and
    put back afterwards. Yields ``{kernel: config as text}``. The kernels' prune rules do not apply to
    a single config: pin where the pinned config suits every input (a sanitizer run on fp16 / bf16)."""
    tuners = autotuners()
    saved = {name: (t.configs, dict(t.cache)) for name, t in tuners.items()}
    try:
        for t in tuners.values():
            t.configs = [t.configs[min(index, len(t.configs) - 1)]]
            t.cache.clear()
        yield {name: str(t.configs[0]) for name, t in tuners.items()}
    finally:
        for name, t in tuners.items():
            t.configs, cache = saved[name]
            t.cache.clear()
            t.cache.update(cache)
