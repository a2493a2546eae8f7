"""`eval.clip`: a MAWS CLIP checkpoint evaluated by the recipe's linprobe stage on a labelled JPEG
folder: zero-shot from the folder's class names (through HF's tokenizer API, here a local
word-level stand-in for XLM-R's) and the probes of its image tower, in the results table."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("timm")

from maws_fast.cli.train import train_main  # noqa: E402
from maws_fast.data.images import encode_jpeg  # noqa: E402
from tests.models.test_maws_clip import _release  # noqa: E402


def _folder(root):
    rng = np.random.default_rng(0)
    for c, colour in (("red_thing", (200, 30, 30)), ("blue_thing", (30, 30, 200))):
        (root / c).mkdir(parents=True)
        for i in range(6):
            px = np.clip(np.array(colour) + rng.integers(-20, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            (root / c / f"{i}.jpg").write_bytes(encode_jpeg(px, 95))
    return root


def _tokenizer(root):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from maws_fast.eval.zeroshot import DEFAULT_TEMPLATES

    words = sorted({w for t in DEFAULT_TEMPLATES for w in t.replace("{}", "red thing blue").replace(".", " .")
                    .replace("-", " - ").split()})
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{w: 4 + i for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(root)
    return root


def _args(tmp_path, ckpt, tok, *extra):
    folder = str(tmp_path / "imgs")
    return ["--run.stages=[linprobe]", f"--run.out_dir={tmp_path / 'run'}", "--run.progress=false",
            "--data.dataset=jpeg", "--data.loader=pil", f"--data.train={folder}", f"--data.eval_train={folder}",
            f"--data.eval_val={folder}", "--data.mean=[0.5,0.5,0.5]", "--data.std=[0.25,0.25,0.25]",
            "--model.img_size=16", "--model.patch_size=8", "--model.in_chans=3", "--model.embed_dim=768",
            "--model.num_heads=12", "--model.depth=1", "--eval.shots=[1]", "--eval.probe_epochs=2",
            "--eval.probe_batch_size=4", "--eval.fewshot_trials=1", f"--eval.clip={ckpt}",
            f"--eval.clip_tokenizer={tok}", *extra]


def test_a_maws_clip_checkpoint_is_evaluated_zero_shot(tmp_path, capsys):
    _folder(tmp_path / "imgs")
    sd, _, _ = _release()
    torch.save(sd, tmp_path / "vit_b16_xlmr_b.pt")
    tok = _tokenizer(tmp_path / "tok")
    assert train_main(_args(tmp_path, tmp_path / "vit_b16_xlmr_b.pt", tok)) == 0
    out = capsys.readouterr().out
    assert "vit_b16_xlmr_b.pt (MAWS CLIP): zero-shot top-1" in out and "zero-shot top-1 / top-5" in out
    row, = json.loads((tmp_path / "run" / "results.json").read_text())
    assert row["stage"] == "eval.clip" and 0 <= row["zero_shot_top1"] <= row["zero_shot_top5"] == 1.0  # 2 classes
    assert 0 <= row["linear_probe_top1"] <= 1


def test_a_maws_clip_of_another_architecture_is_refused(tmp_path, capsys):
    _folder(tmp_path / "imgs")
    sd, _, _ = _release()
    torch.save(sd, tmp_path / "clip.pt")
    rc = train_main(_args(tmp_path, tmp_path / "clip.pt", _tokenizer(tmp_path / "tok"), "--model.patch_size=4"))
    assert rc == 2 and "is a ViT of img_size / patch_size / in_chans / embed_dim (16, 8, 3, 768)" in capsys.readouterr().err
    rc = train_main(_args(tmp_path, tmp_path / "clip.pt", tmp_path / "no_tokenizer_here"))
    assert rc == 2 and "eval.clip_tokenizer" in capsys.readouterr().err
