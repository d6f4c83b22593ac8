"""`biomedsynth plan --fit`: age bins, split and sizes that fit the ingested cohort, by one rule.

1. Patients per label. The X-ray cohort's ages are cut into three bins at the ages that give its scarcest
   sex x bin label the most patients (for one sex alone, its tertiles; for two, their tertiles reconciled so
   that neither sex runs short). X-Norm-L takes the three bins; the age task's young and mature classes are the
   first and the third, and X-Norm's bins follow them (age_bins null): the middle bin parts the classes, as the
   study's 39-47 parts its 18-38 and 48-68.
2. The study's ratios where they fit. Each modality's test_fraction is the study's share of its groups held out
   for testing (SPEC Table 1: X-Norm 13,410 of 133,980 images, 10%; H-Norm and H-Tumor 10,000 of 50,000, 20%)
   where that gives every task of the modality at least `min_test_clusters` test patients / slides per class;
   else the least fraction, in steps of 0.05 up to 0.5 (past half, testing would take more than training),
   that does. val_fraction stays as params has it: the study had no validation side.
3. A minimum of test patients per class: `min_test_clusters`, by default plan's FEW_CLUSTERS (6). Below 10
   clusters a class's interval is a cluster t interval (classify/metrics.py), whose coverage
   tests/test_metrics.py checks at 6 per class; with fewer its degrees of freedom (clusters - strata) widen it
   past deciding anything, and with one it cannot be formed.
4. Sizes: every group side and task set as large as that split's sides give, balanced as the stages balance
   them (drawn by the stages' own code: studygroups.choose_groups, plan.task_sets), and never larger than params
   asks: the profile's sizes are its compute budget, which `biomedsynth set` raises.
5. A GAN batch larger than a trained per-label model's images drops to the largest power of two within them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from biomedsynth.params import GROUP_MODALITY, Params
from biomedsynth.plan import (FEW_CLUSTERS, TASK_SIZES, largest_batch_within, largest_train, make_plan, short,
                              set_assignment, task_sets, task_size)
from biomedsynth.studygroups import SIDES, age_bin_names, choose_groups, summarise_groups

STUDY_TEST_SHARE = {"xray": round(13_410 / (120_570 + 13_410), 2), "histology": round(10_000 / 50_000, 2)}
FRACTION_STEP = 0.05
MOST_TEST_FRACTION = 0.5
MODALITY_TASKS = {"xray": ("xray_sex", "xray_age"), "histology": ("histology",)}


@dataclass
class Fit:
    values: dict        # dotted params key -> proposed value, as `biomedsynth set` takes it
    notes: list[str]    # why each value is what it is, one line each
    plan: dict          # make_plan's result under the proposed values


def with_values(p: Params, values: dict) -> Params:
    """`p` with dotted keys set to `values`, validated as params.yaml is."""
    d = p.model_dump(mode="json")
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = d
        for part in parents:
            node = node[part]
        node[leaf] = value
    return Params.model_validate(d)


def _normal_patients(meta: pd.DataFrame) -> pd.DataFrame:
    """Patients with a normal scan (the scans studygroups uses) and sex F or M: their sex and youngest age."""
    if "normal" in meta:
        meta = meta[meta["normal"].astype(str) == "True"]
    patients = meta.groupby("patient_id").agg(sex=("sex", "first"), age=("age", "min"))
    return patients[patients["sex"].isin(["F", "M"])].astype({"age": int})


def age_bins(xray_meta: pd.DataFrame) -> tuple[list[list[int]], dict[str, int]]:
    """Three age bins covering the cohort's normal scans, cut where the scarcest sex x bin label gets the most
    patients (ties: the next scarcest, then the lowest cuts); with the patients per label."""
    patients = _normal_patients(xray_meta)
    if patients.empty:
        raise ValueError("plan --fit: no normal X-ray scans of patients with sex F or M to fit age bins to")
    scans = xray_meta["age"].astype(int)
    lo, hi = int(scans.min()), int(scans.max())
    at_most = {s: np.cumsum(np.bincount(patients.loc[patients["sex"] == s, "age"] - lo, minlength=hi - lo + 1))
               for s in ("F", "M")}  # at_most[s][a - lo]: patients of sex s aged at most a

    def per_label(c1: int, c2: int) -> list[int]:
        return [int(n) for s in ("F", "M") for n in (at_most[s][c1 - lo], at_most[s][c2 - lo] - at_most[s][c1 - lo],
                                                      at_most[s][-1] - at_most[s][c2 - lo])]

    cuts = [(c1, c2) for c1 in range(lo, hi - 1) for c2 in range(c1 + 1, hi)]
    if not cuts:
        raise ValueError(f"plan --fit: the X-ray scans span ages {lo}-{hi}, too few to cut into three age bins")
    c1, c2 = max(cuts, key=lambda c: (sorted(per_label(*c)), -c[0], -c[1]))
    bins = [[lo, c1], [c1 + 1, c2], [c2 + 1, hi]]
    names = [f"{s}_{b}" for s in ("F", "M") for b in age_bin_names(bins)]
    counts = dict(zip(names, per_label(c1, c2)))
    if min(counts.values()) < len(SIDES):
        raise ValueError(f"plan --fit: at best the X-ray cohort's scarcest sex x age label holds "
                         f"{min(counts.values())} patients ({', '.join(f'{k} {v}' for k, v in counts.items())}); "
                         f"train, val and test each need one: add patients")
    return bins, counts


def _groups_of(modality: str) -> list[str]:
    return [g for g, m in GROUP_MODALITY.items() if m == modality]


def _reached(xray_meta: pd.DataFrame, histology_meta: pd.DataFrame, p: Params, values: dict) -> dict:
    """Images reached per group and side under `values`, drawn as the studygroups stage draws them."""
    probe = with_values(p, values)
    chosen, requested = choose_groups(xray_meta, histology_meta, probe.studygroups, probe.seed, [])
    return summarise_groups(chosen, requested)


def _group_sizes(xray_meta: pd.DataFrame, histology_meta: pd.DataFrame, p: Params, values: dict,
                 modality: str) -> dict:
    """Each group side of `modality` as large as the split gives, at most what `p` asks: asked for everything
    first, then lowered to what was reached (train so that its val request is reached too), again while a side
    falls short (plan.short: by more than balancing rounds off)."""
    cfg = getattr(p.studygroups, modality)
    everything = max(1, len(xray_meta if modality == "xray" else histology_meta))
    sizes = {f"studygroups.{modality}.{g}.{side}": everything
             for g in _groups_of(modality) for side in ("train", "test")}
    for first in (True, *[False] * 10):  # each round lowers requests to what a draw reached: one or two settle it
        reached = _reached(xray_meta, histology_meta, p, values | sizes)
        lower = {}
        for g in _groups_of(modality):
            r, key, asked = reached[g], f"studygroups.{modality}.{g}", getattr(cfg, g)
            if first or short(r["train"]) or short(r["val"]):
                train = largest_train(max(1, r["train"]["images"]), cfg.val_fraction, r["val"]["images"])
                lower[f"{key}.train"] = min(train, asked.train) if first else train
            if first or short(r["test"]):
                lower[f"{key}.test"] = min(max(1, r["test"]["images"]), asked.test) if first else r["test"]["images"]
        lower = {k: v for k, v in lower.items() if v < sizes[k]}
        if not lower:
            return sizes
        sizes |= lower
    raise AssertionError("plan --fit: group sizes still short after 10 rounds of lowering them to what was reached")


def _task_sizes(xray_meta: pd.DataFrame, histology_meta: pd.DataFrame, p: Params, values: dict,
                modality: str) -> dict:
    """Each task set of `modality` as large as its groups' side gives (balanced as the tasks stage balances it),
    at most what `p` asks."""
    tasks = MODALITY_TASKS[modality]
    everything = max(1, len(xray_meta if modality == "xray" else histology_meta))
    probe = with_values(p, values | {f"{TASK_SIZES[t]}.{side}": everything
                                     for t in tasks for side in ("train", "test")})
    chosen, _ = choose_groups(xray_meta, histology_meta, probe.studygroups, probe.seed, [])
    sizes = {}
    for t in tasks:
        reached = task_sets(t, chosen, probe)
        for name, side in (("real", "train"), ("test", "test")):
            sizes[f"{TASK_SIZES[t]}.{side}"] = min(getattr(task_size(t, p), side), max(1, reached[name]["images"]))
    return sizes


def _shortfall(plan: dict, modality: str, min_test_clusters: int) -> str | None:
    """Why the plan does not fit `modality` yet (a side it cannot make, a task test class with too few
    patients / slides), or None."""
    groups = set(_groups_of(modality))
    for line in plan["advice"]:
        if line.split()[0] in groups or (line.startswith("studygroups ") and line.split()[1] in groups):
            return line
    for t in MODALITY_TASKS[modality]:
        test = plan["tasks"][t]["test"]
        if "error" in test:
            return f"tasks {t} test: {test['error']}"
        fewest = min(test["clusters_per_class"].values())
        if fewest < min_test_clusters:
            return f"tasks {t} test: {fewest} patients/slides in a class, under the {min_test_clusters} asked"
    return None


def fit_plan(xray_meta: pd.DataFrame, histology_meta: pd.DataFrame, p: Params,
             min_test_clusters: int = FEW_CLUSTERS) -> Fit:
    """The values the module's rule proposes for this cohort, why, and the plan under them."""
    if min_test_clusters < 2:
        raise ValueError(f"plan --fit: --min-test-clusters {min_test_clusters}: an interval needs at least 2 "
                         "test patients/slides per class")
    bins, patients = age_bins(xray_meta)
    values: dict = {"studygroups.xray.x_norm.age_bins": None, "studygroups.xray.x_norm_l.age_bins": bins,
                    "tasks.xray.age.young": bins[0], "tasks.xray.age.mature": bins[2]}
    notes = [f"X-ray age bins {' | '.join(age_bin_names(bins))} (patients per label in the cohort: "
             f"{', '.join(f'{k} {v}' for k, v in patients.items())}): X-Norm-L's three; the age task's young and "
             f"mature, and X-Norm's bins, the first and the third"]
    for modality in ("xray", "histology"):  # X-ray first: the studygroups stage draws it first from one generator
        fraction, tried, study = STUDY_TEST_SHARE[modality], [], STUDY_TEST_SHARE[modality]
        while True:
            trial = values | {f"studygroups.{modality}.test_fraction": fraction}
            trial |= _group_sizes(xray_meta, histology_meta, p, trial, modality)
            trial |= _task_sizes(xray_meta, histology_meta, p, trial, modality)
            short_by = _shortfall(make_plan(xray_meta, histology_meta, with_values(p, trial)), modality,
                                  min_test_clusters)
            if short_by is None or fraction >= MOST_TEST_FRACTION:
                break
            tried.append(f"{fraction:g} ({short_by})")
            fraction = round(fraction + FRACTION_STEP, 2)
        values = trial
        reached = f"every {modality} task {min_test_clusters}+ test patients/slides per class"
        notes.append(f"{modality} test_fraction {fraction:g}: " + (
            f"the study's, which gives {reached}" if not tried and short_by is None else
            f"the least from the study's {study:g} up that gives {reached}; at {tried[-1]}" if short_by is None else
            f"the most this rule holds out, and still short: {short_by}: add data"))
    plan = make_plan(xray_meta, histology_meta, with_values(p, values))
    for stage, models in plan["gans"].items():
        modality = GROUP_MODALITY[stage.split("-")[1]]
        small = [m["images"] for m in models.values() if m["steps_per_epoch"] == 0]
        key = f"gan.{modality}.batch_size"
        if small and largest_batch_within(min(small)) < values.get(key, getattr(p.gan, modality).batch_size):
            values[key] = largest_batch_within(min(small))
            notes.append(f"{key} {values[key]}: {stage}'s smallest model trains on {min(small)} images")
    if any(k.startswith("gan.") for k in values):
        plan = make_plan(xray_meta, histology_meta, with_values(p, values))
    notes.append("sizes: each group side and task set as large as its side of the split gives, balanced, at most "
                 "what params asks")
    return Fit(values, notes, plan)


def fit_assignments(fit: Fit) -> list[str]:
    """The proposed values as `biomedsynth set` arguments (key=value)."""
    return [set_assignment(k, v) for k, v in fit.values.items()]
