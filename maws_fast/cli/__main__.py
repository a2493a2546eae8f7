"""``python -m maws_fast.cli ...`` is ``maws-train ...`` (``torchrun -m maws_fast.cli`` starts ranks this way)."""
import sys

from maws_fast.cli.train import train_main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())
