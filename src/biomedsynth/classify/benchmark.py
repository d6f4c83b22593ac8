"""The classify stage: one model of one task trained on each training arm, all tested on the same real test
set (SPEC sections 5-6 and 8).

Arms: `real`; `synthetic`, over every independent synthetic draw the task holds (synthetic, synthetic_d1,
...); `real_synthetic` (real + the first draw). The headline numbers are the mean over the training seeds
(classify.seeds; the synthetic arm averaged over its draws), each with a 95% interval from a bootstrap over
the test set's patients / slides and, with several seeds, over the seeds too; the drops real -> synthetic
and real -> real + synthetic are paired over the same resampled clusters. An arm
whose models predict one class, or whose interval contains chance, is flagged `degenerate`. `spread` holds
the other sources of variance: training seeds (classify.seeds) and synthetic draws. Every test prediction
goes to predictions.csv, from which the table3 stage pairs all cells over the same resamples.
"""
from __future__ import annotations

import os
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from biomedsynth.classify import classic, metrics
from biomedsynth.classify.lbp import read_features
from biomedsynth.lifetime import die_with_parent
from biomedsynth.params import Classify
from biomedsynth.store import ImageSet, atomic_write_text, remove_tree, write_json
from biomedsynth.tasks import TEST

CLASSIC = ("knn", "svm", "rf")
MODELS = (*CLASSIC, "vgg16")
ARMS = ("real", "synthetic", "real_synthetic")


def arm_of(set_name: str) -> str:
    """The arm a training set belongs to: every synthetic draw is the synthetic arm."""
    return "synthetic" if set_name.startswith("synthetic") else set_name


def training_sets(task_dir: Path) -> list[str]:
    """The task's training sets, arm by arm: real, synthetic draws in order, real_synthetic."""
    found = {p.name for p in Path(task_dir).iterdir() if p.is_dir() and p.name != TEST}
    draws = sorted((n for n in found if arm_of(n) == "synthetic"), key=lambda n: (n != "synthetic", len(n), n))
    sets = [n for n in ("real", *draws, "real_synthetic") if n in found]
    if missing := {"real", "synthetic"} - set(sets):
        raise FileNotFoundError(f"{task_dir} has no {' or '.join(sorted(missing))} set; run the tasks stage")
    return sets


def arms_not_trained(model: str, cfg: Classify) -> dict[str, str]:
    """{arm: why} of the arms params leave out for `model`: VGG16's real + synthetic arm when
    classify.vgg16.real_synthetic is false (its twice-sized set is ~40% of VGG16's time)."""
    if model == "vgg16" and not cfg.vgg16.real_synthetic:
        return {"real_synthetic": "not trained: classify.vgg16.real_synthetic is false"}
    return {}


def _fit_predict(model: str, task_dir: Path, features_dir: Path, train: str, cfg: Classify, seed: int,
                 out: Path, log) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """(test predictions, test scores of class 1, details) of `model` trained on the task's `train` set;
    None on a torchrun rank other than 0."""
    train_meta, test_meta = ImageSet(task_dir / train).meta, ImageSet(task_dir / TEST).meta
    y = train_meta["y"].astype(int).to_numpy()
    groups = train_meta["group"].astype(str).to_numpy()  # CV / validation by patient; a synthetic image is its own
    if model == "vgg16":
        from biomedsynth.classify.vgg import predict_scores, train_vgg

        v = cfg.vgg16
        net, history = train_vgg(task_dir / train, y, groups=groups, input_size=v.input_side, epochs=v.epochs,
                                 batch_size=v.batch_size, lr=v.lr, val_fraction=v.val_fraction, seed=seed,
                                 weights=v.weights, head=v.head, precision=v.precision,
                                 checkpoint=out / f"{train}-seed{seed}.pt", log=log)
        if not history:  # a torchrun rank > 0: it helped train; rank 0 scores
            return None
        best = min(history, key=lambda r: r["val_loss"])
        scores = predict_scores(net, task_dir / TEST, v.input_side, precision=best["precision"])
        return (scores >= 0.5).astype(int), scores, {"best_epoch": best["epoch"], "val_loss": best["val_loss"],
                                                     "epochs": len(history), "precision": best["precision"]}
    _, train_feats = read_features(features_dir / train)
    _, test_feats = read_features(features_dir / TEST)
    folds = cfg.cv_folds
    if groups is not None:  # grouped CV needs `folds` patients/slides per class; few slides -> fewer folds
        fewest = min(len(np.unique(groups[y == c])) for c in (0, 1))
        if fewest < folds:
            folds, groups = (fewest, groups) if fewest >= 2 else (folds, None)
            log(f"{train}: a class has {fewest} patients/slides, so CV uses {folds} folds"
                + ("" if groups is not None else " without grouping"))
    # all cores, the same result as one; loky's workers die with this process (else they idle on for minutes)
    with joblib.parallel_config(backend="loky", initializer=die_with_parent, initargs=(os.getpid(),)):
        fits = classic.fit_all_variants(model, train_feats, y, test_feats, getattr(cfg, model), folds=folds,
                                        seed=seed, groups=groups, n_jobs=-1)
    best = fits["variants"][fits["best_variant"]]
    joblib.dump({"estimator": best["estimator"], "lbp_variant": fits["best_variant"], "classes": [0, 1]},
                out / f"{train}-seed{seed}.joblib")
    y_test = test_meta["y"].astype(int).to_numpy()
    details = {"best_variant": fits["best_variant"], "cv_folds": folds, "cv_grouped": groups is not None,
               "variants": {name: {"cv_accuracy": round(v["cv_score"], 4), "best_params": v["best_params"],
                                   "test_accuracy": round(float(np.mean(v["pred"] == y_test)), 4)}
                            for name, v in fits["variants"].items()}}
    return np.asarray(best["pred"]).astype(int), np.asarray(best["score"], float), details


def _write_plots(plots: Path, arm: str, y_test: np.ndarray, pred: np.ndarray, score: np.ndarray) -> None:
    """Per test image actual/predicted (DVC's confusion template) and the ROC curve (fpr, tpr)."""
    atomic_write_text(plots / f"confusion-{arm}.csv",
                      "actual,predicted\n" + "".join(f"{a},{p}\n" for a, p in zip(y_test, pred)))
    fpr, tpr, _ = roc_curve(y_test, score)
    atomic_write_text(plots / f"roc-{arm}.csv",
                      "fpr,tpr\n" + "".join(f"{f:.6f},{t:.6f}\n" for f, t in zip(fpr, tpr)))


def _predictions_table(runs: dict[tuple[str, int], tuple], test_meta: pd.DataFrame) -> pd.DataFrame:
    """One row per (training set, seed, test image): what the table3 stage needs to pair every cell."""
    frames = [pd.DataFrame({"set": name, "arm": arm_of(name), "seed": seed, "image": np.arange(len(test_meta)),
                            "group": test_meta["group"].astype(str).to_numpy(), "y": test_meta["y"].astype(int),
                            "pred": pred, "score": np.round(score, 6)})
              for (name, seed), (pred, score, _) in runs.items()]
    return pd.concat(frames, ignore_index=True)


def seed_runs(predictions: pd.DataFrame, arm: str) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Per training seed (in order), the (predictions, scores) of the arm's models, one per training set
    (the first seed's synthetic arm: every draw), in test-image order."""
    rows = predictions[predictions["arm"] == arm]
    return [[(g.sort_values("image")["pred"].to_numpy(), g.sort_values("image")["score"].to_numpy())
             for _, g in by_seed.groupby("set", sort=True)]
            for _, by_seed in rows.groupby("seed", sort=True)]


def score_arms(predictions: pd.DataFrame, n_boot: int, seed: int = 0) -> dict:
    """From a predictions table: per arm the metrics (the mean over training seeds of each seed's mean over
    its synthetic draws) with intervals resampling the test clusters and the seeds (metrics.seed_resampled),
    and the degenerate flag; the paired drops from the real arm; and the weight rows' samples
    {arm: {metric: (R,)}} for pairing with other cells."""
    first = predictions[predictions["seed"] == predictions["seed"].min()]
    test = first[first["set"] == "real"].sort_values("image")
    y, groups = test["y"].to_numpy(), test["group"].to_numpy()
    weights = metrics.cluster_weights(y, groups, n_boot, seed)
    runs_rng = np.random.default_rng((seed, 1))  # which seeds each replicate draws
    result, samples = {}, {}
    for arm in (a for a in ARMS if a in set(first["arm"])):
        per_seed = seed_runs(predictions, arm)
        samples[arm] = metrics.seed_resampled([metrics.arm_samples(y, runs, weights) for runs in per_seed], runs_rng)
        scores = {k: metrics.interval(v) for k, v in samples[arm].items()}
        every_run = [run for runs in per_seed for run in runs]
        reasons = metrics.degenerate(every_run, scores["accuracy"])
        result[arm] = {**scores, "one_class_share": max(metrics.one_class_share(p) for p, _ in every_run),
                       "degenerate": bool(reasons), "degenerate_reasons": reasons, "draws": len(per_seed[0]),
                       "seeds": len(per_seed)}
    for arm, key in (("synthetic", "drop"), ("real_synthetic", "real_synthetic_drop")):
        if arm in samples:
            result[key] = {kind: {k: metrics.interval(v) for k, v in d.items()}
                           for kind, d in metrics.drops(samples["real"], samples[arm]).items()}
    result["degenerate"] = result["real"]["degenerate"] or result["synthetic"]["degenerate"]
    result["test_clusters"] = {str(c): int(len(set(groups[y == c]))) for c in (0, 1)}
    return result, samples


def _spread(runs: dict[tuple[str, int], tuple], y_test: np.ndarray, first_seed: int) -> dict:
    """Accuracy mean and std over training seeds per arm (first draw), and over synthetic draws (first seed)."""
    def acc(pred):
        return float(np.mean(pred == y_test))
    by_seed = {arm: metrics.summarise_seeds([{"accuracy": acc(p)} for (n, _), (p, _, _) in runs.items()
                                            if n == first_set])
               for arm, first_set in (("real", "real"), ("synthetic", "synthetic"),
                                      ("real_synthetic", "real_synthetic"))
               if any(n == first_set for n, _ in runs)}
    draws = [{"accuracy": acc(p)} for (n, s), (p, _, _) in runs.items() if arm_of(n) == "synthetic" and s == first_seed]
    return {"seeds": by_seed, "draws": metrics.summarise_seeds(draws)}


def evaluate(runs: dict[tuple[str, int], tuple], test_meta: pd.DataFrame, task: str,
             n_boot: int) -> tuple[dict, pd.DataFrame]:
    """(the cell's metrics, its predictions table) from {(training set, seed): (predictions, scores,
    details)} on the test set described by test_meta (columns y, group)."""
    y_test = test_meta["y"].astype(int).to_numpy()
    first_seed = min(seed for _, seed in runs)
    predictions = _predictions_table(runs, test_meta)
    result, _ = score_arms(predictions, n_boot)
    for arm in (a for a in ARMS if (a, first_seed) in runs):
        pred, score, details = runs[(arm, first_seed)]
        result[arm] |= {"confusion": metrics.binary_metrics(y_test, pred, score)["confusion"], **details}
    result["spread"] = _spread(runs, y_test, first_seed)
    result["test_images"] = int(len(y_test))
    result["bootstrap"] = {"unit": "slide" if task == "histology" else "patient", "replicates": n_boot}
    return result, predictions


def _rank_world(model: str) -> tuple[int, int]:
    """(rank, world size). VGG16 trains in every process torchrun started; an LBP model runs in one (rank 0's,
    from torchrun's RANK) without importing torch, which would add ~2 s to each of the 9 LBP stages."""
    if model != "vgg16":
        return int(os.environ.get("RANK", "0")), 1
    from biomedsynth.distributed import dist_info

    return dist_info()


def classify(task: str, model: str, cfg: Classify, task_dir: Path, features_dir: Path, models_out: Path,
             metrics_path: Path, plots_dir: Path, tracker=None, log=print, provenance: dict | None = None) -> dict:
    """Train `model` on every training set of `task` (later synthetic draws with the first seed only) for
    every seed; test on the real test set. models_out/<set>-seed<N>.{pt,joblib} keeps each trained model:
    VGG16's best-validation-loss state, an LBP model's fitted estimator of the variant chosen by CV.
    `provenance` (the data and commit it came from) is written into the metrics as it is."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    rank, world = _rank_world(model)
    if rank > 0 and model != "vgg16":  # the LBP models run in one process: rank 0's
        return {}
    if rank == 0:
        remove_tree(models_out)  # no model of an earlier seed list survives
        models_out.mkdir(parents=True)
    if world > 1:  # the others wait until rank 0 has emptied models_out
        import torch.distributed as dist

        dist.barrier()
    test_meta = ImageSet(task_dir / TEST).meta
    y_test = test_meta["y"].astype(int).to_numpy()
    sets, first_seed = training_sets(task_dir), cfg.seeds[0]
    not_trained = arms_not_trained(model, cfg)
    sets = [name for name in sets if name not in not_trained]
    runs = {}
    for seed in cfg.seeds:
        for name in sets:
            if seed != first_seed and name not in ARMS:  # further draws measure the draw, at one seed
                continue
            fitted = _fit_predict(model, task_dir, features_dir, name, cfg, seed, models_out, log)
            if fitted is None:
                continue
            runs[(name, seed)] = fitted
            acc = float(np.mean(fitted[0] == y_test))
            log(f"{task} {model} seed {seed} trained on {name}: test accuracy {acc:.3f}")
            if tracker is not None:
                tracker.log_metrics({f"{name}.accuracy": acc}, step=seed)
    if rank > 0:
        return {}
    result, predictions = evaluate(runs, test_meta, task, cfg.bootstrap)
    if not_trained:
        result["not_trained"] = not_trained
    if provenance is not None:
        result["provenance"] = provenance
    if model == "vgg16":  # which head: Table 3 names it
        from biomedsynth.classify.vgg import MODEL_NAMES

        result["model_name"] = MODEL_NAMES[cfg.vgg16.head]
    for arm in (a for a in ARMS if (a, first_seed) in runs):
        _write_plots(plots_dir, arm, y_test, *runs[(arm, first_seed)][:2])
    for arm in not_trained:  # dvc.yaml's plots of every arm exist: these hold no rows
        atomic_write_text(plots_dir / f"confusion-{arm}.csv", "actual,predicted\n")
        atomic_write_text(plots_dir / f"roc-{arm}.csv", "fpr,tpr\n")
    atomic_write_text(plots_dir / "predictions.csv", predictions.to_csv(index=False))
    write_json(metrics_path, result)
    if tracker is not None:
        tracker.log_metrics({f"{arm}.{m}": result[arm][m]["value"] for arm in ARMS if arm in result
                             for m in metrics.SCALARS})
        tracker.log_metrics({f"drop.{m}": result["drop"]["relative"][m]["value"] for m in metrics.SCALARS})
        tracker.log_artifacts(plots_dir, "plots")
        tracker.log_artifacts(models_out, "model")
    return result
