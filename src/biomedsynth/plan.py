"""`biomedsynth plan`: what the data as ingested gives every later stage under params.yaml, before anything
is trained, and what to set where it falls short.

It draws the study groups exactly as the studygroups stage would (same seed, same code: studygroups.py),
then counts, without writing images: per group and side the images reached vs asked; per GAN model the
profile trains its images, steps per epoch and steps in all; per task the class sizes its sets can reach
and the test set's patients / slides per class (the clusters its intervals resample; the tasks stage's own
draw may differ by a few). `advice` holds one line per shortfall, ending in the `biomedsynth set` line
that fixes it (keys as `set` names them).
"""
from __future__ import annotations

import json
import shlex

import numpy as np
import pandas as pd

from biomedsynth.params import GROUP_MODALITY, Params
from biomedsynth.studygroups import Groups, choose_groups, summarise_groups, val_size
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


def task_size(task: str, p: Params):
    """The task's requested sizes (train, test): params' tasks.histology, tasks.xray.sex or tasks.xray.age."""
    return {"histology": p.tasks.histology, "xray_sex": p.tasks.xray.sex, "xray_age": p.tasks.xray.age}[task]


def task_sets(task: str, chosen: Groups, p: Params) -> dict:
    """Per real set of a task: images reachable vs asked, per class, and (test) clusters per class."""
    groups = ["h_norm", "h_tumor"] if task == "histology" else [p.tasks.xray.group]
    size = task_size(task, p)
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


TASK_SIZES = {"histology": "tasks.histology", "xray_sex": "tasks.xray.sex", "xray_age": "tasks.xray.age"}


def set_assignment(key: str, value) -> str:
    """`key=value` as `biomedsynth set` reads it back to `value`: lists in YAML flow style without spaces, None as
    null."""
    text = "null" if value is None else json.dumps(value, separators=(",", ":")) if isinstance(value, list) \
        else str(value)
    return f"{key}={text}"


def _set(key: str, value) -> str:
    """The command line that sets `key` (as `biomedsynth set` names it) to `value`, quoted where a shell would
    read brackets as a file pattern."""
    return f"biomedsynth set {shlex.quote(set_assignment(key, value))}"


def largest_batch_within(images: int) -> int:
    """The largest power of two within `images`: a GAN batch that gives a model of that many images a step."""
    return 1 << (max(images, 1).bit_length() - 1)


def largest_train(train: int, val_fraction: float, val_reached: int) -> int:
    """The largest training size whose validation request (studygroups.val_size) the data reaches."""
    return next((t for t in range(train, 0, -1) if val_size(t, val_fraction) <= val_reached), 1)


def short(side: dict) -> bool:
    """Whether a group side (summarise_groups) reaches fewer images than it asks by more than balancing rounds
    off: balance_xray takes whole images per label, so a side of L labels may reach up to L - 1 fewer with every
    label's pool to spare (X-Norm: a multiple of its labels; X-Norm-L: each bin scaled down, then rounded down).
    Without this, following the advice for such a side (ask what it reached) rounds off again, without end."""
    return side["requested"] - side["images"] >= max(1, len(side["per_label"]))


def _advice(groups: dict, gans: dict, tasks: dict, p: Params) -> list[str]:
    """One line per shortfall, ending in the `biomedsynth set` line that fixes it where lowering a size does."""
    lines = []
    for name, sides in groups.items():
        modality = GROUP_MODALITY[name]
        cfg = getattr(p.studygroups, modality)
        for side, s in sides.items():
            if not short(s) or s["images"] == 0:  # an empty side: its problem line says why
                continue
            fewest = min(s["per_label"].items(), key=lambda kv: kv[1], default=("none", 0))
            what = f"studygroups {name} {side}: {s['images']}/{s['requested']} images, smallest label {fewest[0]} " \
                   f"{fewest[1]}"
            key = f"studygroups.{modality}.{name}.{'train' if side == 'val' else side}"
            if side == "val":
                fix = _set(key, largest_train(getattr(cfg, name).train, cfg.val_fraction, s["images"]))
            else:
                fix = _set(key, s["images"]) if s["images"] else "add data"
            bins = f", or widen studygroups.{modality}.{name}.age_bins" if modality == "xray" else ""
            lines.append(f"{what}: {fix}{bins}")
    for stage, models in gans.items():
        modality = GROUP_MODALITY[stage.split("-")[1]]
        for model, m in models.items():
            if m["steps_per_epoch"] == 0:
                fits = largest_batch_within(m["images"])
                lines.append(f"train_gan@{stage} model {model}: {m['images']} images, fewer than one batch of "
                             f"{m['batch_size']}: {_set(f'gan.{modality}.batch_size', fits)}, or enlarge the group")
    for task, sets in tasks.items():
        modality = "histology" if task == "histology" else "xray"
        for name, s in sets.items():
            side = "train" if name == "real" else "test"
            if "error" in s:
                lines.append(f"tasks {task} {name}: {s['error']}; compare tasks.xray.age.young and .mature with "
                             "the groups' age_bins")
            elif s["images"] < s["requested"]:
                lines.append(f"tasks {task} {name}: {s['images']}/{s['requested']} images: "
                             f"{_set(f'{TASK_SIZES[task]}.{side}', s['images'])}")
            if name == "test" and "clusters_per_class" in s and min(s["clusters_per_class"].values()) < FEW_CLUSTERS:
                fraction = getattr(p.studygroups, modality).test_fraction
                lines.append(f"tasks {task} test: {s['clusters_per_class']} patients/slides per class; intervals "
                             f"over fewer than {FEW_CLUSTERS} cannot decide: add data, or "
                             f"{_set(f'studygroups.{modality}.test_fraction', round(min(0.5, fraction + 0.1), 2))}")
    return lines


def make_plan(xray_meta: pd.DataFrame, histology_meta: pd.DataFrame, p: Params) -> dict:
    """{groups, gans, tasks, advice} for the ingested metadata under params `p` (its GAN stages: gan.stages)."""
    problems: list[str] = []  # every side the data cannot make, each with its cause: all of them in one run
    chosen, requested = choose_groups(xray_meta, histology_meta, p.studygroups, p.seed, problems)
    groups = summarise_groups(chosen, requested)
    trained = list(p.gan.stages)
    gans = {name: gan_models(name, chosen[name.split("-")[1]]["train"], p) for name in trained}
    tasks = {task: task_sets(task, chosen, p) for task in TASKS}
    used = {s.split("-")[1] for s in trained} | {p.tasks.xray.group, "h_norm", "h_tumor"}
    advice = [_marked(line, used) for line in problems + _advice(groups, gans, tasks, p)]
    advice.sort(key=lambda line: line.endswith(UNUSED))  # what this profile trains and tests on first
    return {"groups": groups, "gans": gans, "tasks": tasks, "advice": advice}


UNUSED = " [a group no stage of this profile uses]"


def _marked(line: str, used: set[str]) -> str:
    """An advice line about a study group no stage of the profile uses, marked as such."""
    group = line.split()[1] if line.startswith("studygroups ") else line.split()[0]
    return line + UNUSED if group in GROUP_MODALITY and group not in used else line


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
