import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from biomedsynth.classify.metrics import (binary_metrics, bootstrap, bootstrap_indices, relative_drop,
                                          resampled_metrics, summarise_seeds)


def test_binary_metrics_by_hand():
    y = [0, 0, 0, 1, 1]
    pred = [0, 1, 0, 1, 0]
    score = [0.1, 0.6, 0.3, 0.6, 0.2]
    m = binary_metrics(y, pred, score)
    assert m["confusion"] == [[2, 1], [1, 1]]  # [[tn, fp], [fn, tp]]
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # positive 0.6 beats 0.1, 0.3 and ties 0.6 (1/2); positive 0.2 beats 0.1 only: (2.5 + 1) / 6
    assert m["auc"] == pytest.approx(3.5 / 6)


def test_resampled_auc_matches_sklearn():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    score = np.round(rng.normal(y, 1.0), 1)  # rounding makes ties
    idx = bootstrap_indices(y, n_boot=5, seed=1)
    auc = resampled_metrics(y, (score > 0.5).astype(int), score, idx)["auc"]
    assert auc == pytest.approx([roc_auc_score(y[r], score[r]) for r in idx])


def test_bootstrap_indices_keep_class_counts_and_are_reproducible():
    y = np.array([0] * 7 + [1] * 3)
    idx = bootstrap_indices(y, n_boot=50, seed=3)
    assert idx.shape == (50, 10)
    assert (y[idx].sum(1) == 3).all()
    assert np.array_equal(idx, bootstrap_indices(y, n_boot=50, seed=3))
    assert not np.array_equal(idx, bootstrap_indices(y, n_boot=50, seed=4))


def test_bootstrap_interval_covers_true_accuracy():
    # 200 fresh test sets of a classifier that is right with probability 0.8 on every image
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 100)
    covered = 0
    for k in range(200):
        correct = rng.random(len(y)) < 0.8
        pred = np.where(correct, y, 1 - y)
        ci = bootstrap(y, pred, pred + rng.random(len(y)), n_boot=1000, seed=k)["accuracy"]
        assert ci["low"] <= ci["value"] <= ci["high"]
        covered += ci["low"] <= 0.8 <= ci["high"]
    assert 0.90 <= covered / 200 <= 0.98


def test_paired_drop_interval_narrower_than_unpaired():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 150)
    hard = rng.random(len(y)) < 0.15  # both models miss the hard images; the synthetic one a few more
    real_ok = ~hard
    synth_ok = ~hard & (rng.random(len(y)) > 0.05)
    pred_r, pred_s = np.where(real_ok, y, 1 - y), np.where(synth_ok, y, 1 - y)
    score_r, score_s = pred_r + 0.5 * rng.random(len(y)), pred_s + 0.5 * rng.random(len(y))
    paired = relative_drop(y, pred_r, score_r, pred_s, score_s, n_boot=1000, seed=0)["accuracy"]
    acc_r, acc_s = real_ok.mean(), synth_ok.mean()
    assert paired["value"] == pytest.approx((acc_r - acc_s) / acc_r)
    assert paired["low"] > 0  # the paired interval sees the drop
    # unpaired: each model on its own independent resamples
    a = resampled_metrics(y, pred_r, score_r, bootstrap_indices(y, 1000, seed=10))["accuracy"]
    b = resampled_metrics(y, pred_s, score_s, bootstrap_indices(y, 1000, seed=11))["accuracy"]
    low, high = np.percentile((a - b) / a, [2.5, 97.5])
    assert paired["high"] - paired["low"] < 0.5 * (high - low)


def test_single_class_test_set_is_refused():
    with pytest.raises(ValueError, match="only class 1"):
        binary_metrics([1, 1, 1], [1, 0, 1], [0.9, 0.2, 0.7])
    with pytest.raises(ValueError, match="only class 0"):
        bootstrap([0, 0], [0, 1], [0.1, 0.8], n_boot=10)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="y_pred must have shape"):
        binary_metrics([0, 1], [0], [0.1, 0.9])
    with pytest.raises(ValueError, match="y_true must hold only 0/1"):
        binary_metrics([0, 2], [0, 1], [0.1, 0.9])
    with pytest.raises(ValueError, match="non-finite"):
        binary_metrics([0, 1], [0, 1], [0.1, np.nan])


def test_summarise_seeds():
    runs = [{"accuracy": 0.8, "confusion": [[4, 1], [1, 4]], "auc": {"value": 0.9}},
            {"accuracy": 0.9, "confusion": [[5, 0], [1, 4]], "auc": {"value": 0.7}}]
    s = summarise_seeds(runs)
    assert s["n_seeds"] == 2
    assert s["accuracy"]["mean"] == pytest.approx(0.85)
    assert s["accuracy"]["std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert s["confusion"]["mean"] == [[4.5, 0.5], [1.0, 4.0]]
    assert s["auc"]["value"]["std"] == pytest.approx(np.std([0.9, 0.7], ddof=1))
    assert summarise_seeds(runs[:1])["accuracy"] == {"mean": 0.8, "std": 0.0}
    with pytest.raises(ValueError, match="differ in their keys at auc"):
        summarise_seeds([runs[0], {**runs[1], "auc": {"val": 0.7}}])
