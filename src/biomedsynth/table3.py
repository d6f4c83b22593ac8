"""The table3 stage: Table 3 of the study (accuracy trained on real -> trained on synthetic, tested on real)
and the verdict on its claim, from the classifier outputs alone, so `dvc repro` of the benchmark refreshes
it without the GAN stages Table 3 does not use.

The claim (SPEC 6): synthetic training data costs the deep model less than the LBP models. Within each task the
contrast is the mean LBP drop (k-NN, SVM, RF) minus the deep drop (VGG16); the verdict is the mean of the tasks'
contrasts, each task weighing alike, so no task counts more for having more usable cells. `holds` when the whole
95% interval is above 0, `fails` when below, `inconclusive` otherwise or when no task has both sides. The drop
is chance-normalised, (real - synthetic) / (real - 0.5): the relative drop (real - synthetic) / real, the
study's, is capped by the real accuracy, so weak baselines could not show large drops; it is reported beside,
with its own verdict.

Every cell, task and the verdict are resampled together: each bootstrap row draws the replicates (training seed
and synthetic draw, classify.replicates) once for every cell, then the test patients / slides once for every
task (X-ray tasks share patients, so they share draws). A task with few clusters in a class gets a cluster t
interval (metrics.interval_rule); the verdict takes the strictest of its tasks' rules.

A cell leaves the verdict only when it measures nothing: its real arm is degenerate (the model cannot learn the
task even from real images), a GAN behind its synthetic set learnt nothing (metrics/gan/<stage>.json
`learnt`), or the set copies training images (metrics/synthesize/<stage>.json `evidence.copying`). A cell whose
synthetic arm is degenerate (a model trained on synthetic images that calls every real image one class) stays
in, flagged: that is the cost the study measures. The earlier rule, which also left such cells out, survives
as a labelled sensitivity line: it selects cells by their outcome.

Generators compared (tasks.compare): each listed architecture trained one more arm of every cell on its own set of
the task's group and setup. The same machinery answers a second question, per model family: each task's own drop
minus that generator's, over the same resampled replicates and clusters, averaged over tasks; holds when its copies
cost the family less. A cell leaves that comparison when either set's cell measures nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from biomedsynth.classify import metrics
from biomedsynth.classify.benchmark import ARMS, CLASSIC, MODELS, arm_samples, test_clusters
from biomedsynth.provenance import git_commit, same_data
from biomedsynth.store import atomic_write_text, write_json
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
    y, groups = test_clusters(predictions)
    return y, np.char.add(MODALITY[task] + ":", groups)


def _cell(m: dict, task: str, model: str, synthetic: str = "synthetic") -> dict:
    """One row of Table 3 from a classify stage's metrics JSON; with `synthetic` a compared generator's arm
    (synthetic-<arch>), that generator's row: its arm in the synthetic column, no real + synthetic arm, no study."""
    ci = lambda d: {b: None if d[b] is None else round(float(d[b]), 4) for b in ("value", "low", "high")}  # noqa: E731
    own = synthetic == "synthetic"
    arms = {"real": "real", "synthetic": synthetic, **({"real_synthetic": "real_synthetic"} if own else {})}
    arms = {column: arm for column, arm in arms.items() if arm in m}
    drop = m["drop" if own else f"{synthetic}_drop"]
    row = {column: ci(m[arm]["accuracy"]) for column, arm in arms.items()}
    row |= {"drop": ci(drop["relative"]["accuracy"]),
            "drop_chance_normalised": ci(drop["chance_normalised"]["accuracy"])}
    if own and "real_synthetic_drop" in m:
        row["real_synthetic_drop"] = ci(m["real_synthetic_drop"]["relative"]["accuracy"])
    reasons = {column: m[arms[column]]["degenerate_reasons"] for column in ("real", "synthetic")
               if m[arms[column]]["degenerate"]}
    row |= {"degenerate": bool(reasons), "degenerate_reasons": reasons, "replicates": m["replicates"],
            "replicate_accuracies": {column: m[arm]["replicate_accuracies"] for column, arm in arms.items()},
            "replicate_std": {column: m[arm]["replicate_std"] for column, arm in arms.items()}}
    if own:
        row["study"] = dict(zip(("real", "synthetic", "drop"), STUDY_TABLE3[task][model]))
    for key in ("model_name", "precision", *(("not_trained",) if own else ())):  # VGG16's head and precision; arms
        if key in m:                                                              # params left out
            row[key] = m[key]
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


def _rounded(d: dict) -> dict:
    return {k: None if v is None else round(v, 4) for k, v in d.items()}


def verdict(samples: dict[tuple[str, str], np.ndarray], used: list[tuple[str, str]], rules: dict[str, dict],
            alpha: float = 0.05) -> dict:
    """The claim "deep loses less than LBP" decided from drop samples {(task, model): (1 + B,)} (row 0: the
    estimate) of the `used` cells: per task (rules: its interval rule) the contrast mean LBP drop - deep drop,
    and the verdict's interval of the mean of the tasks' contrasts, tasks weighing alike."""
    per_task, contrasts = {}, {}
    for task, rule in rules.items():
        deep = [c for c in used if c[0] == task and c[1] in DEEP]
        lbp = [c for c in used if c[0] == task and c[1] in LBP]
        row = {"deep_cells": len(deep), "lbp_cells": len(lbp)}
        if not deep or not lbp:
            per_task[task] = {**row, "contrast": None, "reason": f"no usable {'deep' if not deep else 'LBP'} cell"}
            continue
        deep_mean, lbp_mean = (np.mean([samples[c] for c in cells], 0) for cells in (deep, lbp))
        contrasts[task] = lbp_mean - deep_mean
        per_task[task] = {**row, "deep_drop": round(float(deep_mean[0]), 4), "lbp_drop": round(float(lbp_mean[0]), 4),
                          "contrast": _rounded(metrics.interval(contrasts[task], alpha, rule))}
    out = {"cells_used": len(used), "tasks_used": len(contrasts), "per_task": per_task}
    if not contrasts:
        return {**out, "verdict": "inconclusive", "reason": "no task has a usable deep and LBP cell",
                "difference": None, "interval": None}
    return {**out, **_over_tasks(contrasts, rules, alpha, "LBP drop - deep drop")}


def _over_tasks(contrasts: dict[str, np.ndarray], rules: dict[str, dict], alpha: float, what: str) -> dict:
    """The mean of the tasks' contrast samples (tasks weighing alike) with its interval under the strictest of their
    rules, and what it decides: holds when the whole interval is above 0, fails when below."""
    rule = metrics.strictest([rules[t] for t in contrasts])
    diff = metrics.interval(np.mean(list(contrasts.values()), 0), alpha, rule)
    out = {"interval": metrics.describe(rule)}
    if diff["value"] is None or diff["low"] is None:
        return {**out, "verdict": "inconclusive", "difference": None,
                "reason": "the contrast or its interval is undefined (a real arm at chance, or a class of one cluster)"}
    decided = "holds" if diff["low"] > 0 else "fails" if diff["high"] < 0 else "inconclusive"
    reason = {"holds": f"the whole interval of ({what}) is above 0",
              "fails": f"the whole interval of ({what}) is below 0",
              "inconclusive": f"the interval of ({what}) contains 0"}[decided]
    return {**out, "verdict": decided, "reason": reason, "difference": _rounded(diff)}


FAMILIES = {"deep": DEEP, "lbp": LBP}


def versus(differences: dict[tuple[str, str], np.ndarray], used: list[tuple[str, str]], rules: dict[str, dict],
           arch: str, alpha: float = 0.05) -> dict:
    """Generator `arch` against each task's own, per model family, from the samples {(task, model): (1 + B,)} of
    (own set's drop - arch's set's drop) of the `used` cells: per task the mean over the family's cells, and the
    mean over tasks (tasks weighing alike). Holds: the whole interval is above 0, arch's copies cost the family
    less; fails: below 0, they cost it more."""
    out = {}
    for family, models in FAMILIES.items():
        per_task, contrasts = {}, {}
        for task, rule in rules.items():
            cells = [c for c in used if c[0] == task and c[1] in models]
            if not cells:
                per_task[task] = {"cells": 0, "difference": None, "reason": "no usable cell"}
                continue
            contrasts[task] = np.mean([differences[c] for c in cells], 0)
            per_task[task] = {"cells": len(cells),
                              "difference": _rounded(metrics.interval(contrasts[task], alpha, rule))}
        row = {"cells_used": sum(t["cells"] for t in per_task.values()), "tasks_used": len(contrasts),
               "per_task": per_task}
        out[family] = ({**row, **_over_tasks(contrasts, rules, alpha, f"own drop - {arch} drop")} if contrasts else
                       {**row, "verdict": "inconclusive", "reason": "no task has a usable cell", "difference": None,
                        "interval": None})
    return out


def _points(d: dict) -> str:
    return f"{100 * d['value']:+.1f} points [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


def sentence(claims: dict) -> str:
    """The verdict in one sentence, with its interval, what it rests on and what it could not measure."""
    v = claims[HEADLINE]
    replicates = claims["replicates"]
    variance = (f"{replicates} replicates of training seed and synthetic draw" if replicates > 1
                else "seed and draw variance not measured (1 replicate)")
    left_out = (f", {len(claims['cells_left_out'])} left out as measuring nothing" if claims["cells_left_out"] else "")
    claim = "The study's claim (synthetic data costs the deep model less than the LBP models)"
    if v["difference"] is None:
        return f"{claim} is inconclusive here: {v['reason']} ({v['cells_used']} cells{left_out}; {variance})."
    verb = {"holds": "holds", "fails": "fails", "inconclusive": "is inconclusive"}[v["verdict"]]
    return (f"{claim} {verb} here: LBP minus deep {DROPS[HEADLINE]}, averaged over {v['tasks_used']} tasks with "
            f"equal weight, {_points(v['difference'])} (95%, {v['interval']}; {v['cells_used']} cells{left_out}; "
            f"{variance}).")


def _check_comparable(table: dict) -> tuple[int, dict]:
    """(replicates, {model: precision}) shared by every cell; a ValueError naming the cells that differ."""
    cells = {f"{t}/{m}": c for t, row in table.items() for m, c in row.items()}
    replicates = {c["replicates"] for c in cells.values()}
    if len(replicates) > 1:
        raise ValueError("cells ran with different classify.replicates (" + ", ".join(
            f"{k} {c['replicates']}" for k, c in cells.items()) + "); rerun their classify stages")
    precisions = {k: c["precision"] for k, c in cells.items() if "precision" in c}
    if len({str(v) for v in precisions.values()}) > 1:
        raise ValueError("VGG16 cells trained in different precisions (" + ", ".join(
            f"{k} {v}" for k, v in precisions.items()) + "): Table 3 does not mix them; set classify.vgg16.precision "
            "to fp32 or bf16 and rerun their classify stages")
    return replicates.pop(), {k.split("/")[1]: v for k, v in precisions.items()}


def _measures_nothing(cell: dict, gan: dict) -> list[str]:
    """Why a cell measures nothing (empty: it measures): its real arm is degenerate, a GAN behind its synthetic set
    learnt nothing, or that set copies training images."""
    reasons = [f"real arm: {', '.join(cell['degenerate_reasons']['real'])}"] \
        if "real" in cell["degenerate_reasons"] else []
    reasons += [f"GAN learnt nothing: {s}" for s in gan["not_learnt"]]
    return reasons + [f"synthetic set copies training images: {s}" for s in gan["copying"]]


def summarise(metrics_dir: Path, predictions_dir: Path, gan_stages: dict[str, list[str]],
              tasks: tuple[str, ...] = TASKS, models: tuple[str, ...] = MODELS, n_boot: int = 1000,
              seed: int = 0, compared: dict[str, dict[str, list[str]]] | None = None) -> dict:
    """Table 3 from metrics/<task>/<model>.json, the GAN stages behind each task's synthetic set
    (gan_stages, read from metrics/gan/<stage>.json) and the verdict from data/predictions/<task>/<model>.csv
    (predictions_dir: every test prediction with its patient or slide id, so DVC-cached and kept out of git).
    `compared` {arch: {task: its GAN stages}}: the generators tasks.compare sets beside each task's own
    (`generators`, compare_generator)."""
    for name, given, known in (("task", tasks, TASKS), ("model", models, MODELS)):
        if unknown := sorted(set(given) - set(known)):
            raise ValueError(f"unknown {name}(s) {', '.join(unknown)}; known: {', '.join(known)}")
    metrics_dir = Path(metrics_dir)
    table, predictions, prints, found = {}, {}, {}, {}
    for task in tasks:
        for model in models:
            m = found[(task, model)] = _read_json(metrics_dir / task / f"{model}.json")
            prints[f"{task}/{model}"] = m.get("provenance", {"data": None, "sources": None})
            try:
                table.setdefault(task, {})[model] = _cell(m, task, model)
            except KeyError as e:
                raise ValueError(f"{metrics_dir / task / model}.json: no {e.args[0]!r}; rerun its classify stage") \
                    from None
            path = Path(predictions_dir) / task / f"{model}.csv"
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing; run the classify stage that writes it")
            predictions[(task, model)] = pd.read_csv(path)
    if mixed := same_data(prints):
        raise ValueError(f"{', '.join(mixed)} came from other data than {next(iter(prints))} "
                         "(data.dvc hash or sources params differ); rerun their classify stages")
    replicates, precision = _check_comparable(table)
    tests = {t: _test_set(predictions[(t, models[0])], t) for t in tasks}
    weights = metrics.joint_cluster_weights(tests, n_boot, seed)
    picks = metrics.replicate_picks(replicates, n_boot, seed)
    rules = {t: metrics.interval_rule(*tests[t]) for t in tasks}
    samples, real = {kind: {} for kind in DROPS}, {}
    for (task, model), p in predictions.items():
        y = tests[task][0]
        arms = {arm: arm_samples(p, arm, y, weights[task], picks) for arm in ("real", "synthetic")}
        real[(task, model)] = arms["real"]
        for kind, d in metrics.drops(arms["real"], arms["synthetic"]).items():
            samples[kind][(task, model)] = d["accuracy"]
    gans = {task: gan_evidence(metrics_dir, gan_stages[task]) for task in tasks}
    left_out, synthetic_degenerate = {}, []
    for task, model in predictions:
        cell = table[task][model]
        cell["gan"] = gans[task]
        if reasons := _measures_nothing(cell, gans[task]):
            left_out[f"{task}/{model}"] = "; ".join(reasons)
        elif "synthetic" in cell["degenerate_reasons"]:
            synthetic_degenerate.append((task, model))
    used = [c for c in predictions if f"{c[0]}/{c[1]}" not in left_out]
    claims = {kind: verdict(samples[kind], used, rules) for kind in DROPS}
    survivors = [c for c in used if c not in synthetic_degenerate]
    sensitivity = verdict(samples[HEADLINE], survivors, rules)
    study = {"deep": float(np.mean([STUDY_TABLE3[t][m][2] for t in tasks for m in models if m in DEEP] or [np.nan])),
             "lbp": float(np.mean([STUDY_TABLE3[t][m][2] for t in tasks for m in models if m in LBP] or [np.nan]))}
    claims = {"verdict": claims[HEADLINE]["verdict"], "measure": DROPS[HEADLINE], **claims,
              "cells_left_out": left_out,
              "sensitivity": {"rule": "the earlier rule, leaving out the cells whose synthetic arm is degenerate too "
                                      "(it selects cells by their outcome, so it is not the verdict)",
                              "cells_also_left_out": [f"{t}/{m}" for t, m in synthetic_degenerate],
                              "verdict": sensitivity["verdict"], "difference": sensitivity["difference"],
                              "cells_used": sensitivity["cells_used"], "tasks_used": sensitivity["tasks_used"]},
              "replicates": replicates,
              "replicate_variance": ("measured" if replicates > 1
                                     else "seed and draw variance not measured (1 replicate)"),
              "precision": precision or None,
              "bootstrap": {"rows": n_boot, "unit": "replicate, then patient / slide",
                            "paired": "every cell over the same resampled replicates and clusters",
                            "interval_per_task": {t: metrics.describe(r) for t, r in rules.items()}},
              "study_deep_drop_mean": round(study["deep"], 4), "study_lbp_drop_mean": round(study["lbp"], 4)}
    claims["sentence"] = sentence(claims)
    first = next(iter(prints.values()))
    # the one place a run's commit is written (with the MLflow runs' tags): the per-stage outputs name their data
    # only, and dvc.lock the code each came from
    provenance = {"data": first["data"], "sources": first["sources"], "commit": git_commit()}
    generators = {arch: compare_generator(arch, stages, table, found, predictions, real, samples[HEADLINE], left_out,
                                          {t: (tests[t][0], weights[t], rules[t]) for t in tasks}, picks, metrics_dir)
                  for arch, stages in (compared or {}).items() if stages}
    return {**table, "claims": claims, **({"generators": generators} if generators else {}), "provenance": provenance}


def compare_generator(arch: str, stages: dict[str, list[str]], table: dict, found: dict, predictions: dict,
                      real: dict, own_drops: dict, own_left_out: dict, tests: dict, picks: np.ndarray,
                      metrics_dir: Path) -> dict:
    """Generator `arch` beside each task's own (tasks.compare): its Table 3 (arm synthetic-<arch>, the real arm and
    test set the own set's), its claim (LBP - deep with its drops), and per model family own drop - its drop
    (versus), every cell over the same resampled replicates and clusters as Table 3. A cell leaves its Table 3
    when it measures nothing with its set; it leaves the comparison when either set's cell measures nothing."""
    arm = f"synthetic-{arch}"
    if missing := [f"{task}/{model}" for task in stages for model in table[task]
                   if f"{arm}_drop" not in found[(task, model)]]:
        raise ValueError(f"{metrics_dir / missing[0]}.json has no {arm} arm (tasks.compare lists {arch}); rerun the "
                         "tasks and classify stages")
    gans = {task: gan_evidence(metrics_dir, task_stages) for task, task_stages in stages.items()}
    cells, drops, differences, its_left_out, left_out = {}, {}, {}, {}, {}
    for task in stages:
        y, weights, rule = tests[task]
        for model in table[task]:
            cell = cells.setdefault(task, {})[model] = _cell(found[(task, model)], task, model, arm)
            cell["gan"] = gans[task]
            theirs = arm_samples(predictions[(task, model)], arm, y, weights, picks)
            drops[(task, model)] = metrics.drops(real[(task, model)], theirs)[HEADLINE]["accuracy"]
            differences[(task, model)] = own_drops[(task, model)] - drops[(task, model)]
            cell["own_drop_minus_this"] = _rounded(metrics.interval(differences[(task, model)], rule=rule))
            key = f"{task}/{model}"
            if its := _measures_nothing(cell, gans[task]):
                its_left_out[key] = "; ".join(its)
            both = its + [r for r in own_left_out.get(key, "").split("; ") if r and r not in its]
            if both:
                left_out[key] = "; ".join(both)
    rules = {task: tests[task][2] for task in stages}
    claim = verdict(drops, [c for c in drops if f"{c[0]}/{c[1]}" not in its_left_out], rules)
    families = versus(differences, [c for c in drops if f"{c[0]}/{c[1]}" not in left_out], rules, arch)
    own = {task: next(iter(table[task].values()))["gan"]["stages"][0].split("-")[0] for task in stages}
    result = {"arm": arm, "measure": DROPS[HEADLINE], "stages": stages, "own": own, **cells,
              "claim": {**claim, "cells_left_out": its_left_out}, "cells_left_out": left_out, **families}
    result["sentence"] = generator_sentence(arch, result)
    return result


def generator_sentence(arch: str, g: dict) -> str:
    """A compared generator's answer in one sentence: per model family, own drop - its drop over tasks."""
    own = ", ".join(f"{t} {a}" for t, a in g["own"].items())
    parts = [f"{'VGG16' if family == 'deep' else 'the LBP models'} "
             + (f"{_points(g[family]['difference'])}, {g[family]['verdict']}" if g[family]["difference"]
                else f"no answer ({g[family]['reason']})") for family in FAMILIES]
    left = f"; {len(g['cells_left_out'])} cells left out as measuring nothing" if g["cells_left_out"] else ""
    return (f"{arch} against each task's own generator ({own}), own minus {arch} {DROPS[HEADLINE].split(' (')[0]}, "
            f"mean over tasks: {'; '.join(parts)} (above 0: {arch}'s copies cost less{left}).")


VERDICT_CODES = {"holds": 1, "inconclusive": 0, "fails": -1}


def flat(summary: dict) -> dict:
    """One value per column, for `dvc exp show` / `dvc metrics diff`: each arm's accuracy, the drops, the
    degenerate flag (is_degenerate) and whether the verdict uses the cell (in_verdict; a cell left out says why in
    left_out_because, the one text column) per cell, each task's contrast, then the verdict (1 holds,
    0 inconclusive, -1 fails) with its interval; per compared generator (compare.<arch>.*) its cells' accuracy,
    drop and own drop - its drop, per model family that difference over tasks with its verdict, and its claim's."""
    out = {}
    left_out = summary["claims"]["cells_left_out"]
    for task, row in summary.items():
        if task not in TASKS:
            continue
        for model, c in row.items():
            for key in (*ARMS, "drop", "drop_chance_normalised"):
                if key in c and c[key]["value"] is not None:
                    out[f"{task}.{model}.{key}"] = c[key]["value"]
            out[f"{task}.{model}.is_degenerate"] = int(c["degenerate"])
            out[f"{task}.{model}.in_verdict"] = int(f"{task}/{model}" not in left_out)
            if f"{task}/{model}" in left_out:
                out[f"{task}.{model}.left_out_because"] = left_out[f"{task}/{model}"]
    v = summary["claims"][HEADLINE]
    for task, t in v["per_task"].items():
        if t["contrast"] is not None and t["contrast"]["value"] is not None:
            out[f"{task}.contrast"] = t["contrast"]["value"]
    out["verdict"] = VERDICT_CODES[v["verdict"]]
    if v["difference"] is not None:
        out |= {"verdict_difference": v["difference"]["value"], "verdict_low": v["difference"]["low"],
                "verdict_high": v["difference"]["high"]}
    out["cells_used"] = v["cells_used"]
    out["replicates"] = summary["claims"]["replicates"]
    for arch, g in summary.get("generators", {}).items():
        for task, model, c in ((t, m, c) for t in TASKS if t in g for m, c in g[t].items()):
            for key in ("synthetic", "drop_chance_normalised", "own_drop_minus_this"):
                if c[key]["value"] is not None:
                    out[f"compare.{arch}.{task}.{model}.{key}"] = c[key]["value"]
        for family in FAMILIES:
            out[f"compare.{arch}.{family}.verdict"] = VERDICT_CODES[g[family]["verdict"]]
            if g[family]["difference"] is not None:
                out |= {f"compare.{arch}.{family}.{k}": g[family]["difference"][b]
                        for k, b in (("difference", "value"), ("low", "low"), ("high", "high"))}
        out[f"compare.{arch}.claim.verdict"] = VERDICT_CODES[g["claim"]["verdict"]]  # not 2 dots: a review page cell
    return out


def data_warnings(metrics_dir: Path) -> list[str]:
    """What ingest warned about the data the results rest on (e.g. a histology split by tile, not slide)."""
    found = []
    for modality in ("xray", "histology"):
        path = Path(metrics_dir) / "ingest" / f"{modality}.json"
        if path.is_file():
            found += [f"{modality}: {w}" for w in json.loads(path.read_text()).get("warnings", [])]
    return found


def _study_drop(task: str, model: str) -> float:
    """The study's chance-normalised drop of a cell, from its Table 3 accuracies."""
    real, synthetic, _ = STUDY_TABLE3[task][model]
    return (real - synthetic) / (real - 0.5)


def forest_rows(summary: dict) -> pd.DataFrame:
    """The verdict at a glance, one row per interval: every cell's chance-normalised drop, every task's LBP-minus-
    deep contrast and the verdict, each with the study's value (its Table 3 read the same way) and whether the
    verdict uses it. What report.html draws and `dvc plots diff` compares."""
    rows = []
    v = summary["claims"][HEADLINE]
    left_out = summary["claims"]["cells_left_out"]
    for task in (t for t in TASKS if t in summary):
        for model in (m for m in (*DEEP, *LBP) if m in summary[task]):
            d = summary[task][model]["drop_chance_normalised"]
            rows.append({"row": f"{task} {model}", "kind": "cell", **d, "study": _study_drop(task, model),
                         "in_verdict": f"{task}/{model}" not in left_out})
        t = v["per_task"][task]
        study = (np.mean([_study_drop(task, m) for m in LBP if m in summary[task]])
                 - np.mean([_study_drop(task, m) for m in DEEP if m in summary[task]]))
        rows.append({"row": f"{task} LBP - deep", "kind": "task", **(t["contrast"] or dict.fromkeys(
            ("value", "low", "high"))), "study": study, "in_verdict": t["contrast"] is not None})
    tasks = [r["study"] for r in rows if r["kind"] == "task"]
    rows.append({"row": "verdict: mean over tasks", "kind": "verdict",
                 **(v["difference"] or dict.fromkeys(("value", "low", "high"))), "study": np.mean(tasks),
                 "in_verdict": True})
    return pd.DataFrame(rows).round({"value": 4, "low": 4, "high": 4, "study": 4})


def write_table3(metrics_dir: Path, predictions_dir: Path, gan_stages: dict[str, list[str]], summary_path: Path,
                 flat_path: Path, n_boot: int, forest_path: Path | None = None,
                 compared: dict[str, dict[str, list[str]]] | None = None) -> dict:
    """Write metrics/summary.json (Table 3 with intervals, flags, replicates, claims, the compared generators, the
    data it came from, the commit table3 ran at and ingest's warnings about that data), the flat metrics/table3.json
    and the forest plot's rows."""
    summary = summarise(metrics_dir, predictions_dir, gan_stages, n_boot=n_boot, compared=compared)
    summary["warnings"] = data_warnings(metrics_dir)
    write_json(summary_path, summary)
    write_json(flat_path, flat(summary))
    if forest_path is not None:
        atomic_write_text(forest_path, forest_rows(summary).to_csv(index=False))
    return summary
