"""``maws-train``: the recipe (MAE -> WSP -> evaluation) for a config; also ``python -m maws_fast.cli``.

Errors a user can cause end as one line on stderr and exit status 2; no traceback.
"""
from __future__ import annotations

import argparse
import sys

from maws_fast.cli.common import fail, quiet_broken_pipe
from maws_fast.errors import ConfigError, UserError


def _record(fn):
    """Under torchrun, its error-file hook: a rank's unexpected exception reaches torchrun's failure summary."""
    import functools
    import os

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "TORCHELASTIC_ERROR_FILE" not in os.environ:  # not launched by torchrun: nothing to report to
            return fn(*args, **kwargs)
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(fn)(*args, **kwargs)

    return wrapper


# What each stage of maws_fast.config.STAGES is called in --help; a stage missing here shows its own name.
_STAGE_WORDS = {"mae": "MAE pre-pretraining", "wsp": "weakly supervised pretraining (WSP)", "finetune": "fine-tuning",
                "lit": "LiT (zero-shot)", "linprobe": "linear probe + few-shot"}


def recipe_description() -> str:
    """The recipe in --help, from the stage list: the pretraining chain, then the stages that each start from WSP."""
    from maws_fast.config import STAGES

    words = [_STAGE_WORDS.get(s, s) for s in STAGES]
    k = STAGES.index("wsp") + 1
    return " -> ".join(words[:k] + [", ".join(words[k:])]) + "."


@quiet_broken_pipe
@_record
def train_main(argv: list[str] | None = None) -> int:
    """maws-train --config FILE [--data DIR] [--out DIR] [--section.key=value ...]

    One process, or one per device under ``torchrun --no-python maws-train ...``.
    """
    from maws_fast.config import section_names  # the config imports no torch: cheap before --help

    parser = argparse.ArgumentParser(
        prog="maws-train",
        description=recipe_description(),
        epilog="Any config field can be overridden: --mae.epochs=2 --run.stages=[mae,wsp] --model.attn_backend=manual. "
               "--help-config lists every field with its type, default and help (--help-config SECTION: one section).",
    )
    parser.add_argument("--config", help="YAML config (e.g. configs/demo_fmnist.yaml); defaults apply without one")
    parser.add_argument("--data", metavar="DIR", help="the Fashion-MNIST directory of the demo data (same as "
                        "--data.root=DIR); JPEG data is --data.train=DIR (and --data.eval_train / --data.eval_val)")
    parser.add_argument("--out", help="output directory (same as --run.out_dir=DIR)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--help-config", nargs="?", const="", metavar="SECTION",
                        help=f"list every config field (or one section's: {', '.join(section_names())}) "
                             "with its type, default and help, and exit")
    args, rest = parser.parse_known_args(argv)
    try:
        from maws_fast.config import config_help, load_config

        if args.help_config is not None:
            print(config_help(args.help_config or None))
            return 0

        overrides = list(rest)
        if args.data:
            overrides.append(f"--data.root={args.data}")
        if args.out:
            overrides.append(f"--run.out_dir={args.out}")
        cfg = load_config(args.config, overrides)
        if args.data and cfg.data.dataset != "fmnist":
            raise ConfigError(f"--data {args.data} sets data.root, the Fashion-MNIST directory, which a "
                              f"data.dataset={cfg.data.dataset} run does not read; give the JPEGs as "
                              f"--data.train={args.data} (and the labelled sets as --data.eval_train / --data.eval_val)")
        if args.print_config:
            print(cfg.to_json())
            return 0
        from maws_fast.train.recipe import run_recipe

        run_recipe(cfg)
    except UserError as e:
        return fail("maws-train", e)
    except KeyboardInterrupt:
        print("maws-train: interrupted; completed checkpoints are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    return 0
