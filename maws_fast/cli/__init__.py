"""The command line, layer 7 (docs/ARCHITECTURE.md): it may import everything; nothing imports it.

One module per entry point (the console scripts of setup.py):

* ``maws-train``: :func:`maws_fast.cli.train.train_main` (also ``python -m maws_fast.cli``);
* ``maws-data``: :func:`maws_fast.cli.data.data_main` (the shard work in ``data_shards``);
* ``maws-bench``: :func:`maws_fast.cli.bench.bench_main` and its :func:`~maws_fast.cli.bench.bench_parser`;
* ``maws-ckpt``: :func:`maws_fast.cli.ckpt.ckpt_main`;
* ``maws-doctor``: :func:`maws_fast.cli.doctor.doctor_main` (also ``python -m maws_fast.cli.doctor``);

and ``common`` for what they share. Errors a user can cause end as one line on stderr, exit 2.
"""
