"""The numbers of Table 3 with honest uncertainty (SPEC 6-8): accuracy, balanced accuracy and ROC AUC of a
binary classifier on the real test set, intervals from a bootstrap over the test set's clusters, drops from
a real-trained to a synthetic-trained model with paired intervals, a flag for models that say nothing.

Why clusters: a test set holds several scans per patient and many tiles per slide, and images of one
patient or slide succeed or fail together. Resampling images as if independent makes intervals too narrow
(k copies of every image would look k times as informative). So each bootstrap replicate draws the
clusters (patients, slides) with replacement, stratified by the classes a cluster holds ({0}, {1} or both),
so every replicate keeps the test set's class mix by cluster. A replicate is a row of weights: how many
times each test image's cluster was drawn; every metric below is weighted by such rows. Row 0 is all ones
(the test set itself); rows 1.. are replicates. Models scored with the same weights are paired: what they
share (hard patients, an odd slide) cancels out of their differences.
"""
from __future__ import annotations

import numpy as np
from scipy import sparse

SCALARS = ("accuracy", "balanced_accuracy", "auc")
CHANCE = 0.5          # accuracy, balanced accuracy and AUC of a guess on the benchmark's balanced test sets
ONE_CLASS_SHARE = 0.95  # a model predicting one class for at least this share of the test set says nothing


def _check(y_true, y_pred, y_score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y_true, y_pred, y_score = (np.asarray(a) for a in (y_true, y_pred, y_score))
    n = len(y_true)
    for name, a in (("y_true", y_true), ("y_pred", y_pred), ("y_score", y_score)):
        if a.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},) like y_true, got {a.shape}")
    for name, a in (("y_true", y_true), ("y_pred", y_pred)):
        if not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name} must hold only 0/1, got values {np.unique(a)[:5]}")
    if not np.isfinite(y_score.astype(float)).all():
        raise ValueError("y_score has non-finite values")
    if len(np.unique(y_true)) < 2:
        raise ValueError(f"y_true has only class {y_true[0] if n else 'none'}: "
                         "AUC and balanced accuracy need both classes in the test set")
    return y_true.astype(np.int64), y_pred.astype(np.int64), y_score.astype(float)


def weighted_metrics(y_true, y_pred, y_score, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy and AUC under each row of `weights` (R, n) -> arrays of shape (R,).

    A weight is how many times an image counts. AUC is the weighted Mann-Whitney statistic: the weighted
    share of (positive, negative) pairs ranked right, ties counting 1/2. Every row must weigh both classes.
    """
    y_true, y_pred, y_score = _check(y_true, y_pred, y_score)
    w = np.asarray(weights, float)
    if w.ndim != 2 or w.shape[1] != len(y_true):
        raise ValueError(f"weights must have shape (R, {len(y_true)}), got {w.shape}")
    pos = y_true == 1
    correct = (y_true == y_pred).astype(float)
    w_pos, w_neg = w[:, pos].sum(1), w[:, ~pos].sum(1)
    recall_pos = w[:, pos] @ correct[pos] / w_pos
    recall_neg = w[:, ~pos] @ correct[~pos] / w_neg
    # weight of each class at each distinct score, lowest score first: (R, U)
    _, level = np.unique(y_score, return_inverse=True)
    onehot = sparse.csr_matrix((np.ones(len(level)), (np.arange(len(level)), level)))
    at_pos, at_neg = ((onehot.T @ (w * mask).T).T for mask in (pos, ~pos))
    below = np.cumsum(at_neg, 1) - at_neg
    auc = (at_pos * (below + 0.5 * at_neg)).sum(1) / (w_pos * w_neg)
    return {"accuracy": w @ correct / w.sum(1), "balanced_accuracy": (recall_pos + recall_neg) / 2, "auc": auc}


def joint_cluster_weights(tests: dict[str, tuple[np.ndarray, np.ndarray]], n_boot: int = 1000,
                          seed: int = 0) -> dict[str, np.ndarray]:
    """{name: (1 + n_boot, n_name) weights} for test sets {name: (y_true, groups)} resampled together.

    Row 0 is all ones; each further row is one bootstrap replicate over clusters (the distinct group ids
    across all the sets: test sets that share patients share their draws). Clusters are stratified by the
    classes they hold in every set ({0}, {1}, both, absent); within a stratum as many clusters as it has are
    drawn with replacement, and an image weighs as many times as its cluster was drawn. Images of one
    cluster always share a weight, so k identical copies of a cluster's images change no metric."""
    clusters: dict[str, list] = {}  # cluster id -> per set, the sorted classes it holds there
    for k, (name, (y, groups)) in enumerate(tests.items()):
        y, groups = np.asarray(y), np.asarray(groups).astype(str)
        if groups.shape != y.shape:
            raise ValueError(f"{name}: groups must have one id per test image ({len(y)}), got shape {groups.shape}")
        for g in np.unique(groups):
            clusters.setdefault(g, [()] * len(tests))[k] = tuple(np.unique(y[groups == g]).tolist())
    ids = sorted(clusters)
    rng = np.random.default_rng(seed)
    drawn = np.zeros((n_boot, len(ids)))
    strata: dict[tuple, list[int]] = {}
    for i, g in enumerate(ids):
        strata.setdefault(tuple(clusters[g]), []).append(i)
    for stratum in sorted(strata):
        members = np.asarray(strata[stratum])
        picks = members[rng.integers(0, len(members), (n_boot, len(members)))]
        np.add.at(drawn, (np.arange(n_boot)[:, None], picks), 1)
    position = {g: i for i, g in enumerate(ids)}
    out = {}
    for name, (y, groups) in tests.items():
        cols = np.array([position[g] for g in np.asarray(groups).astype(str)], dtype=np.int64)
        out[name] = np.concatenate([np.ones((1, len(cols))), drawn[:, cols]])
    return out


def cluster_weights(y_true, groups, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """(1 + n_boot, n) weights of one test set's cluster bootstrap (see joint_cluster_weights)."""
    return joint_cluster_weights({"test": (np.asarray(y_true), np.asarray(groups))}, n_boot, seed)["test"]


def interval(samples: np.ndarray, alpha: float = 0.05) -> dict:
    """{value, low, high}: samples[0] (the test set itself) and the percentile interval of samples[1:];
    replicates where the statistic is undefined (NaN) are left out, and an undefined bound is None."""
    finite = samples[1:][np.isfinite(samples[1:])]
    low, high = np.percentile(finite, [100 * alpha / 2, 100 * (1 - alpha / 2)]) if len(finite) else (np.nan,) * 2
    return {k: float(v) if np.isfinite(v) else None for k, v in (("value", samples[0]), ("low", low), ("high", high))}


def arm_samples(y_true, runs: list[tuple[np.ndarray, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric under every weight row, averaged over `runs` ((predictions, scores) of models trained
    alike, e.g. on independent synthetic draws): {metric: (R,)}."""
    if not runs:
        raise ValueError("an arm needs at least one trained model")
    per_run = [weighted_metrics(y_true, pred, score, weights) for pred, score in runs]
    return {k: np.mean([r[k] for r in per_run], 0) for k in SCALARS}


def seed_resampled(per_seed: list[dict[str, np.ndarray]], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Samples {metric: (R,)} of an arm trained with several seeds, from each seed's samples (arm_samples under
    the same weight rows): row 0 the mean over the seeds; each replicate row the mean over as many seeds drawn
    with replacement at that row, so the spread between training runs widens the interval beside the test set's
    (a two-level bootstrap: test clusters, then training runs). One seed: its samples as they are."""
    if not per_seed:
        raise ValueError("an arm needs at least one trained seed")
    if len(per_seed) == 1:
        return per_seed[0]
    rows = len(next(iter(per_seed[0].values())))
    picks = rng.integers(0, len(per_seed), (rows - 1, len(per_seed)))
    out = {}
    for k in per_seed[0]:
        stacked = np.stack([s[k] for s in per_seed])  # (seeds, R)
        out[k] = np.concatenate([[stacked[:, 0].mean()], stacked[picks, np.arange(1, rows)[:, None]].mean(1)])
    return out


def drops(real: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Paired drops from the real arm to another, per metric and weight row: relative (real - other) / real,
    capped by the real value, and chance-normalised (real - other) / (real - 0.5), the share of the real
    model's margin over chance that is lost (undefined, NaN, where the real model is at or below chance)."""
    out = {"relative": {}, "chance_normalised": {}}
    for k in SCALARS:
        lost = real[k] - other[k]
        margin = real[k] - CHANCE
        out["relative"][k] = lost / real[k]
        out["chance_normalised"][k] = np.divide(lost, margin, out=np.full_like(lost, np.nan), where=margin > 0)
    return out


def one_class_share(y_pred) -> float:
    """The largest share of test images given the same predicted class."""
    y_pred = np.asarray(y_pred)
    return float(max(np.mean(y_pred == 0), np.mean(y_pred == 1)))


def degenerate(runs: list[tuple[np.ndarray, np.ndarray]], accuracy: dict) -> list[str]:
    """Why an arm's result says nothing about its training data ([] when it does): some trained model
    predicts one class for >= 95% of the test images, or the accuracy interval contains chance."""
    reasons = []
    share = max(one_class_share(pred) for pred, _ in runs)
    if share >= ONE_CLASS_SHARE:
        reasons.append(f"predicts one class for {share:.0%} of test images")
    if accuracy["low"] <= CHANCE <= accuracy["high"]:
        reasons.append("accuracy interval contains chance (0.5)")
    return reasons


def binary_metrics(y_true, y_pred, y_score) -> dict:
    """{accuracy, balanced_accuracy, auc, confusion [[tn, fp], [fn, tp]]} of 0/1 labels, 0/1 predictions
    and scores of class 1 (higher = more likely 1)."""
    y_true, y_pred, y_score = _check(y_true, y_pred, y_score)
    scalars = weighted_metrics(y_true, y_pred, y_score, np.ones((1, len(y_true))))
    confusion = np.bincount(2 * y_true + y_pred, minlength=4).reshape(2, 2)
    return {**{k: float(v[0]) for k, v in scalars.items()}, "confusion": confusion.tolist()}


def summarise_seeds(runs: list[dict]) -> dict:
    """Mean and sample std (ddof=1; 0 for a single run) over runs of the same shape, e.g. binary_metrics of
    one model trained with several seeds. Nested dicts are summarised key by key, numbers and number lists
    (confusion matrices) element-wise: {"n": n, key: {mean, std}, ...}."""
    if not runs:
        raise ValueError("summarise_seeds needs at least one run")

    def summarise(values: list, where: str):
        if all(isinstance(v, dict) for v in values):
            keys = values[0].keys()
            if any(v.keys() != keys for v in values):
                raise ValueError(f"runs differ in their keys at {where or 'the top level'}")
            return {k: summarise([v[k] for v in values], f"{where}.{k}".lstrip(".")) for k in keys}
        try:
            a = np.asarray(values, float)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: values must be numbers or lists of numbers, got {values[0]!r}") from None
        std = a.std(0, ddof=1) if len(a) > 1 else np.zeros_like(a[0])
        return {"mean": a.mean(0).tolist(), "std": std.tolist()}

    return {"n": len(runs), **summarise(runs, "")}
