"""`biomedsynth plan`: what the data as ingested gives every later stage under params.yaml, before anything
is trained, and what to set where it falls short.

It draws the study groups exactly as the studygroups stage would (same seed, same code: studygroups.py),
then counts, without writing images: per group and side the images reached vs asked; per GAN model the
profile trains its images, steps per epoch and steps in all; per task the class sizes its sets can reach
and the test set's patients / slides per class (the clusters its intervals resample; the tasks stage's own
draw may differ by a few). `advice` holds one line per shortfall, naming the knob to change.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from biomedsynth.left_out import trains
from biomedsynth.params import GROUP_MODALITY, Params
from biomedsynth.studygroups import Groups, choose_groups, summarise_groups
from biomedsynth.tasks import TASKS, draw_balanced, task_classes

FEW_CLUSTERS = 6  # fewer test patients / slides per class than this: intervals too wide to decide


def gan_models(name: str, rows: pd.DataFrame, p: Params) -> dict:
    """{model: {images, batch_size, steps_per_epoch, epochs, steps}} of one GAN stage on its training rows."""
    arch, group, setup = name.split("-")
    data = getattr(p.gan, GROUP_MODALITY[group])
    epochs = data.epochs if GROUP_MODALITY[group] == "histology" else (
        data.epochs_cond if setup == "cond" else data.epochs_uncond)
    if arch == "pggan" and p.gan.pggan.epochs_per == "depth" and p.gan.pggan.images_per_phase is None:
        epochs *= data.resolution.bit_length() - 2  # each depth, 4 px to the side, trains the epochs (as train.py)
    sizes = {"conditional": len(rows)} if setup == "cond" else rows["label"].value_counts().sort_index().to_dict()
    return {model: {"images": int(n), "batch_size": data.batch_size, "steps_per_epoch": n // data.batch_size,
                    "epochs": epochs, "steps": n // data.batch_size * epochs} for model, n in sizes.items()}  # as train.py


def _classed(task: str, rows: pd.DataFrame, p: Params) -> pd.DataFrame:
    """The rows a task can use, with its class `y` and balancing `stratum` (as tasks.py assigns them)."""
    y, stratum = task_classes(task, p.tasks)(rows)
    out = rows.assign(y=y, stratum=stratum)
    return out[out["y"].notna()].astype({"y": int})


def task_sets(task: str, chosen: Groups, p: Params) -> dict:
    """Per real set of a task: images reachable vs asked, per class, and (test) clusters per class."""
    groups = ["h_norm", "h_tumor"] if task == "histology" else [p.tasks.xray.group]
    size = {"histology": p.tasks.histology, "xray_sex": p.tasks.xray.sex, "xray_age": p.tasks.xray.age}[task]
    out = {}
    for name, side, asked in (("real", "train", size.train), ("test", "test", size.test)):
        rows = _classed(task, pd.concat([chosen[g][side] for g in groups]), p)
        try:
            drawn = draw_balanced(rows, asked, np.random.default_rng(p.seed))
        except ValueError as e:
            out[name] = {"images": 0, "requested": asked, "error": str(e)}
            continue
        out[name] = {"images": len(drawn), "requested": asked,
                     "per_class": {str(c): int(n) for c, n in drawn["y"].value_counts().sort_index().items()},
                     "clusters_per_class": {str(c): int(n) for c, n in
                                            drawn.groupby("y")["patient_id"].nunique().items()}}
    return out


def _advice(groups: dict, gans: dict, tasks: dict, p: Params) -> list[str]:
    lines = []
    for name, sides in groups.items():
        for side, s in sides.items():
            if s["images"] < s["requested"]:
                fewest = min(s["per_label"].items(), key=lambda kv: kv[1], default=("none", 0))
                knob = f"studygroups.{GROUP_MODALITY[name]}.{name}.{'train' if side == 'val' else side}"
                lines.append(f"studygroups {name} {side}: {s['images']}/{s['requested']} images, smallest label "
                             f"{fewest[0]} {fewest[1]}: lower {knob}" + (", widen its age_bins" if name.startswith("x")
                                                                          else "") + " or add data")
    for stage, models in gans.items():
        modality = GROUP_MODALITY[stage.split("-")[1]]
        for model, m in models.items():
            if m["steps_per_epoch"] == 0:
                lines.append(f"train_gan@{stage} model {model}: {m['images']} images, fewer than one batch of "
                             f"{m['batch_size']}: lower gan.{modality}.batch_size or enlarge the group")
    for task, sets in tasks.items():
        for name, s in sets.items():
            if "error" in s:
                lines.append(f"tasks {task} {name}: {s['error']}; check tasks.xray.age ranges against the age_bins")
            elif s["images"] < s["requested"]:
                lines.append(f"tasks {task} {name}: {s['images']}/{s['requested']} images: lower tasks.{task} sizes")
            if name == "test" and "clusters_per_class" in s and min(s["clusters_per_class"].values()) < FEW_CLUSTERS:
                lines.append(f"tasks {task} test: {s['clusters_per_class']} patients/slides per class; intervals "
                             f"over fewer than {FEW_CLUSTERS} cannot decide: add data or raise test_fraction")
    return lines


def make_plan(xray_meta: pd.DataFrame, histology_meta: pd.DataFrame, p: Params, gan_stages: list[str]) -> dict:
    """{groups, gans, tasks, advice} for the ingested metadata under params `p`; `gan_stages` are dvc.yaml's
    GAN stages, of which gan.stages may train only some (left_out.trains)."""
    chosen, requested = choose_groups(xray_meta, histology_meta, p.studygroups, p.seed)
    groups = summarise_groups(chosen, requested)
    trained = [s for s in gan_stages if trains(p, s)]
    gans = {name: gan_models(name, chosen[name.split("-")[1]]["train"], p) for name in trained}
    tasks = {task: task_sets(task, chosen, p) for task in TASKS}
    return {"groups": groups, "gans": gans, "tasks": tasks, "advice": _advice(groups, gans, tasks, p)}


def plan_lines(plan: dict) -> list[str]:
    """The plan as short lines for a terminal."""
    out = ["study groups (reached/asked images, patients or slides):"]
    for name, sides in plan["groups"].items():
        out.append(f"  {name:9s} " + "  ".join(f"{side} {s['images']}/{s['requested']} ({s['units']})"
                                                for side, s in sides.items()))
    out.append("GAN models (images, steps per epoch x epochs):")
    for stage, models in plan["gans"].items():
        out.append(f"  {stage}: " + ", ".join(f"{m} {v['images']} img, {v['steps_per_epoch']} x {v['epochs']}"
                                              for m, v in models.items()))
    out.append("tasks (reached/asked; test patients or slides per class 0/1):")
    for task, sets in plan["tasks"].items():
        test = sets["test"]
        clusters = "/".join(str(v) for v in test.get("clusters_per_class", {}).values()) or "-"
        out.append(f"  {task:9s} real {sets['real']['images']}/{sets['real']['requested']}  "
                   f"test {test['images']}/{test['requested']} ({clusters})")
    return out + (["advice:"] + [f"  {line}" for line in plan["advice"]] if plan["advice"] else ["advice: none"])
