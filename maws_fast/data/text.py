"""Captions and their tokenizer: a byte-level BPE trained with HF ``tokenizers`` on the captions.

The tokenizer is one ``tokenizer.json`` (``tokenizers``' own format: the merges, the vocabulary,
the normaliser, truncation and padding), written next to the LiT checkpoint that uses it and read
back by ``Tokenizer.from_file``; anything that reads that format reads ours.

* Normalisation: NFKC, lower case. Pre-tokenisation: byte level (every string encodes; no unknown
  token), a space before the first word.
* Special tokens: ``[PAD]`` = 0, ``[CLS]`` = 1, ``[EOS]`` = 2. Every caption is encoded as
  ``[CLS] ... [EOS]``, truncated to ``context_length`` tokens (the specials kept), padded with
  ``[PAD]`` to ``context_length`` (the text tower drops the padding before its blocks).
* Training is deterministic: the same captions and settings give the same file, byte for byte.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from maws_fast.data.jsonl import check_caption, jsonl_rows
from maws_fast.errors import ConfigError, DataError
from maws_fast.storage import atomic_write_text

PAD, CLS, EOS = "[PAD]", "[CLS]", "[EOS]"
SPECIALS = (PAD, CLS, EOS)  # ids 0, 1, 2


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ConfigError(f"the LiT text tower needs HF tokenizers, which does not import here ({e}); "
                          "pip install tokenizers") from None
    return tokenizers


class CaptionTokenizer:
    """A trained byte-level BPE with this project's specials, truncation and padding.

    Build one with :meth:`train` or :meth:`load`; :meth:`encode` turns captions into (B,
    context_length) int64 ids.
    """

    def __init__(self, tok) -> None:
        trunc, pad = tok.truncation, tok.padding
        ok = (trunc is not None and pad is not None and pad.get("length") == trunc["max_length"]
              and all(tok.token_to_id(s) == i for i, s in enumerate(SPECIALS)))
        if ok:
            probe = tok.encode("a").ids
            ok = len(probe) == trunc["max_length"] and probe[0] == 1 and 2 in probe
        if not ok:
            raise DataError("this tokenizer.json was not written by maws_fast (it needs [PAD]=0, [CLS]=1, [EOS]=2 around "
                            "every caption, truncation and padding to the context length); train one with `maws-data "
                            "tokenizer`")
        # a caption's own text "[PAD]" / "[CLS]" / "[EOS]" is text, never the special token
        tok.encode_special_tokens = True
        self.tok = tok
        self.context_length = int(trunc["max_length"])
        self.pad_id = 0

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int, context_length: int) -> CaptionTokenizer:
        """A BPE of ``vocab_size`` tokens (specials and the 256 bytes included) learnt from ``captions``."""
        tk = _tokenizers()
        if vocab_size < 256 + len(SPECIALS) + 1:
            raise ConfigError(f"config: lit.vocab_size: {vocab_size} is below the 256 byte tokens + 3 specials + 1 merge; "
                              "use >= 260")
        if context_length < 3:
            raise ConfigError(f"config: lit.context_length: {context_length} leaves no room for a word between "
                              "[CLS] and [EOS]; use >= 3")
        tok = tk.Tokenizer(tk.models.BPE())
        tok.normalizer = tk.normalizers.Sequence([tk.normalizers.NFKC(), tk.normalizers.Lowercase()])
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
        captions = list(captions)
        if not captions:
            raise DataError("no captions to train the tokenizer on")
        tok.train_from_iterator(captions, trainer=trainer, length=len(captions))
        tok.post_processor = tk.processors.TemplateProcessing(single=f"{CLS} $A {EOS}",
                                                              special_tokens=[(CLS, 1), (EOS, 2)])
        tok.enable_truncation(max_length=context_length)
        tok.enable_padding(pad_id=0, pad_token=PAD, length=context_length)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> CaptionTokenizer:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"tokenizer {p} does not exist; train one with `maws-data tokenizer` or let the lit stage "
                            "train it (lit.tokenizer=null)")
        try:
            tok = _tokenizers().Tokenizer.from_file(str(p))
        except Exception as e:  # noqa: BLE001 - tokenizers raises its own Exception type for a bad file
            raise DataError(f"tokenizer {p} does not load ({e}); it must be a tokenizer.json from `maws-data "
                            "tokenizer`") from None
        return cls(tok)

    def to_str(self) -> str:
        return self.tok.to_str()

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` atomically (a crash never leaves half a file)."""
        atomic_write_text(Path(path), self.to_str())

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """(B, context_length) int64 ids: ``[CLS] tokens [EOS]`` then ``[PAD]``."""
        if isinstance(captions, str):
            raise TypeError("encode takes a list of captions, not one string")
        enc = self.tok.encode_batch(list(captions))
        return torch.tensor([e.ids for e in enc], dtype=torch.int64).reshape(len(enc), self.context_length)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def read_captions(path: str | Path) -> list[str]:
    """Captions of a corpus file: ``.jsonl`` rows with a ``caption`` field, or ``.txt``, one per line."""
    p = Path(path)
    if p.suffix == ".jsonl":
        return [check_caption(p, no, row["caption"])
                for no, row in jsonl_rows(p, ("caption",), "caption file", 'give a .jsonl of {"caption": "..."} rows '
                                          "or a .txt of one caption per line")]
    if not p.is_file():
        raise DataError(f"caption file {p} does not exist; give a .jsonl of {{\"caption\": \"...\"}} rows or a .txt "
                        "of one caption per line")
    return [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]


class TokenizedLoader:
    """A JPEG loader of (images, captions) as a loader of (images, token ids (B, context_length)):
    each batch's captions are tokenized on the host as it is handed out (HF tokenizers' batch
    encode: about a millisecond for 256 captions). Everything else is the wrapped loader's."""

    def __init__(self, loader, tokenizer: CaptionTokenizer):
        self.loader, self.tokenizer = loader, tokenizer

    @property
    def bad(self):
        return self.loader.bad

    @property
    def num_batches(self) -> int:
        return self.loader.num_batches

    def epoch(self, epoch: int, start_batch: int = 0):
        for imgs, captions in self.loader.epoch(epoch, start_batch):
            yield imgs, self.tokenizer.encode(captions)

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def close(self) -> None:
        self.loader.close()


def source_captions(source) -> list[str]:
    """Every caption of a :class:`~maws_fast.data.sources.Source` (to train its tokenizer on): a file
    list's from its JSONL, shards' from each sample's ``.json`` (one read per sample: for a large
    corpus train the tokenizer once with `maws-data tokenizer` and pass it as lit.tokenizer)."""
    if source.shards is None:
        return [c for c in (source.captions or []) if c is not None]
    from maws_fast.data.shards import ShardReader

    reader = ShardReader()
    try:
        return [c for s in source.shards.samples if (c := reader.read_meta(s).get("caption")) is not None]
    finally:
        reader.close()
