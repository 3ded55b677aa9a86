"""BIO-constrained decoding (seqserve.tagging) against brute force over every tag sequence."""
import itertools

import numpy as np
import pytest

from seqserve.tagging import bio_rules, decode_bio, entities, log_softmax

LABELS = ["O", "B-person", "I-person", "B-geo-loc", "I-geo-loc"]


def valid(tags: list[str]) -> bool:
    """Written independently of bio_rules: I-X needs B-X or I-X just before it."""
    prev = "O"
    for t in tags:
        if t.startswith("I-") and prev[2:] != t[2:]:
            return False
        prev = t
    return True


def brute_force(scores: np.ndarray, labels: list[str]) -> list[int]:
    lp = log_softmax(scores)
    best, best_ids = -np.inf, None
    for ids in itertools.product(range(len(labels)), repeat=scores.shape[0]):
        if not valid([labels[i] for i in ids]):
            continue
        total = sum(lp[t, i] for t, i in enumerate(ids))
        if total > best:
            best, best_ids = total, list(ids)
    return best_ids


@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("T", [1, 2, 5])
def test_decode_equals_brute_force_over_valid_sequences(seed, T):
    rng = np.random.default_rng(seed)
    scores = rng.normal(scale=3.0, size=(T, len(LABELS)))
    got = decode_bio(scores, LABELS)
    assert got == brute_force(scores, LABELS)
    assert valid([LABELS[i] for i in got])


def test_invalid_argmax_is_repaired():
    # argmax alone would say "O I-person": no annotator writes that
    z = np.log(np.array([[0.6, 0.3, 0.1, 0.0 + 1e-9, 1e-9],
                         [0.1, 0.1, 0.8, 1e-9, 1e-9]]))
    assert [LABELS[i] for i in z.argmax(-1)] == ["O", "I-person"]
    assert [LABELS[i] for i in decode_bio(z, LABELS)] == ["B-person", "I-person"]


def test_rules_and_errors():
    may_start, may_follow = bio_rules(LABELS)
    assert may_start.tolist() == [True, True, False, True, False]
    i_person = LABELS.index("I-person")
    assert may_follow[:, i_person].tolist() == [False, True, True, False, False]
    assert decode_bio(np.zeros((0, 5)), LABELS) == []
    with pytest.raises(ValueError, match="5 tags per token but 4 labels"):
        decode_bio(np.zeros((3, 5)), LABELS[:4])
    with pytest.raises(ValueError, match="not a BIO tag"):
        bio_rules(["O", "person"])


def test_entities_with_text():
    tags = ["B-person", "I-person", "O", "B-geo-loc"]
    assert entities(tags, ["Barack", "Obama", "in", "Paris"]) == [
        {"type": "person", "start": 0, "end": 2, "text": "Barack Obama"},
        {"type": "geo-loc", "start": 3, "end": 4, "text": "Paris"}]
