"""``maws-ckpt``: sharded checkpoint tools (``consolidate``: one timm-keyed model.safetensors)."""
from __future__ import annotations

import argparse

from maws_fast.cli.common import fail, quiet_broken_pipe
from maws_fast.errors import UserError


@quiet_broken_pipe
def ckpt_main(argv: list[str] | None = None) -> int:
    """maws-ckpt consolidate CKPT_DIR OUT.safetensors"""
    parser = argparse.ArgumentParser(prog="maws-ckpt", description="Sharded checkpoint tools.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("consolidate", help="merge a sharded checkpoint into one model.safetensors (timm keys)")
    p.add_argument("ckpt", help="sharded checkpoint directory, e.g. out/mae/step_00000200")
    p.add_argument("out", help="output file, e.g. model.safetensors")
    args = parser.parse_args(argv)
    try:
        from maws_fast.parallel.checkpoint import export_safetensors

        out = export_safetensors(args.ckpt, args.out)
    except UserError as e:
        return fail("maws-ckpt", e)
    print(f"wrote {out}")
    return 0
