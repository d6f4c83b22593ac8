"""The table3 stage: Table 3 of the study (accuracy trained on real -> trained on synthetic, tested on real)
and the verdict on its claim, from the classifier outputs alone, so `dvc repro` of the benchmark refreshes
it without the GAN stages Table 3 does not use.

The claim (SPEC 6): synthetic training data costs the deep model less than the LBP models. It is decided
from the paired bootstrap interval of (mean LBP drop - mean deep drop) over the cells whose real and
synthetic arms both say something (not `degenerate`): `holds` when the whole interval is above 0, `fails`
when below, `inconclusive` otherwise or when a side has no usable cell. The drop is chance-normalised,
(real - synthetic) / (real - 0.5): the relative drop (real - synthetic) / real, the study's, is capped by
the real accuracy, so weak baselines could not show large drops; it is reported beside, with its own
verdict. All cells are resampled together: every replicate draws the test patients / slides once and
scores every model of every task on that draw (X-ray tasks share patients, so they share draws); with several
training seeds (classify.seeds) a cell's value is the mean over them, and each replicate also draws the seeds
with replacement, cell by cell, so the verdict sees how much training runs disagree. A cell is
also left out when a GAN behind its synthetic set learnt nothing (metrics/gan/<stage>.json `learnt`) or the set
copies training images (metrics/synthesize/<stage>.json `evidence.copying`): its drop then measures noise or
real images, not what synthetic data costs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from biomedsynth.classify import metrics
from biomedsynth.classify.benchmark import ARMS, CLASSIC, MODELS, seed_runs
from biomedsynth.provenance import same_data
from biomedsynth.store import write_json
from biomedsynth.tasks import TASKS

DEEP = tuple(m for m in MODELS if m not in CLASSIC)
LBP = CLASSIC
DROPS = {"chance_normalised": "chance-normalised accuracy drop (real - synthetic) / (real - 0.5)",
         "relative": "relative accuracy drop (real - synthetic) / real"}
HEADLINE = "chance_normalised"
MODALITY = {"histology": "histology", "xray_sex": "xray", "xray_age": "xray"}

# SPEC section 6: task -> model -> (accuracy trained on real, accuracy trained on synthetic, relative drop)
STUDY_TABLE3 = {
    "histology": {"vgg16": (0.96, 0.93, 0.0312), "knn": (0.94, 0.87, 0.0745),
                  "svm": (0.90, 0.85, 0.0556), "rf": (0.93, 0.86, 0.0753)},
    "xray_sex": {"vgg16": (0.90, 0.88, 0.0222), "knn": (0.84, 0.78, 0.0714),
                 "svm": (0.82, 0.74, 0.0976), "rf": (0.83, 0.72, 0.1325)},
    "xray_age": {"vgg16": (0.86, 0.83, 0.0349), "knn": (0.80, 0.73, 0.0875),
                 "svm": (0.79, 0.71, 0.1013), "rf": (0.80, 0.70, 0.1250)},
}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run the classify stage that writes it")
    return json.loads(path.read_text())


def _test_set(predictions: pd.DataFrame, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(y, cluster ids) of the task's test images; ids carry the modality so a slide never meets a patient."""
    real = predictions[(predictions["set"] == "real") & (predictions["seed"] == predictions["seed"].min())]
    real = real.sort_values("image")
    return real["y"].to_numpy(), (MODALITY[task] + ":" + real["group"].astype(str)).to_numpy()


def _cell(m: dict, task: str, model: str) -> dict:
    """One row of Table 3 from a classify stage's metrics JSON."""
    ci = lambda d: {b: None if d[b] is None else round(float(d[b]), 4) for b in ("value", "low", "high")}  # noqa: E731
    row = {arm: ci(m[arm]["accuracy"]) for arm in ARMS if arm in m}
    row |= {"drop": ci(m["drop"]["relative"]["accuracy"]),
            "drop_chance_normalised": ci(m["drop"]["chance_normalised"]["accuracy"])}
    if "real_synthetic_drop" in m:
        row["real_synthetic_drop"] = ci(m["real_synthetic_drop"]["relative"]["accuracy"])
    reasons = {arm: m[arm]["degenerate_reasons"] for arm in ("real", "synthetic") if m[arm]["degenerate"]}
    spread = m["spread"]
    row |= {"degenerate": bool(reasons), "degenerate_reasons": reasons, "synthetic_draws": m["synthetic"]["draws"],
            "spread": {"seeds": {arm: s["accuracy"]["std"] for arm, s in spread["seeds"].items()},
                       "n_seeds": spread["seeds"]["real"]["n"], "draws": spread["draws"]["accuracy"]["std"],
                       "n_draws": spread["draws"]["n"]},
            "study": dict(zip(("real", "synthetic", "drop"), STUDY_TABLE3[task][model]))}
    if "model_name" in m:  # VGG16's head
        row["model_name"] = m["model_name"]
    if "not_trained" in m:  # arms params left out, with why
        row["not_trained"] = m["not_trained"]
    return row


def gan_evidence(metrics_dir: Path, stages: list[str]) -> dict:
    """What the GAN stages behind a task's synthetic set say of themselves (learnt, still improving) and what the
    memorisation test says of the sets they drew (copying: synthesize's evidence)."""
    found = [_read_json(Path(metrics_dir) / "gan" / f"{stage}.json") for stage in stages]
    drawn = [_read_json(Path(metrics_dir) / "synthesize" / f"{stage}.json") for stage in stages]
    return {"stages": stages, "learnt": all(g.get("learnt", False) for g in found),
            "still_improving": any(g.get("still_improving", False) for g in found),
            "not_learnt": [s for s, g in zip(stages, found) if not g.get("learnt", False)],
            "copying": [s for s, d in zip(stages, drawn) if d.get("evidence", {}).get("copying", False)]}


def verdict(samples: dict[tuple[str, str], np.ndarray], used: list[tuple[str, str]], alpha: float = 0.05) -> dict:
    """The claim "deep loses less than LBP" decided from drop samples {(task, model): (R,)} (row 0: the test
    set) of the `used` cells: the interval of mean LBP drop - mean deep drop, each mean over its used cells."""
    deep = [c for c in used if c[1] in DEEP]
    lbp = [c for c in used if c[1] in LBP]
    out = {"cells_used": len(used), "deep_cells": len(deep), "lbp_cells": len(lbp)}
    if not deep or not lbp:
        missing = "deep" if not deep else "LBP"
        return {**out, "verdict": "inconclusive", "reason": f"no usable {missing} cell", "difference": None,
                "deep_drop_mean": None, "lbp_drop_mean": None}
    deep_mean = np.mean([samples[c] for c in deep], 0)
    lbp_mean = np.mean([samples[c] for c in lbp], 0)
    diff = metrics.interval(lbp_mean - deep_mean, alpha)
    if diff["value"] is None or diff["low"] is None:
        return {**out, "verdict": "inconclusive", "reason": "the drop is undefined (a real arm at chance)",
                "difference": None, "deep_drop_mean": None, "lbp_drop_mean": None}
    decided = "holds" if diff["low"] > 0 else "fails" if diff["high"] < 0 else "inconclusive"
    reason = {"holds": "the whole interval of (LBP drop - deep drop) is above 0",
              "fails": "the whole interval of (LBP drop - deep drop) is below 0",
              "inconclusive": "the interval of (LBP drop - deep drop) contains 0"}[decided]
    return {**out, "verdict": decided, "reason": reason, "difference": {k: round(v, 4) for k, v in diff.items()},
            "deep_drop_mean": round(float(deep_mean[0]), 4), "lbp_drop_mean": round(float(lbp_mean[0]), 4)}


def sentence(claims: dict) -> str:
    """The verdict in one sentence, with its interval."""
    v = claims[HEADLINE]
    left_out = (f"; {len(claims['cells_left_out'])} cell(s) left out as degenerate, from a GAN that learnt "
                "nothing or from a set that copies training images" if claims["cells_left_out"] else "")
    if v["difference"] is None:
        return (f"The study's claim (synthetic data costs the deep model less than the LBP models) is inconclusive "
                f"here: {v['reason']}{left_out}.")
    d = v["difference"]
    return (f"The study's claim (synthetic data costs the deep model less than the LBP models) "
            f"{ {'holds': 'holds', 'fails': 'fails', 'inconclusive': 'is inconclusive'}[v['verdict']] } here: "
            f"mean LBP minus mean deep {DROPS[HEADLINE]} {100 * d['value']:+.1f} points "
            f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] (95%, {v['cells_used']} cells{left_out}).")


def summarise(metrics_dir: Path, gan_stages: dict[str, list[str]], tasks: tuple[str, ...] = TASKS,
              models: tuple[str, ...] = MODELS, n_boot: int = 1000, seed: int = 0) -> dict:
    """Table 3 from metrics/<task>/<model>.json, the GAN stages behind each task's synthetic set
    (gan_stages, read from metrics/gan/<stage>.json) and the verdict from metrics/<task>/<model>/predictions.csv."""
    for name, given, known in (("task", tasks, TASKS), ("model", models, MODELS)):
        if unknown := sorted(set(given) - set(known)):
            raise ValueError(f"unknown {name}(s) {', '.join(unknown)}; known: {', '.join(known)}")
    metrics_dir = Path(metrics_dir)
    table, predictions, prints = {}, {}, {}
    for task in tasks:
        for model in models:
            m = _read_json(metrics_dir / task / f"{model}.json")
            prints[f"{task}/{model}"] = m.get("provenance", {"data": None, "sources": None, "commit": None})
            try:
                table.setdefault(task, {})[model] = _cell(m, task, model)
            except KeyError as e:
                raise ValueError(f"{metrics_dir / task / model}.json: no {e.args[0]!r}; rerun its classify stage") \
                    from None
            path = metrics_dir / task / model / "predictions.csv"
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing; run the classify stage that writes it")
            predictions[(task, model)] = pd.read_csv(path)
    seeds = sorted({int(s) for p in predictions.values() for s in p["seed"].unique()})
    weights = metrics.joint_cluster_weights({t: _test_set(predictions[(t, models[0])], t) for t in tasks}, n_boot, seed)
    samples = {kind: {} for kind in DROPS}
    runs_rng = np.random.default_rng((seed, 1))  # which training seeds each replicate draws, cell by cell
    for (task, model), p in predictions.items():
        y = _test_set(p, task)[0]
        arms = {arm: metrics.seed_resampled([metrics.arm_samples(y, runs, weights[task])
                                             for runs in seed_runs(p, arm)], runs_rng)
                for arm in ("real", "synthetic")}
        for kind, d in metrics.drops(arms["real"], arms["synthetic"]).items():
            samples[kind][(task, model)] = d["accuracy"]
    gans = {task: gan_evidence(metrics_dir, gan_stages[task]) for task in tasks}
    left_out = {}
    for task, model in predictions:
        cell = table[task][model]
        cell["gan"] = gans[task]
        reasons = [f"{arm}: {', '.join(r)}" for arm, r in cell["degenerate_reasons"].items()]
        reasons += [f"GAN learnt nothing: {s}" for s in gans[task]["not_learnt"]]
        reasons += [f"synthetic set copies training images: {s}" for s in gans[task]["copying"]]
        if reasons:
            left_out[f"{task}/{model}"] = "; ".join(reasons)
    used = [c for c in predictions if f"{c[0]}/{c[1]}" not in left_out]
    claims = {kind: verdict(samples[kind], used) for kind in DROPS}
    study = {"deep": float(np.mean([STUDY_TABLE3[t][m][2] for t in tasks for m in models if m in DEEP] or [np.nan])),
             "lbp": float(np.mean([STUDY_TABLE3[t][m][2] for t in tasks for m in models if m in LBP] or [np.nan]))}
    claims = {"verdict": claims[HEADLINE]["verdict"], "measure": DROPS[HEADLINE], **claims,
              "cells_left_out": left_out, "bootstrap": {"replicates": n_boot, "unit": "patient / slide",
                                                        "paired": "all cells over the same resampled clusters",
                                                        "training_seeds": seeds},
              "study_deep_drop_mean": round(study["deep"], 4), "study_lbp_drop_mean": round(study["lbp"], 4)}
    claims["sentence"] = sentence(claims)
    if mixed := same_data(prints):
        raise ValueError(f"{', '.join(mixed)} came from other data than {next(iter(prints))} "
                         "(data.dvc hash or sources params differ); rerun their classify stages")
    first = next(iter(prints.values()))
    provenance = {"data": first["data"], "sources": first["sources"],
                  "commits": sorted({p["commit"] for p in prints.values() if p["commit"]})}
    return {**table, "claims": claims, "provenance": provenance}


def flat(summary: dict) -> dict:
    """One number per column, for `dvc exp show` / `dvc metrics diff`: each arm's accuracy, the drops and the
    degenerate flag (is_degenerate) per cell, then the verdict (1 holds, 0 inconclusive, -1 fails) with its interval."""
    out = {}
    for task, row in summary.items():
        if task not in TASKS:
            continue
        for model, c in row.items():
            for key in (*ARMS, "drop", "drop_chance_normalised"):
                if key in c and c[key]["value"] is not None:
                    out[f"{task}.{model}.{key}"] = c[key]["value"]
            out[f"{task}.{model}.is_degenerate"] = int(c["degenerate"])
    v = summary["claims"][HEADLINE]
    out["verdict"] = {"holds": 1, "inconclusive": 0, "fails": -1}[v["verdict"]]
    if v["difference"] is not None:
        out |= {"verdict_difference": v["difference"]["value"], "verdict_low": v["difference"]["low"],
                "verdict_high": v["difference"]["high"]}
    out["cells_used"] = v["cells_used"]
    return out


def data_warnings(metrics_dir: Path) -> list[str]:
    """What ingest warned about the data the results rest on (e.g. a histology split by tile, not slide)."""
    found = []
    for modality in ("xray", "histology"):
        path = Path(metrics_dir) / "ingest" / f"{modality}.json"
        if path.is_file():
            found += [f"{modality}: {w}" for w in json.loads(path.read_text()).get("warnings", [])]
    return found


def write_table3(metrics_dir: Path, gan_stages: dict[str, list[str]], summary_path: Path, flat_path: Path,
                 n_boot: int) -> dict:
    """Write metrics/summary.json (Table 3 with intervals, flags, spreads, claims, the data it came from and
    ingest's warnings about that data) and the flat metrics/table3.json."""
    summary = summarise(metrics_dir, gan_stages, n_boot=n_boot)
    summary["warnings"] = data_warnings(metrics_dir)
    write_json(summary_path, summary)
    write_json(flat_path, flat(summary))
    return summary
