"""Real-data source adapters: NIH ChestX-ray14, manifest CSV, tile folder, PatchCamelyon."""
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from biomedsynth.sources import ScanRecord
from biomedsynth.sources.folder import folder_tiles
from biomedsynth.sources.manifest import manifest_records, parse_age
from biomedsynth.sources.nih import nih_records
from biomedsynth.sources.pcam import pcam_tiles


def touch(path: Path, image: np.ndarray | None = None) -> Path:
    """Save an image (default a small black grayscale one), making its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4), np.uint8) if image is None else image).save(path)
    return path


# --- NIH ChestX-ray14 ---

NIH_ROWS = [  # Image Index, Finding Labels, Follow-up #, Patient ID, Patient Age, Patient Gender, View Position
    ("00000001_000.png", "Cardiomegaly", 0, 1, "058Y", "M", "PA"),
    ("00000001_001.png", "No Finding", 1, 1, "058Y", "M", "PA"),
    ("00000002_000.png", "No Finding", 0, 2, "081", "F", "AP"),
    ("00000003_000.png", "No Finding", 0, 3, "412", "F", "PA"),     # the CSV's impossible ages
    ("00000004_000.png", "Effusion|Mass", 0, 4, "040Y", "X", "PA"),  # bad sex
    ("00000005_000.png", "No Finding", 0, 5, "033Y", "F", "PA"),     # image not downloaded
]
NIH_COLUMNS = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
               "View Position"]


def nih_tree(root: Path, drop: str | None = None) -> Path:
    table = pd.DataFrame(NIH_ROWS, columns=NIH_COLUMNS)
    table.drop(columns=[drop] if drop else []).to_csv(root / "Data_Entry_2017_v2020.csv", index=False)
    for i, name in enumerate(table["Image Index"][:5]):  # split over images_001/images, images_002/images
        touch(root / f"images_00{i % 2 + 1}" / "images" / name)
    return root


def test_nih_records_split_folders_ages_and_skips(tmp_path):
    records, skipped = nih_records(nih_tree(tmp_path))
    assert skipped == {"bad_age": 1, "bad_sex": 1, "missing_image": 1}
    assert [(r.image_id, r.patient_id, r.sex, r.age, r.normal) for r in records] == [
        ("00000001_000.png", "1", "M", 58, False), ("00000001_001.png", "1", "M", 58, True),
        ("00000002_000.png", "2", "F", 81, True)]
    assert records[1].path == tmp_path / "images_002" / "images" / "00000001_001.png"
    assert all(isinstance(r, ScanRecord) and r.path.is_file() for r in records)


def test_nih_records_single_images_folder_and_explicit_csv(tmp_path):
    touch(tmp_path / "imgs" / "images" / "00000002_000.png")
    csv = tmp_path / "labels.csv"
    pd.DataFrame(NIH_ROWS[2:3], columns=NIH_COLUMNS).to_csv(csv, index=False)
    records, skipped = nih_records(tmp_path / "imgs", csv=csv)
    assert [r.image_id for r in records] == ["00000002_000.png"] and skipped == {}


def test_nih_missing_column_names_it_and_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"Data_Entry_2017_v2020\.csv: missing column 'Patient Age'"):
        nih_records(nih_tree(tmp_path, drop="Patient Age"))


def test_nih_layout_errors(tmp_path):
    with pytest.raises(ValueError, match="no Data_Entry"):
        nih_records(tmp_path)
    pd.DataFrame(NIH_ROWS, columns=NIH_COLUMNS).to_csv(tmp_path / "Data_Entry_2017.csv", index=False)
    (tmp_path / "images_001.tar.gz").touch()
    with pytest.raises(ValueError, match="unpack the images_"):
        nih_records(tmp_path)
    nih_tree(tmp_path)
    with pytest.raises(ValueError, match="several label CSVs"):
        nih_records(tmp_path)


@pytest.mark.parametrize("text, years", [("58", 58), ("058Y", 58), ("58.0", 58), ("045y", 45), ("006M", 0),
                                         ("030M", 2), ("104W", 1), ("400D", 1), ("121", None), ("", None),
                                         ("-3", None), ("5 years", None)])
def test_parse_age(text, years):
    assert parse_age(text) == years


# --- manifest ---

def test_manifest_paths_sexes_and_findings(tmp_path):
    export = tmp_path / "export"
    touch(export / "p1" / "a.png")
    touch(export / "p2" / "b.tif")
    dcm = export / "p3" / "IM0001"  # DICOM without extension: listed, decoded at ingest
    dcm.parent.mkdir()
    dcm.write_bytes(b"\0" * 128 + b"DICM")
    absolute = touch(tmp_path / "elsewhere" / "c.jpg")
    csv = export / "manifest.csv"
    pd.DataFrame({"path": ["p1/a.png", "p2/b.tif", "p3/IM0001", str(absolute), "p4/gone.png", "p1/a.png"],
                  "patient_id": ["007", "8", "9", "10", "11", "12"],
                  "sex": ["male", "F", "Female", "m", "M", "O"],
                  "age": ["045Y", "30", "71", "19", "50", "60"],
                  "finding": ["No Finding", "Nodule", "no finding", "No Finding", "No Finding", "No Finding"],
                  "report": ["x"] * 6}).to_csv(csv, index=False)
    records, skipped = manifest_records(csv)
    assert skipped == {"missing_image": 1, "bad_sex": 1}
    assert records == [ScanRecord(export / "p1/a.png", "a", "007", "M", 45, True),
                       ScanRecord(export / "p2/b.tif", "b", "8", "F", 30, False),
                       ScanRecord(dcm, "IM0001", "9", "F", 71, True),
                       ScanRecord(absolute, "c", "10", "M", 19, True)]


def test_manifest_root_normal_column_and_default_normal(tmp_path):
    touch(tmp_path / "data" / "a.png")
    touch(tmp_path / "data" / "b.png")
    csv = tmp_path / "m.csv"
    table = pd.DataFrame({"path": ["a.png", "b.png"], "patient_id": ["1", "2"], "sex": ["F", "M"],
                          "age": ["20", "30"], "image_id": ["s1", "s2"]})
    table.to_csv(csv, index=False)
    records, _ = manifest_records(csv, root=tmp_path / "data")
    assert [(r.image_id, r.normal) for r in records] == [("s1", True), ("s2", True)]
    table.assign(normal=["false", "1"]).to_csv(csv, index=False)
    assert [r.normal for r in manifest_records(csv, root=tmp_path / "data")[0]] == [False, True]
    table.assign(normal=["false", "maybe"]).to_csv(csv, index=False)
    assert manifest_records(csv, root=tmp_path / "data")[1] == {"bad_normal": 1}


def test_manifest_duplicate_ids_and_missing_column(tmp_path):
    touch(tmp_path / "p1" / "scan.png")
    touch(tmp_path / "p2" / "scan.png")
    csv = tmp_path / "m.csv"
    pd.DataFrame({"path": ["p1/scan.png", "p2/scan.png"], "patient_id": ["1", "2"], "sex": ["F", "M"],
                  "age": ["20", "30"]}).to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"'scan' on rows 1 and 2.*add an image_id column"):
        manifest_records(csv)
    pd.DataFrame({"path": ["p1/scan.png"], "patient_id": ["1"], "age": ["20"]}).to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"m\.csv: missing column 'sex'"):
        manifest_records(csv)


def test_manifest_all_rows_bad_is_fatal(tmp_path):
    csv = tmp_path / "m.csv"
    pd.DataFrame({"path": ["gone.png"], "patient_id": ["1"], "sex": ["F"], "age": ["20"]}).to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"no usable rows.*missing_image"):
        manifest_records(csv)


# --- tile folder ---

def test_folder_tiles_labels_slides_conversion_and_corrupt(tmp_path):
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    touch(tmp_path / "normal" / "s1_0.png", rgb)
    touch(tmp_path / "normal" / "s1_1.png", np.full((4, 5), 77, np.uint8))  # grayscale
    touch(tmp_path / "Tumour" / "s2_x3_y9.tif", np.zeros((4, 5, 4), np.uint8))  # RGBA
    (tmp_path / "Tumour" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "Tumour" / "notes.txt").write_text("hi")
    touch(tmp_path / "Tumour" / "lone.jpg", rgb)
    tiles, skipped = folder_tiles(tmp_path)
    assert skipped == {}  # nothing read yet
    tiles = list(tiles)
    assert skipped == {"unreadable": 1, "unsupported_format": 1}
    assert [(t.source, t.slide_id, t.label) for t in tiles] == [
        ("Tumour/lone.jpg", "lone", "tumor"), ("Tumour/s2_x3_y9.tif", "s2", "tumor"),
        ("normal/s1_0.png", "s1", "normal"), ("normal/s1_1.png", "s1", "normal")]
    assert all(t.image.dtype == np.uint8 and t.image.shape == (4, 5, 3) for t in tiles)
    np.testing.assert_array_equal(tiles[2].image, rgb)
    assert (tiles[3].image == 77).all()


def test_folder_tiles_slides_csv_and_label_errors(tmp_path):
    touch(tmp_path / "1" / "a.png")
    touch(tmp_path / "1" / "b.png")
    pd.DataFrame({"file": ["1/a.png"], "slide": ["tumor_001"]}).to_csv(tmp_path / "slides.csv", index=False)
    tiles, skipped = folder_tiles(tmp_path)
    assert [(t.slide_id, t.label) for t in tiles] == [("tumor_001", "tumor")] and skipped == {"not_in_slides_csv": 1}
    (tmp_path / "tumr").mkdir()
    with pytest.raises(ValueError, match="found tumr"):
        folder_tiles(tmp_path)


# --- PatchCamelyon ---

def pcam_tree(root: Path, split: str, n: int, meta: bool) -> np.ndarray:
    rng = np.random.default_rng(len(split) + n)
    x, y = rng.integers(0, 256, (n, 96, 96, 3), np.uint8), (np.arange(n) % 3 == 0).astype(np.uint8)
    with h5py.File(root / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
        f.create_dataset("x", data=x, chunks=(1, 96, 96, 3))
    with h5py.File(root / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
        f.create_dataset("y", data=y.reshape(n, 1, 1, 1))
    if meta:
        pd.DataFrame({"coord_y": range(n), "coord_x": range(n), "tumor_patch": y.astype(bool),
                      "center_tumor_patch": y.astype(bool), "wsi": [f"camelyon16_{split}_{i // 4}" for i in range(n)]}
                     ).to_csv(root / f"camelyonpatch_level_2_split_{split}_meta.csv")
    return x


def test_pcam_tiles_labels_slides_and_streaming(tmp_path, monkeypatch):
    xs = {"train": pcam_tree(tmp_path, "train", 10, meta=True), "test": pcam_tree(tmp_path, "test", 5, meta=False)}
    rows_read = []
    getitem = h5py.Dataset.__getitem__

    def spy(self, key):
        out = getitem(self, key)
        rows_read.append(len(out))
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    tiles, skipped = pcam_tiles(tmp_path, splits=("train", "test"), chunk=3)
    first = next(tiles)
    assert rows_read == [3, 3]  # one chunk of x and of y, not the whole file
    tiles = [first, *tiles]
    assert max(rows_read) == 3 and skipped == {}
    assert [t.label for t in tiles] == ["tumor" if i % 3 == 0 else "normal" for i in [*range(10), *range(5)]]
    assert [t.slide_id for t in tiles] == ([f"camelyon16_train_{i // 4}" for i in range(10)]
                                           + [f"test-{i}" for i in range(5)])
    assert tiles[12].source == "camelyonpatch_level_2_split_test_x.h5:2"
    np.testing.assert_array_equal(np.stack([t.image for t in tiles]), np.concatenate([xs["train"], xs["test"]]))


def test_pcam_errors(tmp_path):
    pcam_tree(tmp_path, "valid", 2, meta=False)
    with pytest.raises(ValueError, match="split_train_x.h5 not found"):
        pcam_tiles(tmp_path)
    (tmp_path / "camelyonpatch_level_2_split_valid_y.h5").rename(tmp_path / "camelyonpatch_level_2_split_valid_y.h5.gz")
    with pytest.raises(ValueError, match=r"split_valid_y\.h5\.gz is gzip-compressed; run `gunzip"):
        pcam_tiles(tmp_path, splits=("valid",))
    (tmp_path / "camelyonpatch_level_2_split_valid_y.h5.gz").unlink()
    with pytest.raises(ValueError, match=r"valid_y\.h5 not found \(the labels for camelyonpatch_level_2_split_valid_x"):
        pcam_tiles(tmp_path, splits=("valid",))
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_valid_y.h5", "w") as f:
        f.create_dataset("y", data=np.array([1, 7], np.uint8))
    tiles, skipped = pcam_tiles(tmp_path, splits=("valid",))
    assert [t.label for t in tiles] == ["tumor"] and skipped == {"bad_label": 1}
    pd.DataFrame({"wsi": ["a"]}).to_csv(tmp_path / "camelyonpatch_level_2_split_valid_meta.csv")
    with pytest.raises(ValueError, match="1 rows for 2 tiles"):
        pcam_tiles(tmp_path, splits=("valid",))
