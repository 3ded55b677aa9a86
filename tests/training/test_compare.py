"""`seqserve compare` on a tiny budget writes every file of its report."""
import json

import pytest
import torch

from seqserve.cli import main as seqserve_main


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_compare_text_report(tmp_path):
    out = tmp_path / "s2"
    rc = seqserve_main(["compare", "--task", "sentiment2", "--cells", "rnn,gru", "--max-examples", "200",
                        "--epochs", "1", "--hidden", "8", "--out", str(out), "--no-progress"])
    assert rc == 0
    for name in ("report.md", "accuracy_by_length.png", "loss.png", "compare.json"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "| rnn |" in report and "| gru |" in report and "GRU vs LSTM" in report
    results = json.loads((out / "compare.json").read_text())
    assert set(results) == {"rnn", "gru", "_wall_seconds"}
    assert "recurrent parameters" in report
    assert results["gru"]["served"]["step_us"] > 0
    assert (out / "model_repository" / "sentiment2-gru" / "1" / "model.onnx").is_file()


def test_compare_adding_report(tmp_path):
    out = tmp_path / "add"
    rc = seqserve_main(["compare", "--task", "adding", "--cells", "rnn,lstm", "--lags", "5,8",
                        "--epochs", "1", "--steps-per-epoch", "3", "--hidden", "8", "--out", str(out),
                        "--no-progress", "--no-export"])
    assert rc == 0
    for name in ("report.md", "lag.png", "gradients.png", "loss.png", "compare.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "compare.json").read_text())
    assert results["lstm"]["grad_lag"] == 8
    assert len(results["rnn"]["gradient_norms"]["trained"]) == 8
    assert set(results["rnn"]["per_lag"]) == {"5", "8"}
    # the report can be rewritten from compare.json alone
    (out / "report.md").unlink()
    assert seqserve_main(["compare", "--task", "adding", "--cells", "rnn,lstm", "--lags", "5,8",
                          "--out", str(out), "--report-only"]) == 0
    assert "test MSE lag 8" in (out / "report.md").read_text()
    # --resume reuses the finished run folders: same results without training
    assert seqserve_main(["compare", "--task", "adding", "--cells", "rnn,lstm", "--lags", "5,8",
                          "--hidden", "8", "--out", str(out), "--resume", "--no-export",
                          "--no-progress"]) == 0
    again = json.loads((out / "compare.json").read_text())
    assert again["lstm"]["per_lag"]["8"]["test_mse"] == results["lstm"]["per_lag"]["8"]["test_mse"]


def test_compare_rejects_bad_cells(capsys):
    with pytest.raises(SystemExit) as exc:
        seqserve_main(["compare", "--task", "adding", "--cells", "rnn,transformer"])
    assert exc.value.code == 2
    assert "transformer" in capsys.readouterr().err
