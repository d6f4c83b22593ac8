import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from biomedsynth.classify.classic import cv_splitter, fit_all_variants, fit_classic, score_of


def twin_checkerboard(seed=0):
    """A 10x10 lattice coloured like a checkerboard, two jittered copies per site: a point's nearest
    neighbour is its twin (same class) but its next four are the opposite class, so only k = 1 works."""
    rng = np.random.default_rng(seed)
    sites = np.stack(np.meshgrid(np.arange(10), np.arange(10)), -1).reshape(-1, 2).astype(float)
    X = np.repeat(sites, 2, axis=0) + rng.normal(0, 0.01, (200, 2))
    return X, np.repeat(sites.sum(1) % 2, 2).astype(int)


def xor(n=200, seed=0):
    """Class = quadrant parity in 2D: no single split separates it, two levels of splits do."""
    X = np.random.default_rng(seed).uniform(-1, 1, (n, 2))
    return X, ((X[:, 0] > 0) ^ (X[:, 1] > 0)).astype(int)


def test_search_picks_the_only_working_parameter():
    X, y = twin_checkerboard()
    _, info = fit_classic("knn", X, y, {"n_neighbors": [3, 1, 5, 9]})
    assert info["best_params"] == {"n_neighbors": 1} and info["cv_score"] > 0.7
    _, info = fit_classic("rf", *xor(), {"max_depth": [1, 4], "n_estimators": 20})
    assert info["best_params"] == {"max_depth": 4, "n_estimators": 20} and info["cv_score"] > 0.9
    X, y = xor(seed=1)
    svm, info = fit_classic("svm", X, y, {"C": [1e-3, 10.0]})
    assert info["best_params"] == {"C": 10.0} and info["cv_score"] > 0.9
    Xt, yt = xor(seed=2)
    s = score_of(svm, Xt)  # decision score of class 1: ranks the test set well
    assert s.shape == (200,) and roc_auc_score(yt, s) > 0.95


def grouped_data(seed=0):
    """40 patients, 5 near-identical images each, label drawn per patient and unrelated to the features:
    a patient on both sides of a split lets 1-NN look up its own label."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (40, 5))
    X = np.repeat(centres, 5, axis=0) + rng.normal(0, 1e-3, (200, 5))
    y = np.repeat(rng.permutation(np.arange(40) % 2), 5)
    return X, y, np.repeat(np.arange(40), 5)


def test_group_cv_keeps_patients_on_one_side():
    X, y, groups = grouped_data()
    for train, val in cv_splitter(5, 0, grouped=True).split(X, y, groups):
        assert not set(groups[train]) & set(groups[val])
    _, leaky = fit_classic("knn", X, y, {"n_neighbors": [1]})
    _, grouped = fit_classic("knn", X, y, {"n_neighbors": [1]}, groups=groups)
    assert leaky["cv_score"] == 1.0 and grouped["cv_score"] < 0.8


def test_variant_chosen_by_cv_not_test():
    X, y = twin_checkerboard()
    noise = np.random.default_rng(3).normal(size=X.shape)
    train = {"noise": noise, "signal": X}
    # the test copy of "signal" is shifted one lattice step, which swaps its classes (test accuracy 0.1),
    # while "noise" tested on its own training rows scores high: the choice must still follow CV
    test = {"noise": noise, "signal": X + [1, 0]}
    out = fit_all_variants("knn", train, y, test, {"n_neighbors": [1, 3]})
    v = out["variants"]
    assert out["best_variant"] == "signal" and v["signal"]["cv_score"] > v["noise"]["cv_score"]
    assert (v["signal"]["pred"] == y).mean() < 0.2 < 0.5 < (v["noise"]["pred"] == y).mean()
    assert v["signal"]["score"].shape == (200,)


def test_fixed_seed_is_deterministic():
    X, y = xor(seed=4)
    feats = {"a": X, "b": X[:, ::-1]}
    runs = [fit_all_variants("rf", feats, y, feats, {"max_depth": [2, 8], "n_estimators": 10}, seed=7) for _ in range(2)]
    for name in feats:
        a, b = runs[0]["variants"][name], runs[1]["variants"][name]
        assert a["best_params"] == b["best_params"] and a["cv_score"] == b["cv_score"]
        assert np.array_equal(a["pred"], b["pred"]) and np.array_equal(a["score"], b["score"])


def test_bad_input_is_refused():
    X, y = xor(n=40)
    with pytest.raises(ValueError, match="'max_dept' is not a parameter of rf"):
        fit_classic("rf", X, y, {"max_dept": [2]})
    with pytest.raises(ValueError, match="single class"):
        fit_classic("knn", X, np.zeros(40), {"n_neighbors": [1]})
    y_few = np.zeros(40, int)
    y_few[:3] = 1
    with pytest.raises(ValueError, match="class 1 has 3 training samples, fewer than folds=5"):
        fit_classic("svm", X, y_few, {"C": [1.0]})
    with pytest.raises(ValueError, match="fewer than folds=5"):
        fit_classic("knn", X, y, {"n_neighbors": [1]}, groups=np.arange(40) % 4)
    with pytest.raises(ValueError, match="unknown classifier 'mlp'"):
        fit_classic("mlp", X, y, {})
    with pytest.raises(ValueError, match="variants differ"):
        fit_all_variants("knn", {"r2": X}, y, {"r3": X}, {"n_neighbors": [1]})
