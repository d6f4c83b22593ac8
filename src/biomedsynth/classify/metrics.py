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
from scipy import sparse, stats

SCALARS = ("accuracy", "balanced_accuracy", "auc")
CHANCE = 0.5          # accuracy, balanced accuracy and AUC of a guess on the benchmark's balanced test sets
ONE_CLASS_SHARE = 0.95  # a model predicting one class for at least this share of the test set says nothing
FEW_CLUSTERS = 10      # below this many clusters in a class, a t interval instead of the percentile bootstrap's


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


def interval_rule(y_true, groups) -> dict:
    """How the intervals of a test set's statistics are formed. With at least FEW_CLUSTERS clusters in each class
    stratum, the percentile interval of the bootstrap samples. With fewer, the percentile bootstrap under-covers
    (it resamples n clusters as if they were the population: its variance is (n-1)/n of the true one, and its
    tails are the normal's where a t's belong), so a cluster-level t interval: value +- t(df) x the bootstrap's
    standard error x sqrt(m / (m-1)), df = clusters - strata, m = the smallest class stratum's clusters."""
    y, groups = np.asarray(y_true), np.asarray(groups).astype(str)
    classes = {}
    for g in np.unique(groups):
        classes.setdefault(tuple(np.unique(y[groups == g]).tolist()), []).append(g)
    sizes = [len(v) for k, v in classes.items() if len(k) == 1]  # clusters holding one class
    fewest = min(sizes) if sizes else 0
    if fewest >= FEW_CLUSTERS:
        return {"method": "percentile", "fewest_clusters": fewest}
    clusters = sum(len(v) for v in classes.values())
    return {"method": "cluster t", "fewest_clusters": fewest, "df": max(clusters - len(classes), 1),
            "inflation": float(np.sqrt(fewest / (fewest - 1))) if fewest > 1 else None}


def strictest(rules: list[dict]) -> dict:
    """The rule for a statistic of several test sets resampled together (e.g. the verdict over every task): the
    t interval of the set with the fewest clusters when any needs one (its df the smallest, its inflation the
    largest: wider, never narrower, than a pooled df would give)."""
    t_rules = [r for r in rules if r["method"] != "percentile"]
    if not t_rules:
        return {"method": "percentile", "fewest_clusters": min(r["fewest_clusters"] for r in rules)}
    inflations = [r["inflation"] for r in t_rules]
    return {"method": "cluster t", "fewest_clusters": min(r["fewest_clusters"] for r in t_rules),
            "df": min(r["df"] for r in t_rules),
            "inflation": None if None in inflations else max(inflations)}


def describe(rule: dict) -> str:
    """The interval's method in words, for the report and the summary."""
    if rule["method"] == "percentile":
        return f"percentile bootstrap ({rule['fewest_clusters']}+ clusters per class)"
    return (f"cluster t interval, df {rule['df']} (the smallest one-class stratum holds {rule['fewest_clusters']} "
            f"clusters, under the {FEW_CLUSTERS} a percentile bootstrap needs)")


def interval(samples: np.ndarray, alpha: float = 0.05, rule: dict | None = None,
             bounds: tuple[float, float] | None = None) -> dict:
    """{value, low, high}: samples[0] (the test set itself) and an interval from the bootstrap rows samples[1:]
    formed as `rule` says (interval_rule; None: percentile); replicates where the statistic is undefined (NaN)
    are left out, and an undefined bound is None. `bounds` clip a t interval to the statistic's range."""
    finite = samples[1:][np.isfinite(samples[1:])]
    value = samples[0]
    if rule is None or rule["method"] == "percentile":
        low, high = np.percentile(finite, [100 * alpha / 2, 100 * (1 - alpha / 2)]) if len(finite) else (np.nan,) * 2
    elif rule["inflation"] is None or len(finite) < 2:  # a class of one cluster: its variance cannot be estimated
        low = high = np.nan
    else:
        half = stats.t.ppf(1 - alpha / 2, rule["df"]) * finite.std(ddof=1) * rule["inflation"]
        low, high = value - half, value + half
        if bounds is not None:
            low, high = max(low, bounds[0]), min(high, bounds[1])
    return {k: float(v) if np.isfinite(v) else None for k, v in (("value", value), ("low", low), ("high", high))}


def arm_samples(y_true, runs: list[tuple[np.ndarray, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric under every weight row, averaged over `runs` ((predictions, scores) of models trained
    alike, e.g. on independent synthetic draws): {metric: (R,)}."""
    if not runs:
        raise ValueError("an arm needs at least one trained model")
    per_run = [weighted_metrics(y_true, pred, score, weights) for pred, score in runs]
    return {k: np.mean([r[k] for r in per_run], 0) for k in SCALARS}


def replicate_picks(replicates: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """(1 + n_boot, replicates) indices of the replicates each bootstrap row averages: row 0 every replicate once
    (the estimate), each further row as many replicates drawn with replacement. Shared by every cell so that
    cells trained on the same synthetic draw stay paired."""
    if replicates < 1:
        raise ValueError(f"need at least one replicate, got {replicates}")
    rng = np.random.default_rng((seed, 1))
    return np.concatenate([np.arange(replicates)[None], rng.integers(0, replicates, (n_boot, replicates))])


def over_replicates(per_replicate: list[dict[str, np.ndarray]], picks: np.ndarray) -> dict[str, np.ndarray]:
    """The two-level bootstrap: samples {metric: (1 + B,)} of an arm from each replicate's samples (arm_samples
    under the same cluster weight rows): row b is the mean, over the replicates picks[b] draws, of their value
    at cluster row b. So the spread between replicates (training seed and synthetic draw) widens the interval
    beside the test set's; with one replicate the samples are that replicate's."""
    if len(per_replicate) != picks.shape[1]:
        raise ValueError(f"{len(per_replicate)} replicates given, the picks draw from {picks.shape[1]}")
    rows = np.arange(picks.shape[0])[:, None]
    return {k: np.stack([r[k] for r in per_replicate])[picks, rows].mean(1) for k in per_replicate[0]}


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
    predicts one class for >= 95% of the test images, or the accuracy interval contains chance. An undefined
    interval (a test class of one patient or slide: None bounds) tells neither way, so it flags nothing."""
    reasons = []
    share = max(one_class_share(pred) for pred, _ in runs)
    if share >= ONE_CLASS_SHARE:
        reasons.append(f"predicts one class for {share:.0%} of test images")
    if None not in (accuracy["low"], accuracy["high"]) and accuracy["low"] <= CHANCE <= accuracy["high"]:
        reasons.append("accuracy interval contains chance (0.5)")
    return reasons


def binary_metrics(y_true, y_pred, y_score) -> dict:
    """{accuracy, balanced_accuracy, auc, confusion [[tn, fp], [fn, tp]]} of 0/1 labels, 0/1 predictions
    and scores of class 1 (higher = more likely 1)."""
    y_true, y_pred, y_score = _check(y_true, y_pred, y_score)
    scalars = weighted_metrics(y_true, y_pred, y_score, np.ones((1, len(y_true))))
    confusion = np.bincount(2 * y_true + y_pred, minlength=4).reshape(2, 2)
    return {**{k: float(v[0]) for k, v in scalars.items()}, "confusion": confusion.tolist()}
