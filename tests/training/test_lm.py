"""Language model: perplexity by hand, state carried across TBPTT windows, a run that exports."""
import argparse
import json
import math

import pytest
import torch

from training import lm
from training.model import ModelConfig, SequenceModel

torch.set_num_threads(1)


def constant_model(probs):
    """An LM whose next-token distribution is `probs` whatever it reads (head weights zero)."""
    V = len(probs)
    m = SequenceModel(ModelConfig(cell="lstm", vocab_size=V, embed_dim=3, hidden=4, layers=1,
                                  head="lm", output_size=V))
    with torch.no_grad():
        m.head.weight.zero_()
        m.head.bias.copy_(torch.log(torch.tensor(probs)))
    return m.eval()


def test_perplexity_matches_hand_calculation():
    m = constant_model([0.1, 0.2, 0.3, 0.4])
    data = torch.tensor([[2, 3, 1, 3],
                         [3, 3, 2, 1]])  # (B=2, N=4): targets are columns 1..3 of each row
    # row 0 predicts 3, 1, 3 (p .4 .2 .4); row 1 predicts 3, 2, 1 (p .4 .3 .2)
    want = (0.4 * 0.2 * 0.4 * 0.4 * 0.3 * 0.2) ** (-1 / 6)
    for bptt in (1, 2, 35):  # windowing must not drop or repeat a target
        assert lm.perplexity(m, data, bptt) == pytest.approx(want, rel=1e-6)


def test_batchify_and_windows_cover_the_stream():
    stream = torch.arange(23)
    data = lm.batchify(stream, 4)  # (4, 5): 3 tokens dropped
    assert data.shape == (4, 5) and data[1].tolist() == [5, 6, 7, 8, 9]
    pairs = list(lm.windows(data, 3))
    assert [x.shape[1] for x, _ in pairs] == [3, 1]
    assert torch.equal(torch.cat([y for _, y in pairs], 1), data[:, 1:])
    with pytest.raises(ValueError, match="too short"):
        lm.batchify(torch.arange(3), 4)


def test_state_carried_across_windows_equals_one_pass():
    torch.manual_seed(0)
    m = SequenceModel(ModelConfig(cell="lstm", vocab_size=30, embed_dim=8, hidden=12, layers=2,
                                  dropout=0.3, head="lm", output_size=30)).eval()
    data = torch.randint(2, 30, (3, 21))
    whole, _ = m(data[:, :-1])  # (3, 20, 30) one pass
    chunked = torch.cat([lo for lo, _ in lm.stream_logits(m, data, bptt=6)], dim=1)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    # ... and carrying matters: restarting each window from zeros gives other logits
    fresh = torch.cat([m(x)[0] for x, _ in lm.windows(data, 6)], dim=1)
    assert not torch.allclose(fresh, whole, atol=1e-3)
    assert lm.perplexity(m, data, 6) == pytest.approx(lm.perplexity(m, data, 20), rel=1e-5)


def test_encode_stream_adds_eos_and_maps_unknown():
    vocab = lm.build_vocab([["the", "cat"], ["the", "<unk>"]])
    ids = lm.encode_stream([["the", "dog"]], vocab).tolist()
    assert vocab.decode(ids) == ["the", "<unk>", lm.EOS]


def test_tiny_run_writes_checkpoint_report_and_exports(tmp_path):
    args = argparse.Namespace(out=str(tmp_path / "run"), max_examples=60, hidden=16, embed_dim=12,
                              epochs=2, batch_size=4, threads=1, quiet=True, bidirectional=False)
    m = lm.run(args)
    run = tmp_path / "run"
    for name in ("checkpoint.pt", "metrics.json", "report.md", "curve.png"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["test_ppl"] == m["test_ppl"] and math.isfinite(m["test_ppl"])
    assert saved["ngram"]["kn3"]["test_ppl"] > 1
    assert len(saved["next_words"][lm.PROMPT]) == 5
    assert set(saved["neighbours_output"]) == set(saved["neighbours"])
    with pytest.raises(ValueError, match="bidirectional"):
        lm.run(argparse.Namespace(out=str(tmp_path / "bi"), bidirectional=True))

    export = pytest.importorskip("training.export")
    onnx = pytest.importorskip("onnx")
    from seqserve import artifact
    from seqserve.text import Tokenizer
    path = export.export_run(run, repo=tmp_path / "repo", name="ptb-tiny", log=lambda *a: None)
    meta = artifact.read_metadata(onnx.load(str(path)))
    assert meta["output_kind"] == "lm" and meta["input_kind"] == "tokens"
    assert meta["vocab"][:2] == ["<pad>", "<unk>"] and lm.EOS in meta["vocab"]
    tok = Tokenizer.from_metadata(meta["tokenizer"], meta["vocab"])
    assert tok.decode(tok.encode("the")) == ["the"]
