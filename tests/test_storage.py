"""Storage: atomic checkpoint writes, round trips, and clear errors for torn or foreign checkpoints."""
import os

import pytest
import torch

from maws_fast import storage
from maws_fast.errors import CheckpointError, UserError
from maws_fast.train.optim import param_groups


def _model_and_opt():
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_model_optimizer_and_meta(tmp_path):
    model, opt = _model_and_opt()
    path = storage.save_checkpoint(tmp_path, "step_00000001", model.state_dict(), {"step": 1}, opt)
    tensors, meta, opt_tensors = storage.load_checkpoint(path)
    assert meta["step"] == 1 and meta["format_version"] == storage.FORMAT_VERSION
    for k, v in model.state_dict().items():
        assert torch.equal(tensors[k], v)
    model2, opt2 = _model_and_opt()
    storage.load_optimizer_tensors(opt2, opt_tensors, meta["optimizer_param_groups"])
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for i in s1["state"]:
        for name in s1["state"][i]:
            assert torch.equal(torch.as_tensor(s1["state"][i][name]), torch.as_tensor(s2["state"][i][name]))
    assert s2["param_groups"][0]["betas"] == (0.9, 0.95) and s2["param_groups"][1]["weight_decay"] == 0.0


def test_keep_prunes_old_and_ignores_temp_dirs(tmp_path):
    model, opt = _model_and_opt()
    (tmp_path / ".tmp-step_00000009-dead").mkdir()  # leftover of a killed writer
    for s in range(1, 5):
        storage.save_checkpoint(tmp_path, f"step_{s:08d}", model.state_dict(), {"step": s}, opt, keep=2)
    assert [p.name for p in storage.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]


def test_failed_write_leaves_previous_checkpoint_and_no_temp(tmp_path, monkeypatch):
    model, opt = _model_and_opt()
    storage.save_checkpoint(tmp_path, "step_00000001", model.state_dict(), {"step": 1}, opt)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage, "write_json", boom)
    with pytest.raises(UserError, match="No space left on device.*earlier checkpoints are untouched"):
        storage.save_checkpoint(tmp_path, "step_00000002", model.state_dict(), {"step": 2}, opt)
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]
    storage.load_checkpoint(tmp_path / "step_00000001")


def test_replacing_a_named_checkpoint_is_atomic(tmp_path):
    model, _ = _model_and_opt()
    storage.save_checkpoint(tmp_path, "final", model.state_dict(), {"step": 1})
    with torch.no_grad():
        model[0].weight.add_(1)
    storage.save_checkpoint(tmp_path, "final", model.state_dict(), {"step": 2})
    tensors, meta, _ = storage.load_checkpoint(tmp_path / "final")
    assert meta["step"] == 2 and torch.equal(tensors["0.weight"], model[0].weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_truncated_or_corrupt_files_are_named(tmp_path):
    model, opt = _model_and_opt()
    path = storage.save_checkpoint(tmp_path, "step_00000001", model.state_dict(), {"step": 1}, opt)
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

    model, opt = _model_and_opt()
    storage.save_checkpoint(tmp_path, "step_00000001", model.state_dict(), {"step": 1}, opt)

    def full_disk(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(storage, "save_file", full_disk)
    with pytest.raises(UserError, match="could not write checkpoint .*No space left"):
        storage.save_checkpoint(tmp_path, "step_00000002", model.state_dict(), {"step": 2}, opt)
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]


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
