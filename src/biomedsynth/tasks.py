"""The benchmark's task sets (SPEC section 5, Table 2): for each task a real and a synthetic training set
drawn the same way, and one real test set.

Tasks: histology normal (0) vs tumour (1); X-ray female (0) vs male (1); X-ray young (0) vs mature (1).
Every set is balanced by class, and the X-ray sets also by sex-age label within each class. The real
training and test sets come from the two sides of the study groups' patient / slide split, so the test
set never shares a patient or slide with a training set; the synthetic set has no patients at all.
All three sets are stored at the synthetic images' side (real images are area-downsampled to it), so a
classifier sees one resolution and the comparison measures the GAN, not a change of scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from biomedsynth.params import Tasks
from biomedsynth.store import ImageSet, ImageSetWriter, write_json

TASKS = ("histology", "xray_sex", "xray_age")
SETS = ("real", "synthetic", "test")


@dataclass
class Pool:
    """Candidate images of one set of a task: rows of one or more image sets, with class and stratum."""
    sets: list[ImageSet]
    meta: pd.DataFrame  # columns: set (index into sets), row, y, stratum, group, label + the source's columns


def _pool(paths: list[Path], classify) -> Pool:
    """Rows of the image sets at `paths` that `classify(meta) -> (y: float 0/1/NaN, stratum)` keeps."""
    sets, frames = [], []
    for k, path in enumerate(paths):
        s = ImageSet(path)
        meta = s.meta.copy()
        y, stratum = classify(meta)
        meta = meta.assign(set=k, row=np.arange(len(meta)), y=y, stratum=stratum,
                           group=meta["patient_id"] if "patient_id" in meta else "synthetic")
        sets.append(s)
        frames.append(meta[meta["y"].notna()])
    return Pool(sets, pd.concat(frames, ignore_index=True).astype({"y": int}))


def draw_balanced(meta: pd.DataFrame, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """At most n rows: the same count per class and, within a class, the same count per stratum.

    A class total must split evenly over both classes' strata (a multiple of the lcm of their counts),
    so balance is exact; what the data cannot supply shows as fewer rows, never as repeated images.
    """
    sizes = meta.groupby(["y", "stratum"]).size()
    classes = sorted(set(sizes.index.get_level_values("y")))
    if classes != [0, 1]:
        raise ValueError(f"only class {classes} present; a task needs both")
    strata = {c: len(sizes[c]) for c in (0, 1)}
    cap = min(min(n // 2, int(sizes[c].min()) * strata[c]) for c in (0, 1))
    step = math.lcm(strata[0], strata[1])
    total = cap // step * step
    if total == 0:
        raise ValueError(f"cannot draw a balanced set of {n}: classes have {strata[0]} and {strata[1]} strata, "
                         f"the smallest holds {int(sizes.min())} images")
    picks = [rng.choice(idx, size=total // strata[y], replace=False)
             for (y, _), idx in sorted(meta.groupby(["y", "stratum"]).groups.items())]
    return meta.loc[np.sort(np.concatenate(picks))]


def _write(pool: Pool, rows: pd.DataFrame, out: Path, side: int, desc: str) -> None:
    channels = pool.sets[0].shape[2]
    keep = [c for c in ("image_id", "y", "label", "stratum", "group", "sex", "age", "age_bin") if c in rows]
    with ImageSetWriter(out, (side, side, channels)) as w:
        for _, r in tqdm(rows.iterrows(), total=len(rows), desc=desc, leave=False):
            img = pool.sets[int(r["set"])][int(r["row"])]
            if img.shape[0] != side:  # area-downsample real images to the synthetic side
                x = torch.tensor(img).permute(2, 0, 1)[None].float()
                img = F.interpolate(x, size=side, mode="area")[0].permute(1, 2, 0).round().clamp(0, 255)
                img = img.to(torch.uint8).numpy()
            w.add(img, **{c: r[c] for c in keep})


def _age_classes(young, mature):
    def classify(meta):
        bins = meta["age_bin"].str.split("-", expand=True).astype(int)
        inside = lambda lo, hi: (bins[0] >= lo) & (bins[1] <= hi)  # noqa: E731 (a whole bin inside the range)
        y = np.where(inside(*young), 0.0, np.where(inside(*mature), 1.0, np.nan))
        return y, meta["label"]
    return classify


def task_pools(task: str, cfg: Tasks, groups: Path, synthetic: Path) -> dict[str, Pool]:
    """The real-train, synthetic-train and real-test candidate pools of one task."""
    if task == "histology":
        real = [groups / g for g in ("h_norm", "h_tumor")]
        synth = [synthetic / f"{cfg.histology.arch}-{g}-uncond" for g in ("h_norm", "h_tumor")]
        classify = lambda m: ((m["label"] == "tumor").astype(float), m["label"])  # noqa: E731
        return {"real": _pool([p / "train" for p in real], classify), "synthetic": _pool(synth, classify),
                "test": _pool([p / "test" for p in real], classify)}
    x = cfg.xray
    real, synth = groups / x.group, synthetic / f"{x.arch}-{x.group}-{x.setup}"
    if task == "xray_sex":
        classify = lambda m: ((m["sex"] == "M").astype(float), m["label"])  # noqa: E731
    elif task == "xray_age":
        classify = _age_classes(x.age.young, x.age.mature)
    else:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    return {"real": _pool([real / "train"], classify), "synthetic": _pool([synth], classify),
            "test": _pool([real / "test"], classify)}


def build_tasks(cfg: Tasks, groups: Path, synthetic: Path, out: Path, seed: int, summary_path: Path) -> dict:
    """Write <out>/<task>/{real,synthetic,test} image sets and a summary of what each holds."""
    rng = np.random.default_rng(seed)
    sizes = {"histology": cfg.histology, "xray_sex": cfg.xray.sex, "xray_age": cfg.xray.age}
    summary = {}
    for task in TASKS:
        pools = task_pools(task, cfg, groups, synthetic)
        side = pools["synthetic"].sets[0].shape[0]
        summary[task] = {}
        for name in SETS:
            requested = sizes[task].test if name == "test" else sizes[task].train
            try:
                rows = draw_balanced(pools[name].meta, requested, rng)
            except ValueError as e:
                raise ValueError(f"{task} {name}: {e}") from None
            _write(pools[name], rows, out / task / name, side, f"{task}/{name}")
            summary[task][name] = {"images": len(rows), "requested": requested, "shortfall": requested - len(rows),
                                   "per_class": {str(c): int(v) for c, v in rows["y"].value_counts().sort_index().items()},
                                   "strata": int(rows["stratum"].nunique()), "side": side}
        shared = set(pools["test"].meta["group"]) & set(pools["real"].meta["group"])
        if shared:  # the study-group split is by patient / slide, so this is a bug, not bad data
            raise AssertionError(f"{task}: test shares {len(shared)} patients/slides with real training")
    write_json(summary_path, summary)
    return summary
