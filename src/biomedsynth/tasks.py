"""The benchmark's task sets (SPEC section 5, Table 2): for each task a real and a synthetic training set
drawn the same way, and one real test set.

Tasks: histology normal (0) vs tumour (1); X-ray female (0) vs male (1); X-ray young (0) vs mature (1).
Every set is balanced by class, and the X-ray sets also by sex-age label within each class. The real
training and test sets come from the two sides of the study groups' patient / slide split, so the test
set never shares a patient or slide with a training set; the synthetic set has no patients at all.
All three sets are stored at the synthetic images' side (real images are area-downsampled to it), so a
classifier sees one resolution and the comparison measures the GAN, not a change of scale.

Training arms: `real`; `synthetic`, and `synthetic_d<k>` for every further independent draw the synthetic
group holds (its `draw` column, from synthesize.draws: fresh latents from the same checkpoint), so the spread
between draws can be told from the test set's; `real_synthetic` and `real_synthetic_d<k>`, the real set plus
synthetic draw k (synthetic data as augmentation, medigan's trained_on_real_and_fake). The classifiers' replicate
k trains on draw k (classify.replicates). Generators compared (tasks.compare): `synthetic-<arch>` and
`synthetic-<arch>_d<k>`, drawn the same way from that architecture's set of the same group and setup, each with its
own random stream, so listing one more architecture leaves every other set as it was.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from biomedsynth.params import Tasks
from biomedsynth.store import ImageSet, ImageSetWriter, write_json

TASKS = ("histology", "xray_sex", "xray_age")
TEST = "test"


def synthetic_set(draw: int) -> str:
    """The task set trained on synthetic draw `draw`."""
    return "synthetic" if draw == 0 else f"synthetic_d{draw}"


def real_synthetic_set(draw: int) -> str:
    """The task set of the real images plus synthetic draw `draw`."""
    return "real_synthetic" if draw == 0 else f"real_synthetic_d{draw}"


def compared_set(arch: str, draw: int) -> str:
    """The task set trained on draw `draw` of architecture `arch`'s synthetic set (tasks.compare)."""
    return f"synthetic-{arch}" if draw == 0 else f"synthetic-{arch}_d{draw}"


def set_names(draws: int, compared: dict[str, int] | None = None) -> list[str]:
    """The sets of a task whose synthetic group holds `draws` draws and whose compared architectures {arch: draws}
    hold theirs: training arms first, the test set last."""
    return ["real", *(synthetic_set(d) for d in range(draws)), *(real_synthetic_set(d) for d in range(draws)),
            *(compared_set(a, d) for a, n in (compared or {}).items() for d in range(n)), TEST]


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
        # a synthetic image is its own group: grouped CV and validation splits then treat it as one sample
        group = (meta["patient_id"].astype(str) if "patient_id" in meta
                 else pd.Series([f"synthetic:{k}:{i}" for i in range(len(meta))], index=meta.index))
        meta = meta.assign(set=k, row=np.arange(len(meta)), y=y, stratum=stratum, group=group,
                           draw=meta["draw"] if "draw" in meta else 0)
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


def _write(parts: list[tuple[Pool, pd.DataFrame]], out: Path, side: int, desc: str) -> None:
    """Write the chosen rows of one or more pools (the real + synthetic arm has two) as one image set."""
    import torch  # here, not at the top: the stages that import this module only for its task names need no torch
    import torch.nn.functional as F

    channels = parts[0][0].sets[0].shape[2]
    columns = ("image_id", "y", "label", "stratum", "group", "sex", "age", "age_bin")
    with ImageSetWriter(out, (side, side, channels)) as w:
        for pool, rows in parts:
            keep = [c for c in columns if c in rows]
            for _, r in tqdm(rows.iterrows(), total=len(rows), desc=desc, leave=False):
                img = pool.sets[int(r["set"])][int(r["row"])]
                if img.shape[0] != side:  # area-downsample real images to the synthetic side
                    x = torch.tensor(img).permute(2, 0, 1)[None].float()
                    img = F.interpolate(x, size=side, mode="area")[0].permute(1, 2, 0).round().clamp(0, 255)
                    img = img.to(torch.uint8).numpy()
                w.add(img, **{c: r[c] for c in keep})


def _age_classes(young, mature):
    """Young (0) / mature (1) by the scan's own age where the set has one (real scans), so the classes are
    exactly the configured ranges even where an age bin straddles a boundary (the paper's X-Norm-L bins
    37-39, 45-49 and 67-77 do); synthetic images have only their bin, so only bins wholly inside count."""
    def classify(meta):
        if "age" in meta:
            lo = hi = meta["age"].astype(int)
        else:
            bins = meta["age_bin"].str.split("-", expand=True).astype(int)
            lo, hi = bins[0], bins[1]
        inside = lambda r: (lo >= r[0]) & (hi <= r[1])  # noqa: E731
        y = np.where(inside(young), 0.0, np.where(inside(mature), 1.0, np.nan))
        return y, meta["label"]
    return classify


def task_classes(task: str, cfg: Tasks):
    """The task's `classify(meta) -> (y: float 0/1/NaN, stratum)`: its class per image and balancing stratum."""
    if task == "histology":
        return lambda m: ((m["label"] == "tumor").astype(float), m["label"])
    if task == "xray_sex":
        return lambda m: ((m["sex"] == "M").astype(float), m["label"])
    if task == "xray_age":
        return _age_classes(cfg.xray.age.young, cfg.xray.age.mature)
    raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")


def task_pools(task: str, cfg: Tasks, groups: Path, synthetic: Path) -> dict[str, Pool]:
    """The real-train, synthetic-train and real-test candidate pools of one task, and one synthetic pool per
    compared architecture (keyed by its arm, synthetic-<arch>)."""
    classify = task_classes(task, cfg)
    real = [groups / g for g in ("h_norm", "h_tumor")] if task == "histology" else [groups / cfg.xray.group]
    synth = lambda arch=None: _pool([synthetic / s for s in cfg.gan_stages(arch)[task]], classify)  # noqa: E731
    return {"real": _pool([p / "train" for p in real], classify), "synthetic": synth(),
            **{compared_set(arch, 0): synth(arch) for arch in cfg.compared()[task]},
            TEST: _pool([p / "test" for p in real], classify)}


def _set_summary(rows: pd.DataFrame, requested: int, side: int) -> dict:
    return {"images": len(rows), "requested": requested, "shortfall": requested - len(rows),
            "per_class": {str(c): int(v) for c, v in rows["y"].value_counts().sort_index().items()},
            "clusters_per_class": {str(c): int(v) for c, v in rows.groupby("y")["group"].nunique().items()},
            "strata": int(rows["stratum"].nunique()), "side": side}


def _write_compared(task: str, arch: str, pools: dict[str, Pool], requested: int, side: int, out: Path, seed: int,
                    summary: dict) -> int:
    """Write every draw of a compared architecture's training set (compared_set) into out/<task>/ and its summary;
    the number of draws. Its random stream is its own (seed, task, arch): the other sets do not move with it."""
    pool = pools[compared_set(arch, 0)]
    if (found := pool.sets[0].shape[0]) != side:
        raise ValueError(f"{task}: {arch}'s synthetic images are {found} px, the task's {side} px; compared "
                         "generators must draw at the same side (gan.<modality>.resolution)")
    rng = np.random.default_rng([seed, zlib.crc32(f"{task}/{arch}".encode())])
    draws = int(pool.meta["draw"].max()) + 1
    for d in range(draws):
        name = compared_set(arch, d)
        try:
            rows = draw_balanced(pool.meta[pool.meta["draw"] == d], requested, rng)
        except ValueError as e:
            raise ValueError(f"{task} {name}: {e}") from None
        _write([(pool, rows)], out / task / name, side, f"{task}/{name}")
        summary[name] = _set_summary(rows, requested, side)
    return draws


def build_tasks(cfg: Tasks, groups: Path, synthetic: Path, out: Path, seed: int, summary_path: Path) -> dict:
    """Write <out>/<task>/<set> image sets (see set_names) and a summary of what each holds."""
    rng = np.random.default_rng(seed)
    sizes = {"histology": cfg.histology, "xray_sex": cfg.xray.sex, "xray_age": cfg.xray.age}
    summary = {}
    for task in TASKS:
        pools = task_pools(task, cfg, groups, synthetic)
        side = pools["synthetic"].sets[0].shape[0]
        draws = int(pools["synthetic"].meta["draw"].max()) + 1
        candidates = {"real": pools["real"].meta, TEST: pools[TEST].meta}
        synth = pools["synthetic"].meta
        candidates |= {synthetic_set(d): synth[synth["draw"] == d] for d in range(draws)}
        chosen, summary[task] = {}, {}
        for name, meta in candidates.items():
            requested = sizes[task].test if name == TEST else sizes[task].train
            try:
                chosen[name] = draw_balanced(meta, requested, rng)
            except ValueError as e:
                raise ValueError(f"{task} {name}: {e}") from None
            pool = pools["synthetic" if name.startswith("synthetic") else name]
            _write([(pool, chosen[name])], out / task / name, side, f"{task}/{name}")
            summary[task][name] = _set_summary(chosen[name], requested, side)
        for d in range(draws):
            name = real_synthetic_set(d)
            _write([(pools["real"], chosen["real"]), (pools["synthetic"], chosen[synthetic_set(d)])],
                   out / task / name, side, f"{task}/{name}")
            both = pd.concat([chosen["real"], chosen[synthetic_set(d)]])
            summary[task][name] = _set_summary(both, 2 * sizes[task].train, side)
        compared = {arch: _write_compared(task, arch, pools, sizes[task].train, side, out, seed, summary[task])
                    for arch in cfg.compared()[task]}
        summary[task] = {name: summary[task][name] for name in set_names(draws, compared)}
        shared = set(pools[TEST].meta["group"]) & set(pools["real"].meta["group"])
        if shared:  # the study-group split is by patient / slide, so this is a bug, not bad data
            raise AssertionError(f"{task}: test shares {len(shared)} patients/slides with real training")
    write_json(summary_path, summary)
    return summary
