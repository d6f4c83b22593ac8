"""The classify stage: one model of one task trained on the real and on the synthetic training set,
both tested on the same real test set (SPEC sections 5-6).

Per seed the model is trained twice (real, synthetic). The headline numbers are the first seed's, each
with a 95% bootstrap interval over the test set, and the relative drop (real - synthetic) / real with a
paired interval (both models scored on the same resampled test images); `seeds` holds the spread over
all seeds (training randomness), so both kinds of uncertainty are shown.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import joblib
import numpy as np
import torch.distributed as dist
from sklearn.metrics import roc_curve

from biomedsynth.classify import classic, metrics
from biomedsynth.distributed import dist_info
from biomedsynth.classify.lbp import read_features
from biomedsynth.params import Classify
from biomedsynth.store import ImageSet, atomic_write_text, write_json

CLASSIC = ("knn", "svm", "rf")
MODELS = (*CLASSIC, "vgg16")
TRAIN_SETS = ("real", "synthetic")


def _fit_predict(model: str, task_dir: Path, features_dir: Path, train: str, cfg: Classify, seed: int,
                 out: Path, log) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """(test predictions, test scores of class 1, details) of `model` trained on the task's `train` set;
    None on a torchrun rank other than 0."""
    train_meta, test_meta = ImageSet(task_dir / train).meta, ImageSet(task_dir / "test").meta
    y = train_meta["y"].astype(int).to_numpy()
    groups = None if train == "synthetic" else train_meta["group"].to_numpy()  # CV / validation by patient
    if model == "vgg16":
        from biomedsynth.classify.vgg import predict_scores, train_vgg

        v = cfg.vgg16
        net, history = train_vgg(task_dir / train, y, groups=groups, input_size=v.input_side, epochs=v.epochs,
                                 batch_size=v.batch_size, lr=v.lr, val_fraction=v.val_fraction, seed=seed,
                                 weights=v.weights, checkpoint=out / f"{train}-seed{seed}.pt", log=log)
        if not history:  # a torchrun rank > 0: it helped train; rank 0 scores
            return None
        scores = predict_scores(net, task_dir / "test", v.input_side)
        best = min(history, key=lambda r: r["val_loss"])
        return (scores >= 0.5).astype(int), scores, {"best_epoch": best["epoch"], "val_loss": best["val_loss"],
                                                     "epochs": len(history)}
    _, train_feats = read_features(features_dir / train)
    _, test_feats = read_features(features_dir / "test")
    folds = cfg.cv_folds
    if groups is not None:  # grouped CV needs `folds` patients/slides per class; few slides -> fewer folds
        fewest = min(len(np.unique(groups[y == c])) for c in (0, 1))
        if fewest < folds:
            folds, groups = (fewest, groups) if fewest >= 2 else (folds, None)
            log(f"{train}: a class has {fewest} patients/slides, so CV uses {folds} folds"
                + ("" if groups is not None else " without grouping"))
    fits = classic.fit_all_variants(model, train_feats, y, test_feats, getattr(cfg, model), folds=folds,
                                    seed=seed, groups=groups, n_jobs=-1)  # all cores; same result as one
    best = fits["variants"][fits["best_variant"]]
    joblib.dump({"estimator": best["estimator"], "lbp_variant": fits["best_variant"], "classes": [0, 1]},
                out / f"{train}-seed{seed}.joblib")
    y_test = test_meta["y"].astype(int).to_numpy()
    details = {"best_variant": fits["best_variant"], "cv_folds": folds, "cv_grouped": groups is not None,
               "variants": {name: {"cv_accuracy": round(v["cv_score"], 4), "best_params": v["best_params"],
                                   "test_accuracy": round(float(np.mean(v["pred"] == y_test)), 4)}
                            for name, v in fits["variants"].items()}}
    return np.asarray(best["pred"]).astype(int), np.asarray(best["score"], float), details


def _write_plots(plots: Path, train: str, y_test: np.ndarray, pred: np.ndarray, score: np.ndarray) -> None:
    """Per test image actual/predicted (DVC's confusion template) and the ROC curve (fpr, tpr)."""
    atomic_write_text(plots / f"confusion-{train}.csv",
                      "actual,predicted\n" + "".join(f"{a},{p}\n" for a, p in zip(y_test, pred)))
    fpr, tpr, _ = roc_curve(y_test, score)
    atomic_write_text(plots / f"roc-{train}.csv",
                      "fpr,tpr\n" + "".join(f"{f:.6f},{t:.6f}\n" for f, t in zip(fpr, tpr)))


def classify(task: str, model: str, cfg: Classify, task_dir: Path, features_dir: Path, models_out: Path,
             metrics_path: Path, plots_dir: Path, tracker=None, log=print) -> dict:
    """Train `model` on the real and the synthetic set of `task` for every seed; test on the real test set.
    models_out/<train>-seed<N>.{pt,joblib} keeps each trained model: VGG16's best-validation-loss state,
    an LBP model's fitted estimator of the variant chosen by CV."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    rank, world = dist_info()
    if rank > 0 and model != "vgg16":  # the LBP models run in one process: rank 0's
        return {}
    if rank == 0:
        shutil.rmtree(models_out, ignore_errors=True)  # no model of an earlier seed list survives
        models_out.mkdir(parents=True)
    if world > 1:  # the others wait until rank 0 has emptied models_out
        dist.barrier()
    y_test = ImageSet(task_dir / "test").meta["y"].astype(int).to_numpy()
    runs = {train: [] for train in TRAIN_SETS}
    for seed in cfg.seeds:
        for train in TRAIN_SETS:
            fitted = _fit_predict(model, task_dir, features_dir, train, cfg, seed, models_out, log)
            if fitted is None:
                continue
            pred, score, details = fitted
            runs[train].append((pred, score, details))
            acc = float(np.mean(pred == y_test))
            log(f"{task} {model} seed {seed} trained on {train}: test accuracy {acc:.3f}")
            if tracker is not None:
                tracker.log_metrics({f"{train}.accuracy": acc}, step=seed)
    if rank > 0:
        return {}
    first = {train: runs[train][0] for train in TRAIN_SETS}
    result = {}
    for train, (pred, score, details) in first.items():
        result[train] = {**metrics.bootstrap(y_test, pred, score, cfg.bootstrap, seed=0),
                         "confusion": metrics.binary_metrics(y_test, pred, score)["confusion"], **details}
        _write_plots(plots_dir, train, y_test, pred, score)
    result["drop"] = metrics.relative_drop(y_test, first["real"][0], first["real"][1], first["synthetic"][0],
                                           first["synthetic"][1], cfg.bootstrap, seed=0)
    result["seeds"] = {train: metrics.summarise_seeds([metrics.binary_metrics(y_test, p, s) for p, s, _ in rs])
                       for train, rs in runs.items()}
    result["test_images"] = int(len(y_test))
    write_json(metrics_path, result)
    if tracker is not None:
        tracker.log_metrics({f"{k}.{m}": result[k][m]["value"] for k in (*TRAIN_SETS, "drop")
                             for m in ("accuracy", "balanced_accuracy", "auc")})
        tracker.log_artifacts(plots_dir, "plots")
        tracker.log_artifacts(models_out, "model")
    return result
