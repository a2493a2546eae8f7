"""Configuration: a tree of dataclasses, YAML files, and ``--section.key=value`` overrides.

Every field carries its one-line help next to its definition (:func:`setting`; ``maws-train
--help-config`` lists them with type and default, :func:`config_help`) and is validated in
``__post_init__``; unknown keys, bad values and unreadable YAML raise
:class:`~maws_fast.errors.ConfigError` naming the key or the file position. Model presets are plain
functions.

The modules, from the ground up: ``fields`` (a field with its help, the check, the accepted names),
``stages`` (the stages' sections and their shared ``augment``), ``schema`` (the root and the other
sections, ``data.dali`` among them), ``presets``, ``resolve`` (defaults that depend on the device and
the world), ``renames`` (old keys still read, one release), ``binder`` (YAML, overrides, help).
Importing this package imports no torch.
"""
from maws_fast.config.binder import CliText, config_from_dict, config_help, load_config, parse_overrides
from maws_fast.config.fields import (
    ATTN_BACKENDS, CHECKPOINT_MODES, DALI_OUTPUTS, DEFAULT_STAGES, FORMATS, LOADERS, PARALLEL_ENGINES, STAGES, setting,
)
from maws_fast.config.presets import (
    PRESETS, model_preset, preset_tiny, preset_vit_2b14, preset_vit_6_5b14, preset_vit_b16, preset_vit_h14,
    preset_vit_l16,
)
from maws_fast.config.renames import RENAMED
from maws_fast.config.resolve import resolve_defaults, resolve_parallel, resolve_run
from maws_fast.config.schema import (
    Config, DaliSettings, DataConfig, EvalConfig, ModelConfig, ParallelConfig, RunConfig, section_names,
)
from maws_fast.config.stages import Augment, FinetuneConfig, LiTConfig, MAEConfig, OptimConfig, WSPConfig
from maws_fast.errors import ConfigError

__all__ = [
    "ATTN_BACKENDS", "CHECKPOINT_MODES", "DALI_OUTPUTS", "DEFAULT_STAGES", "FORMATS", "LOADERS", "PARALLEL_ENGINES",
    "PRESETS", "RENAMED", "STAGES",
    "Augment", "CliText", "Config", "ConfigError", "DaliSettings", "DataConfig", "EvalConfig", "FinetuneConfig",
    "LiTConfig", "MAEConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "RunConfig", "WSPConfig",
    "config_from_dict", "config_help", "load_config", "model_preset", "parse_overrides", "preset_tiny",
    "preset_vit_2b14", "preset_vit_6_5b14", "preset_vit_b16", "preset_vit_h14", "preset_vit_l16",
    "resolve_defaults", "resolve_parallel", "resolve_run", "section_names", "setting",
]
