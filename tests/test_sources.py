"""Real-data source adapters: NIH ChestX-ray14, manifest CSV, tile folder, PatchCamelyon."""
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from biomedsynth.params import HistologySource
from biomedsynth.sources import ScanRecord
from biomedsynth.sources.folder import folder_tiles
from biomedsynth.sources.manifest import manifest_records, parse_age
from biomedsynth.sources.nih import nih_records
from biomedsynth.sources.pcam import pcam_tiles
from biomedsynth.sources.wsi import list_slides
from test_scans import BUDGET


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
    assert skipped == {"outside_root": 1, "missing_image": 1, "bad_sex": 1}  # the absolute path, outside the root
    assert records == [ScanRecord(export / "p1/a.png", "a", "007", "M", 45, True),
                       ScanRecord(export / "p2/b.tif", "b", "8", "F", 30, False),
                       ScanRecord(dcm, "IM0001", "9", "F", 71, True)]
    records, skipped = manifest_records(csv, allow_outside_root=True)
    assert skipped == {"missing_image": 1, "bad_sex": 1} and records[3] == ScanRecord(absolute, "c", "10", "M", 19, True)


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
    with pytest.raises(ValueError, match=r"1 image id\(s\) listed more than once: 'scan' on rows 1, 2; "
                                         r"de-duplicate .*\(ids are the file names without extension\)") as err:
        manifest_records(csv)
    assert "image_id column" not in str(err.value)  # another id would hide an image listed under two patients
    pd.DataFrame({"path": ["p1/scan.png"], "patient_id": ["1"], "age": ["20"]}).to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"m\.csv: missing column 'sex'"):
        manifest_records(csv)


def test_manifest_lists_every_duplicate_id_count_and_first_ten(tmp_path):
    touch(tmp_path / "a.png")
    csv = tmp_path / "m.csv"
    ids = [f"id{i:02d}" for i in range(12)]
    pd.DataFrame({"path": ["a.png"] * 25, "image_id": ids + ids + ["once"], "patient_id": [str(i) for i in range(25)],
                  "sex": ["F"] * 25, "age": ["40"] * 25}).to_csv(csv, index=False)
    with pytest.raises(ValueError) as err:
        manifest_records(csv)
    message = str(err.value)
    assert "\n" not in message
    assert "12 image id(s) listed more than once: 'id00' on rows 1, 13; 'id01' on rows 2, 14" in message
    assert "'id09' on rows 10, 22; ... (the first 10 shown); de-duplicate the table" in message
    assert "'id10'" not in message and "'once'" not in message


def test_manifest_all_rows_bad_is_fatal(tmp_path):
    csv = tmp_path / "m.csv"
    pd.DataFrame({"path": ["gone.png"], "patient_id": ["1"], "sex": ["F"], "age": ["20"]}).to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"no usable rows.*missing_image"):
        manifest_records(csv)


# --- tile folder ---

def test_folder_tiles_labels_slide_regex_conversion_and_corrupt(tmp_path):
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    touch(tmp_path / "normal" / "s1_0.png", rgb)
    touch(tmp_path / "normal" / "s1_1.png", np.full((4, 5), 77, np.uint8))  # grayscale
    touch(tmp_path / "Tumour" / "s2_x3_y9.tif", np.zeros((4, 5, 4), np.uint8))  # RGBA
    (tmp_path / "Tumour" / "s3_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "Tumour" / "notes.txt").write_text("hi")
    touch(tmp_path / "Tumour" / "lone.jpg", rgb)  # no slide in its name: skipped, not a slide of its own
    tiles, skipped = folder_tiles(tmp_path, slide_id=r"^(?P<slide>s\d+)_", allow_tile_level_split=False,
                                  max_pixels=BUDGET)
    assert skipped == {}  # nothing read yet
    tiles = list(tiles)
    assert skipped == {"no_slide_id": 1, "unreadable": 1, "unsupported_format": 1}
    assert [(t.source, t.slide_id, t.label) for t in tiles] == [
        ("Tumour/s2_x3_y9.tif", "s2", "tumor"), ("normal/s1_0.png", "s1", "normal"),
        ("normal/s1_1.png", "s1", "normal")]
    assert all(t.image.dtype == np.uint8 and t.image.shape == (4, 5, 3) for t in tiles)
    np.testing.assert_array_equal(tiles[1].image, rgb)
    assert (tiles[2].image == 77).all()


def test_folder_tiles_slides_csv_and_label_errors(tmp_path):
    touch(tmp_path / "1" / "a.png")
    touch(tmp_path / "1" / "b.png")
    pd.DataFrame({"file": ["1/a.png"], "slide": ["tumor_001"]}).to_csv(tmp_path / "slides.csv", index=False)
    tiles, skipped = folder_tiles(tmp_path, slide_id=None, allow_tile_level_split=False, max_pixels=BUDGET)
    assert [(t.slide_id, t.label) for t in tiles] == [("tumor_001", "tumor")] and skipped == {"not_in_slides_csv": 1}
    with pytest.raises(ValueError, match=r"slides\.csv and sources\.histology\.slide_id = 'camelyon16' both"):
        folder_tiles(tmp_path, slide_id="camelyon16", allow_tile_level_split=False, max_pixels=BUDGET)
    (tmp_path / "tumr").mkdir()
    with pytest.raises(ValueError, match="found tumr"):
        folder_tiles(tmp_path, slide_id=None, allow_tile_level_split=False, max_pixels=BUDGET)


CAMELYON_TILES = ["normal/normal_017_x0_y0.png", "normal/normal_017_x256_y0.png", "tumor/tumor_001_x100_y200.png",
                  "tumor/tumor_002_x100_y200.png", "tumor/tumor_002_5.png"]


def test_folder_tiles_without_slide_ids_refused_then_split_by_tile(tmp_path):
    for name in CAMELYON_TILES:
        touch(tmp_path / name)
    with pytest.raises(ValueError) as err:  # before: every "tumor_..." tile was one slide 'tumor'
        folder_tiles(tmp_path, slide_id=None, allow_tile_level_split=False, max_pixels=BUDGET)
    message = str(err.value)
    assert "\n" not in message and "tiles have no slide ids" in message
    assert all(how in message for how in ("slides.csv", "sources.histology.slide_id", "allow_tile_level_split=true"))
    tiles, _ = folder_tiles(tmp_path, slide_id=None, allow_tile_level_split=True, max_pixels=BUDGET)
    assert [t.slide_id for t in tiles] == [None] * len(CAMELYON_TILES)


@pytest.mark.parametrize("rule, names, slides", [
    ("camelyon16", CAMELYON_TILES, ["normal_017", "normal_017", "tumor_001", "tumor_002", "tumor_002"]),
    ("camelyon16", ["tumor/test_003_7.png", "tumor/tumor_0012.png"], ["test_003", "tumor_0012"]),
    ("pcam", ["normal/camelyon16_train_normal_033_12.png", "tumor/camelyon16_train_tumor_101_x4_y8.png",
              "tumor/camelyon16_test_002_0.png", "tumor/camelyon16_train_tumor_101.png"],
     ["camelyon16_train_normal_033", "camelyon16_train_tumor_101", "camelyon16_test_002",
      "camelyon16_train_tumor_101"]),
    (r"slide-(?P<slide>\w+?)-tile", ["normal/case7_slide-A12-tile3.png"], ["A12"]),
])
def test_slide_id_presets_and_regex_read_the_file_name(tmp_path, rule, names, slides):
    for name in names:
        touch(tmp_path / name)
    tiles, skipped = folder_tiles(tmp_path, slide_id=rule, allow_tile_level_split=False, max_pixels=BUDGET)
    assert sorted((t.source, t.slide_id) for t in tiles) == sorted(zip(names, slides)) and skipped == {}


def test_tiles_and_slides_linked_out_of_the_root_are_left_out_unless_allowed(tmp_path):
    """sources.histology.allow_outside_root false: a tile or slide that is a link out of the root is skipped
    unread and counted (outside_root); true: read like the others."""
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    tiles_root, slides_root, elsewhere = tmp_path / "tiles", tmp_path / "slides", tmp_path / "elsewhere"
    touch(tiles_root / "normal" / "s1_0.png", rgb)
    (tiles_root / "normal" / "s2_0.png").symlink_to(touch(elsewhere / "s2_0.png", rgb))
    rule = dict(slide_id=r"^(?P<slide>s\d+)_", allow_tile_level_split=False, max_pixels=BUDGET)
    tiles, skipped = folder_tiles(tiles_root, **rule)
    assert [t.source for t in tiles] == ["normal/s1_0.png"] and skipped == {"outside_root": 1}
    tiles, skipped = folder_tiles(tiles_root, **rule, allow_outside_root=True)
    assert [t.source for t in tiles] == ["normal/s1_0.png", "normal/s2_0.png"] and skipped == {}
    touch(slides_root / "normal_001.tif")
    (slides_root / "tumor_002.tif").symlink_to(touch(elsewhere / "tumor_002.tif", rgb))
    outside: list[Path] = []
    assert [r.slide_id for r in list_slides(slides_root, outside=outside)] == ["normal_001"]
    assert outside == [slides_root / "tumor_002.tif"]
    assert [r.slide_id for r in list_slides(slides_root)] == ["normal_001", "tumor_002"]


def test_slide_id_matching_no_file_and_bad_knob_values(tmp_path):
    touch(tmp_path / "normal" / "slideA_0.png")
    with pytest.raises(ValueError, match=r"slide_id = 'camelyon16' matches no file name \(e\.g\. 'slideA_0\.png'\)"):
        folder_tiles(tmp_path, slide_id="camelyon16", allow_tile_level_split=False, max_pixels=BUDGET)
    base = {"format": "tiles", "root": "r", "labels_csv": None, "allow_tile_level_split": False,
            "allow_outside_root": False}
    assert HistologySource(**base, slide_id="pcam").slide_id == "pcam"
    for bad, why in (("camelyon17", "group named 'slide'"), ("(?P<slide>[", "nor a regex")):
        with pytest.raises(ValueError, match=why):
            HistologySource(**base, slide_id=bad)
    with pytest.raises(ValueError, match="slide_id reads tile file names"):
        HistologySource(**{**base, "format": "pcam"}, slide_id="pcam")


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
    tiles, skipped = pcam_tiles(tmp_path, allow_tile_level_split=True, max_pixels=BUDGET, splits=("train", "test"),
                                chunk=3)
    first = next(tiles)
    assert rows_read == [3, 3]  # one chunk of x and of y, not the whole file
    tiles = [first, *tiles]
    assert max(rows_read) == 3 and skipped == {}
    assert [t.label for t in tiles] == ["tumor" if i % 3 == 0 else "normal" for i in [*range(10), *range(5)]]
    assert [t.slide_id for t in tiles] == [f"camelyon16_train_{i // 4}" for i in range(10)] + [None] * 5
    assert tiles[12].source == "camelyonpatch_level_2_split_test_x.h5:2"
    np.testing.assert_array_equal(np.stack([t.image for t in tiles]), np.concatenate([xs["train"], xs["test"]]))


def test_pcam_without_meta_csv_is_refused_unless_split_by_tile(tmp_path):
    pcam_tree(tmp_path, "train", 4, meta=True)
    pcam_tree(tmp_path, "test", 4, meta=False)
    with pytest.raises(ValueError) as err:  # before: each tile of `test` became a slide of its own, silently
        pcam_tiles(tmp_path, allow_tile_level_split=False, max_pixels=BUDGET, splits=("train", "test"))
    message = str(err.value)
    assert "\n" not in message and "_meta.csv for split(s) test, so their tiles have no slide ids" in message
    assert "allow_tile_level_split=true" in message
    tiles, _ = pcam_tiles(tmp_path, allow_tile_level_split=False, max_pixels=BUDGET, splits=("train",))
    assert [t.slide_id for t in tiles] == ["camelyon16_train_0"] * 4


def test_pcam_errors(tmp_path):
    pcam_tree(tmp_path, "valid", 2, meta=False)
    with pytest.raises(ValueError, match="split_train_x.h5 not found"):
        pcam_tiles(tmp_path, allow_tile_level_split=True, max_pixels=BUDGET)
    (tmp_path / "camelyonpatch_level_2_split_valid_y.h5").rename(tmp_path / "camelyonpatch_level_2_split_valid_y.h5.gz")
    with pytest.raises(ValueError, match=r"split_valid_y\.h5\.gz is gzip-compressed; run `gunzip"):
        pcam_tiles(tmp_path, allow_tile_level_split=True, max_pixels=BUDGET, splits=("valid",))
    (tmp_path / "camelyonpatch_level_2_split_valid_y.h5.gz").unlink()
    with pytest.raises(ValueError, match=r"valid_y\.h5 not found \(the labels for camelyonpatch_level_2_split_valid_x"):
        pcam_tiles(tmp_path, allow_tile_level_split=True, max_pixels=BUDGET, splits=("valid",))
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_valid_y.h5", "w") as f:
        f.create_dataset("y", data=np.array([1, 7], np.uint8))
    tiles, skipped = pcam_tiles(tmp_path, allow_tile_level_split=True, max_pixels=BUDGET, splits=("valid",))
    assert [t.label for t in tiles] == ["tumor"] and skipped == {"bad_label": 1}
    pd.DataFrame({"wsi": ["a"]}).to_csv(tmp_path / "camelyonpatch_level_2_split_valid_meta.csv")
    with pytest.raises(ValueError, match="1 rows for 2 tiles"):
        pcam_tiles(tmp_path, allow_tile_level_split=False, max_pixels=BUDGET, splits=("valid",))
    pd.DataFrame({"wsi": ["a", " "]}).to_csv(tmp_path / "camelyonpatch_level_2_split_valid_meta.csv")
    with pytest.raises(ValueError, match=r"empty wsi \(slide\) on row 2"):
        pcam_tiles(tmp_path, allow_tile_level_split=False, max_pixels=BUDGET, splits=("valid",))
