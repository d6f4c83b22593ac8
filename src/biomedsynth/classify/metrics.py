"""The numbers of Table 3 with their uncertainty (SPEC 6 and 7): accuracy, balanced accuracy and ROC AUC
of a binary classifier on the real test set, percentile bootstrap intervals, the relative drop from a
real-trained to a synthetic-trained model with a paired interval, and mean / std over seeds.

The bootstrap resamples the test set with replacement within each class (stratified), so every resample
keeps the test set's class counts: balanced accuracy and AUC stay defined, and the interval reflects the
sampling of images, not of the class mix the benchmark fixed by design. A test set with one class is
refused: AUC and balanced accuracy are undefined there, and the benchmark's test sets are balanced.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

SCALARS = ("accuracy", "balanced_accuracy", "auc")


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


def resampled_metrics(y_true, y_pred, y_score, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy and AUC of each row of the index matrix idx (R, n) -> arrays of shape (R,).

    Every row must hold both classes. AUC is the Mann-Whitney statistic from average ranks (ties count 1/2).
    """
    t, p, s = y_true[idx], y_pred[idx], y_score[idx]
    pos = t == 1
    n_pos, n_neg = pos.sum(1), (~pos).sum(1)
    correct = t == p
    recall_pos = (correct & pos).sum(1) / n_pos
    recall_neg = (correct & ~pos).sum(1) / n_neg
    rank_sum = np.where(pos, rankdata(s, axis=1), 0).sum(1)
    auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return {"accuracy": correct.mean(1), "balanced_accuracy": (recall_pos + recall_neg) / 2, "auc": auc}


def binary_metrics(y_true, y_pred, y_score) -> dict:
    """{accuracy, balanced_accuracy, auc, confusion [[tn, fp], [fn, tp]]} of 0/1 labels, 0/1 predictions
    and scores of class 1 (higher = more likely 1)."""
    y_true, y_pred, y_score = _check(y_true, y_pred, y_score)
    scalars = resampled_metrics(y_true, y_pred, y_score, np.arange(len(y_true))[None])
    confusion = np.bincount(2 * y_true + y_pred, minlength=4).reshape(2, 2)
    return {**{k: float(v[0]) for k, v in scalars.items()}, "confusion": confusion.tolist()}


def bootstrap_indices(y_true, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_boot, n) int indices into the test set: each row resamples every class with replacement to its
    own count. Reuse one matrix for several models to compare them on the same resampled images."""
    y_true = np.asarray(y_true)
    rng = np.random.default_rng(seed)
    idx = np.empty((n_boot, len(y_true)), np.int64)
    for c in np.unique(y_true):
        members = np.flatnonzero(y_true == c)
        idx[:, members] = members[rng.integers(0, len(members), (n_boot, len(members)))]
    return idx


def _interval(point: float, samples: np.ndarray, alpha: float) -> dict:
    low, high = np.percentile(samples, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"value": float(point), "low": float(low), "high": float(high)}


def bootstrap(y_true, y_pred, y_score, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """{metric: {value, low, high}} for accuracy, balanced_accuracy and auc: the test set's value and the
    percentile (1 - alpha) interval over n_boot class-stratified resamples of the test set."""
    y_true, y_pred, y_score = _check(y_true, y_pred, y_score)
    point = binary_metrics(y_true, y_pred, y_score)
    boot = resampled_metrics(y_true, y_pred, y_score, bootstrap_indices(y_true, n_boot, seed))
    return {k: _interval(point[k], boot[k], alpha) for k in SCALARS}


def relative_drop(y_true, pred_real, score_real, pred_synth, score_synth, n_boot: int = 1000, seed: int = 0,
                  alpha: float = 0.05) -> dict:
    """{metric: {value, low, high}}: drop = (real - synthetic) / real of the model trained on real vs the one
    trained on synthetic images, both tested on the same set, with a paired bootstrap interval (each resample
    scores both models on the same images, so what the two share cancels out of the drop's spread)."""
    y_true, pred_real, score_real = _check(y_true, pred_real, score_real)
    _, pred_synth, score_synth = _check(y_true, pred_synth, score_synth)
    every = np.arange(len(y_true))[None]
    idx = np.concatenate([every, bootstrap_indices(y_true, n_boot, seed)])  # row 0: the test set itself
    real = resampled_metrics(y_true, pred_real, score_real, idx)
    synth = resampled_metrics(y_true, pred_synth, score_synth, idx)
    drop = {k: (real[k] - synth[k]) / real[k] for k in SCALARS}
    return {k: _interval(d[0], d[1:], alpha) for k, d in drop.items()}


def summarise_seeds(runs: list[dict]) -> dict:
    """Mean and sample std (ddof=1; 0 for a single run) over runs of the same shape, e.g. binary_metrics or
    bootstrap dicts of one model trained with several seeds. Nested dicts are summarised key by key,
    numbers and number lists (confusion matrices) element-wise: {"n_seeds": n, key: {mean, std}, ...}."""
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

    return {"n_seeds": len(runs), **summarise(runs, "")}
