"""The baseline the LSTM language model is measured against: an interpolated
Kneser-Ney n-gram model (bigram or trigram), counted with plain dicts.

Like the LSTM, it reads the corpus as one stream with "<eos>" after each
line, so a history may cross a line boundary; the first n-1 tokens get
"<eos>" as their history.

P_k(w | h) for a history h of k-1 words:
    (max(c_k(h w) - D_k, 0) + D_k * T_k(h) * P_{k-1}(w | h[1:])) / c_k(h .)
  where c_n is the raw count at the top order, c_k (k < n) the continuation
  count N1+(. h w) (how many distinct words precede h w), c_k(h .) their sum
  over w, T_k(h) how many distinct w follow h, D_k = n1 / (n1 + 2 n2) from
  that level's count-of-counts. An unseen history falls through to P_{k-1};
  P_0 is uniform over the vocabulary, so no word gets probability 0.

    lm = KneserNey.fit(train_lines, order=3)
    lm.perplexity(test_lines)
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict

EOS = "<eos>"
UNK = "<unk>"


def stream(lines: list[list[str]], eos: str = EOS) -> list[str]:
    out = []
    for ln in lines:
        out.extend(ln)
        out.append(eos)
    return out


class KneserNey:
    """Interpolated Kneser-Ney of any order >= 1 (one absolute discount per order)."""

    def __init__(self, order: int, counts: list[dict], vocab: set[str], eos: str = EOS):
        self.order = order
        self.eos = eos
        self.vocab = vocab
        self.counts = counts  # counts[k]: {k-gram tuple: count}, k = 1..order (index 0 unused)
        self.ctx_total: list[dict] = [{}]
        self.ctx_types: list[dict] = [{}]
        self.discount: list[float] = [0.0]
        for k in range(1, order + 1):
            total, types = defaultdict(int), defaultdict(int)
            for gram, c in counts[k].items():
                total[gram[:-1]] += c
                types[gram[:-1]] += 1
            self.ctx_total.append(dict(total))
            self.ctx_types.append(dict(types))
            coc = Counter(counts[k].values())
            n1, n2 = coc.get(1, 0), coc.get(2, 0)
            # n1/(n1+2n2) is the leave-one-out estimate (Ney et al. 1994); fall back to 0.75
            # when a tiny corpus has no singletons or doubletons to estimate it from.
            self.discount.append(n1 / (n1 + 2 * n2) if n1 > 0 and n2 > 0 else 0.75)

    @classmethod
    def fit(cls, lines: list[list[str]], order: int = 3, eos: str = EOS) -> "KneserNey":
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        toks = stream(lines, eos)
        if not toks:
            raise ValueError("cannot fit an n-gram model on an empty corpus")
        seq = [eos] * (order - 1) + toks
        top = Counter(tuple(seq[i - order + 1: i + 1]) for i in range(order - 1, len(seq)))
        counts: list[dict] = [dict() for _ in range(order + 1)]
        counts[order] = dict(top)
        # Lower orders count distinct left neighbours (continuation counts).
        for k in range(order - 1, 0, -1):
            cont: dict = defaultdict(int)
            for gram in counts[k + 1]:
                cont[gram[1:]] += 1
            counts[k] = dict(cont)
        return cls(order, counts, set(toks), eos)

    def _word(self, w: str) -> str:
        return w if w in self.vocab or UNK not in self.vocab else UNK

    def prob(self, word: str, history: tuple[str, ...]) -> float:
        """P(word | last order-1 words of history)."""
        word = self._word(word)
        h = tuple(self._word(w) for w in history[-(self.order - 1):]) if self.order > 1 else ()
        p = 1.0 / len(self.vocab)  # P_0: uniform
        for k in range(1, self.order + 1):  # lowest order first, each level interpolates the last
            ctx = h[-(k - 1):] if k > 1 else ()
            total = self.ctx_total[k].get(ctx, 0)
            if total == 0:
                continue  # unseen history: this level passes P_{k-1} through
            d = self.discount[k]
            c = self.counts[k].get(ctx + (word,), 0)
            p = (max(c - d, 0.0) + d * self.ctx_types[k][ctx] * p) / total
        return p

    def perplexity(self, lines: list[list[str]]) -> float:
        """exp(mean -log P) over every token of the stream (each line's <eos> included)."""
        toks = stream(lines, self.eos)
        if not toks:
            raise ValueError("cannot score an empty corpus")
        seq = [self.eos] * (self.order - 1) + toks
        n = self.order - 1
        nll = 0.0
        for i in range(n, len(seq)):
            nll -= math.log(self.prob(seq[i], tuple(seq[i - n: i])))
        return math.exp(nll / len(toks))
