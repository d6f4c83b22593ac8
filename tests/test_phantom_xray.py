import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage.filters import threshold_otsu
from skimage.measure import label

from biomedsynth.sources.phantom_xray import CSV_COLUMNS, FINDINGS, render_scan, write_xray_sample

SAMPLE = dict(n_patients=8, seed=3, difficulty=0.5, abnormal_fraction=0.4, scans_per_patient=(1, 4),
              min_side=96, max_side=160)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("xray")
    return root, write_xray_sample(root, **SAMPLE)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def lung_area(img: np.ndarray) -> float:
    """Share of the image taken by dark regions below Otsu's threshold that do not touch the border."""
    lab = label(img < threshold_otsu(img))
    border = np.unique(np.r_[lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    return float(np.mean((lab > 0) & ~np.isin(lab, border)))


def test_same_arguments_same_bytes_other_seed_other_bytes(sample, tmp_path):
    root, n = sample
    again = write_xray_sample(tmp_path / "a", **SAMPLE, workers=2)  # patients written by two processes
    assert again == n and _files(tmp_path / "a") == _files(root)
    write_xray_sample(tmp_path / "b", **{**SAMPLE, "seed": 4})
    assert _files(tmp_path / "b")["Data_Entry.csv"] != _files(root)["Data_Entry.csv"]


def test_csv_is_nih_style_and_valid(sample):
    root, n = sample
    df = pd.read_csv(root / "Data_Entry.csv")
    assert list(df.columns) == CSV_COLUMNS and len(df) == n
    assert df["Image Index"].str.fullmatch(r"\d{8}_\d{3}\.png").all()
    assert (df["Image Index"].str[:8].astype(int) == df["Patient ID"]).all()
    assert (df["Image Index"].str[9:12].astype(int) == df["Follow-up #"]).all()
    assert df["Patient Age"].between(18, 80).all() and set(df["Patient Gender"]) == {"F", "M"}
    assert (df["View Position"] == "PA").all()
    labels = df["Finding Labels"]
    assert (labels == "No Finding").any() and (labels != "No Finding").any()
    assert all(lab == "No Finding" or set(lab.split("|")) <= set(FINDINGS) for lab in labels)
    per_patient = df.groupby("Patient ID")
    assert per_patient.size().max() > 1 and per_patient.size().between(1, 4).all()
    for _, g in per_patient:  # follow-ups numbered 0.. with ages not going back
        assert list(g["Follow-up #"]) == list(range(len(g)))
        assert g["Patient Age"].is_monotonic_increasing and g["Patient Gender"].nunique() == 1


def test_pngs_are_16bit_grayscale_of_varying_sizes(sample):
    root, _ = sample
    names = pd.read_csv(root / "Data_Entry.csv")["Image Index"]
    assert sorted(p.name for p in (root / "images").iterdir()) == sorted(names)  # no leftover temp files
    sizes = set()
    for name in names:
        raw = (root / "images" / name).read_bytes()
        assert raw[24] == 16 and raw[25] == 0  # IHDR: bit depth 16, colour type 0 (grayscale)
        img = np.asarray(Image.open(root / "images" / name))
        assert img.ndim == 2 and img.max() > 255 and all(96 <= s <= 160 for s in img.shape)
        sizes.add(img.shape)
    assert len(sizes) > 3


def test_rewrite_with_fewer_patients_removes_stale_scans(tmp_path):
    write_xray_sample(tmp_path, **{**SAMPLE, "n_patients": 4})
    n = write_xray_sample(tmp_path, **{**SAMPLE, "n_patients": 2})
    assert len(list((tmp_path / "images").iterdir())) == n


def test_render_is_deterministic_uint16_and_checks_input():
    a = render_scan(np.random.default_rng(5), "F", 30, 0.5, "No Finding", 100, 120)
    b = render_scan(np.random.default_rng(5), "F", 30, 0.5, "No Finding", 100, 120)
    assert a.dtype == np.uint16 and a.shape == (100, 120) and np.array_equal(a, b)
    for bad in [dict(sex="X"), dict(finding="Fracture"), dict(difficulty=1.5)]:
        with pytest.raises(ValueError):
            render_scan(np.random.default_rng(0), **{**dict(sex="M", age=40, difficulty=0.5, finding="No Finding",
                                                         height=64, width=64), **bad})


def test_lungs_are_two_dark_fields_inside_a_bright_body():
    img = render_scan(np.random.default_rng(1), "M", 45, 0.5, "No Finding", 160, 160).astype(float)
    lab = label(img < threshold_otsu(img))
    border = np.unique(np.r_[lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    inner = [k for k in range(1, lab.max() + 1) if k not in border and (lab == k).sum() > 0.02 * img.size]
    assert len(inner) == 2
    lungs = np.isin(lab, inner)
    cols = np.flatnonzero(lungs.any(0))
    spine = img[lungs.any(1), (cols.min() + cols.max()) // 2]  # mediastinum between the lungs
    assert np.median(img[lungs]) < 0.6 * np.median(spine)


def test_men_have_larger_lung_fields_on_average_at_difficulty_0():
    area = {sex: [lung_area(render_scan(np.random.default_rng(i), sex, 40, 0.0, "No Finding", 128, 128))
                  for i in range(12)] for sex in "FM"}
    assert np.mean(area["M"]) > np.mean(area["F"]) * 1.05


def test_same_anatomy_seed_is_the_same_person_a_year_on():
    def scan(person, age):  # same scan settings (rng), so only the anatomy differs
        return render_scan(np.random.default_rng(0), "F", age, 0.5, "No Finding", 128, 128,
                           anatomy_seed=person).astype(float)
    follow_up = [np.abs(scan(p, 50) - scan(p, 51)).mean() for p in range(4)]
    other = [np.abs(scan(p, 50) - scan(p + 10, 50)).mean() for p in range(4)]
    assert 0 < max(follow_up) < 0.5 * min(other)


@pytest.mark.parametrize("finding", ["Cardiomegaly", "Effusion"])
def test_findings_shrink_the_lung_fields(finding):
    def area(f):
        return lung_area(render_scan(np.random.default_rng(7), "M", 50, 0.0, f, 128, 128, anatomy_seed=7))
    assert area(finding) < 0.95 * area("No Finding")


def test_a_mass_adds_an_opacity():
    normal, mass = (render_scan(np.random.default_rng(8), "F", 50, 0.0, f, 128, 128, anatomy_seed=8).astype(float)
                    for f in ("No Finding", "Mass"))
    assert (mass - normal).max() > 0.05 * normal.max()
