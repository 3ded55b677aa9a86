"""NER: BIO spans, word shapes, the memorisation baseline, and a tiny run that exports."""
import argparse
import json

import pytest
import torch
from seqeval.metrics.sequence_labeling import get_entities

from training import ner, nerdata

torch.set_num_threads(1)


@pytest.mark.parametrize("tags, want", [
    (["B-person", "I-person", "O", "B-geo-loc"], [("person", 0, 2), ("geo-loc", 3, 4)]),
    (["O", "I-company", "I-company", "O"], [("company", 1, 3)]),          # I after O starts one
    (["B-person", "B-person", "I-person"], [("person", 0, 1), ("person", 1, 3)]),
    (["B-person", "I-geo-loc", "I-geo-loc"], [("person", 0, 1), ("geo-loc", 1, 3)]),  # type change
    (["I-other"], [("other", 0, 1)]),
    (["O", "O"], []),
    ([], []),
])
def test_spans_on_hand_made_examples(tags, want):
    assert nerdata.spans(tags) == want
    # seqeval (independent) agrees; it reports inclusive ends
    assert [(t, s, e + 1) for t, s, e in get_entities(tags)] == want


def test_spans_rejects_non_bio_tags():
    for bad in (["X-person"], ["B-"], ["person"]):
        with pytest.raises(ValueError, match="BIO"):
            nerdata.spans(bad)


def test_memorizer_takes_majority_tag_and_o_for_unseen():
    train = [(["Paris", "is", "nice"], ["B-geo-loc", "O", "O"]),
             (["Paris", "Hilton"], ["B-person", "I-person"]),
             (["to", "Paris"], ["O", "B-geo-loc"]),
             (["Apple", "Apple"], ["B-company", "B-product"])]  # a tie: alphabetical wins
    memo = nerdata.Memorizer.fit(train)
    assert memo.predict(["Paris", "Hilton", "rocks"]) == ["B-geo-loc", "I-person", "O"]
    assert memo.predict(["Apple", "paris"]) == ["B-company", "O"]  # case-sensitive lookup


def test_read_conll_and_bad_lines(tmp_path):
    good = tmp_path / "ok.txt"
    good.write_text("@bob\tO\nParis\tB-geo-loc\n\t\nhi\tO\n")
    assert nerdata.read_conll(good) == [(["@bob", "Paris"], ["O", "B-geo-loc"]), (["hi"], ["O"])]
    bad = tmp_path / "bad.txt"
    bad.write_text("Paris B-geo-loc\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        nerdata.read_conll(bad)


def test_word_shapes_stand_in_for_unknown_words():
    assert [nerdata.word_shape(t) for t in ["Obama", "NASA", "dog", "@bob", "#tbt", "http://t.co/x", "2pm", "!!"]] == \
        [f"<shape:{k}>" for k in ["Xx", "X", "x", "@", "#", "url", "d", "."]]
    vocab = nerdata.build_vocab([["the", "the", "Zork", "dog", "dog"]], min_freq=2)
    assert "<shape:Xx>" in vocab and "<shape:@>" not in vocab
    ids = nerdata.encode(["the", "Quux", "@bob"], vocab)
    assert vocab.decode(ids) == ["the", "<shape:Xx>", "<unk>"]


def test_split_is_seeded_and_disjoint():
    items = list(range(100))
    a = nerdata.split(items, seed=1)
    assert a == nerdata.split(items, seed=1) and a != nerdata.split(items, seed=2)
    assert [len(p) for p in a] == [70, 15, 15] and sorted(sum(a, [])) == items


def test_real_corpus_reads():
    sentences = nerdata.read_conll(nerdata.corpus_path())
    assert len(sentences) == 2394
    labels = nerdata.tag_set(sentences)
    assert labels[0] == "O" and "B-person" in labels and "I-person" in labels


def test_tiny_bidirectional_run_writes_checkpoint_and_exports(tmp_path):
    args = argparse.Namespace(out=str(tmp_path / "run"), max_examples=80, hidden=12, embed_dim=10, epochs=2,
                              bidirectional=True, threads=1, quiet=True, device="cpu")
    m = ner.run(args)
    run = tmp_path / "run"
    for name in ("checkpoint.pt", "metrics.json", "report.md", "curve.png"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["direction"] == "bidirectional" and 0 <= saved["test"]["f1"] <= 100
    assert saved["f1_minus_baseline"] == pytest.approx(m["test"]["f1"] - m["baseline_memorize"]["test"]["f1"])

    export = pytest.importorskip("training.export")
    onnx = pytest.importorskip("onnx")
    from seqserve import artifact
    path = export.export_run(run, repo=tmp_path / "repo", name="ner-tiny", log=lambda *a: None)
    meta = artifact.read_metadata(onnx.load(str(path)))
    assert meta["output_kind"] == "tag" and meta["directions"] == 2
    assert meta["labels"][0] == "O" and meta["output_names"] == meta["labels"]
    assert meta["vocab"][:2] == ["<pad>", "<unk>"] and meta["tokenizer"]["unknown"] == "word_shape"


def test_server_tokenizer_from_metadata_encodes_like_training():
    """The NER model's tokenizer settings, read back as a server would (torch-free
    seqserve.text), give the ids training used: whitespace tokens, unknown words
    as their shapes, <unk> when even the shape is unknown."""
    from seqserve.text import Tokenizer

    train = [["Obama", "visits", "NASA", "today"], ["@bob", "loves", "#tbt", "2pm"]]
    vocab = nerdata.build_vocab(train, min_freq=1)
    settings = Tokenizer(lowercase=False).to_dict()
    settings.update(pretokenized="whitespace", unknown="word_shape", shape_prefix=nerdata.SHAPE_PREFIX)
    tok = Tokenizer.from_metadata(settings, vocab.to_list())
    sentence = ["Merkel", "visits", "ESA", "@alice", "tomorrow", "http://t.co/x", "!!"]
    assert tok.encode(" ".join(sentence)) == nerdata.encode(sentence, vocab)
    ids = tok.encode(" ".join(sentence))
    assert vocab.decode(ids[:4]) == ["<shape:Xx>", "visits", "<shape:X>", "<shape:@>"]
    assert ids[5] == vocab.unk_id  # no url was seen in training: no <shape:url> token
