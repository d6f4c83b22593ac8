"""The study's conventional classifiers on LBP features (SPEC 5): k-NN, SVM (RBF kernel) and Random Forest,
hyper-parameters chosen by stratified k-fold cross-validation on the training set only, then refit on
all of it. When patient or slide ids are given, folds are grouped by them, so the validation score is
not inflated by near-identical images of one patient on both sides (the product splits by patient
everywhere); synthetic training sets have no patients and use plain stratified folds.
"""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

MODELS = ("knn", "svm", "rf")


def make_estimator(model: str, seed: int = 0) -> BaseEstimator:
    """An unfitted classifier. k-NN and SVM see standardised features: rare LBP codes have tiny spreads
    and would otherwise count for nothing in their distances; trees do not care about scale."""
    if model == "knn":
        return Pipeline([("scale", StandardScaler()), ("model", KNeighborsClassifier())])
    if model == "svm":  # decision_function scores the ROC curve; probability=True would add an inner CV
        return Pipeline([("scale", StandardScaler()), ("model", SVC(kernel="rbf", random_state=seed))])
    if model == "rf":
        return RandomForestClassifier(random_state=seed)
    raise ValueError(f"unknown classifier {model!r}; choose one of {', '.join(MODELS)}")


def _param_grid(estimator: BaseEstimator, model: str, grid: dict) -> dict:
    """The caller's plain grid ({"n_neighbors": [1, 3]}) in the estimator's own names; a single value is fixed."""
    core = estimator.named_steps["model"] if isinstance(estimator, Pipeline) else estimator
    prefix = "model__" if isinstance(estimator, Pipeline) else ""
    out = {}
    for key, values in grid.items():
        if key not in core.get_params(deep=False):
            raise ValueError(f"grid key {key!r} is not a parameter of {model} ({type(core).__name__})")
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        if not values:
            raise ValueError(f"grid key {key!r} of {model} has no values")
        out[prefix + key] = values
    return out


def cv_splitter(folds: int, seed: int, grouped: bool):
    """Stratified folds, grouped (no group on both sides of a split) when groups are given."""
    kind = StratifiedGroupKFold if grouped else StratifiedKFold
    return kind(n_splits=folds, shuffle=True, random_state=seed)


def check_training(y: np.ndarray, folds: int, groups: np.ndarray | None) -> None:
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    classes, counts = np.unique(y, return_counts=True)
    classes = [_plain(c) for c in classes]  # np.int64(1) -> 1 in messages
    if len(classes) < 2:
        raise ValueError(f"training labels have {'a single class ' + repr(classes[0]) if classes else 'no samples'}; need two or more")
    if counts.min() < folds:
        raise ValueError(f"class {classes[counts.argmin()]!r} has {counts.min()} training samples, fewer than folds={folds}")
    if groups is not None:
        if len(groups) != len(y):
            raise ValueError(f"groups has {len(groups)} entries for {len(y)} training samples")
        for c in classes:
            n = len(np.unique(groups[y == c]))
            if n < folds:
                raise ValueError(f"class {c!r} comes from {n} groups (patients/slides), fewer than folds={folds}")


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v


def fit_classic(model: str, X_train, y_train, grid: dict, *, folds: int = 5, seed: int = 0, n_jobs: int = 1,
                groups=None) -> tuple[BaseEstimator, dict]:
    """Grid-search `grid` by `folds`-fold stratified CV accuracy on the training data (grouped by `groups`
    when given), refit the best on all of it. Returns (fitted estimator, {"best_params", "cv_score",
    "cv_std"}): the mean and std over folds of the best candidate's validation accuracy. Ties go to the
    first candidate in grid order, so a fixed seed gives a fixed result."""
    X, y = np.asarray(X_train), np.asarray(y_train)
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"X_train must be (N, D) with one row per label, got shape {X.shape} for {len(y)} labels")
    groups = None if groups is None else np.asarray(groups)
    check_training(y, folds, groups)
    estimator = make_estimator(model, seed)
    search = GridSearchCV(estimator, _param_grid(estimator, model, grid), scoring="accuracy",
                          cv=cv_splitter(folds, seed, groups is not None), n_jobs=n_jobs, refit=True,
                          error_score="raise")
    search.fit(X, y, groups=groups)
    best = search.best_index_
    info = {"best_params": {k.removeprefix("model__"): _plain(v) for k, v in search.best_params_.items()},
            "cv_score": float(search.best_score_), "cv_std": float(search.cv_results_["std_test_score"][best])}
    return search.best_estimator_, info


def score_of(estimator: BaseEstimator, X) -> np.ndarray:
    """Per row, the score of the positive class `estimator.classes_[1]` for a ROC curve: its probability
    where the estimator gives one (k-NN, RF), else the decision function (SVM)."""
    if len(estimator.classes_) != 2:
        raise ValueError(f"score_of needs a two-class estimator, got classes {list(estimator.classes_)}")
    if hasattr(estimator, "predict_proba"):
        return estimator.predict_proba(X)[:, 1]
    return estimator.decision_function(X)


def fit_all_variants(model: str, features_train: dict, y_train, features_test: dict, grid: dict, *,
                     folds: int = 5, seed: int = 0, n_jobs: int = 1, groups=None) -> dict:
    """fit_classic on every LBP variant (same folds for all), then predict the test set. Returns
    {"best_variant": name, "variants": {name: {"best_params", "cv_score", "cv_std", "pred", "score",
    "estimator"}}}."""
    if not features_train or set(features_train) != set(features_test):
        raise ValueError(f"train and test feature variants differ: {sorted(features_train)} vs {sorted(features_test)}")
    variants = {}
    for name, X in features_train.items():
        estimator, info = fit_classic(model, X, y_train, grid, folds=folds, seed=seed, n_jobs=n_jobs, groups=groups)
        variants[name] = {**info, "estimator": estimator, "pred": estimator.predict(features_test[name]),
                          "score": score_of(estimator, features_test[name])}
    # The best variant is the one with the best CV score on the training set, never the best test score:
    # choosing by test accuracy would make the reported test accuracy optimistic. All variants are reported.
    best = max(variants, key=lambda v: variants[v]["cv_score"])
    return {"best_variant": best, "variants": variants}
