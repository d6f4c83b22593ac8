"""Study groups (SPEC section 2): X-Norm, X-Norm-L, H-Norm, H-Tumor, split by patient or slide.

One split of patients (X-ray) and one of slides (histology) serves every group of the modality, so a
patient or slide is on one side for all groups and all later tasks. The sides: `test` (held out for the
benchmark), `val` (a part of the training side held out from the GANs, which score their epochs against
it) and `train`. Each side is then balanced and sampled to its size; what the data could not supply is
reported, never padded.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from biomedsynth.params import HistologyGroups, StudyGroups, XrayGroup, XrayGroups
from biomedsynth.paths import INGEST_DETAILS
from biomedsynth.store import ImageSet, ImageSetWriter, write_json

SIDES = ("train", "val", "test")


class GroupError(ValueError):
    """The data cannot make a group as configured (e.g. an empty sex-age label)."""


def age_bin_names(bins) -> list[str]:
    return [f"{lo:02d}-{hi:02d}" for lo, hi in bins]


def assign_age_bins(ages: pd.Series, bins) -> pd.Series:
    """Name of the inclusive [lo, hi] bin holding each age, or None outside every bin."""
    out = pd.Series([None] * len(ages), index=ages.index, dtype=object)
    for (lo, hi), name in zip(bins, age_bin_names(bins)):
        out[(ages >= lo) & (ages <= hi)] = name
    return out


def split_units(strata: pd.Series, test_fraction: float, rng: np.random.Generator) -> set[str]:
    """Hold out about `test_fraction` of the units (patients, slides) of each stratum for testing.

    `strata` maps unit id -> stratum. A stratum with two or more units keeps at least one on each
    side; a lone unit stays in training.
    """
    test: set[str] = set()
    for _, units in sorted(strata.groupby(strata).groups.items()):
        units = sorted(units)
        if len(units) < 2:
            continue
        k = min(len(units) - 1, max(1, round(test_fraction * len(units))))
        test.update(rng.choice(units, size=k, replace=False).tolist())
    return test


def split_sides(strata: pd.Series, cfg, rng: np.random.Generator) -> pd.Series:
    """unit id -> "test", "val" or "train": `cfg.test_fraction` of each stratum's units held out for testing,
    then `cfg.val_fraction` of the rest for validation (the same stratified draw, from the training side)."""
    test = split_units(strata, cfg.test_fraction, rng)
    val = split_units(strata[~strata.index.isin(test)], cfg.val_fraction, rng)
    return pd.Series(["test" if u in test else "val" if u in val else "train" for u in strata.index],
                     index=strata.index)


def val_size(train: int, val_fraction: float) -> int:
    """Validation images requested beside `train`: the validation units' share of the training side."""
    return max(1, round(train * val_fraction / (1 - val_fraction)))


def _take(pool: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(pool, size=k, replace=False) if k < len(pool) else pool


def balance_xray(meta: pd.DataFrame, group: XrayGroup, n: int, rng: np.random.Generator,
                 name: str) -> pd.DataFrame:
    """Rows of `meta` (one split side) forming a balanced group of at most `n` scans, with `label`.

    sex_age: every sex x age-bin label gets the same count. sex: each age bin gets as many women as
    men, bins keep their natural (uneven) sizes, scaled down together to fit `n`.
    """
    bins = assign_age_bins(meta["age"], group.age_bins)
    pools = {(sex, b): meta.index[(meta["sex"] == sex) & (bins == b)].to_numpy()
             for b in age_bin_names(group.age_bins) for sex in ("F", "M")}
    if group.balance == "sex_age":
        empty = [f"{s}_{b}" for (s, b), p in pools.items() if len(p) == 0]
        if empty:
            raise GroupError(f"{name}: no normal scans for label(s) {', '.join(empty)}; widen studygroups age_bins")
        per = min(n // len(pools), min(len(p) for p in pools.values()))
        counts = {key: per for key in pools}
    else:
        pairs = {b: min(len(pools["F", b]), len(pools["M", b])) for b in age_bin_names(group.age_bins)}
        total = 2 * sum(pairs.values())
        if total == 0:
            raise GroupError(f"{name}: no age bin holds scans of both sexes")
        scale = min(1.0, n / total)
        counts = {(s, b): int(m * scale) for b, m in pairs.items() for s in ("F", "M")}
    rows = np.concatenate([_take(pools[key], k, rng) for key, k in counts.items() if k > 0]) \
        if any(counts.values()) else np.array([], dtype=int)
    if len(rows) == 0:
        raise GroupError(f"{name}: too few scans to give every label at least one")
    out = meta.loc[np.sort(rows)].copy()
    out["age_bin"] = bins[out.index]
    out["label"] = out["sex"] + "_" + out["age_bin"]
    return out


def _write_side(src: ImageSet, rows: pd.DataFrame, out: Path, desc: str) -> None:
    with ImageSetWriter(out, src.shape) as w:
        for i, row in tqdm(rows.iterrows(), total=len(rows), desc=desc, leave=False):
            w.add(src[int(i)], **row.to_dict())


def _side_summary(rows: pd.DataFrame, requested: int) -> dict:
    return {"images": len(rows), "requested": requested, "shortfall": requested - len(rows),
            "units": int(rows["patient_id"].nunique()),
            "per_label": {str(k): int(v) for k, v in rows["label"].value_counts().sort_index().items()}}


def _check_disjoint(sides: dict[str, pd.DataFrame], name: str) -> None:
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = set(sides[a]["patient_id"]) & set(sides[b]["patient_id"])
        if shared:  # the split is by unit, so this would be a bug, not bad data
            raise AssertionError(f"{name}: {len(shared)} patient/slide ids on both {a} and {b}, "
                                 f"e.g. {sorted(shared)[:3]}")


def _check_val_labels(sides: dict[str, pd.DataFrame], name: str, knob: str) -> None:
    """Every label a GAN trains on needs validation images to be scored against."""
    missing = sorted(set(sides["train"]["label"]) - set(sides["val"]["label"]))
    if missing:
        raise GroupError(f"{name} val: no images of label(s) {', '.join(missing)} on the validation patients/slides; "
                         f"raise {knob}")


def _requested(group, side: str, val_fraction: float) -> int:
    return val_size(group.train, val_fraction) if side == "val" else getattr(group, side)


Groups = dict[str, dict[str, pd.DataFrame]]  # group -> side -> the chosen rows of the ingested metadata


def _or_note(problems: list[str] | None, choose, empty: pd.DataFrame, cause=None):
    """choose() as it is; where it raises GroupError, the message gets its cause (which replaces the generic
    advice after ';'): raised again for the studygroups stage (problems None), or noted in `problems` with
    `empty` standing in, so `plan` lists every shortfall in one run."""
    try:
        return choose()
    except GroupError as e:
        message = f"{str(e).split(';')[0]}; {cause()}" if cause is not None else str(e)
        if problems is None:
            raise GroupError(message) from None
        problems.append(message)
        return empty


def _xray_cause(meta: pd.DataFrame, group: XrayGroup, name: str) -> str:
    """Why a sex x age-bin label is empty on a side: its bin holds too few patients in the whole cohort to reach
    every side (widen the bins), or the split's fractions left none on this side (raise them)."""
    bins = assign_age_bins(meta["age"], group.age_bins)
    patients = meta.assign(label=meta["sex"] + "_" + bins.astype(str)).groupby("label")["patient_id"].nunique()
    labels = [f"{sex}_{b}" for b in age_bin_names(group.age_bins) for sex in ("F", "M")]
    thin = {label: int(patients.get(label, 0)) for label in labels if patients.get(label, 0) < len(SIDES)}
    if thin:
        shown = ", ".join(f"{k} {v}" for k, v in thin.items())
        return f"the age bins are the cause: in the whole cohort {shown} patients, and train, val and test each " \
               f"need one: widen studygroups.xray.{name}.age_bins"
    return "the split is the cause: every label has 3+ patients but none fell on this side: raise " \
           "studygroups.xray.val_fraction or studygroups.xray.test_fraction"


def choose_xray_groups(meta: pd.DataFrame, cfg: XrayGroups, rng: np.random.Generator,
                       problems: list[str] | None = None) -> tuple[Groups, dict]:
    """(rows per group and side, images requested per group and side) of X-Norm and X-Norm-L."""
    meta = meta[meta["normal"].astype(str) == "True"] if "normal" in meta else meta
    patients = meta.groupby("patient_id").agg(sex=("sex", "first"), age=("age", "min"))
    side_of = meta["patient_id"].map(split_sides(patients["sex"] + (patients["age"] // 10).astype(str), cfg, rng))
    empty = meta.iloc[:0].assign(age_bin=pd.Series(dtype=object), label=pd.Series(dtype=object))
    chosen, requested = {}, {}
    for name in ("x_norm", "x_norm_l"):
        group: XrayGroup = getattr(cfg, name)
        requested[name] = {side: _requested(group, side, cfg.val_fraction) for side in SIDES}
        chosen[name] = {side: _or_note(problems, lambda: balance_xray(meta[side_of == side], group,
                                                                      requested[name][side], rng, f"{name} {side}"),
                                       empty, lambda: _xray_cause(meta, group, name))
                        for side in SIDES}
        _check_disjoint(chosen[name], name)
        _or_note(problems, lambda: _check_val_labels(chosen[name], name, "studygroups.xray.val_fraction"), None,
                 lambda: _xray_cause(meta, group, name))
    return chosen, requested


def choose_histology_groups(meta: pd.DataFrame, cfg: HistologyGroups, rng: np.random.Generator,
                            problems: list[str] | None = None) -> tuple[Groups, dict]:
    """(rows per group and side, images requested per group and side) of H-Norm and H-Tumor."""
    side_of = meta["patient_id"].map(split_sides(meta.groupby("patient_id")["slide_label"].first(), cfg, rng))
    chosen, requested = {}, {}
    for name, label in (("h_norm", "normal"), ("h_tumor", "tumor")):
        group = getattr(cfg, name)
        requested[name] = {side: _requested(group, side, cfg.val_fraction) for side in SIDES}
        chosen[name] = {}
        for side in SIDES:
            pool = meta.index[(meta["label"] == label) & (side_of == side)].to_numpy()

            def take():
                if len(pool) == 0:
                    raise GroupError(f"{name} {side}: no '{label}' tiles on this side of the slide split; "
                                     "add slides or tiles_per_slide")
                return meta.loc[np.sort(_take(pool, requested[name][side], rng))]
            chosen[name][side] = _or_note(problems, take, meta.iloc[:0])
        _check_disjoint(chosen[name], name)
    return chosen, requested


def choose_groups(xray_meta: pd.DataFrame, histology_meta: pd.DataFrame, cfg: StudyGroups,
                  seed: int, problems: list[str] | None = None) -> tuple[Groups, dict]:
    """Every group's rows and requested sizes, exactly as the studygroups stage draws them for `seed`. With a
    `problems` list (plan) a side the data cannot make is noted there and left empty instead of stopping."""
    rng = np.random.default_rng(seed)
    xray, xray_asked = choose_xray_groups(xray_meta, cfg.xray, rng, problems)
    histology, histology_asked = choose_histology_groups(histology_meta, cfg.histology, rng, problems)
    return {**xray, **histology}, {**xray_asked, **histology_asked}


def summarise_groups(chosen: Groups, requested: dict) -> dict:
    return {name: {side: _side_summary(rows, requested[name][side]) for side, rows in sides.items()}
            for name, sides in chosen.items()}


def check_fill(summary: dict, min_fill: float) -> None:
    """GroupError naming the first side that reaches less than `min_fill` of the images it asks for."""
    for name, sides in summary.items():
        for side, s in sides.items():
            if s["images"] < min_fill * s["requested"]:
                fewest = min(s["per_label"].items(), key=lambda kv: kv[1], default=("none", 0))
                raise GroupError(f"{name} {side}: {s['images']}/{s['requested']} images (below studygroups.min_fill "
                                 f"{min_fill:.0%}; smallest label {fewest[0]}: {fewest[1]}); see `biomedsynth plan`")


def histology_split_unit(histology: Path) -> str:
    """What one histology unit of the split is, as ingest recorded it in <histology>/ingest.json: "slide", or
    "tile" when ready-cut tiles came without slide ids (each such tile is then a unit of its own, so tiles of one
    slide can sit on both sides of the split)."""
    details = Path(histology) / INGEST_DETAILS
    if not details.is_file():
        raise FileNotFoundError(f"{details} is missing, so the split unit (slide or tile) is unknown; "
                                "run ingest@histology (dvc repro)")
    unit = json.loads(details.read_text()).get("split_unit")
    if unit not in ("slide", "tile"):
        raise ValueError(f"{details}: split_unit = {unit!r}, expected slide or tile; run ingest@histology again")
    return unit


def build_studygroups(xray: Path, histology: Path, cfg: StudyGroups, out: Path, seed: int,
                      summary_path: Path) -> dict:
    """Write <out>/<group>/{train,val,test} image sets and the per-group summary JSON; return the summary.
    Each side records its split_unit (patient, slide or tile: what its `units` count and what no two sides share),
    so later stages (the export's datasheet) say what the split guarantees. Nothing is written when a side falls
    short of studygroups.min_fill of its requested size."""
    sources = {"x": ImageSet(xray), "h": ImageSet(histology)}
    unit = {"x": "patient", "h": histology_split_unit(histology)}
    chosen, requested = choose_groups(sources["x"].meta, sources["h"].meta, cfg, seed)
    summary = summarise_groups(chosen, requested)
    for name, sides in summary.items():
        for s in sides.values():
            s["split_unit"] = unit[name[0]]
    check_fill(summary, cfg.min_fill)
    for name, sides in chosen.items():
        for side, rows in sides.items():
            _write_side(sources["x" if name.startswith("x") else "h"], rows, out / name / side, f"{name}/{side}")
    write_json(summary_path, summary)
    return summary
