"""maws-bench dist: the communication counter against collectives of known size, and the benchmark's
per-step volumes of every engine against the 2Ψ / 3Ψ theory computed here from the model itself."""
import argparse
import json
import math

import pytest
import torch
import torch.distributed as dist

from maws_fast.bench.dist import CommCounter, add_dist_args, bench_dist
from maws_fast.config import model_preset
from maws_fast.errors import ConfigError
from maws_fast.models import build_mae


# torch >= 2.13 names (the older ones warn there); both dispatch to the same c10d ops
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_dist_args(p)
    return p.parse_args(list(argv))


def test_comm_counter_volume_rules(tmp_path):
    """all-reduce n -> 2n, reduce-scatter input n -> n, all-gather output n -> n, broadcast n -> n; bytes by dtype."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        a, b = torch.randn(7), torch.randn(5, dtype=torch.bfloat16)
        with CommCounter() as c:
            dist.all_reduce(a)
            dist.all_reduce(b)
            _REDUCE_SCATTER(torch.empty(3), torch.randn(3))
            _ALL_GATHER(torch.empty(4), torch.randn(4))
            dist.all_gather([torch.empty(6)], torch.randn(6))
            dist.broadcast(torch.randn(2, 3), 0)
            dist.barrier()  # moves no data: not counted, not "uncounted" either
        assert [(r.op, r.elems, r.nbytes) for r in c.records] == [
            ("allreduce_", 14, 56), ("allreduce_", 10, 20), ("_reduce_scatter_base_", 3, 12),
            ("_allgather_base_", 4, 16), ("allgather_", 6, 24), ("broadcast_", 6, 24)]
        assert c.total(group=dist.group.WORLD.group_name) == (43, 152)
        assert c.by_op() == {"all_reduce": [2, 24], "reduce_scatter": [1, 3], "all_gather": [2, 10], "broadcast": [1, 6]}
        assert c.uncounted == []
    finally:
        dist.destroy_process_group()


def _pad(n: int, world: int) -> int:
    return -(-n // world) * world


def _pad_dim0(p: torch.Tensor, world: int) -> int:
    return _pad(p.shape[0], world) * math.prod(p.shape[1:])


def test_bench_dist_volumes_match_theory(tmp_path, capsys):
    """World 2 on gloo: every engine's counted volume equals what its shard layout must move."""
    world, out = 2, tmp_path / "dist.json"
    rows = bench_dist(_args("--world", str(world), "--preset", "tiny", "--batch-size", "8", "--steps", "1",
                            "--warmup", "2", "--bucket-mb", "25", "--out", str(out)))
    assert json.loads(out.read_text()) == rows
    by = {r["engine"]: r for r in rows}
    assert list(by) == ["ours-z1", "ours-z2", "ours-z3", "fsdp2", "ddp"]

    # The theory, from the model: Ψ trainable params; blocks vs the rest (FSDP2 / ZeRO-3 units).
    mae = build_mae(model_preset("tiny"))
    blocks = [list(blk.parameters()) for blk in [*mae.blocks, *mae.decoder_blocks]]
    in_block = {id(p) for ps in blocks for p in ps}
    root = [p for p in mae.parameters() if id(p) not in in_block]  # includes the frozen pos-embeds
    psi = sum(p.numel() for p in mae.parameters() if p.requires_grad)
    for r in rows:
        assert r["psi"] == psi and r["world"] == world and r["dp"] == world and r["uncounted_ops"] == []
        assert r["comm_matches_theory"], r["engine"]

    # DDP and ZeRO-1/2: 2Ψ (one 25 MiB bucket holds the tiny model; ours pads it to an even length).
    assert by["ddp"]["comm_elems"] == 2 * psi and set(by["ddp"]["comm_ops"]) == {"all_reduce"}
    for z in ("ours-z1", "ours-z2"):
        assert by[z]["comm_ops"] == {"reduce_scatter": [1, _pad(psi, world)], "all_gather": [1, _pad(psi, world)]}
    # ZeRO-3: blocks all-gathered twice and reduce-scattered (3Ψ); the root bucket stays gathered (2Ψ).
    blk = sum(_pad(sum(p.numel() for p in ps), world) for ps in blocks)
    rest = _pad(sum(p.numel() for p in root if p.requires_grad), world)
    assert by["ours-z3"]["comm_ops"]["all_gather"][1] == 2 * blk + rest
    assert by["ours-z3"]["comm_ops"]["reduce_scatter"][1] == blk + rest
    # FSDP2: per-parameter dim-0 padding; the root (frozen pos-embeds too) is gathered once, blocks twice.
    fsdp_blk = sum(_pad_dim0(p, world) for ps in blocks for p in ps)
    assert by["fsdp2"]["comm_ops"]["all_gather"][1] == 2 * fsdp_blk + sum(_pad_dim0(p, world) for p in root)
    assert by["fsdp2"]["comm_ops"]["reduce_scatter"][1] == fsdp_blk + sum(
        _pad_dim0(p, world) for p in root if p.requires_grad)
    assert 2.9 < by["ours-z3"]["comm_over_psi"] < 3.0 < by["fsdp2"]["comm_over_psi"] < 3.02

    # bytes: fp32 everywhere on CPU; persistent state shrinks with the stage (DDP: 16 bytes/param).
    assert all(r["comm_bytes"] == 4 * r["comm_elems"] for r in rows)
    assert by["ddp"]["state_bytes"] == 16 * psi
    assert by["ours-z3"]["state_bytes"] < by["ours-z2"]["state_bytes"] < by["ours-z1"]["state_bytes"] < 16 * psi
    assert by["fsdp2"]["speedup_vs_fsdp2"] == 1.0 and by["ddp"]["mem_vs_ddp"] == 1.0
    assert all(r["step_ms"] > 0 and r["mem_peak_bytes"] and r["commit"] for r in rows)
    assert "vs fsdp2" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["--engines", "ours:2,magic"], "magic"),
    (["--engines", "ours:5"], "ours:5"),
    (["--batch-size", "7"], "--batch-size 7"),
    (["--tp", "3"], "parallel.tp=3"),
    (["--tp", "2", "--engines", "fsdp2,ddp"], "needs an ours"),
])
def test_bench_dist_rejects_bad_arguments_before_starting_ranks(argv, needle):
    with pytest.raises(ConfigError, match=needle.replace("+", r"\+")):
        bench_dist(_args("--out", "", *argv))


def test_an_engine_that_fails_on_every_rank_is_a_row_and_the_next_engine_runs(tmp_path, monkeypatch):
    """One rank (as torchrun starts it): FSDP2 raises; its row says why, and the rows of the engines
    before and after it reach the file as each is measured."""
    import socket

    import maws_fast.bench.dist as bd

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "dist.json"
    real, seen = bd._bench_engine, []

    def bench_engine(engine, stage, *a):
        seen.append(len(json.loads(out.read_text())) if out.exists() else 0)
        if engine == "fsdp2":
            raise RuntimeError("fully_shard: unsupported on this build\ndetails")
        return real(engine, stage, *a)

    monkeypatch.setattr(bd, "_bench_engine", bench_engine)
    rows = bench_dist(_args("--engines", "ours:1,fsdp2,ddp", "--preset", "tiny", "--batch-size", "4", "--steps", "1",
                            "--warmup", "2", "--out", str(out)))
    assert seen == [0, 1, 2]
    assert [(r["engine"], r.get("status")) for r in rows] == [("ours-z1", None), ("fsdp2", "failed"), ("ddp", None)]
    assert rows[1]["error"] == "RuntimeError: fully_shard: unsupported on this build"
    assert rows[0]["speedup_vs_ddp"] is not None and rows[0]["speedup_vs_fsdp2"] is None
    assert json.loads(out.read_text()) == rows
