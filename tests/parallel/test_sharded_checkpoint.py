"""Sharded checkpoints: exact round trips across layouts, the cross-rank commit, clear errors.

Ranks are simulated by threads sharing a ``threading.Barrier``, so the real three-barrier commit
protocol runs (no torch.distributed needed). Rank order is tp innermost: rank = dp_rank * tp + tp_rank.
"""
import json
import math
import os
import threading

import pytest
import torch
from safetensors.torch import load_file

from maws_fast.cli.ckpt import ckpt_main
from maws_fast.errors import CheckpointDamaged, CheckpointError, UserError
from maws_fast.parallel import checkpoint as pc
from maws_fast.parallel.tensor import Piece, TPSplit, tp_full, tp_local

D, H = 8, 16
SPEC = {  # key: (full shape, TP split or None = replicated over tp ranks)
    "cls_token": ((1, 1, D), None),
    "blocks.0.norm1.weight": ((D,), None),
    "blocks.0.attn.qkv.weight": ((3 * D, D), TPSplit(0, 3)),
    "blocks.0.attn.qkv.bias": ((3 * D,), TPSplit(0, 3)),
    "blocks.0.attn.proj.weight": ((D, D), TPSplit(1, 1)),
    "blocks.0.attn.proj.bias": ((D,), None),
    "blocks.0.mlp.fc1.weight": ((H, D), TPSplit(0, 1)),
    "blocks.0.mlp.fc1.bias": ((H,), TPSplit(0, 1)),
    "blocks.0.mlp.fc2.weight": ((D, H), TPSplit(1, 1)),
}


def _model(seed=0):
    g = torch.Generator().manual_seed(seed)
    full = {k: {"param": torch.randn(s, generator=g), "exp_avg": torch.randn(s, generator=g),
                "exp_avg_sq": torch.rand(s, generator=g)} for k, (s, _) in SPEC.items()}
    extra = {"pos_embed": torch.randn(1, 5, D, generator=g)}
    return full, extra


def _layout(tp, dp, layout, spec=SPEC):
    """Per-rank piece lists: "zero" = one flat buffer of the TP-local params padded to a multiple
    of dp, dp rank d owns chunk d (pieces are the intersections); "even" = each param split evenly."""
    ranks = []
    for d in range(dp):
        for t in range(tp):
            pieces, off = [], 0
            total = sum(math.prod(s) // (tp if sp else 1) for s, sp in spec.values())
            chunk = -(-total // dp)
            for key, (shape, split) in spec.items():
                n = math.prod(shape) // (tp if split else 1)
                if layout == "zero":
                    a, b = max(d * chunk - off, 0), min((d + 1) * chunk - off, n)
                else:
                    c = -(-n // dp)
                    a, b = min(d * c, n), min((d + 1) * c, n)
                a, b = (a, b) if a < b else (0, 0)
                pieces.append(Piece(key, shape, split, t, tp, a, b))
                off += n
            ranks.append(pieces)
    return ranks


def _expected(full, p, names=pc.NAMES):
    return {n: tp_local(full[p.key][n], p.tp, p.tp_rank, p.tp_size).reshape(-1)[p.start:p.end] for n in names}


def _save(directory, name, ranks, full, extra, keep=None, meta=None, names=pc.NAMES, fail=None):
    """Every rank saves from its own thread; returns each rank's return value or exception."""
    world = len(ranks)
    barrier = threading.Barrier(world, timeout=20)  # a protocol bug fails the test instead of hanging it
    results = [None] * world

    def run(r):
        tensors = {p.key: _expected(full, p, names) for p in ranks[r] if p.start < p.end}
        if fail == r:
            tensors[next(iter(tensors))]["param"] = torch.zeros(1)  # wrong size: this rank raises mid-save
        try:
            results[r] = pc.save_sharded(directory, name, rank=r, world=world, pieces=ranks[r], tensors=tensors,
                                         extra=extra if r == 0 else {}, meta=meta or {"step": 7},
                                         rank_meta={"loader": r * 10}, barrier=barrier.wait, keep=keep)
        except Exception as e:  # noqa: BLE001
            results[r] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results


def _check_load(path, ranks, full, with_optim=True):
    names = pc.NAMES if with_optim else ("param",)
    for pieces in ranks:
        tensors, extra, meta, rank_metas = pc.load_sharded(path, pieces, with_optim=with_optim)
        assert set(tensors) == {p.key for p in pieces}
        for p in pieces:
            assert set(tensors[p.key]) == set(names)
            for n, want in _expected(full, p, names).items():
                assert torch.equal(tensors[p.key][n], want), (p, n)
        assert meta["step"] == 7 and torch.equal(extra["pos_embed"], _model()[1]["pos_embed"])
    return rank_metas


def test_tp_local_and_tp_full_cut_per_group():
    qkv = torch.arange(12 * 2).reshape(12, 2)  # q, k, v blocks of 4 rows
    parts = [tp_local(qkv, TPSplit(0, 3), t, 2) for t in range(2)]
    assert parts[0][:, 0].tolist() == [0, 2, 8, 10, 16, 18]  # rows 0-1 of q, k and v
    assert torch.equal(tp_full(parts, TPSplit(0, 3)), qkv)
    w = torch.randn(3, 8)
    assert torch.equal(tp_local(w, TPSplit(1, 1), 1, 4), w[:, 2:4])
    assert torch.equal(tp_full([tp_local(w, TPSplit(1, 2), t, 2) for t in range(2)], TPSplit(1, 2)), w)


@pytest.mark.parametrize("tp,dp,layout", [(1, 1, "zero"), (1, 2, "zero"), (2, 2, "even"), (1, 3, "zero"),
                                          (4, 1, "zero"), (2, 3, "zero"), (1, 5, "even")])
def test_round_trip_reshards_exactly(tmp_path, tp, dp, layout):
    full, extra = _model()
    saved = _layout(2, 2, "zero")
    assert all(isinstance(r, type(tmp_path)) for r in _save(tmp_path, "step_00000007", saved, full, extra))
    rank_metas = _check_load(tmp_path / "step_00000007", _layout(tp, dp, layout), full)
    assert rank_metas == [{"loader": r * 10} for r in range(4)]
    got = pc.consolidate(tmp_path / "step_00000007")
    assert set(got) == set(full) | {"pos_embed"}
    for k in full:
        assert torch.equal(got[k], full[k]["param"]), k


def test_even_split_saved_loads_into_zero_tp(tmp_path):
    full, extra = _model()
    results = _save(tmp_path, "step_00000007", _layout(1, 3, "even"), full, extra)
    assert not any(isinstance(r, Exception) for r in results)
    _check_load(tmp_path / "step_00000007", _layout(2, 2, "zero"), full)
    _check_load(tmp_path / "step_00000007", _layout(4, 1, "even"), full, with_optim=False)


def test_fast_path_reads_only_its_own_file(tmp_path):
    full, extra = _model()
    ranks = _layout(2, 2, "zero")
    _save(tmp_path, "step_00000007", ranks, full, extra)
    path = tmp_path / "step_00000007"
    for r in (0, 2, 3):
        (path / f"rank_{r:05d}.safetensors").unlink()
    _check_load(path, [ranks[1]], full)
    with pytest.raises(CheckpointError, match=r"rank_0000[023]\.safetensors is missing or truncated"):
        pc.load_sharded(path, _layout(1, 2, "zero")[0])


def test_export_has_no_optimizer_state_and_consolidates(tmp_path, capsys):
    full, extra = _model()
    _save(tmp_path, "final", _layout(2, 1, "even"), full, extra, names=("param",))
    path = tmp_path / "final"
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        pc.load_sharded(path, _layout(1, 1, "zero")[0])
    _check_load(path, _layout(1, 2, "zero"), full, with_optim=False)
    out = tmp_path / "export" / "model.safetensors"
    assert ckpt_main(["consolidate", str(path), str(out)]) == 0
    got = load_file(str(out))
    assert set(got) == set(full) | {"pos_embed"} and all(torch.equal(got[k], full[k]["param"]) for k in full)
    assert [p.name for p in out.parent.iterdir()] == ["model.safetensors"]
    assert ckpt_main(["consolidate", str(tmp_path / "nope"), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("maws-ckpt: error: ") and "meta.json is missing" in err and err.count("\n") == 1
    # a single-process final/ is consolidated already: one line pointing at its file
    from maws_fast.storage import save_checkpoint

    single = save_checkpoint(tmp_path / "run", "final", {"w": torch.ones(2)}, {"step": 1})
    assert ckpt_main(["consolidate", str(single), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "is already consolidated" in err and str(single / "model.safetensors") in err and err.count("\n") == 1


def test_rank_failing_mid_save_leaves_previous_checkpoint(tmp_path):
    full, extra = _model()
    ranks = _layout(2, 2, "zero")
    _save(tmp_path, "step_00000001", ranks, full, extra)
    results = _save(tmp_path, "step_00000002", ranks, full, extra, fail=2)
    assert isinstance(results[2], ValueError) and "/param has shape (1,)" in str(results[2])
    assert isinstance(results[0], CheckpointError) and "ranks [2] did not finish" in str(results[0])
    assert all(isinstance(results[r], CheckpointError) and "was not written" in str(results[r]) for r in (1, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]
    _check_load(tmp_path / "step_00000001", ranks, full)


def test_full_disk_on_one_rank_is_a_user_error_everywhere(tmp_path, monkeypatch):
    full, extra = _model()
    ranks = _layout(1, 3, "zero")
    _save(tmp_path, "final", ranks, full, extra)
    real = pc.write_tensors

    def full_disk(path, tensors):
        if path.name == "rank_00001.safetensors":
            raise OSError(28, "No space left on device")
        real(path, tensors)

    monkeypatch.setattr(pc, "write_tensors", full_disk)
    results = _save(tmp_path, "final", ranks, full, extra, meta={"step": 8})
    assert isinstance(results[1], UserError) and "No space left on device" in str(results[1])
    assert "earlier checkpoints are untouched" in str(results[1])
    assert all(isinstance(r, UserError) for r in results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert json.loads((tmp_path / "final" / "meta.json").read_text())["step"] == 7  # the old one, whole


def test_stale_temp_dir_is_cleaned_and_replacing_is_atomic(tmp_path):
    full, extra = _model()
    ranks = _layout(1, 2, "even")
    # a crashed run left a complete set of rank files (old data, world 3) in the temp dir
    _save(tmp_path, "crashed", _layout(1, 3, "even"), *_model(5))
    os.rename(tmp_path / "crashed", tmp_path / ".tmp-final")
    (tmp_path / ".tmp-final" / "meta.json").unlink()
    # rank 1 fails now: its stale rank_00001.json must not stand in for it
    results = _save(tmp_path, "final", ranks, full, extra, fail=1)
    assert all(isinstance(r, Exception) for r in results) and sorted(p.name for p in tmp_path.iterdir()) == []
    files = ["extra.safetensors", "meta.json", "rank_00000.json", "rank_00000.safetensors", "rank_00001.json",
             "rank_00001.safetensors"]
    (tmp_path / ".tmp-final").mkdir()
    (tmp_path / ".tmp-final" / "rank_00002.json").write_text("{}")
    _save(tmp_path, "final", ranks, full, extra)
    path = tmp_path / "final"
    assert sorted(p.name for p in path.iterdir()) == files
    _check_load(path, _layout(2, 1, "zero"), full)
    full2, _ = _model(3)
    _save(tmp_path, "final", ranks, full2, extra, meta={"step": 7, "run": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert sorted(p.name for p in path.iterdir()) == files
    meta = json.loads((path / "meta.json").read_text())
    assert meta["run"] == 2 and meta["sharded"]["world"] == 2 and pc.is_sharded(path)
    _check_load(path, _layout(2, 1, "zero"), full2)


def test_cover_takes_the_farthest_reaching_piece():
    def piece(a, b):
        return Piece("w", (10,), None, 0, 1, a, b)

    cands = [(piece(0, 2), 0), (piece(0, 6), 1), (piece(1, 3), 2), (piece(5, 10), 3)]
    assert [(a, b, r) for a, b, _, r in pc._cover(cands, 0, 10)] == [(0, 6, 1), (6, 10, 3)]
    assert [(a, b, r) for a, b, _, r in pc._cover(cands, 2, 4)] == [(2, 4, 1)]
    assert pc._cover([(piece(0, 4), 0), (piece(5, 10), 1)], 0, 10) is None


def test_truncated_rank_file_and_corrupt_meta_are_named(tmp_path):
    full, extra = _model()
    ranks = _layout(1, 2, "zero")
    _save(tmp_path, "step_00000001", ranks, full, extra)
    path = tmp_path / "step_00000001"
    f = path / "rank_00001.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 8)
    pc.load_sharded(path, ranks[0])  # the fast path of rank 0 never touches rank 1's file
    with pytest.raises(CheckpointDamaged, match=r"rank_00001\.safetensors is missing or truncated"):
        pc.load_sharded(path, ranks[1])
    (path / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointDamaged, match=r"meta\.json is corrupt"):
        pc.load_sharded(path, ranks[0])


@pytest.mark.parametrize("victim", ["rank_00001.safetensors", "extra.safetensors"])
def test_a_flipped_bit_fails_the_checksum_and_is_named(tmp_path, victim):
    """Same size, one bit changed: only the CRC-32 every file carries in meta.json can see it."""
    full, extra = _model()
    ranks = _layout(1, 2, "zero")
    _save(tmp_path, "step_00000001", ranks, full, extra)
    path = tmp_path / "step_00000001"
    f = path / victim
    data = bytearray(f.read_bytes())
    data[len(data) - 3] ^= 0x10  # inside the tensor bytes (the header is at the start)
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointDamaged, match=rf"{victim} fails its checksum"):
        pc.load_sharded(path, ranks[1])


def test_model_that_does_not_fit_names_key_and_shapes(tmp_path):
    full, extra = _model()
    _save(tmp_path, "step_00000001", _layout(1, 1, "zero"), full, extra)
    bigger = {**SPEC, "blocks.0.mlp.fc1.weight": ((2 * H, D), TPSplit(0, 1))}
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.mlp\.fc1\.weight' has shape \(16, 8\) there but "
                                              r"\(32, 8\) in this model; use the model config"):
        pc.load_sharded(tmp_path / "step_00000001", _layout(1, 1, "zero", bigger)[0])
    with pytest.raises(CheckpointError, match=r"'head\.weight' is not in it"):
        pc.load_sharded(tmp_path / "step_00000001", [Piece("head.weight", (10, D), None, 0, 1, 0, 80)])
    with pytest.raises(CheckpointError, match="single-process checkpoint"):
        from maws_fast.storage import save_checkpoint

        pc.load_sharded(save_checkpoint(tmp_path, "step_00000002", {"w": torch.ones(2)}, {}), [])


def test_keep_prunes_and_list_sharded(tmp_path):
    full, extra = _model()
    ranks = _layout(2, 1, "zero")
    for s in range(1, 5):
        assert not any(isinstance(r, Exception) for r in _save(tmp_path, f"step_{s:08d}", ranks, full, extra, keep=2))
    assert [p.name for p in pc.list_sharded(tmp_path)] == ["step_00000003", "step_00000004"]
    assert not pc.is_sharded(tmp_path) and pc.list_sharded(tmp_path / "missing") == []


def test_inconsistent_pieces_fail_at_save_time(tmp_path):
    full, extra = _model()
    ranks = _layout(1, 2, "even")
    ranks[1] = [Piece(p.key, p.shape, p.tp, p.tp_rank, p.tp_size, p.start, p.start) for p in ranks[1]]  # holes
    results = _save(tmp_path, "step_00000001", ranks, full, extra)
    assert isinstance(results[0], ValueError) and "no rank stores" in str(results[0])
    assert isinstance(results[1], CheckpointError)
    assert list(tmp_path.iterdir()) == []
