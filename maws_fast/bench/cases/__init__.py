"""One module per op: ``cases(shapes, dtype, device) -> Iterator[Case]`` (see maws_fast.bench.kernels)."""
