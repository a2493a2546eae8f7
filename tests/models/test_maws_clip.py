"""MAWS CLIP checkpoints into a LiT with HF transformers' XLM-R: a checkpoint written by a
torchtext-shaped XLM-R (its module tree and forward rebuilt here from torch.nn, random weights,
both of torchtext's key spellings) and a timm ViT gives the same embeddings through our model."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

from maws_fast.errors import CheckpointError  # noqa: E402
from maws_fast.models.maws_clip import load_maws_clip, torchtext_to_hf, xlmr_ids  # noqa: E402

V, W, LAYERS, FFN, MAXLEN = 120, 768, 2, 256, 40


class TorchtextXLMR(nn.Module):
    """torchtext's RobertaModel(XLM-R conf, identity head): the same module names and forward."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Module()
        t = self.encoder.transformer = nn.Module()
        t.token_embedding = nn.Embedding(V, W, padding_idx=1)
        layer = nn.TransformerEncoderLayer(W, 12, FFN, dropout=0.0, activation="gelu", batch_first=True, norm_first=False)
        t.layers = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        t.positional_embedding = nn.Module()
        t.positional_embedding.embedding = nn.Embedding(MAXLEN, W, padding_idx=1)
        t.embedding_layer_norm = nn.LayerNorm(W)

    def forward(self, tokens):
        t = self.encoder.transformer
        pad = tokens.eq(1)
        keep = (~pad).long()
        positions = torch.cumsum(keep, dim=1) * keep + 1  # torchtext's PositionalEmbedding
        x = t.embedding_layer_norm(t.token_embedding(tokens) + t.positional_embedding.embedding(positions))
        return t.layers(x, src_key_padding_mask=pad)[:, 0]  # RobertaIdentityHead: the <s> token


def _release(old_names=False):
    g = torch.Generator().manual_seed(0)
    text = TorchtextXLMR().eval()
    vit = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=8, in_chans=3, embed_dim=768,
                                                           depth=1, num_heads=12, num_classes=0).eval()
    with torch.no_grad():
        for p in list(text.parameters()) + list(vit.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if p.ndim == 1 and p.shape[0] == W else 0.0))
    sd = {f"vision_encoder.{k}": v for k, v in vit.state_dict().items()}
    tt = {f"text_encoder.{k}": v for k, v in text.state_dict().items()}
    if old_names:  # the older torchtext spelling of the layer tensors
        ren = {"self_attn.in_proj_weight": "attention.input_projection.weight",
               "self_attn.in_proj_bias": "attention.input_projection.bias",
               "self_attn.out_proj.": "attention.output_projection.", "linear1.": "residual_mlp.mlp.0.",
               "linear2.": "residual_mlp.mlp.3.", "norm1.": "attention_layer_norm.", "norm2.": "final_layer_norm."}
        new = {}
        for k, v in tt.items():
            for a, b in ren.items():
                if a in k:
                    k = k.replace("layers.layers.", "layers.").replace(a, b)
            new[k] = v
        tt = new
    sd.update(tt)
    sd["vision_projection"] = torch.randn(768, 64, generator=g)
    sd["text_projection"] = torch.randn(W, 64, generator=g)
    sd["logit_scale"] = torch.tensor(4.2)
    return sd, text, vit


@pytest.mark.parametrize("old_names", [False, True])
def test_a_maws_clip_checkpoint_embeds_as_its_towers_do(tmp_path, old_names):
    sd, text, vit = _release(old_names)
    path = tmp_path / "vit_b16_xlmr_b.pt"
    torch.save(sd, path)
    model = load_maws_clip(path)
    assert model.logit_scale.item() == pytest.approx(4.2) and model.scale().item() == pytest.approx(66.686, rel=1e-4)
    ids = torch.tensor([[0, 5, 9, 17, 2, 1, 1, 1], [0, 33, 2, 1, 1, 1, 1, 1], [0, 7, 8, 9, 10, 11, 12, 2]])
    with torch.no_grad():
        ref = F.normalize(text(ids) @ sd["text_projection"], dim=-1)
        torch.testing.assert_close(model.encode_texts(ids), ref, atol=2e-5, rtol=1e-4)
        imgs = torch.randn(2, 3, 16, 16)
        ref_img = F.normalize(vit(imgs) @ sd["vision_projection"], dim=-1)
        torch.testing.assert_close(model.encode_images(imgs), ref_img, atol=2e-5, rtol=1e-4)
    assert not any(p.requires_grad for p in model.vision_encoder.parameters())


def test_bad_maws_clip_checkpoints_are_named():
    sd, _, _ = _release()
    with pytest.raises(CheckpointError, match="lacks \\['vision_projection'\\]"):
        load_maws_clip({k: v for k, v in sd.items() if k != "vision_projection"})
    with pytest.raises(CheckpointError, match="not a MAWS CLIP checkpoint with a torchtext XLM-R"):
        torchtext_to_hf({"vision_projection": sd["vision_projection"]})
    extra = dict(sd, **{"text_encoder.encoder.transformer.layers.layers.0.mystery.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="mystery"):
        load_maws_clip(extra)
    narrow = dict(sd, vision_projection=torch.zeros(300, 64))
    with pytest.raises(CheckpointError, match="not one MAWS released"):
        load_maws_clip(narrow)


def test_xlmr_ids_lays_captions_out_as_maws_does():
    class Pieces:  # the part of HF's tokenizer call xlmr_ids uses
        def __call__(self, texts, add_special_tokens, truncation, max_length):
            assert not add_special_tokens and truncation
            return {"input_ids": [list(range(10, 10 + len(t.split())))[:max_length] for t in texts]}

    ids = xlmr_ids(Pieces(), ["a b c", "a " * 9], context_length=6)
    assert ids.tolist() == [[0, 10, 11, 12, 2, 1, 1, 1], [0, 10, 11, 12, 13, 14, 15, 2]]
