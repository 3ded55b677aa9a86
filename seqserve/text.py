"""Raw text -> token ids, the same way at training time and on the server.

Pure Python (no torch, no numpy): the server imports this to accept raw text
for a text model, using the tokenizer settings and vocabulary stored in the
model's ONNX metadata (keys "tokenizer" and "vocab", see seqserve/artifact.py).

API
  Tokenizer(lowercase=True, split_punctuation=True)
      .tokenize(text) -> list[str]        words; punctuation marks are tokens
      .encode(text) -> list[int]          needs a vocabulary (unknown -> UNK_ID)
      .decode(ids) -> list[str]
      .to_dict() -> dict                  JSON-able settings, goes to metadata
      pretokenized="whitespace"           split on spaces only (pre-tokenised corpora, NER)
      unknown="word_shape"                unknown words -> word_shape(token) ids (NER)
      Tokenizer.from_metadata(tokenizer_dict, vocab_list) -> Tokenizer
  Vocab.build(token_lists, min_freq=2, max_size=None) -> Vocab   (training split only!)
      .encode(tokens) / .decode(ids) / .to_list() / Vocab.from_list(tokens)
      len(vocab), vocab.pad_id == 0, vocab.unk_id == 1
  pad_batch(id_lists, pad_id=0) -> (rows, lengths)   right-padded rectangle

Server recipe (raw text in, label out):
    tok = Tokenizer.from_metadata(meta["tokenizer"], meta["vocab"])
    ids = tok.encode(text)          # [] for text with no tokens: reject it
    x = [ids]                       # int64 (1, T); y (1, T, C): y[0, -1] is the class
For a batch, pad with pad_batch and read each row's logits at step
lengths[i] - 1 (or run rows separately): padded steps are not meaningful.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

PAD = "<pad>"
UNK = "<unk>"
PAD_ID = 0
UNK_ID = 1

# A word is letters/digits with inner apostrophes ("don't", "it's"); every
# other non-space character (punctuation, '#', '@', emoji) is a token alone.
# Underscores separate words (tweets glue words with them).
_WORD = r"[^\W_]+(?:'[^\W_]+)*"
_WORDS_AND_MARKS = re.compile(_WORD + r"|[^\w\s]|_")
_WORDS_ONLY = re.compile(_WORD)

SHAPE_PREFIX = "<shape:"
_URL = re.compile(r"^(https?://|www\.)", re.I)


def word_shape(token: str, prefix: str = SHAPE_PREFIX) -> str:
    """A coarse class of a word's surface form, standing in for an unknown word.

    An unknown capitalised word is a likely entity, an unknown lower-case one
    is not: taggers keep that signal where a single <unk> would lose it. The
    same rule runs at training time (training/nerdata.py) and on the server.
    """
    if _URL.match(token):
        kind = "url"
    elif token.startswith("@") and len(token) > 1:
        kind = "@"
    elif token.startswith("#") and len(token) > 1:
        kind = "#"
    elif any(ch.isdigit() for ch in token):
        kind = "d"
    elif token.isupper() and any(ch.isalpha() for ch in token):
        kind = "X"
    elif token[:1].isupper():
        kind = "Xx"
    elif any(ch.isalpha() for ch in token):
        kind = "x"
    else:
        kind = "."
    return f"{prefix}{kind}>"


class Vocab:
    """Token <-> id table; id 0 is padding and id 1 the unknown token."""

    def __init__(self, tokens: list[str]):
        if len(tokens) < 2 or tokens[PAD_ID] != PAD or tokens[UNK_ID] != UNK:
            raise ValueError(f"a vocabulary must start with {PAD!r}, {UNK!r}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("a vocabulary must not repeat a token")
        self._tokens = list(tokens)
        self._ids = {t: i for i, t in enumerate(self._tokens)}

    @classmethod
    def build(cls, token_lists: Iterable[list[str]], min_freq: int = 2,
              max_size: int | None = None) -> "Vocab":
        """Count tokens (of the TRAINING split only) and keep the frequent ones.

        Order is by descending count, then alphabetical, so the same data
        always gives the same ids.
        """
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        counts = Counter(t for tokens in token_lists for t in tokens)
        kept = sorted((t for t, n in counts.items() if n >= min_freq and t not in (PAD, UNK)),
                      key=lambda t: (-counts[t], t))
        if max_size is not None:
            kept = kept[: max(0, max_size - 2)]
        return cls([PAD, UNK] + kept)

    @classmethod
    def from_list(cls, tokens: list[str]) -> "Vocab":
        return cls(tokens)

    def to_list(self) -> list[str]:
        return list(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._ids

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    def encode(self, tokens: list[str]) -> list[int]:
        return [self._ids.get(t, UNK_ID) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        n = len(self._tokens)
        out = []
        for i in ids:
            if not 0 <= int(i) < n:
                raise ValueError(f"token id {i} out of range for a vocabulary of {n}")
            out.append(self._tokens[int(i)])
        return out


class Tokenizer:
    """Lower-cases and splits text into words and punctuation marks."""

    KIND = "words-v1"

    def __init__(self, lowercase: bool = True, split_punctuation: bool = True,
                 vocab: Vocab | None = None, *, pretokenized: str | None = None,
                 unknown: str = "unk", shape_prefix: str = SHAPE_PREFIX):
        if pretokenized not in (None, "whitespace"):
            raise ValueError(f"pretokenized must be None or 'whitespace', got {pretokenized!r}")
        if unknown not in ("unk", "word_shape"):
            raise ValueError(f"unknown must be 'unk' or 'word_shape', got {unknown!r}")
        self.lowercase = lowercase
        self.split_punctuation = split_punctuation
        self.vocab = vocab
        self.pretokenized = pretokenized  # "whitespace": tokens are split on spaces only
        self.unknown = unknown  # "word_shape": an unknown word becomes its shape token
        self.shape_prefix = shape_prefix

    def tokenize(self, text: str) -> list[str]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        if self.lowercase:
            text = text.lower()
        if self.pretokenized == "whitespace":
            return text.split()
        pattern = _WORDS_AND_MARKS if self.split_punctuation else _WORDS_ONLY
        return pattern.findall(text)

    def with_vocab(self, vocab: Vocab) -> "Tokenizer":
        return Tokenizer(self.lowercase, self.split_punctuation, vocab,
                         pretokenized=self.pretokenized, unknown=self.unknown,
                         shape_prefix=self.shape_prefix)

    def encode(self, text: str) -> list[int]:
        if self.vocab is None:
            raise ValueError("this tokenizer has no vocabulary: build one with Vocab.build")
        tokens = self.tokenize(text)
        ids = self.vocab.encode(tokens)
        if self.unknown == "word_shape":  # unknown word -> its shape, when the vocabulary has it
            ids = [self.vocab.encode([word_shape(t, self.shape_prefix)])[0] if i == UNK_ID else i
                   for t, i in zip(tokens, ids)]
        return ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        if self.vocab is None:
            raise ValueError("this tokenizer has no vocabulary")
        return self.vocab.decode(ids)

    def to_dict(self) -> dict:
        """Settings only (the vocabulary travels separately as a list)."""
        return {
            "kind": self.KIND,
            "lowercase": self.lowercase,
            "split_punctuation": self.split_punctuation,
            "pad": PAD,
            "unk": UNK,
            "pad_id": PAD_ID,
            "unk_id": UNK_ID,
            "pretokenized": self.pretokenized,
            "unknown": self.unknown,
            "shape_prefix": self.shape_prefix,
        }

    @classmethod
    def from_metadata(cls, tokenizer: dict | None, vocab: list[str] | None) -> "Tokenizer":
        """Rebuild from ONNX metadata values (or Checkpoint.extra)."""
        if not isinstance(tokenizer, dict):
            raise ValueError("model has no tokenizer settings: it does not accept raw text")
        kind = tokenizer.get("kind", cls.KIND)
        if kind != cls.KIND:
            raise ValueError(f"unknown tokenizer kind {kind!r} (this build reads {cls.KIND!r})")
        voc = Vocab.from_list(vocab) if vocab is not None else None
        return cls(bool(tokenizer.get("lowercase", True)),
                   bool(tokenizer.get("split_punctuation", True)), voc,
                   pretokenized=tokenizer.get("pretokenized"),
                   unknown=tokenizer.get("unknown") or "unk",
                   shape_prefix=tokenizer.get("shape_prefix") or SHAPE_PREFIX)


def pad_batch(id_lists: list[list[int]], pad_id: int = PAD_ID) -> tuple[list[list[int]], list[int]]:
    """Right-pad token id lists to one length: (rows (B, T), lengths (B,))."""
    lengths = [len(ids) for ids in id_lists]
    if not lengths or min(lengths) == 0:
        raise ValueError("every sequence needs at least one token")
    T = max(lengths)
    return [list(ids) + [pad_id] * (T - len(ids)) for ids in id_lists], lengths
