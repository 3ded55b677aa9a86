"""Kneser-Ney baseline: a hand-worked bigram example and the axioms of a distribution."""
import math
import random

import pytest

from training.ngram import EOS, KneserNey

# Train "a b" / "a c": stream a b <eos> a c <eos>, history of the first token <eos>.
#   bigram counts: (<eos>,a)=2 (a,b)=1 (b,<eos>)=1 (a,c)=1 (c,<eos>)=1  -> n1=4, n2=1, D2=4/6=2/3
#   continuation counts N1+(. w): a=1 b=1 c=1 <eos>=2, total 5          -> n1=3, n2=1, D1=3/5
#   P1(w) = (N1+(.w) - 3/5 + 3/5 * 4 types * 1/4) / 5 = N1+(.w) / 5
#   P(a|<eos>) = (2 - 2/3 + 2/3 * 1 * 1/5) / 2 = 11/15
#   P(b|a)     = (1 - 2/3 + 2/3 * 2 * 1/5) / 2 = 3/10
#   P(<eos>|b) = (1 - 2/3 + 2/3 * 1 * 2/5) / 1 = 3/5
TRAIN = [["a", "b"], ["a", "c"]]


def test_bigram_probabilities_match_hand_calculation():
    lm = KneserNey.fit(TRAIN, order=2)
    assert lm.discount[1:] == pytest.approx([3 / 5, 2 / 3])
    assert lm.prob("a", (EOS,)) == pytest.approx(11 / 15)
    assert lm.prob("b", ("a",)) == pytest.approx(3 / 10)
    assert lm.prob(EOS, ("b",)) == pytest.approx(3 / 5)
    # no history: the bigram level has nothing to say and P1 answers
    assert lm.prob("a", ()) == pytest.approx(1 / 5)
    assert lm.prob(EOS, ()) == pytest.approx(2 / 5)


def test_perplexity_matches_hand_calculation():
    lm = KneserNey.fit(TRAIN, order=2)
    want = (11 / 15 * 3 / 10 * 3 / 5) ** (-1 / 3)
    assert lm.perplexity([["a", "b"]]) == pytest.approx(want)


def test_unigram_order_is_continuation_counts():
    lm = KneserNey.fit(TRAIN, order=1)
    # order 1 alone: raw counts a=2 b=1 c=1 <eos>=2 (total 6), n1=2 n2=2 -> D=1/3
    d = 1 / 3
    assert lm.prob("a", ()) == pytest.approx((2 - d + d * 4 * 0.25) / 6)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_distribution_sums_to_one(order):
    rng = random.Random(order)
    words = [f"w{i}" for i in range(12)] + ["<unk>"]
    lines = [[rng.choice(words[: 3 + i % 10]) for _ in range(rng.randint(1, 8))] for i in range(60)]
    lm = KneserNey.fit(lines, order=order)
    for history in [(), ("w0",), ("w1", "w2"), ("zzz", "w0"), (EOS, EOS), ("w11", "w11")]:
        total = sum(lm.prob(w, history) for w in lm.vocab)
        assert total == pytest.approx(1.0, abs=1e-9), history


def test_unknown_words_score_as_unk_and_never_zero():
    lm = KneserNey.fit([["the", "<unk>", "cat"], ["the", "dog"]], order=3)
    assert lm.prob("zebra", ("the",)) == lm.prob("<unk>", ("the",)) > 0
    assert math.isfinite(lm.perplexity([["a", "zebra", "flew"]]))


def test_bad_input():
    with pytest.raises(ValueError, match="order"):
        KneserNey.fit(TRAIN, order=0)
    with pytest.raises(ValueError, match="empty"):
        KneserNey.fit([], order=2)
