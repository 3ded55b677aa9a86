"""Forecasting data: series, chronological splits, train-only normalisation, windows, CSV refusals."""
from __future__ import annotations

import numpy as np
import pytest

from training.forecast import (Normalization, TaskConfig, batches, chronological_split, co2_series,
                               csv_series, load_series, prepare, scoring_inputs, sine_series,
                               sunspots_series, train_windows)


def test_sine_is_deterministic_from_seed():
    a, b, c = sine_series(500, 7), sine_series(500, 7), sine_series(500, 8)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    noisy = sine_series(500, 7, noise=0.1)
    assert 0.05 < np.std(noisy - a) < 0.15


def test_sine_has_a_low_and_a_high_frequency_component():
    periods = (40.0, 7.0)
    x = sine_series(4000, 0, periods=periods)
    power = np.abs(np.fft.rfft(x - x.mean())) ** 2
    freqs = np.fft.rfftfreq(len(x))
    top = freqs[np.argsort(power)[::-1][:12]]  # the strongest bins (a peak spreads over a few)
    for p in periods:
        assert np.min(np.abs(top - 1 / p)) < 0.002, f"no spectral peak near period {p}"
    # Nothing else: all strong bins sit near one of the two frequencies.
    assert all(min(abs(f - 1 / p) for p in periods) < 0.005 for f in top)


def test_real_series_load_without_gaps():
    sun, co2 = sunspots_series(), co2_series()
    assert sun.values.shape == (309, 1) and sun.time[0] == 1700 and sun.time[-1] == 2008
    assert co2.values.shape == (2284, 1)
    assert np.isfinite(co2.values).all()  # the 59 missing weeks are interpolated
    assert 300 < co2.values.min() and co2.values.max() < 400
    assert np.all(np.diff(co2.time) > 0)


@pytest.mark.parametrize("n,window", [(309, 32), (4000, 64), (80, 20), (1000, 1)])
def test_splits_are_chronological_disjoint_and_complete(n, window):
    s = chronological_split(n, window)
    (a0, a1), (b0, b1), (c0, c1) = s.train, s.val, s.test
    assert a0 == 0 and a1 == b0 and b1 == c0 and c1 == n  # contiguous, nothing lost
    assert a1 - a0 >= window + 1 and b1 - b0 >= 2 and c1 - c0 >= 2
    train, val, test = set(range(a0, a1)), set(range(b0, b1)), set(range(c0, c1))
    assert not (train & val or train & test or val & test)
    assert max(train) < min(val) and max(val) < min(test)


def test_normalisation_uses_train_statistics_only():
    task = TaskConfig(name="sine", window=16, length=1000, seed=1)
    data = prepare(task)
    a, b = data.splits.train
    train = data.series.values[a:b]
    np.testing.assert_allclose(data.norm.mean, train.mean(axis=0))
    np.testing.assert_allclose(data.norm.std, train.std(axis=0))
    # Changing everything after train must not move the statistics.
    other = data.series.values.copy()
    other[b:] = other[b:] * 100 + 50
    refit = Normalization.fit(other[a:b])
    np.testing.assert_array_equal(refit.mean, data.norm.mean)
    np.testing.assert_array_equal(refit.std, data.norm.std)
    assert abs(data.normalized[a:b].mean()) < 1e-6 and abs(data.normalized[a:b].std() - 1) < 1e-5
    np.testing.assert_allclose(data.norm.invert(data.normalized.astype(np.float64)), data.series.values,
                               atol=1e-5)


def test_constant_training_column_keeps_unit_scale():
    n = Normalization.fit(np.array([[2.0, 1.0], [2.0, 3.0]]))
    assert n.std[0] == 1.0 and n.mean[0] == 2.0


def test_train_windows_stay_inside_train_and_target_the_next_step():
    data = prepare(TaskConfig(name="sine", window=10, length=300, seed=2))
    X, Y = train_windows(data)
    a, b = data.splits.train
    seg = data.normalized[a:b]
    assert X.shape == (b - a - 10, 10, 1) == Y.shape
    np.testing.assert_array_equal(X[:, 1:], Y[:, :-1])  # many-to-many: next value at every step
    np.testing.assert_array_equal(X[0], seg[:10])
    np.testing.assert_array_equal(Y[-1, -1], seg[-1])  # the last target is the last train value
    assert not np.isin(data.normalized[b:], Y).any()  # no val/test value ever becomes a target


def test_scoring_inputs_never_include_a_scored_target():
    data = prepare(TaskConfig(name="sine", window=12, length=400, seed=2))
    start, stop = data.splits.test
    x, target, ctx = scoring_inputs(data, data.splits.test, warmup=12)
    assert ctx == 12 and len(x) == stop - start + ctx - 1
    np.testing.assert_array_equal(target, data.normalized[start:stop])
    np.testing.assert_array_equal(x[ctx - 1], data.normalized[start - 1])  # last value before test
    np.testing.assert_array_equal(x[-1], data.normalized[stop - 2])


def test_batches_repeat_by_seed_and_epoch_and_cover_every_window():
    X = np.arange(50, dtype=np.float32).reshape(10, 5, 1)
    first = [x[:, 0, 0].tolist() for x, _ in batches(X, X, 4, seed=1, epoch=0)]
    again = [x[:, 0, 0].tolist() for x, _ in batches(X, X, 4, seed=1, epoch=0)]
    other = [x[:, 0, 0].tolist() for x, _ in batches(X, X, 4, seed=1, epoch=1)]
    assert first == again and first != other
    assert sorted(v for b in first for v in b) == X[:, 0, 0].tolist()


# ------------------------------------------------------------------- CSV


def write(path, text):
    path.write_text(text)
    return path


def test_csv_univariate_and_multivariate(tmp_path):
    rows = "\n".join(f"{i},{np.sin(i / 5):.6f},{np.cos(i / 5):.6f}" for i in range(200))
    f = write(tmp_path / "d.csv", "t,a,b\n" + rows + "\n\n")
    uni = csv_series(f, ["a"])
    multi = csv_series(f, ["b", "a"])
    assert uni.values.shape == (200, 1) and multi.values.shape == (200, 2)
    assert multi.columns == ["b", "a"]
    np.testing.assert_allclose(multi.values[:, 1], uni.values[:, 0])
    data = prepare(TaskConfig(name="csv", csv=str(f), columns=["a", "b"], window=16))
    assert data.features == 2 and data.norm.mean.shape == (2,)


def test_csv_missing_column_is_named(tmp_path):
    f = write(tmp_path / "d.csv", "a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"column 'c' not in header \(columns: a, b\)"):
        csv_series(f, ["a", "c"])


@pytest.mark.parametrize("cell,shown", [("abc", "'abc'"), ("", "an empty cell"), ("nan", "'nan'")])
def test_csv_bad_value_names_row_and_column(tmp_path, cell, shown):
    f = write(tmp_path / "d.csv", f"a,b\n1,2\n3,4\n5,{cell}\n7,8\n")
    with pytest.raises(ValueError) as e:
        csv_series(f, ["a", "b"])
    msg = str(e.value)
    assert "row 3 (line 4)" in msg and "column 'b'" in msg and shown in msg


def test_csv_short_row_is_named(tmp_path):
    f = write(tmp_path / "d.csv", "a,b\n1,2\n3\n")
    with pytest.raises(ValueError, match=r"row 2 \(line 3\) has no value for column 'b'"):
        csv_series(f, ["a", "b"])


def test_csv_too_short_for_window_says_how_many_rows(tmp_path):
    f = write(tmp_path / "d.csv", "a\n" + "\n".join(str(i) for i in range(40)) + "\n")
    with pytest.raises(ValueError, match=r"has 40 rows: too short for window 32 \(needs at least \d+ rows"):
        prepare(TaskConfig(name="csv", csv=str(f), columns=["a"], window=32))
    prepare(TaskConfig(name="csv", csv=str(f), columns=["a"], window=8))  # a smaller window fits


def test_csv_empty_file_and_header_only(tmp_path):
    with pytest.raises(ValueError, match="file is empty"):
        csv_series(write(tmp_path / "e.csv", ""), ["a"])
    with pytest.raises(ValueError, match="no data rows"):
        csv_series(write(tmp_path / "h.csv", "a,b\n"), ["a"])


def test_csv_missing_file_is_an_oserror(tmp_path):
    with pytest.raises(OSError):
        csv_series(tmp_path / "nope.csv", ["a"])


def test_task_config_round_trip_and_refusals():
    t = TaskConfig(name="sine", window=8, seed=4, noise=0.1)
    assert TaskConfig.from_dict(t.to_dict()) == t
    np.testing.assert_array_equal(load_series(t).values, load_series(TaskConfig.from_dict(t.to_dict())).values)
    for bad in (dict(name="weather"), dict(window=0), dict(noise=-1), dict(name="csv"),
                dict(name="csv", csv="x.csv")):
        with pytest.raises(ValueError):
            TaskConfig(**bad).validate()
