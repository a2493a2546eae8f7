"""Every checkpoint format a user brings loads through read_weights + load_pretrained, each written
here: our directories and safetensors, the official MAE .pth, MAWS's bare .pt, timm's .safetensors /
.bin (with fc_norm and no norm), DDP-prefixed keys. Pickles load with weights_only: a payload never runs."""
import argparse
import pathlib

import pytest
import torch
from safetensors.torch import save_file

from maws_fast.errors import CheckpointError
from maws_fast.models import MaskedAutoencoderViT, VisionTransformer, load_pretrained
from maws_fast.storage import read_weights

KW = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _encoder_sd(vit: VisionTransformer) -> dict:
    return {k: v.clone() for k, v in vit.state_dict().items() if not k.startswith("head.")}


def _check_encoder_loaded(model: VisionTransformer, want: dict, report) -> None:
    for k, v in want.items():
        if k in model.state_dict():
            assert torch.equal(model.state_dict()[k], v), k
    assert "blocks.1.attn.qkv.weight" in report.loaded


@pytest.fixture
def src(seeded):
    m = VisionTransformer(**KW, num_classes=0, pos_embed_learnable=True)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    return m


def test_our_directory_and_safetensors(src, tmp_path):
    d = tmp_path / "final"
    d.mkdir()
    save_file(src.state_dict(), str(d / "model.safetensors"))
    for path in (d, d / "model.safetensors"):
        model = VisionTransformer(**KW, num_classes=7, pos_embed_learnable=True)
        report = load_pretrained(model, read_weights(path))
        _check_encoder_loaded(model, src.state_dict(), report)
        assert report.initialised == ["head.weight", "head.bias"]


def test_official_mae_pth_with_optimizer_epoch_and_args(seeded, tmp_path):
    mae = MaskedAutoencoderViT(**KW, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    f = tmp_path / "checkpoint-799.pth"
    torch.save({"model": mae.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "epoch": 799,
                "scaler": {"scale": 65536.0}, "args": argparse.Namespace(blr=1.5e-4, model="mae_vit_base")}, f)
    model = VisionTransformer(**KW, num_classes=3)
    report = load_pretrained(model, read_weights(f))
    _check_encoder_loaded(model, mae.state_dict(), report)
    assert "decoder_embed.weight" in report.dropped and "mask_token" in report.dropped


def test_maws_bare_encoder_pt_and_ddp_prefix(src, tmp_path):
    f = tmp_path / "vit_b16_maws.pt"
    torch.save(_encoder_sd(src), f)
    g = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in _encoder_sd(src).items()}}, g)
    for path in (f, g):
        model = VisionTransformer(**KW, num_classes=4, pos_embed_learnable=True)
        report = load_pretrained(model, read_weights(path))
        _check_encoder_loaded(model, _encoder_sd(src), report)
        assert not report.dropped and report.initialised == ["head.weight", "head.bias"]


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_timm_checkpoint_with_fc_norm_and_no_norm(src, tmp_path, suffix):
    sd = _encoder_sd(src)
    sd["fc_norm.weight"], sd["fc_norm.bias"] = sd.pop("norm.weight"), sd.pop("norm.bias")
    sd["head.weight"], sd["head.bias"] = torch.randn(1000, 32), torch.randn(1000)
    f = tmp_path / f"model{suffix}"
    save_file(sd, str(f)) if suffix == ".safetensors" else torch.save(sd, f)
    model = VisionTransformer(**KW, num_classes=0, pos_embed_learnable=True)
    report = load_pretrained(model, read_weights(f))
    assert sorted(report.initialised) == ["norm.bias", "norm.weight"]  # named, not silently fresh
    assert {"fc_norm.weight", "head.weight"} <= set(report.dropped)
    assert "norm" in report.summary()


class _Payload:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_pickle_payload_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    f = tmp_path / "evil.pth"
    torch.save({"model": {"cls_token": torch.zeros(1)}, "x": _Payload(marker)}, f)
    with pytest.raises(CheckpointError, match=r"\(getattr\), so it is refused"):
        read_weights(f)
    assert not marker.exists()


def test_bad_paths_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_weights(tmp_path / "nope.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="without model.safetensors"):
        read_weights(tmp_path / "empty")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown weights format"):
        read_weights(tmp_path / "w.npz")
    (tmp_path / "torn.pth").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="torn.pth is not a readable torch checkpoint"):
        read_weights(tmp_path / "torn.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_weights(tmp_path / "list.pt")
