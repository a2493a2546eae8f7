"""Autotuned choices as data: saved with a checkpoint, restored in a resumed process, pinned for tools.

Triton's ``@triton.autotune`` picks a config (tile sizes, warps, stages) per process, the first time a
kernel meets a key (sequence length, head block, dtypes, ...), by timing every candidate. Two processes
can pick differently (timings are noisy), and two tiles round differently: a resumed run would then
not reproduce the uninterrupted one bit for bit. :func:`choices` reads every autotuned kernel's picks
as JSON-able data; :func:`restore` puts them back into a fresh process's autotuners before the first
launch, so the resumed process reuses them and benchmarks nothing it already decided.

:func:`pinned` restricts every autotuned kernel to one of its configs for a while (a sanitizer run,
which would otherwise time every candidate under instrumentation).

Only the autotuners' own public-ish attributes are used (``configs``, ``cache``, ``early_config_prune``,
``Config.kwargs`` / ``num_warps`` / ``num_stages`` / ``num_ctas``), which Triton 3.6 and 3.7 share.

What is saved is what a resumed process could not decide alone: a pick among several of the kernel's
configs. Where the kernel's prune leaves one config for a key (fp32 attention: one small tile), the
pick is not recorded; that key has nothing to time and lands on the same config again. Each kernel's
picks are saved with a fingerprint of the module that defines it (its source): after any change to
that module (its configs, its prune rules, the kernel itself) the picks are dropped with one line and
tuned again, since an old pick could be a config the new prune forbids at that key.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
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
    """The launch parameters that tell configs apart (not fields a newer Triton may add to ``all_kwargs``)."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages,
            "num_ctas": getattr(config, "num_ctas", 1)}


def _params(config) -> tuple:
    return tuple(sorted(_config_dict(config).items()))


def _fingerprint(name: str) -> str:
    """sha256 (16 hex digits) of the source of the module that defines kernel ``name``."""
    mod = importlib.import_module(f"maws_kernels.{name.split('.', 1)[0]}")
    return hashlib.sha256(inspect.getsource(mod).encode()).hexdigest()[:16]


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def choices() -> dict:
    """Every autotuned kernel's picks among its configs so far, JSON-able:
    ``{"triton": version, "kernels": {name: {"module": fingerprint, "picks": [[key, config], ...]}}}``, each key a
    list (sequence length, head block, flags, dtype names, ...) and each config its launch parameters
    (``BLOCK_M``, ``num_warps``, ...). Kernels with no such pick are left out."""
    kernels = {}
    for name, tuner in autotuners().items():
        own = {_params(c) for c in tuner.configs}
        picks = [[list(key), _config_dict(cfg)] for key, cfg in tuner.cache.items() if _params(cfg) in own]
        if picks:
            kernels[name] = {"module": _fingerprint(name), "picks": picks}
    return {"triton": _triton_version(), "kernels": kernels}


def restore(saved: dict | None) -> list[str]:
    """Put :func:`choices` of an earlier process back into this process's autotuners (before their
    first launch, or over what they picked since). Returns one line per kernel whose picks could not
    all be restored (an unknown kernel, a changed module, a config the kernel no longer has): those
    keys are tuned again, so the resumed run may round differently there. The Triton version is not
    compared: a pick that is still one of the kernel's configs, under an unchanged module, is restored."""
    if not saved:
        return []
    tuners, problems = autotuners(), []
    for name, entry in (saved.get("kernels") or {}).items():
        picks = entry.get("picks", []) if isinstance(entry, dict) else []
        tuner = tuners.get(name)
        if tuner is None:
            problems.append(f"{name}: no such autotuned kernel in this maws_kernels; its {len(picks)} pick(s) are "
                            "tuned again")
            continue
        if entry.get("module") != _fingerprint(name):
            problems.append(f"{name}: its module changed since the checkpoint (configs, prune rules or the kernel); "
                            f"its {len(picks)} pick(s) are tuned again")
            continue
        by_params = {_params(c): c for c in tuner.configs}
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
def pinned() -> Iterator[list[str]]:
    """Within the block, every autotuned kernel launches the first config its own prune allows for each
    key (the config list and the prune rules stay: fp32 still gets its small tile, a 128-wide head block
    still avoids the tiles that spill), so the timing is of one candidate and each launch compiles one
    variant; picks made before are set aside and put back afterwards. Yields the kernels' names."""
    tuners = autotuners()
    saved = {name: (t.early_config_prune, dict(t.cache)) for name, t in tuners.items()}

    def first_allowed(prune):
        def pick(configs, named_args, **kwargs):
            return (prune(configs, named_args, **kwargs) if prune else configs)[:1]
        return pick

    try:
        for t in tuners.values():
            t.early_config_prune = first_allowed(t.early_config_prune)
            t.cache.clear()
        yield sorted(tuners)
    finally:
        for name, t in tuners.items():
            t.early_config_prune, cache = saved[name]
            t.cache.clear()
            t.cache.update(cache)
