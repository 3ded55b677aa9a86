"""Tokenizer, vocabulary and padding: the text pipeline a server relies on."""
import json
import sys

import pytest
import torch

from seqserve.text import PAD, PAD_ID, UNK, UNK_ID, Tokenizer, Vocab, pad_batch
from training.model import ModelConfig, SequenceModel
from training.textdata import load_text_task, stratified_split


def test_tokenize_lowercases_and_splits_punctuation():
    tok = Tokenizer()
    assert tok.tokenize("Don't PANIC, it's fine!") == ["don't", "panic", ",", "it's", "fine", "!"]
    assert Tokenizer(lowercase=False).tokenize("Hi there") == ["Hi", "there"]
    assert Tokenizer(split_punctuation=False).tokenize("a, b_c!") == ["a", "b", "c"]
    assert tok.tokenize("   ") == []


def test_round_trip_and_unknown_words():
    tok = Tokenizer()
    vocab = Vocab.build([tok.tokenize("the film was good . the film was bad .")], min_freq=1)
    tok = tok.with_vocab(vocab)
    ids = tok.encode("The film was GOOD.")
    assert UNK_ID not in ids
    assert tok.decode(ids) == ["the", "film", "was", "good", "."]
    ids = tok.encode("the zebra was purple")
    assert tok.decode(ids) == ["the", UNK, "was", UNK]
    # Settings and vocabulary survive JSON (the ONNX metadata path) unchanged.
    back = Tokenizer.from_metadata(json.loads(json.dumps(tok.to_dict())),
                                   json.loads(json.dumps(vocab.to_list())))
    assert back.encode("the zebra was purple") == ids
    assert back.vocab.to_list()[:2] == [PAD, UNK]


def test_min_freq_and_reserved_ids():
    vocab = Vocab.build([["a", "a", "b"], ["a", "c", "c"]], min_freq=2)
    assert vocab.to_list() == [PAD, UNK, "a", "c"]
    assert vocab.pad_id == PAD_ID == 0 and vocab.unk_id == UNK_ID == 1
    with pytest.raises(ValueError):
        Vocab(["a", "b"])
    with pytest.raises(ValueError):
        Vocab([PAD, UNK]).decode([5])
    with pytest.raises(ValueError, match="tokenizer"):
        Tokenizer.from_metadata(None, [PAD, UNK])


def test_text_module_does_not_import_torch():
    import subprocess
    code = "import sys, seqserve.text; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_vocabulary_comes_from_train_split_only():
    data = load_text_task("sentiment2", seed=3, min_freq=1, max_examples=300)
    train_words = {t for ids, _, _ in data.train for t in data.vocab.decode(ids)}
    tok = Tokenizer()
    test_words = {w for _, _, text in data.test for w in tok.tokenize(text)[:64]}
    only_in_test = test_words - {w for _, _, text in data.train for w in tok.tokenize(text)}
    assert only_in_test, "a 300-example subset always has test-only words"
    for w in only_in_test:
        assert w not in data.vocab
    assert set(data.vocab.to_list()[2:]) == train_words - {UNK}
    # Splits are disjoint and fixed by the seed.
    again = load_text_task("sentiment2", seed=3, min_freq=1, max_examples=300)
    assert [t for _, _, t in again.test] == [t for _, _, t in data.test]
    assert not {t for _, _, t in data.train} & {t for _, _, t in data.test}


def test_stratified_split_keeps_class_shares():
    labels = [0] * 800 + [1] * 200
    train, val, test = stratified_split(labels, seed=0)
    assert (len(train), len(val), len(test)) == (800, 100, 100)
    assert sum(labels[i] for i in test) == 20
    assert sorted(train + val + test) == list(range(1000))


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_padded_batch_answers_like_each_sentence_alone(cell, bidirectional):
    torch.manual_seed(0)
    model = SequenceModel(ModelConfig(cell=cell, vocab_size=30, embed_dim=8, hidden=12, layers=2,
                                      bidirectional=bidirectional, head="classify", output_size=3)).eval()
    sentences = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [12, 13, 14, 2]]
    rows, lengths = pad_batch(sentences)
    assert rows[1] == [3, 4, 0, 0, 0, 0, 0]
    with torch.no_grad():
        y, state = model(torch.tensor(rows), lengths=torch.tensor(lengths))  # (B, T, C)
        h = state[0] if cell == "lstm" else state
        for b, ids in enumerate(sentences):
            alone, alone_state = model(torch.tensor([ids]))
            alone_h = alone_state[0] if cell == "lstm" else alone_state
            torch.testing.assert_close(y[b, : len(ids)], alone[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(h[:, b], alone_h[:, 0], atol=1e-5, rtol=1e-5)
