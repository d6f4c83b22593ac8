"""The paper profile holds every size and setting of the study, read from docs/SPEC.md (a copy of the team's
SPEC), so a change of either that breaks the match fails here."""
import re
import shutil
from pathlib import Path

import pytest

from biomedsynth.params import load_params
from biomedsynth.params_edit import apply_profile

ROOT = Path(__file__).resolve().parents[1]
SPEC = (ROOT / "docs" / "SPEC.md").read_text()


def _section(number: int) -> str:
    return re.search(rf"^## {number}\..*?(?=^## )", SPEC, re.S | re.M).group(0)


def _table(section: str) -> dict[str, list[str]]:
    """First column -> the other cells of each body row of the section's Markdown table."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("|")]
    return {r[0]: r[1:] for r in rows[2:]}


def _count(cell: str) -> int:
    return int(cell.replace(",", ""))


def _bins(cell: str) -> list[list[int]]:
    """'2-year bins 18-19, 20-21, ..., 67-68' or an explicit list -> [[lo, hi], ...], filling the '...'."""
    bins = [[int(a), int(b)] for a, b in re.findall(r"(\d+)-(\d+)", cell)]
    if "..." in cell:  # a regular run: extend the step of the first bins up to the last one
        step = bins[1][0] - bins[0][0]
        bins = [[lo, lo + step - 1] for lo in range(bins[0][0], bins[-1][0], step)] + [bins[-1]]
    return bins


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    path = tmp_path_factory.mktemp("paper") / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    apply_profile("paper", path)
    return load_params(path)


def test_preprocessing_section_1(paper):
    row = _table(_section(1))
    assert f"resize to {paper.ingest.xray.image_size}x{paper.ingest.xray.image_size}" in row["chest X-ray"][2]
    assert list(paper.ingest.xray.percentiles) == [int(p) for p in re.findall(r"(\d+)th", row["chest X-ray"][2])]
    assert paper.ingest.xray.normal_only and "keep only normal scans" in row["chest X-ray"][2]
    tile = paper.ingest.histology.tile_size
    assert f"cut into {tile}x{tile} tiles" in row["lymph-node histology"][2]
    assert paper.ingest.histology.tumor_label == "slide"
    assert "inherits its slide's label" in row["lymph-node histology"][2]


def test_study_groups_table_1(paper):
    table = _table(_section(2))
    groups = {"X-Norm": paper.studygroups.xray.x_norm, "X-Norm-L": paper.studygroups.xray.x_norm_l,
              "H-Norm": paper.studygroups.histology.h_norm, "H-Tumor": paper.studygroups.histology.h_tumor}
    for name, group in groups.items():
        train, test, labels = table[name]
        assert (group.train, group.test) == (_count(train), _count(test)), name
        if name.startswith("X"):
            spec_bins = _bins(labels)
            if name == "X-Norm":  # "..., 67-68" closes a run of 2-year bins from 18-19: the last takes 66-68
                spec_bins = spec_bins[:-2] + [[66, 68]]
            assert [list(b) for b in group.age_bins] == spec_bins, name
    assert paper.studygroups.xray.x_norm.balance == "sex_age" and paper.studygroups.xray.x_norm_l.balance == "sex"


def test_gan_training_section_3(paper):
    text = _section(3)
    xray = re.search(r"X-ray: latent (\d+), batch (\d+), (\d+)x\d+ in and out, Adam; (\d+) epochs unconditional, "
                     r"(\d+) conditional", text).groups()
    g = paper.gan.xray
    assert [g.latent_dim, g.batch_size, g.resolution, g.epochs_uncond, g.epochs_cond] == [int(v) for v in xray]
    histo = re.search(r"Histology: latent (\d+), batch (\d+), (\d+)x\d+, (\d+) epochs", text).groups()
    h = paper.gan.histology
    assert [h.latent_dim, h.batch_size, h.resolution, h.epochs] == [int(v) for v in histo]
    # "same batch size and epochs number were used for all layer depths"
    assert (paper.gan.pggan.images_per_phase, paper.gan.pggan.epochs_per) == (None, "depth")
    # the architectures' own papers: DCGAN 2e-4 / beta1 0.5; PGGAN widths 8192/512, Adam 1e-3 (0, 0.99)
    assert (paper.gan.dcgan.lr, paper.gan.dcgan.betas[0]) == (2e-4, 0.5)
    assert (paper.gan.pggan.fmap_base, paper.gan.pggan.fmap_max) == (8192, 512)
    assert (paper.gan.pggan.lr, list(paper.gan.pggan.betas)) == (1e-3, [0.0, 0.99])


def test_synthetic_datasets_section_4(paper):
    assert f"hash size {paper.synthesize.hash_size}" in _section(4)
    assert paper.synthesize.hash_screen == "dcgan_xray" and "DCGAN X-rays are screened" in _section(4)


def test_benchmark_table_2_and_classifiers(paper):
    text = _section(5)
    table = _table(text)
    t = paper.tasks
    sizes = {"histology: normal vs tumour": (t.histology.train, t.histology.test),
             "X-ray: female vs male": (t.xray.sex.train, t.xray.sex.test),
             'X-ray: age "young" 18-38 vs "mature" 48-68': (t.xray.age.train, t.xray.age.test)}
    for task, (train, test) in sizes.items():
        assert (train, test) == tuple(_count(c) for c in table[task]), task
    assert [list(t.xray.age.young), list(t.xray.age.mature)] == [[18, 38], [48, 68]]
    assert (t.xray.group, t.xray.arch, t.xray.setup, t.histology.arch) == ("x_norm_l", "pggan", "cond", "dcgan")
    vgg = re.search(r"VGG16\*\* on whole images, (\d+) epochs, batch (\d+)", text).groups()
    assert [paper.classify.vgg16.epochs, paper.classify.vgg16.batch_size] == [int(v) for v in vgg]
    assert paper.classify.vgg16.input_side == paper.gan.xray.resolution  # whole synthetic images
    radii = re.search(r"radius (\d+), (\d+), (\d+)", text).groups()
    assert paper.classify.lbp.radii == [int(r) for r in radii]
    assert f"**{paper.classify.cv_folds}-fold cross-validation**" in text


def test_age_task_is_the_studys_18_38_vs_48_68(paper):
    """SPEC 5: young 18-38, mature 48-68, exactly. X-Norm-L's paper bins 37-39, 45-49 and 67-77 straddle those
    edges: the real scans are classed by their own ages, so every age 18-38 is young and 48-68 mature;
    synthetic images carry only a bin, so only bins wholly inside a range can be classed."""
    import pandas as pd

    from biomedsynth.studygroups import age_bin_names, assign_age_bins
    from biomedsynth.tasks import _age_classes

    ranges = re.search(r'age "young" (\d+)-(\d+) vs "mature" (\d+)-(\d+)', _section(5)).groups()
    young, mature = (int(ranges[0]), int(ranges[1])), (int(ranges[2]), int(ranges[3]))
    age = paper.tasks.xray.age
    classify = _age_classes(age.young, age.mature)
    bins = paper.studygroups.xray.x_norm_l.age_bins
    scans = pd.DataFrame({"age": range(18, 78)})
    scans["age_bin"] = assign_age_bins(scans["age"], bins)
    scans["label"] = "F_" + scans["age_bin"]
    y, _ = classify(scans)
    assert list(scans["age"][y == 0]) == list(range(young[0], young[1] + 1))
    assert list(scans["age"][y == 1]) == list(range(mature[0], mature[1] + 1))
    synthetic = pd.DataFrame({"age_bin": age_bin_names(bins)})
    synthetic["label"] = "F_" + synthetic["age_bin"]
    y, _ = classify(synthetic)
    wholly_inside = [b for b in synthetic["age_bin"]
                     if young[0] <= int(b.split("-")[0]) and int(b.split("-")[1]) <= young[1]]
    assert list(synthetic["age_bin"][y == 0]) == wholly_inside and "37-39" not in wholly_inside
