"""Turning a tagger's per-token scores into BIO tags and entities (torch-free).

A many-to-many tagger scores every tag at every token independently; taking
the argmax per token can produce sequences no annotator would write, such as
`O I-person` or `B-person I-geo-loc`. `decode_bio` instead finds the single
most probable tag sequence among the VALID ones (Viterbi over the per-token
log-probabilities, with transitions allowed or forbidden by the BIO rules):

    I-X may only follow B-X or I-X; a sentence may not start with I-X.

No transition is learned (there are no scores to train: this is the same
model read more carefully), so the server, the CLI and the training report
all decode one way. Used by `training.ner` (reported beside plain argmax)
and by `seqserve predict` for tagging models.
"""
from __future__ import annotations

import numpy as np

OUTSIDE = "O"


def _parts(tag: str) -> tuple[str, str]:
    prefix, _, kind = tag.partition("-")
    if prefix not in ("B", "I", OUTSIDE) or (prefix != OUTSIDE and not kind):
        raise ValueError(f"not a BIO tag: {tag!r} (expected O, B-<type> or I-<type>)")
    return prefix, kind


def bio_rules(labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(may_start (K,), may_follow (K, K)) boolean: may_follow[i, j] allows tag j after tag i."""
    parts = [_parts(t) for t in labels]
    K = len(parts)
    may_start = np.array([p != "I" for p, _ in parts], bool)
    may_follow = np.ones((K, K), bool)
    for j, (pj, kj) in enumerate(parts):
        if pj == "I":
            may_follow[:, j] = [pi in ("B", "I") and ki == kj for pi, ki in parts]
    return may_start, may_follow


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def decode_bio(scores: np.ndarray, labels: list[str], rules=None) -> list[int]:
    """The most probable valid BIO tag sequence (tag ids) for scores (T, K) of logits.

    Every label list has at least one tag that may start and follow anything
    (O or a B- tag), so a valid sequence always exists.
    """
    lp = log_softmax(scores)
    T, K = lp.shape
    if K != len(labels):
        raise ValueError(f"scores have {K} tags per token but {len(labels)} labels were given")
    if T == 0:
        return []
    may_start, may_follow = rules if rules is not None else bio_rules(labels)
    forbid = np.where(may_follow, 0.0, -np.inf)  # (K, K)
    best = np.where(may_start, lp[0], -np.inf)  # best score of a valid path ending in each tag
    back = np.zeros((T, K), np.int64)
    for t in range(1, T):
        cand = best[:, None] + forbid  # (from, to)
        back[t] = cand.argmax(axis=0)
        best = cand[back[t], np.arange(K)] + lp[t]
    path = [int(best.argmax())]
    for t in range(T - 1, 0, -1):
        path.append(int(back[t, path[-1]]))
    return path[::-1]


def entities(tags: list[str], tokens: list[str] | None = None) -> list[dict]:
    """Entities of a BIO tag sequence (CoNLL rules: an I-X after O or another
    type starts an entity): [{"type", "start", "end" (exclusive)[, "text"]}]."""
    out, kind, start = [], None, 0
    for i, tag in enumerate(list(tags) + [OUTSIDE]):
        prefix, typ = _parts(tag)
        continues = prefix == "I" and typ == kind
        if kind is not None and not continues:
            out.append({"type": kind, "start": start, "end": i})
            kind = None
        if prefix in ("B", "I") and not continues:
            kind, start = typ, i
    if tokens is not None:
        for e in out:
            e["text"] = " ".join(tokens[e["start"]: e["end"]])
    return out
