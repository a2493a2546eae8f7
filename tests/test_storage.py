"""Storage: atomic checkpoint writes, round trips, and clear errors for torn or foreign checkpoints."""
import os

import pytest
import torch

from maws_fast import storage
from maws_fast.errors import CheckpointError, UserError


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))


def test_round_trip_model_and_meta(tmp_path):
    model = _model()
    path = storage.save_checkpoint(tmp_path, "final", model.state_dict(), {"step": 1})
    tensors, meta = storage.load_checkpoint(path)
    assert meta["step"] == 1 and meta["format_version"] == storage.FORMAT_VERSION
    assert sorted(meta["files"]) == ["model.safetensors"]
    assert tensors.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(tensors[k], v)


def test_list_checkpoints_ignores_temp_and_moved_aside_dirs(tmp_path):
    for name in ("step_00000002", "step_00000010", ".tmp-step_00000011", ".old-step_00000003-dead", "damaged"):
        (tmp_path / name).mkdir()
    assert [p.name for p in storage.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000010"]


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "results.json"
    storage.atomic_write_text(target, "old\n")
    with pytest.raises(RuntimeError, match="killed"):
        with storage.atomic_file(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left
    with storage.atomic_file(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_failed_write_leaves_previous_checkpoint_and_no_temp(tmp_path, monkeypatch):
    model = _model()
    storage.save_checkpoint(tmp_path, "final", model.state_dict(), {"step": 1})

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage, "write_json", boom)
    with pytest.raises(UserError, match="No space left on device.*earlier checkpoints are untouched"):
        storage.save_checkpoint(tmp_path, "final", model.state_dict(), {"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
    assert storage.load_checkpoint(tmp_path / "final")[1]["step"] == 1


def test_replacing_a_named_checkpoint_is_atomic(tmp_path):
    model = _model()
    storage.save_checkpoint(tmp_path, "final", model.state_dict(), {"step": 1})
    with torch.no_grad():
        model[0].weight.add_(1)
    storage.save_checkpoint(tmp_path, "final", model.state_dict(), {"step": 2})
    tensors, meta = storage.load_checkpoint(tmp_path / "final")
    assert meta["step"] == 2 and torch.equal(tensors["0.weight"], model[0].weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_truncated_or_corrupt_files_are_named(tmp_path):
    model = _model()
    path = storage.save_checkpoint(tmp_path, "final", model.state_dict(), {"step": 1})
    f = path / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing or truncated"):
        storage.load_checkpoint(path)
    (path / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"meta\.json is corrupt"):
        storage.load_checkpoint(path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        storage.load_tensors(junk)
    with pytest.raises(CheckpointError, match="does not exist"):
        storage.load_tensors(tmp_path / "missing.safetensors")


def test_safetensors_write_error_is_one_clear_error(tmp_path, monkeypatch):
    """safetensors reports I/O failures (a full disk) as SafetensorError, not OSError."""
    from safetensors import SafetensorError

    model = _model()
    storage.save_checkpoint(tmp_path, "final", model.state_dict(), {"step": 1})

    def full_disk(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(storage, "save_file", full_disk)
    with pytest.raises(UserError, match="could not write checkpoint .*No space left"):
        storage.save_checkpoint(tmp_path, "final", model.state_dict(), {"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_a_save_killed_mid_write_leaves_nothing_behind_on_the_next_save(tmp_path):
    from maws_fast.storage import save_checkpoint

    (tmp_path / ".tmp-final-deadbeef").mkdir()  # a temp dir of a killed save
    (tmp_path / ".tmp-final-deadbeef" / "model.safetensors").write_bytes(b"half")
    save_checkpoint(tmp_path, "final", {"w": torch.ones(2)}, {"step": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    # killed between moving the old one aside and renaming the new one in: the old one comes back
    os.rename(tmp_path / "final", tmp_path / ".old-final-0badf00d")
    (tmp_path / ".tmp-final-cafe0000").mkdir()
    save_checkpoint(tmp_path, "final", {"w": torch.zeros(2)}, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert storage.read_meta(tmp_path / "final")["step"] == 2
