import json

import numpy as np
import pandas as pd
import pytest

from biomedsynth.params import HistologyGroup, HistologyGroups, StudyGroups, XrayGroup, XrayGroups
from biomedsynth.store import ImageSet, ImageSetWriter
from biomedsynth.studygroups import (GroupError, assign_age_bins, balance_xray, build_studygroups, split_sides,
                                     split_units, val_size)

BINS = [(18, 29), (30, 49), (50, 68)]


def _xray_set(path, n_patients=120, seed=0):
    rng = np.random.default_rng(seed)
    with ImageSetWriter(path, (4, 4, 1)) as w:
        for p in range(n_patients):
            sex, age = ("F", "M")[p % 2], int(rng.integers(18, 75))
            for k in range(int(rng.integers(1, 4))):
                w.add(np.full((4, 4), p % 256, np.uint8), image_id=f"{p}_{k}", patient_id=f"{p:04d}", sex=sex,
                      age=age + k, normal=bool(rng.random() > 0.1))


def _histology_set(path, slides=(("normal", 6), ("tumor", 4)), split_unit="slide"):
    """Tiles of whole slides, with ingest's details file (ingest.json) recording the split unit."""
    with ImageSetWriter(path, (4, 4, 3)) as w:
        for label, n in slides:
            for s in range(n):
                for t in range(30):
                    # tumour slides hold some normal tissue (annotation labelling)
                    tile_label = label if label == "normal" or t % 3 else "normal"
                    w.add(np.zeros((4, 4, 3), np.uint8), image_id=f"{label}{s}_{t}", patient_id=f"{label}_{s:03d}",
                          label=tile_label, slide_label=label)
    (path / "ingest.json").write_text(json.dumps({"split_unit": split_unit}))


def _cfg(train=60, test=20, htrain=50, htest=20):
    xg = dict(age_bins=BINS, train=train, test=test)
    return StudyGroups(
        min_fill=0.0,  # these tests read what a side reached; tests/test_plan.py checks the stop
        xray=XrayGroups(test_fraction=0.25, val_fraction=0.3, x_norm=XrayGroup(balance="sex_age", **xg),
                        x_norm_l=XrayGroup(balance="sex", **xg)),
        histology=HistologyGroups(test_fraction=0.3, val_fraction=0.25, h_norm=HistologyGroup(train=htrain, test=htest),
                                  h_tumor=HistologyGroup(train=htrain, test=htest)))


def test_age_bins_are_inclusive_and_leave_outsiders_out():
    names = assign_age_bins(pd.Series([17, 18, 29, 30, 68, 69]), BINS).tolist()
    assert names == [None, "18-29", "18-29", "30-49", "50-68", None]


def test_split_units_is_stratified_and_keeps_lone_units_in_training():
    strata = pd.Series({f"p{i}": ("a" if i < 10 else "b" if i < 14 else "c") for i in range(15)})
    test = split_units(strata, 0.3, np.random.default_rng(0))
    assert sum(u in test for u in strata.index[:10]) == 3 and sum(u in test for u in strata.index[10:14]) == 1
    assert "p14" not in test  # the only unit of stratum c


def test_validation_units_come_from_the_training_side_of_each_stratum():
    strata = pd.Series({f"p{i}": ("a" if i < 20 else "b" if i < 24 else "c") for i in range(25)})
    cfg = XrayGroups(test_fraction=0.25, val_fraction=0.2, x_norm=XrayGroup(age_bins=BINS, balance="sex_age",
                                                                           train=1, test=1),
                     x_norm_l=XrayGroup(age_bins=BINS, balance="sex", train=1, test=1))
    sides = split_sides(strata, cfg, np.random.default_rng(0))
    counts = sides.groupby(strata).value_counts().unstack(fill_value=0)
    assert counts.loc["a"].to_dict() == {"test": 5, "train": 12, "val": 3}  # 25% of 20, then 20% of the other 15
    assert counts.loc["b"].to_dict() == {"test": 1, "train": 2, "val": 1}
    assert sides["p24"] == "train"  # a lone unit stays in training
    # the test side is drawn first, as before validation existed
    assert set(sides.index[sides == "test"]) == split_units(strata, 0.25, np.random.default_rng(0))
    assert val_size(400, 0.2) == 100 and val_size(10, 0.01) == 1


def test_balance_sex_age_gives_every_label_the_same_count():
    meta = pd.DataFrame({"sex": ["F"] * 10 + ["M"] * 10, "age": [20] * 5 + [40] * 5 + [20] * 3 + [40] * 7,
                         "patient_id": [str(i) for i in range(20)]})
    out = balance_xray(meta, XrayGroup(age_bins=[(18, 29), (30, 49)], balance="sex_age", train=100, test=1),
                       100, np.random.default_rng(0), "t")
    assert out["label"].value_counts().to_dict() == {"F_18-29": 3, "F_30-49": 3, "M_18-29": 3, "M_30-49": 3}
    sex_only = balance_xray(meta, XrayGroup(age_bins=[(18, 29), (30, 49)], balance="sex", train=100, test=1),
                            100, np.random.default_rng(0), "t")
    assert sex_only["label"].value_counts().to_dict() == {"F_18-29": 3, "M_18-29": 3, "F_30-49": 5, "M_30-49": 5}
    with pytest.raises(GroupError, match="M_50-68"):
        balance_xray(meta, XrayGroup(age_bins=[(18, 29), (50, 68)], balance="sex_age", train=9, test=1),
                     9, np.random.default_rng(0), "X-Norm train")


def test_groups_never_share_a_patient_or_slide_and_are_balanced(tmp_path):
    _xray_set(tmp_path / "xray")
    _histology_set(tmp_path / "hist")
    summary = build_studygroups(tmp_path / "xray", tmp_path / "hist", _cfg(), tmp_path / "groups", 0,
                                tmp_path / "summary.json")
    for group in ("x_norm", "x_norm_l", "h_norm", "h_tumor"):
        train, val, test = (ImageSet(tmp_path / "groups" / group / side).meta for side in ("train", "val", "test"))
        assert len(train) and len(val) and len(test)
        for a, b in ((train, val), (train, test), (val, test)):
            assert not set(a["patient_id"]) & set(b["patient_id"])
        assert summary[group]["train"]["images"] == len(train) and summary[group]["val"]["images"] == len(val)
        assert set(val["label"]) == set(train["label"])
    xn = ImageSet(tmp_path / "groups/x_norm/train").meta
    counts = xn["label"].value_counts()
    assert len(counts) == 6 and counts.nunique() == 1 and len(xn) <= 60
    xv = ImageSet(tmp_path / "groups/x_norm/val").meta["label"].value_counts()  # balanced like train
    assert len(xv) == 6 and xv.nunique() == 1 and summary["x_norm"]["val"]["requested"] == 26  # 60 x 0.3 / 0.7
    assert (xn["normal"].astype(str) == "True").all()  # X-Norm holds normal scans only
    xl = ImageSet(tmp_path / "groups/x_norm_l/test").meta
    per_bin = xl.groupby(["age_bin", "sex"]).size().unstack()
    assert (per_bin["F"] == per_bin["M"]).all()
    # one patient split for every X-ray group: a test or validation patient of X-Norm is never a train patient
    # of X-Norm-L
    xl_train = ImageSet(tmp_path / "groups/x_norm_l/train").meta
    for side in ("test", "val"):
        assert not set(ImageSet(tmp_path / "groups/x_norm" / side).meta["patient_id"]) & set(xl_train["patient_id"])
    hn = ImageSet(tmp_path / "groups/h_norm/train").meta
    assert (hn["label"] == "normal").all() and len(hn) == 50
    ht = ImageSet(tmp_path / "groups/h_tumor/test").meta
    assert (ht["label"] == "tumor").all() and ht["patient_id"].str.startswith("tumor").all()


def test_each_side_records_its_split_unit_from_ingest(tmp_path):
    """X-rays split by patient; histology by slide, or by tile where ingest recorded tiles without slide ids; an
    ingest that left no details is a one-line error, not a guess."""
    _xray_set(tmp_path / "xray")
    _histology_set(tmp_path / "hist", split_unit="tile")
    summary = build_studygroups(tmp_path / "xray", tmp_path / "hist", _cfg(), tmp_path / "groups", 0,
                                tmp_path / "summary.json")
    assert {s["split_unit"] for g in ("x_norm", "x_norm_l") for s in summary[g].values()} == {"patient"}
    assert {s["split_unit"] for g in ("h_norm", "h_tumor") for s in summary[g].values()} == {"tile"}
    assert json.loads((tmp_path / "summary.json").read_text())["h_norm"]["test"]["split_unit"] == "tile"
    (tmp_path / "hist" / "ingest.json").write_text(json.dumps({"split_unit": "slide"}))
    summary = build_studygroups(tmp_path / "xray", tmp_path / "hist", _cfg(), tmp_path / "groups2", 0,
                                tmp_path / "summary2.json")
    assert summary["h_tumor"]["train"]["split_unit"] == "slide"
    (tmp_path / "hist" / "ingest.json").unlink()
    with pytest.raises(FileNotFoundError, match="split unit .slide or tile. is unknown; run ingest@histology"):
        build_studygroups(tmp_path / "xray", tmp_path / "hist", _cfg(), tmp_path / "groups3", 0, tmp_path / "s.json")


def test_shortfall_is_reported_not_padded(tmp_path):
    _xray_set(tmp_path / "xray")
    _histology_set(tmp_path / "hist")
    summary = build_studygroups(tmp_path / "xray", tmp_path / "hist", _cfg(train=600, htrain=1000),
                                tmp_path / "groups", 0, tmp_path / "summary.json")
    assert summary["x_norm"]["train"]["shortfall"] > 0
    tumour_train = summary["h_tumor"]["train"]
    assert tumour_train["images"] < 1000 and tumour_train["shortfall"] == 1000 - tumour_train["images"]


def test_a_label_without_validation_images_is_a_clear_error(tmp_path):
    _xray_set(tmp_path / "xray")
    _histology_set(tmp_path / "hist")
    x = _cfg().xray  # balanced by sex only, so an age bin can lack validation scans
    x = x.model_copy(update={"val_fraction": 0.1, "x_norm": x.x_norm_l})
    cfg = _cfg().model_copy(update={"xray": x})
    with pytest.raises(GroupError, match="x_norm val: no images of label.s. F_50-68, M_50-68 .*val_fraction"):
        build_studygroups(tmp_path / "xray", tmp_path / "hist", cfg, tmp_path / "groups", 0, tmp_path / "s.json")


def test_a_class_without_test_slides_is_a_clear_error(tmp_path):
    _xray_set(tmp_path / "xray")
    _histology_set(tmp_path / "hist", slides=(("normal", 4), ("tumor", 1)))
    with pytest.raises(GroupError, match="h_tumor val: no 'tumor' tiles"):  # the lone slide trains; val comes first
        build_studygroups(tmp_path / "xray", tmp_path / "hist", _cfg(), tmp_path / "groups", 0, tmp_path / "s.json")
