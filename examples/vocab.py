"""Token vocabularies: the subword tokenizers (Hugging Face ``tokenizers``) of the chatbot and
the classifier, and the classifier's character vocabulary.

Every vocabulary here has ``<pad>`` at id 0, so padded batches are zeros.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "SPECIAL_TOKENS",
    "UNK",
    "CharTokens",
    "SubwordTokens",
    "make_tokens",
    "show_token",
    "tokenizer_from_json",
    "train_subword_tokenizer",
]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = range(4)


def train_subword_tokenizer(texts: Iterable[str], *, vocab_size: int, kind: str = "bpe") -> Any:
    """A subword tokenizer (Hugging Face ``tokenizers``) trained on ``texts``.

    ``kind`` is "bpe" or "unigram". Text is NFKC-normalised and split at spaces the way
    SentencePiece does (Metaspace: a word carries its leading space as "▁"), so decoding
    restores the spacing, and Hangul syllables stay whole characters (a byte-level BPE would
    spend three byte tokens on each before learning to merge them). The special tokens take
    ids 0-3: ``<pad> <bos> <eos> <unk>``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
        )
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            unk_token="<unk>",
            show_progress=False,
        )
    else:
        raise ValueError(f"tokenizer kind must be 'bpe' or 'unigram', got {kind!r}")
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(list(texts), trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"special token {t} got id {tok.token_to_id(t)}, expected {i}")
    return tok


def tokenizer_from_json(text: str) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(text)


CHAR_PAD, CHAR_UNK = 0, 1  # char vocabulary: 0 pad, 1 unknown, then the characters


class CharTokens:
    """Characters as tokens: 0 padding, 1 unknown, then the training set's characters."""

    def __init__(self, chars: str):
        self.chars = chars
        self.index = {c: i + 2 for i, c in enumerate(chars)}

    @classmethod
    def fit(cls, texts: Sequence[str]) -> CharTokens:
        return cls("".join(sorted(set("".join(texts)))))

    def encode(self, text: str) -> list[int]:
        return [self.index.get(c, CHAR_UNK) for c in text]

    def pieces(self, ids: Sequence[int]) -> list[str]:
        return [self.chars[i - 2] if i >= 2 else "?" for i in ids]

    @property
    def size(self) -> int:
        return len(self.chars) + 2

    def to_str(self) -> str:
        return self.chars


class SubwordTokens:
    """A trained ``tokenizers`` model behind the :class:`CharTokens` interface; its <pad> is
    id 0 too."""

    def __init__(self, tok: Any):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def pieces(self, ids: Sequence[int]) -> list[str]:
        return [self.tok.id_to_token(i) for i in ids]

    @property
    def size(self) -> int:
        return self.tok.get_vocab_size()

    def to_str(self) -> str:
        return self.tok.to_str()


def make_tokens(
    kind: str, texts: Sequence[str], vocab_size: int, saved: str | None
) -> CharTokens | SubwordTokens:
    """``kind`` "char", "bpe" or "unigram", fitted on ``texts`` or rebuilt from ``saved``
    (what ``to_str()`` gave, kept in the checkpoint)."""
    if kind == "char":
        return CharTokens(saved) if saved is not None else CharTokens.fit(texts)
    if saved is not None:
        return SubwordTokens(tokenizer_from_json(saved))
    return SubwordTokens(train_subword_tokenizer(texts, vocab_size=vocab_size, kind=kind))


def show_token(text: str) -> str:
    """A token as a readable tick label: visible spaces and line ends."""
    return text.replace(" ", "␣").replace("▁", "␣").replace("\n", "⏎") or "∅"
