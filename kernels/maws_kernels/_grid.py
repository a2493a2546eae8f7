"""CUDA's launch-grid limits, checked on the host before a Triton launch.

A grid past a limit does not fail where the shape is chosen: ``cuLaunchKernel`` rejects it deep
inside Triton with an "invalid argument" that names neither the kernel nor the shape. Axis x takes
up to 2**31 - 1 programs, axes y and z only 65535 each (CUDA programming guide, "Compute
Capabilities" table; the same on every arch since sm_30), so anything that grows with the batch
belongs on axis x (or folded into it), never on y or z.

Every launcher keeps these limits at every shape the project's fit table allows
(``tests/kernels/test_launch_grids.py`` records each launch at those shapes). The launchers whose
grid could still pass a limit for a shape that fits in GPU memory call :func:`check_grid`:
attention (dense with N = 1 and a huge B * H, or varlen with many sequences and one long one),
bias_gelu's forward (column tiles on axis y: rows wider than 65535 * 1024), the soft-target CE
(rows on x, column chunks on y: V > 65535 * 4096), norm_pix_loss and masked_patchify (one program
per patch: 2**31 patches at p = 1). The others cannot: the layer_norm / add_layer_norm forwards
would need ~7e10 rows (with their outputs and fp32 row statistics far past any GPU's memory), their
backwards and bias_gelu's run a fixed number of persistent programs (2 per SM), the column
reductions take one program per 16 or more columns, and AdamW (flat or multi-tensor, one program per
1024 elements) would need a 2**41-element (8 TB) shard.
"""
from __future__ import annotations

# Most programs per launch on grid axes x, y, z.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def check_grid(kernel: str, grid: tuple[int, ...], shape: str) -> tuple[int, ...]:
    """``grid`` itself when every axis is within CUDA's limits, else a ValueError.

    Args:
        kernel: the kernel's name, for the message (e.g. "attention forward").
        grid: the launch grid, 1 to 3 ints.
        shape: what the grid was computed from, for the message (e.g. "B=20472 H=16 N=197").

    Raises:
        ValueError: naming the kernel, the shape, the axis and its limit.
    """
    if not 1 <= len(grid) <= 3:
        raise ValueError(f"maws_kernels: {kernel} at {shape}: a launch grid has 1 to 3 axes, got {tuple(grid)}")
    for axis, (n, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if n > limit:
            raise ValueError(
                f"maws_kernels: {kernel} at {shape} needs {n} programs on grid axis {'xyz'[axis]} (grid "
                f"{tuple(grid)}), past CUDA's limit of {limit} on that axis; split the input into smaller "
                "calls or use backend='torch'")
    return grid
