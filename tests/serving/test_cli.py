"""`seqserve predict` and `seqserve stream` round trips against a real server."""
import subprocess
import sys

import numpy as np


def _run(args, stdin=None):
    return subprocess.run([sys.executable, "-m", "seqserve", *args], input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_predict_npy_and_csv(server, model_repo, kit, tmp_path):
    x = np.random.default_rng(30).standard_normal((2, 7, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = _run(["predict", "--target", server.target, "--model", "gru", "--input", str(tmp_path / "x.npy")])
    assert r.returncode == 0, r.stderr
    want = kit.ort_reference(model_repo / "gru/1/model.onnx", x)["y"][:, -1]  # (2, 3)
    lines = [l for l in r.stdout.splitlines() if "step 6:" in l]
    got = np.array([[float(kv.split("=")[1]) for kv in l.split(":", 1)[1].split()] for l in lines])
    assert np.abs(got - want).max() < 1e-4
    (tmp_path / "x.csv").write_text("a,b,c\n" + "\n".join(",".join(map(str, row)) for row in x[0]))
    r = _run(["predict", "--target", server.target, "--model", "gru", "--input", str(tmp_path / "x.csv")])
    assert r.returncode == 0, r.stderr
    got = [float(kv.split("=")[1]) for kv in r.stdout.splitlines()[-1].split(":", 1)[1].split()]
    assert np.abs(np.array(got) - want[0]).max() < 1e-4


def test_predict_text_prints_top_words(server):
    r = _run(["predict", "--target", server.target, "--model", "lm", "--text", "the cat sat", "--top-k", "2"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the cat sat:") and len(r.stdout.splitlines()[1].split()) == 6


def test_stream_from_stdin_prints_each_step(server, model_repo, kit):
    x = np.random.default_rng(31).standard_normal((6, 3)).astype(np.float32)
    lines = "\n".join(" ".join(f"{v:.9g}" for v in row) for row in x) + "\n"
    r = _run(["stream", "--target", server.target, "--model", "rnn", "--sequence", "cli-test"], stdin=lines)
    assert r.returncode == 0, r.stderr
    got = np.array([[float(kv.split("=")[1]) for kv in l.split()] for l in r.stdout.splitlines()])
    want = kit.ort_reference(model_repo / "rnn/1/model.onnx", x[None].astype(np.float32))["y"][0]
    assert got.shape == (6, 3) and np.abs(got - want).max() < 1e-4


def test_stream_skips_a_bad_line_and_lm_prints_next_words(server):
    r = _run(["stream", "--target", server.target, "--model", "lm", "--top-k", "3"],
             stdin="the cat\n\nsat on\n")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert len(out) == 2 and all(len(l.split()) == 6 for l in out)
    r = _run(["stream", "--target", server.target, "--model", "rnn"], stdin="1 2 3\nabc\n1 2\n4 5 6\n")
    assert r.returncode == 0
    assert len(r.stdout.splitlines()) == 2
    assert "line 2: not numbers" in r.stderr and "line 3" in r.stderr and "features" in r.stderr


def test_cli_errors_are_one_line(server, tmp_path):
    r = _run(["predict", "--target", server.target, "--model", "nope", "--text", "x"])
    assert r.returncode != 0 and "NOT_FOUND" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = _run(["predict", "--target", server.target, "--model", "gru", "--input", str(tmp_path / "no.npy")])
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_predict_text_on_a_tagger_prints_valid_bio_tags_and_entities(server, model_repo, kit):
    """Tags come from the BIO-constrained decoding of ONNX Runtime's scores (the
    decoder is checked against brute force in tests/training/test_tagging.py)."""
    from seqserve.tagging import decode_bio, entities

    text = "the cat sat on a mat far"
    r = _run(["predict", "--target", server.target, "--model", "tagger", "--text", text])
    assert r.returncode == 0, r.stderr
    ids = np.array([[kit.VOCAB.index(w) for w in text.split()]], np.int64)
    y = kit.ort_reference(model_repo / "tagger/1/model.onnx", ids)["y"][0]  # (T, tags)
    want = [kit.TAGS[i] for i in decode_bio(y, kit.TAGS)]
    lines = r.stdout.splitlines()
    got = [l.split()[3] for l in lines if l.strip().startswith("step ")]
    assert got == want
    words = [l.split()[2].strip("'") for l in lines if l.strip().startswith("step ")]
    assert words == text.split()
    found = entities(want, text.split())
    assert lines[-1].strip() == "entities: " + (", ".join(f"{e['type']} {e['text']!r}" for e in found) or "none")


def test_stream_continues_a_prompt_by_sampling_or_greedily(server, kit):
    args = ["stream", "--target", server.target, "--model", "lm", "--continue", "5"]
    sampled = [_run(args + ["--temperature", "1.2", "--seed", "9"], stdin="the cat\nsat\n") for _ in range(2)]
    for r in sampled:
        assert r.returncode == 0, r.stderr
    last = sampled[0].stdout.splitlines()[-1]
    assert last == sampled[1].stdout.splitlines()[-1]  # the seed repeats it
    words = last.split(": ", 1)[1].split()
    assert last.startswith("continuation: ") and len(words) == 5 and set(words) <= set(kit.VOCAB)
    greedy = _run(args, stdin="the cat\nsat\n")
    assert greedy.returncode == 0 and greedy.stdout.splitlines()[-1].startswith("continuation: ")
    bad = _run(args + ["--sample-top-k", "3"], stdin="the\n")  # top-k without temperature
    assert bad.returncode != 0 and "INVALID_ARGUMENT" in bad.stderr and "temperature > 0" in bad.stderr
