"""maws-train under torchrun with a fault injected on rank 1 (test driver, not a product file).

FAULT=step: rank 1 raises a UserError in the forward of step 3.
FAULT=save: rank 1's second checkpoint write fails with "No space left on device".
FAULT=sigterm: rank 1 sends itself SIGTERM during step 3 (as a preempting scheduler would, to one rank).
FAULT=kill: rank 1 SIGKILLs itself during step 3 of the job's first attempt (torchrun restart count 0).
FAULT=stop: rank 1 SIGSTOPs itself during step 3 (alive but stuck: it never runs again).
"""
import os
import signal
import sys


def at_step_3(action) -> None:
    """Run ``action()`` at the start of the MAE forward of step 3 (index), on this rank."""
    from maws_fast.train import objectives

    real_forward = objectives.MAEObjective.forward

    def forward(self, imgs, targets, step, *args):
        if step == 3:
            action()
        return real_forward(self, imgs, targets, step, *args)

    objectives.MAEObjective.forward = forward


def fail() -> None:
    from maws_fast.errors import UserError

    raise UserError("simulated failure on rank 1 at step 3")


if os.environ.get("RANK") == "1":
    fault = os.environ.get("FAULT")
    if fault == "step":
        at_step_3(fail)
    elif fault == "save":
        from maws_fast.parallel import checkpoint

        real_write, calls = checkpoint.write_tensors, []

        def failing_write(path, tensors):
            calls.append(path)
            if len(calls) == 2:  # the second checkpoint's shard: the first checkpoint must survive
                raise OSError(28, "No space left on device")
            real_write(path, tensors)

        checkpoint.write_tensors = failing_write
    elif fault == "sigterm":
        at_step_3(lambda: os.kill(os.getpid(), signal.SIGTERM))
    elif fault == "kill" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        at_step_3(lambda: os.kill(os.getpid(), signal.SIGKILL))
    elif fault == "stop":
        at_step_3(lambda: os.kill(os.getpid(), signal.SIGSTOP))

from maws_fast.cli.train import train_main  # noqa: E402

sys.exit(train_main(sys.argv[1:]))
