"""SequenceModel: shapes per cell/head, explicit state, padding, checkpoints."""
from __future__ import annotations

import pytest
import torch

from training.model import (CELLS, Checkpoint, ModelConfig, SequenceModel, count_parameters,
                            load_checkpoint, save_checkpoint)

B, T, H, L = 3, 7, 5, 2


def make(cell, head="regression", bidirectional=False, vocab=0, features=2, out=4, dropout=0.0):
    torch.manual_seed(0)
    cfg = ModelConfig(cell=cell, input_size=features, vocab_size=vocab, embed_dim=6, hidden=H, layers=L,
                      dropout=dropout, bidirectional=bidirectional, head=head, output_size=out)
    return SequenceModel(cfg).eval()


def inputs(model, b=B, t=T):
    g = torch.Generator().manual_seed(1)
    c = model.config
    if c.token_input:
        return torch.randint(1, c.vocab_size, (b, t), generator=g)
    return torch.randn(b, t, c.input_size, generator=g)


def states(state):
    return state if isinstance(state, tuple) else (state,)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("head,vocab", [("regression", 0), ("classify", 11), ("tag", 11), ("lm", 11)])
@pytest.mark.parametrize("cell", CELLS)
def test_shapes(cell, head, vocab, bidirectional):
    m = make(cell, head, bidirectional, vocab)
    y, state = m(inputs(m))
    assert y.shape == (B, T, 4)
    D = 2 if bidirectional else 1
    assert len(states(state)) == (2 if cell == "lstm" else 1)
    for s in states(state):
        assert s.shape == (L * D, B, H)
    init = m.initial_state(B)
    assert [s.shape for s in states(init)] == [s.shape for s in states(state)]
    assert all(float(s.abs().sum()) == 0 for s in states(init))


@pytest.mark.parametrize("cell", CELLS)
def test_parameter_count_matches_torch_formula(cell):
    # Independent count: gates * (in*H + H*H + 2H) per layer, plus the head.
    m = make(cell, features=2, out=4)
    gates = {"rnn": 1, "gru": 3, "lstm": 4}[cell]
    expected = gates * (2 * H + H * H + 2 * H) + gates * (H * H + H * H + 2 * H) + (H * 4 + 4)
    assert count_parameters(m) == expected


@pytest.mark.parametrize("token", [False, True])
@pytest.mark.parametrize("cell", CELLS)
def test_state_carries_across_calls(cell, token):
    m = make(cell, head="lm" if token else "regression", vocab=11 if token else 0)
    x = inputs(m, t=9)
    with torch.no_grad():
        y_all, s_all = m(x)
        y1, s1 = m(x[:, :4])
        y2, s2 = m(x[:, 4:], s1)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y_all, rtol=1e-5, atol=1e-6)
    for a, b in zip(states(s2), states(s_all)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("cell", CELLS)
def test_padded_batch_with_lengths_equals_rows_alone(cell, bidirectional):
    m = make(cell, head="tag", vocab=13, bidirectional=bidirectional)
    lengths = torch.tensor([7, 3, 5])
    x = inputs(m, b=3, t=7)
    for i, n in enumerate(lengths):
        x[i, n:] = 0  # padding id
    with torch.no_grad():
        y, state = m(x, lengths=lengths)
        for i, n in enumerate(lengths.tolist()):
            y_i, s_i = m(x[i:i + 1, :n])
            torch.testing.assert_close(y[i:i + 1, :n], y_i, rtol=1e-5, atol=1e-6)
            for a, b in zip(states(state), states(s_i)):
                torch.testing.assert_close(a[:, i:i + 1], b, rtol=1e-5, atol=1e-6)


def test_dropout_only_in_training():
    m = make("lstm", dropout=0.5)
    x = inputs(m)
    with torch.no_grad():
        torch.testing.assert_close(m(x)[0], m(x)[0])  # eval: deterministic
        m.train()
        assert not torch.allclose(m(x)[0], m(x)[0])


@pytest.mark.parametrize("bad", [dict(cell="lstmx"), dict(head="nope"), dict(hidden=0), dict(layers=-1),
                                 dict(output_size=0), dict(dropout=1.0), dict(input_size=0)])
def test_config_refuses_bad_values(bad):
    with pytest.raises(ValueError):
        ModelConfig(**bad).validate()


@pytest.mark.parametrize("cell,vocab", [("lstm", 0), ("gru", 17), ("rnn", 0)])
def test_checkpoint_rebuilds_identical_model(tmp_path, cell, vocab):
    m = make(cell, head="classify" if vocab else "regression", vocab=vocab)
    with torch.no_grad():
        for p in m.parameters():  # away from any default init
            p.add_(0.01 * torch.randn_like(p))
    ckpt = Checkpoint(model=m.config.to_dict(), task={"name": "t"}, train={"epochs": 1},
                      normalization={"mean": [1.0, 2.0], "std": [3.0, 4.0]}, metrics={"x": 1.5})
    save_checkpoint(tmp_path / "c.pt", m, ckpt)
    m2, ckpt2 = load_checkpoint(tmp_path / "c.pt")
    assert ckpt2 == ckpt
    assert m2.config == m.config
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    x = inputs(m)
    with torch.no_grad():
        assert torch.equal(m(x)[0], m2(x)[0])
