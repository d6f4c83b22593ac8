"""The classify stage: one model of one task trained on each training arm, all tested on the same real test
set (SPEC sections 5-6 and 8).

Arms: `real`, `synthetic` and `real_synthetic` (real + synthetic), and `synthetic-<arch>` for each generator
compared (tasks.compare: another architecture's set of the same group and setup). Replicates
(classify.replicates): replicate r trains the real arm with seed r, the synthetic arm on synthetic draw r with
seed r, the real + synthetic arm on real + draw r and each compared arm on its draw r, each with seed r, so the
replicates carry training-seed and draw variance together. Each arm's number is the mean over the replicates,
with a 95% interval from a two-level bootstrap: the replicates, then the test set's patients / slides
(metrics.over_replicates); a test set with few clusters in a class gets a cluster t interval instead of the
percentile one (metrics.interval_rule). The drops from the real arm to each other arm are paired over the same
resampled replicates and clusters. An arm whose models predict one class, or whose interval contains chance, is
flagged `degenerate`. With one replicate the spread between training runs is not measured, and the metrics say so
(null, never 0). Every test prediction goes to data/predictions/<task>/<model>.csv (with patient or slide ids:
DVC-cached, never in git), from which the table3 stage pairs all cells over the same resamples.
"""
from __future__ import annotations

import os
import re
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
from biomedsynth.tasks import TEST, compared_set, real_synthetic_set, synthetic_set

CLASSIC = ("knn", "svm", "rf")
MODELS = (*CLASSIC, "vgg16")
ARMS = ("real", "synthetic", "real_synthetic")


def arm_of(set_name: str) -> str:
    """The arm a training set belongs to: every draw's set (synthetic_d1, real_synthetic_d2) is its arm's."""
    return re.sub(r"_d[0-9]+$", "", set_name)


def compared_arms(names) -> list[str]:
    """The compared generators' arms (synthetic-<arch>) among training set or arm names, sorted."""
    return sorted({arm_of(n) for n in names if arm_of(n).startswith("synthetic-")})


def training_sets(task_dir: Path) -> list[str]:
    """The task's training sets, arm by arm: real, synthetic draws in order, real + synthetic draws in order, then
    each compared arm's draws in order."""
    found = {p.name for p in Path(task_dir).iterdir() if p.is_dir() and p.name != TEST}
    if missing := {"real", "synthetic"} - found:
        raise FileNotFoundError(f"{task_dir} has no {' or '.join(sorted(missing))} set; run the tasks stage")
    by_draw = lambda n: (len(n), n)  # noqa: E731  synthetic before synthetic_d1 before synthetic_d10
    return ["real", *(n for arm in ("synthetic", "real_synthetic", *compared_arms(found))
                      for n in sorted((n for n in found if arm_of(n) == arm), key=by_draw))]


def replicate_plan(task_dir: Path, replicates: int, not_trained: dict[str, str]) -> list[tuple[int, str]]:
    """(replicate, training set) of every model to train: replicate r the real set, synthetic draw r, real +
    draw r and each compared arm's draw r (arms params leave out are skipped), each with seed r."""
    found = set(training_sets(task_dir))
    compared = [arm.removeprefix("synthetic-") for arm in compared_arms(found)]
    for arm in ("synthetic", *(f"synthetic-{a}" for a in compared)):
        if (draws := sum(arm_of(n) == arm for n in found)) < replicates:
            raise ValueError(f"classify.replicates is {replicates} but {task_dir} holds {draws} {arm} draw(s); "
                             f"set synthesize.draws to {replicates} or more")
    plan = [(r, name) for r in range(replicates)
            for name in ("real", synthetic_set(r), real_synthetic_set(r), *(compared_set(a, r) for a in compared))
            if arm_of(name) not in not_trained]
    if missing := sorted({name for _, name in plan} - found):
        raise FileNotFoundError(f"{task_dir} has no {', '.join(missing)} set; run the tasks stage")
    return plan


def arms_not_trained(model: str, cfg: Classify) -> dict[str, str]:
    """{arm: why} of the arms params leave out for `model`: VGG16's real + synthetic arm when
    classify.vgg16.real_synthetic is false (its twice-sized set is ~40% of VGG16's time)."""
    if model == "vgg16" and not cfg.vgg16.real_synthetic:
        return {"real_synthetic": "not trained: classify.vgg16.real_synthetic is false"}
    return {}


def trained_arms(names) -> list[str]:
    """The arms among arm names (a predictions table's, or a cell's metrics keys beside their drops), in order:
    Table 3's, then the compared generators'."""
    names = set(names)
    return [a for a in ARMS if a in names] + compared_arms(n for n in names if not n.endswith("_drop"))


def _lbp_folds(y: np.ndarray, groups: np.ndarray, folds: int) -> tuple[int, np.ndarray | None, str | None]:
    """(folds, groups, a note or None) of an LBP model's CV: grouped CV needs `folds` patients/slides per class,
    so few slides mean fewer folds, and a class of one patient/slide means CV without grouping."""
    fewest = min(len(np.unique(groups[y == c])) for c in np.unique(y))
    if fewest >= folds:
        return folds, groups, None
    folds, groups = (fewest, groups) if fewest >= 2 else (folds, None)
    return folds, groups, (f"a class has {fewest} patients/slides, so CV uses {folds} folds"
                           + ("" if groups is not None else " without grouping"))


def check_cell(task_dir: Path, model: str, cfg: Classify) -> None:
    """What classify@<task>-<model> would refuse in its task sets, found from their labels and patient/slide
    ids alone (no image read, nothing trained): fewer synthetic draws than replicates, a test set of one class,
    a training set too small for the CV folds or VGG16's validation split by patient. ValueError naming it."""
    from biomedsynth.classify.vgg import split_validation

    plan = replicate_plan(task_dir, cfg.replicates, arms_not_trained(model, cfg))
    if (classes := ImageSet(task_dir / TEST).meta["y"].nunique()) < 2:
        raise ValueError(f"{task_dir / TEST} holds {classes} class(es); the benchmark tests on two")
    for seed, train in plan:
        meta = ImageSet(task_dir / train).meta
        y, groups = meta["y"].astype(int).to_numpy(), meta["group"].astype(str).to_numpy()
        try:
            if model == "vgg16":
                split_validation(y, groups, cfg.vgg16.val_fraction, seed)
            else:
                classic.check_training(y, *_lbp_folds(y, groups, cfg.cv_folds)[:2])
        except ValueError as e:
            raise ValueError(f"{task_dir / train} (replicate {seed}): {e}") from None


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
    folds, groups, note = _lbp_folds(y, groups, cfg.cv_folds)
    if note:
        log(f"{train}: {note}")
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
    """Per test image actual/predicted (DVC's confusion template) and the ROC curve (fpr, tpr):
    plots/confusion/<arm>.csv and plots/roc/<arm>.csv, one folder per kind, so dvc.yaml declares two outputs per cell,
    not six."""
    atomic_write_text(plots / "confusion" / f"{arm}.csv",
                      "actual,predicted\n" + "".join(f"{a},{p}\n" for a, p in zip(y_test, pred)))
    fpr, tpr, _ = roc_curve(y_test, score)
    atomic_write_text(plots / "roc" / f"{arm}.csv",
                      "fpr,tpr\n" + "".join(f"{f:.6f},{t:.6f}\n" for f, t in zip(fpr, tpr)))


def _predictions_table(runs: dict[tuple[str, int], tuple], test_meta: pd.DataFrame) -> pd.DataFrame:
    """One row per (training set, replicate, test image): what the table3 stage needs to pair every cell."""
    frames = [pd.DataFrame({"set": name, "arm": arm_of(name), "replicate": r, "image": np.arange(len(test_meta)),
                            "group": test_meta["group"].astype(str).to_numpy(), "y": test_meta["y"].astype(int),
                            "pred": pred, "score": np.round(score, 6)})
              for (name, r), (pred, score, _) in runs.items()]
    return pd.concat(frames, ignore_index=True)


def test_clusters(predictions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(y, cluster ids) of the test images, in image order."""
    test = predictions[predictions["arm"] == "real"].drop_duplicates("image").sort_values("image")
    return test["y"].to_numpy(), test["group"].astype(str).to_numpy()


def replicate_runs(predictions: pd.DataFrame, arm: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The arm's (predictions, scores) per replicate, replicate 0 first, in test-image order: whatever order
    the rows come in, the same runs count."""
    rows = predictions[predictions["arm"] == arm].sort_values(["replicate", "image"])
    runs = [(g["pred"].to_numpy(), g["score"].to_numpy()) for _, g in rows.groupby("replicate", sort=True)]
    if [int(r) for r in sorted(rows["replicate"].unique())] != list(range(len(runs))):
        raise ValueError(f"{arm} arm: replicates must be 0..{len(runs) - 1}, got {sorted(rows['replicate'].unique())}")
    return runs


def arm_samples(predictions: pd.DataFrame, arm: str, y: np.ndarray, weights: np.ndarray,
                picks: np.ndarray) -> dict[str, np.ndarray]:
    """The arm's metrics under every bootstrap row (cluster weights and replicate picks): {metric: (1 + B,)}."""
    return metrics.over_replicates([metrics.arm_samples(y, [run], weights)
                                    for run in replicate_runs(predictions, arm)], picks)


def score_arms(predictions: pd.DataFrame, n_boot: int, seed: int = 0) -> tuple[dict, dict]:
    """From a predictions table: per arm the metrics (the mean over replicates) with intervals from the two-level
    bootstrap, the accuracy of each replicate and their spread (null with one replicate: not measured), and the
    degenerate flag; the paired drops from the real arm; and the samples {arm: {metric: (1 + B,)}}."""
    y, groups = test_clusters(predictions)
    weights = metrics.cluster_weights(y, groups, n_boot, seed)
    replicates = int(predictions["replicate"].nunique())
    picks = metrics.replicate_picks(replicates, n_boot, seed)
    rule = metrics.interval_rule(y, groups)
    result, samples = {}, {}
    for arm in trained_arms(predictions["arm"]):
        samples[arm] = arm_samples(predictions, arm, y, weights, picks)
        runs = replicate_runs(predictions, arm)
        scores = {k: metrics.interval(v, rule=rule, bounds=(0, 1)) for k, v in samples[arm].items()}
        reasons = metrics.degenerate(runs, scores["accuracy"])
        per_replicate = [round(float(np.mean(pred == y)), 4) for pred, _ in runs]
        result[arm] = {**scores, "one_class_share": max(metrics.one_class_share(p) for p, _ in runs),
                       "degenerate": bool(reasons), "degenerate_reasons": reasons,
                       "replicate_accuracies": per_replicate,
                       "replicate_std": round(float(np.std(per_replicate, ddof=1)), 4) if len(runs) > 1 else None}
    for arm, key in (("synthetic", "drop"), ("real_synthetic", "real_synthetic_drop"),
                     *((a, f"{a}_drop") for a in compared_arms(samples))):
        if arm in samples:
            result[key] = {kind: {k: metrics.interval(v, rule=rule) for k, v in d.items()}
                           for kind, d in metrics.drops(samples["real"], samples[arm]).items()}
    result["degenerate"] = result["real"]["degenerate"] or result["synthetic"]["degenerate"]
    result["replicates"] = replicates
    if replicates == 1:
        result["replicate_variance"] = "seed and draw variance not measured (1 replicate)"
    result["interval"] = {**rule, "method_text": metrics.describe(rule)}
    result["test_clusters"] = {str(c): int(len(set(groups[y == c]))) for c in (0, 1)}
    return result, samples


def evaluate(runs: dict[tuple[str, int], tuple], test_meta: pd.DataFrame, task: str,
             n_boot: int) -> tuple[dict, pd.DataFrame]:
    """(the cell's metrics, its predictions table) from {(training set, replicate): (predictions, scores,
    details)} on the test set described by test_meta (columns y, group). Confusion matrices and training
    details are replicate 0's."""
    y_test = test_meta["y"].astype(int).to_numpy()
    predictions = _predictions_table(runs, test_meta)
    result, _ = score_arms(predictions, n_boot)
    for (name, r), (pred, score, details) in runs.items():
        if r == 0:
            result[arm_of(name)] |= {"confusion": metrics.binary_metrics(y_test, pred, score)["confusion"], **details}
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
             metrics_path: Path, plots_dir: Path, predictions_path: Path, tracker=None, log=print,
             provenance: dict | None = None) -> dict:
    """Train `model` on every training set of `task` that each replicate uses (replicate_plan); test on the real
    test set. models_out/<set>-seed<r>.{pt,joblib} keeps each trained model: VGG16's best-validation-loss state,
    an LBP model's fitted estimator of the variant chosen by CV. `provenance` (the data it came from) is
    written into the metrics as it is."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    not_trained = arms_not_trained(model, cfg)
    plan = replicate_plan(task_dir, cfg.replicates, not_trained)  # before anything is removed
    rank, world = _rank_world(model)
    if rank > 0 and model != "vgg16":  # the LBP models run in one process: rank 0's
        return {}
    if rank == 0:
        remove_tree(models_out)  # no model of an earlier replicate count survives
        models_out.mkdir(parents=True)
    if world > 1:  # the others wait until rank 0 has emptied models_out
        import torch.distributed as dist

        dist.barrier()
    test_meta = ImageSet(task_dir / TEST).meta
    y_test = test_meta["y"].astype(int).to_numpy()
    runs = {}
    for r, name in plan:
        fitted = _fit_predict(model, task_dir, features_dir, name, cfg, r, models_out, log)
        if fitted is None:
            continue
        runs[(name, r)] = fitted
        acc = float(np.mean(fitted[0] == y_test))
        log(f"{task} {model} replicate {r} trained on {name}: test accuracy {acc:.3f}")
        if tracker is not None:
            tracker.log_metrics({f"{arm_of(name)}.accuracy": acc}, step=r)
    if rank > 0:
        return {}
    result, predictions = evaluate(runs, test_meta, task, cfg.bootstrap)
    if not_trained:
        result["not_trained"] = not_trained
    if model == "vgg16":  # which head, and the precision it trained in: Table 3 names both
        from biomedsynth.classify.vgg import MODEL_NAMES

        result["model_name"] = MODEL_NAMES[cfg.vgg16.head]
        precisions = sorted({details["precision"] for _, _, details in runs.values()})
        result["precision"] = precisions[0] if len(precisions) == 1 else precisions
    if provenance is not None:
        result["provenance"] = provenance
    for (name, r), (pred, score, _) in runs.items():
        if r == 0:
            _write_plots(plots_dir, arm_of(name), y_test, pred, score)
    for arm in not_trained:  # dvc.yaml's plots of every arm exist: these hold no rows
        atomic_write_text(plots_dir / "confusion" / f"{arm}.csv", "actual,predicted\n")
        atomic_write_text(plots_dir / "roc" / f"{arm}.csv", "fpr,tpr\n")
    atomic_write_text(predictions_path, predictions.to_csv(index=False))  # patient/slide ids: DVC-cached, not git
    write_json(metrics_path, result)
    if tracker is not None:
        tracker.log_metrics({f"{arm}.{m}": result[arm][m]["value"] for arm in trained_arms(result)
                             for m in metrics.SCALARS})
        tracker.log_metrics({f"drop.{m}": result["drop"]["relative"][m]["value"] for m in metrics.SCALARS})
        # the files this stage wrote, not the folder: an older layout's predictions.csv (patient ids) sat there and
        # went to MLflow with it
        for arm in trained_arms(result) + list(not_trained):
            for kind in ("confusion", "roc"):
                if (plots_dir / kind / f"{arm}.csv").is_file():
                    tracker.log_artifact(plots_dir / kind / f"{arm}.csv", f"plots/{kind}")
        tracker.log_artifacts(models_out, "model", real_images=True)  # fitted to real images (k-NN keeps them all)
    return result
