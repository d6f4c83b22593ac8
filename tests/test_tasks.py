"""Task sets: balanced by class and sex-age label, real test never shares a patient with real training."""
import numpy as np
import pandas as pd
import pytest

from biomedsynth.params import Tasks
from biomedsynth.store import ImageSet, ImageSetWriter
from biomedsynth.tasks import build_tasks, draw_balanced

LABELS = {"F_18-38": ("F", "18-38"), "F_48-68": ("F", "48-68"), "M_18-38": ("M", "18-38"),
          "M_48-68": ("M", "48-68"), "M_39-47": ("M", "39-47")}


def write_set(path, n_per_label: dict, side: int, channels: int = 1, patient_offset: int = 0, synthetic=False):
    rng = np.random.default_rng(len(str(path)))
    with ImageSetWriter(path, (side, side, channels)) as w:
        i = 0
        for label, n in n_per_label.items():
            for _ in range(n):
                meta = {"label": label}
                if label in LABELS:
                    meta.update(sex=LABELS[label][0], age_bin=LABELS[label][1])
                if not synthetic:
                    meta["patient_id"] = str(patient_offset + i // 2)  # two scans per patient
                w.add(rng.integers(0, 256, (side, side, channels), dtype=np.uint8), **meta)
                i += 1


@pytest.fixture
def tree(tmp_path):
    groups, synth = tmp_path / "groups", tmp_path / "synthetic"
    counts = {lb: 20 for lb in LABELS}
    write_set(groups / "x_norm/train", counts, 64)
    write_set(groups / "x_norm/test", {lb: 6 for lb in LABELS}, 64, patient_offset=1000)
    write_set(synth / "pggan-x_norm-cond", counts, 32, synthetic=True)
    for g, lb in (("h_norm", "normal"), ("h_tumor", "tumor")):
        write_set(groups / g / "train", {lb: 30}, 64, 3, patient_offset=100 if lb == "tumor" else 0)
        write_set(groups / g / "test", {lb: 10}, 64, 3, patient_offset=2000 if lb == "tumor" else 3000)
        write_set(synth / f"dcgan-{g}-uncond", {lb: 30}, 32, 3, synthetic=True)
    return groups, synth


def cfg(compare=(), **xray) -> Tasks:
    x = dict(group="x_norm", arch="pggan", setup="cond", sex={"train": 40, "test": 16},
             age={"train": 40, "test": 16, "young": [18, 38], "mature": [48, 68]})
    return Tasks.model_validate({"histology": {"arch": "dcgan", "train": 40, "test": 12}, "xray": {**x, **xray},
                                 "compare": list(compare)})


def test_sets_are_balanced_disjoint_and_at_the_synthetic_side(tree, tmp_path):
    groups, synth = tree
    summary = build_tasks(cfg(), groups, synth, tmp_path / "tasks", 0, tmp_path / "tasks.json")
    for task in ("histology", "xray_sex", "xray_age"):
        sets = {name: ImageSet(tmp_path / "tasks" / task / name) for name in ("real", "synthetic", "test")}
        assert all(s.shape[0] == 32 for s in sets.values())  # real 64 px downsampled to the GAN's 32 px
        for name, s in sets.items():
            counts = s.meta["y"].value_counts()
            assert counts[0] == counts[1], (task, name)
            assert summary[task][name]["images"] == len(s)
        assert not set(sets["test"].meta["group"]) & set(sets["real"].meta["group"])
    sex = ImageSet(tmp_path / "tasks/xray_sex/real").meta
    # balanced by sex-age label too: F has 2 labels, M 3 (incl. 39-47), so 18 per class (lcm 6): 9 F, 6 M per label
    assert sex.groupby("stratum").size().to_dict() == {"F_18-38": 9, "F_48-68": 9, "M_18-38": 6, "M_39-47": 6,
                                                       "M_48-68": 6}
    age = ImageSet(tmp_path / "tasks/xray_age/test").meta
    assert set(age["age_bin"]) == {"18-38", "48-68"} and "39-47" not in set(age["age_bin"])  # no bin straddles
    assert (age["y"] == (age["age_bin"] == "48-68")).all()


def test_a_compared_generator_gets_its_own_sets_and_moves_no_other(tree, tmp_path):
    """tasks.compare [diffusion, dcgan]: each task gets synthetic-diffusion (and the X-ray tasks synthetic-dcgan; histology's
    own is dcgan), drawn like the own set; every other set is the same bytes as without the comparison."""
    groups, synth = tree
    write_set(synth / "diffusion-x_norm-cond", {lb: 20 for lb in LABELS}, 32, synthetic=True)
    write_set(synth / "dcgan-x_norm-cond", {lb: 20 for lb in LABELS}, 32, synthetic=True)
    for g, lb in (("h_norm", "normal"), ("h_tumor", "tumor")):
        write_set(synth / f"diffusion-{g}-uncond", {lb: 30}, 32, 3, synthetic=True)
    alone = build_tasks(cfg(), groups, synth, tmp_path / "alone", 0, tmp_path / "alone.json")
    both = build_tasks(cfg(["diffusion", "dcgan"]), groups, synth, tmp_path / "both", 0, tmp_path / "both.json")
    assert list(both["histology"]) == [*list(alone["histology"])[:-1], "synthetic-diffusion", "test"]
    assert list(both["xray_sex"])[-3:] == ["synthetic-diffusion", "synthetic-dcgan", "test"]
    for task in alone:
        for name in alone[task]:
            files = lambda root: {f.name: f.read_bytes() for f in (root / task / name).iterdir()}  # noqa: E731
            assert files(tmp_path / "both") == files(tmp_path / "alone"), (task, name)
        theirs = ImageSet(tmp_path / "both" / task / "synthetic-diffusion").meta
        assert len(theirs) == alone[task]["synthetic"]["images"]
        assert theirs["y"].value_counts()[0] == theirs["y"].value_counts()[1]


def test_a_compared_generator_at_another_side_is_refused(tree, tmp_path):
    groups, synth = tree
    write_set(synth / "diffusion-x_norm-cond", {lb: 20 for lb in LABELS}, 64, synthetic=True)
    for g, lb in (("h_norm", "normal"), ("h_tumor", "tumor")):
        write_set(synth / f"diffusion-{g}-uncond", {lb: 30}, 32, 3, synthetic=True)
    with pytest.raises(ValueError, match="xray_sex: diffusion's synthetic images are 64 px, the task's 32 px"):
        build_tasks(cfg(["diffusion"]), groups, synth, tmp_path / "tasks", 0, tmp_path / "tasks.json")


def test_a_task_whose_bins_miss_a_class_names_it(tree, tmp_path):
    groups, synth = tree
    with pytest.raises(ValueError, match="xray_age real: only class \\[0\\] present"):
        build_tasks(cfg(age={"train": 40, "test": 16, "young": [18, 40], "mature": [50, 60]}), groups, synth,
                    tmp_path / "tasks", 0, tmp_path / "tasks.json")


def test_draw_balanced_takes_the_same_count_from_every_stratum():
    meta = pd.DataFrame({"y": [0] * 10 + [1] * 4 + [1] * 9, "stratum": ["a"] * 10 + ["b"] * 4 + ["c"] * 9})
    rows = draw_balanced(meta, 100, np.random.default_rng(0))
    assert rows.groupby("stratum").size().to_dict() == {"a": 8, "b": 4, "c": 4}  # class 1 limited by b
    rows = draw_balanced(meta, 8, np.random.default_rng(0))
    assert rows.groupby("stratum").size().to_dict() == {"a": 4, "b": 2, "c": 2}


def test_each_synthetic_draw_is_a_set_and_real_plus_synthetic_joins_real_and_each_draw(tree, tmp_path):
    groups, synth = tree
    with ImageSetWriter(synth / "pggan-x_norm-cond", (32, 32, 1)) as w:  # two draws of 20 per label
        for draw in (0, 1):
            for label, (sex, age_bin) in LABELS.items():
                for i in range(20):
                    w.add(np.full((32, 32, 1), 10 * draw, np.uint8), image_id=f"syn-d{draw}-{label}-{i}",
                          label=label, sex=sex, age_bin=age_bin, draw=draw)
    summary = build_tasks(cfg(), groups, synth, tmp_path / "tasks", 0, tmp_path / "tasks.json")
    assert list(summary["xray_sex"]) == ["real", "synthetic", "synthetic_d1", "real_synthetic", "real_synthetic_d1",
                                         "test"]
    assert list(summary["histology"]) == ["real", "synthetic", "real_synthetic", "test"]  # one draw there
    root = tmp_path / "tasks/xray_sex"
    first, second = ImageSet(root / "synthetic"), ImageSet(root / "synthetic_d1")
    assert all(first[i].max() == 0 for i in range(len(first))) and all(second[i].max() == 10 for i in range(len(second)))
    both = ImageSet(root / "real_synthetic").meta
    real, syn = ImageSet(root / "real").meta, first.meta
    assert len(both) == len(real) + len(syn)
    assert list(both["image_id"]) == list(real["image_id"]) + list(syn["image_id"])
    assert both["group"].nunique() == real["group"].nunique() + len(syn)  # every synthetic image its own group
    with_second = ImageSet(root / "real_synthetic_d1").meta  # replicate 1's real + synthetic arm: draw 1
    assert list(with_second["image_id"]) == list(real["image_id"]) + list(second.meta["image_id"])
    assert summary["xray_sex"]["test"]["clusters_per_class"] == {
        c: int(n) for c, n in ImageSet(root / "test").meta.groupby("y")["group"].nunique().astype(int)
        .rename(index=str).items()}
