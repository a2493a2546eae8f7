"""What every config section is made of: a field with its help, a check that names its key, and
the names the config accepts.

The code that implements each name checks against these tuples; config imports neither torch nor
the models, so reading a config is cheap.
"""
from __future__ import annotations

from dataclasses import field

from maws_fast.errors import ConfigError

ATTN_BACKENDS = ("triton", "sdpa", "xformers", "manual")  # maws_kernels.nn implements each
LOADERS = ("reference", "pil", "dali")
FORMATS = ("webdataset", "folder", "filelist")
DALI_OUTPUTS = ("float32", "uint8")  # maws_fast.data.dali delivers each
PARALLEL_ENGINES = ("ours", "fsdp2", "ddp")  # maws_fast.parallel.engine.build_engine builds each
STAGES = ("mae", "wsp", "finetune", "lit", "linprobe")
DEFAULT_STAGES = ("mae", "wsp", "finetune", "linprobe")
CHECKPOINT_MODES = ("none", "full", "selective")  # maws_fast.models.vit.set_block_options implements each


def check(cond: bool, key: str, msg: str) -> None:
    """Raise ConfigError ``config: <key>: <msg>`` unless ``cond``.

    A section shared by several parents (the stages' optimizer fields, ``augment``) names its key
    relative to itself (``epochs``, ``crop_scale``); the binder puts the dotted path in front.
    """
    if not cond:
        raise ConfigError(f"config: {key}: {msg}")


def setting(default, help: str):
    """A config field with its one-line help. A mutable default (a list, a section) is given as a
    zero-argument function (``lambda: [5]``, ``RunConfig``), as dataclasses require."""
    if callable(default):
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})
