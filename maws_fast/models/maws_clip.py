"""MAWS's released CLIP checkpoints (``maws_clip``: ViT + XLM-R) as a :class:`~maws_fast.models.lit.LiT`.

The MAWS repository saves its CLIP model's ``state_dict`` with a timm ``VisionTransformer``
(``num_classes=0``, cls-token pooling after ``norm``) as ``vision_encoder.*``, ``vision_projection``
(W_img, E), ``text_projection`` (W_txt, E), ``logit_scale``, and a torchtext ``RobertaModel``
(XLM-R, post-norm, pooled at the ``<s>`` token) as ``text_encoder.*``. Here the vision tower is our
ViT (timm's keys, loaded as they are) and the text tower is HF ``transformers``' ``XLMRobertaModel``
(the optional ``[xlmr]`` extra), the torchtext keys renamed as follows (``T`` =
``text_encoder.encoder.transformer.``, layer ``i``; torchtext has written both names on the left):

=====================================================================  ============================================
torchtext                                                              transformers ``XLMRobertaModel``
=====================================================================  ============================================
``T token_embedding.weight``                                           ``embeddings.word_embeddings.weight``
``T positional_embedding.embedding.weight``                            ``embeddings.position_embeddings.weight``
``T embedding_layer_norm.{weight,bias}``                               ``embeddings.LayerNorm.*``
(none)                                                                 ``embeddings.token_type_embeddings.weight``: zeros (1, W)
``T layers.layers.i.self_attn.in_proj_{weight,bias}`` |                split in three: ``encoder.layer.i.attention.self.{query,key,value}.*``
``T layers.i.attention.input_projection.*``
``T layers.layers.i.self_attn.out_proj.*`` | ``...attention.output_projection.*``   ``encoder.layer.i.attention.output.dense.*``
``T layers.layers.i.norm1.*`` | ``...attention_layer_norm.*``          ``encoder.layer.i.attention.output.LayerNorm.*``
``T layers.layers.i.linear1.*`` | ``...residual_mlp.mlp.0.*``          ``encoder.layer.i.intermediate.dense.*``
``T layers.layers.i.linear2.*`` | ``...residual_mlp.mlp.3.*``          ``encoder.layer.i.output.dense.*``
``T layers.layers.i.norm2.*`` | ``...final_layer_norm.*``              ``encoder.layer.i.output.LayerNorm.*``
=====================================================================  ============================================

Both compute the same function: torchtext's positions are ``cumsum(not pad) * (not pad) + pad_idx``
as HF's ``create_position_ids_from_input_ids``; both are post-norm with exact GELU and LayerNorm
eps 1e-5; padding (id 1) is a key padding mask in both. The text embedding is the final hidden
state of the first token (``<s>``, id 0). Captions are tokenized as MAWS does: the XLM-R
SentencePiece model, truncated to 100 pieces, ``<s>`` ... ``</s>``, padded with id 1 to 102
(:func:`xlmr_ids` with HF's ``XLMRobertaTokenizerFast``, whose ids are the fairseq ones MAWS uses).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn

from maws_fast.errors import CheckpointError, ConfigError
from maws_fast.models.lit import LiT
from maws_fast.models.vit import VisionTransformer
from maws_fast.models.weights import load_pretrained, unwrap_state_dict
from maws_fast.storage import read_weights

TT = "text_encoder.encoder.transformer."
XLMR_PAD, XLMR_BOS, XLMR_EOS = 1, 0, 2
CONTEXT_LENGTH = 100  # SentencePiece pieces; <s> and </s> make 102
# Head counts cannot be read off the weights: MAWS's model table (maws/model_builder.py).
VISION_HEADS = {768: 12, 1024: 16, 1280: 16, 2560: 32}
TEXT_HEADS = {768: 12, 1024: 16}

# torchtext layer names -> (new torchtext name, HF name); the in-projection is split separately
_LAYER_NAMES = {
    "attention.output_projection": ("self_attn.out_proj", "attention.output.dense"),
    "attention_layer_norm": ("norm1", "attention.output.LayerNorm"),
    "residual_mlp.mlp.0": ("linear1", "intermediate.dense"),
    "residual_mlp.mlp.3": ("linear2", "output.dense"),
    "final_layer_norm": ("norm2", "output.LayerNorm"),
}


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ConfigError(f"MAWS CLIP's XLM-R text tower needs HF transformers, which does not import here ({e}); "
                          "pip install 'maws_fast[xlmr]' (or pip install transformers)") from None
    return transformers


def torchtext_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``text_encoder.*`` tensors of a MAWS CLIP state dict with HF ``XLMRobertaModel`` keys."""
    out: dict[str, torch.Tensor] = {}
    rest = {k[len(TT):]: v for k, v in sd.items() if k.startswith(TT)}
    if not rest:
        raise CheckpointError(f"no {TT}* tensors: this is not a MAWS CLIP checkpoint with a torchtext XLM-R text tower")
    out["embeddings.word_embeddings.weight"] = rest.pop("token_embedding.weight")
    out["embeddings.position_embeddings.weight"] = rest.pop("positional_embedding.embedding.weight")
    for p in ("weight", "bias"):
        out[f"embeddings.LayerNorm.{p}"] = rest.pop(f"embedding_layer_norm.{p}")
    width = out["embeddings.word_embeddings.weight"].shape[1]
    out["embeddings.token_type_embeddings.weight"] = torch.zeros(1, width, dtype=out["embeddings.word_embeddings.weight"].dtype)
    for key in list(rest):
        # layers.i.<name>.weight (older torchtext) or layers.layers.i.<name>.weight (nn.TransformerEncoder's)
        m = re.fullmatch(r"layers\.(?:layers\.)?(\d+)\.(.+)\.(weight|bias)",
                         key.replace("in_proj_weight", "in_proj.weight").replace("in_proj_bias", "in_proj.bias"))
        if m is None:
            continue
        i, name, kind = m.groups()
        v = rest.pop(key)
        if name in ("self_attn.in_proj", "attention.input_projection"):  # q, k, v stacked
            for part_name, part in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                out[f"encoder.layer.{i}.attention.self.{part_name}.{kind}"] = part.clone()
            continue
        hf = next((h for old, (new, h) in _LAYER_NAMES.items() if name in (old, new)), None)
        if hf is None:
            raise CheckpointError(f"{TT}{key}: a torchtext layer tensor this mapping does not know")
        out[f"encoder.layer.{i}.{hf}.{kind}"] = v
    if rest:
        raise CheckpointError(f"{TT}: tensors this mapping does not know: {sorted(rest)[:6]}")
    return out


class XLMRTextTower(nn.Module):
    """HF ``XLMRobertaModel`` (no pooler) from (B, N) ids padded with 1 to the ``<s>`` token's final state."""

    def __init__(self, config):
        super().__init__()
        self.model = _transformers().XLMRobertaModel(config, add_pooling_layer=False)
        self.pad_id = config.pad_token_id

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=(ids != self.pad_id).long()).last_hidden_state[:, 0]


def _count(prefix_re: str, keys) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(prefix_re, k))}
    return max(idx) + 1 if idx else 0


def build_maws_clip(sd: dict[str, torch.Tensor]) -> LiT:
    """An empty LiT shaped like the MAWS CLIP state dict ``sd`` (every size read off its tensors;
    head counts from MAWS's model table)."""
    need = ("vision_projection", "text_projection", "logit_scale", "vision_encoder.patch_embed.proj.weight",
            "vision_encoder.pos_embed")
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"not a MAWS CLIP checkpoint: it lacks {missing}; expected vision_encoder.*, "
                              "vision_projection, text_projection, logit_scale and text_encoder.*")
    v_width, embed = sd["vision_projection"].shape
    t_width = sd["text_projection"].shape[0]
    if v_width not in VISION_HEADS or t_width not in TEXT_HEADS:
        raise CheckpointError(f"a MAWS CLIP of widths {v_width} (vision) / {t_width} (text) is not one MAWS released "
                              f"(vision {sorted(VISION_HEADS)}, text {sorted(TEXT_HEADS)})")
    patch = sd["vision_encoder.patch_embed.proj.weight"]
    p, chans = patch.shape[-1], patch.shape[1]
    grid = int(round((sd["vision_encoder.pos_embed"].shape[1] - 1) ** 0.5))
    depth = _count(r"vision_encoder\.blocks\.(\d+)\.", sd)
    mlp = sd["vision_encoder.blocks.0.mlp.fc1.weight"].shape[0] / v_width
    vision = VisionTransformer(img_size=grid * p, patch_size=p, in_chans=chans, embed_dim=v_width, depth=depth,
                               num_heads=VISION_HEADS[v_width], mlp_ratio=mlp, pos_embed_learnable=True)
    hf = torchtext_to_hf(sd)
    emb = hf["embeddings.word_embeddings.weight"]
    config = _transformers().XLMRobertaConfig(
        vocab_size=emb.shape[0], hidden_size=t_width, num_hidden_layers=_count(r"encoder\.layer\.(\d+)\.", hf),
        num_attention_heads=TEXT_HEADS[t_width], intermediate_size=hf["encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=hf["embeddings.position_embeddings.weight"].shape[0], type_vocab_size=1,
        layer_norm_eps=1e-5, hidden_act="gelu", pad_token_id=XLMR_PAD, bos_token_id=XLMR_BOS, eos_token_id=XLMR_EOS,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return LiT(vision, XLMRTextTower(config), v_width, t_width, embed)


def load_maws_clip(path_or_state: str | Path | dict, device: str | torch.device = "cpu") -> LiT:
    """A released MAWS CLIP checkpoint (``vit_b16_xlmr_b.pt``, ...) or its state dict as a LiT in
    eval mode, its image tower locked; every tensor is used and every one of the model's is loaded."""
    if isinstance(path_or_state, dict):
        sd, source = dict(path_or_state), "state dict"
    else:
        sd, source = dict(read_weights(Path(path_or_state))), str(path_or_state)
    sd = unwrap_state_dict(sd)
    model = build_maws_clip(sd)
    vision = {k[len("vision_encoder."):]: v for k, v in sd.items() if k.startswith("vision_encoder.")}
    report = load_pretrained(model.vision_encoder, vision, source=source)
    if report.initialised or report.dropped:
        raise CheckpointError(f"{source}: its vision_encoder does not fit a ViT: {report.summary()}")
    missing, unexpected = model.text_encoder.model.load_state_dict(torchtext_to_hf(sd), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # a buffer HF builds itself
    if missing or unexpected:
        raise CheckpointError(f"{source}: its text_encoder does not fit XLM-R (missing {missing[:4]}, unexpected "
                              f"{unexpected[:4]})")
    with torch.no_grad():
        for k in ("vision_projection", "text_projection", "logit_scale"):
            getattr(model, k).copy_(sd[k].reshape(getattr(model, k).shape))
    return model.lock_vision().to(device).eval()


def xlmr_ids(tokenizer, captions: list[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """(B, context_length + 2) ids as MAWS tokenizes: ``<s>`` + at most ``context_length`` pieces +
    ``</s>``, padded with 1. ``tokenizer`` is HF's ``XLMRobertaTokenizer(Fast)``."""
    enc = tokenizer(list(captions), add_special_tokens=False, truncation=True, max_length=context_length)["input_ids"]
    out = torch.full((len(enc), context_length + 2), XLMR_PAD, dtype=torch.int64)
    for i, pieces in enumerate(enc):
        row = [XLMR_BOS, *pieces, XLMR_EOS]
        out[i, :len(row)] = torch.tensor(row)
    return out


def load_xlmr_tokenizer(name_or_dir: str):
    """HF's fast XLM-R tokenizer from a local directory or the hub (``xlm-roberta-base``: the
    SentencePiece model MAWS's CLIP was trained with, under the same fairseq ids)."""
    t = _transformers()
    try:
        return t.AutoTokenizer.from_pretrained(name_or_dir)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config: eval.clip_tokenizer: cannot load the XLM-R tokenizer {name_or_dir!r} ({e}); give "
                          "a local tokenizer directory, or a hub name with network access") from None
