from pathlib import Path

import numpy as np
import openslide
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from biomedsynth.sources.wsi import (DICOM_WSI, list_slides, points_in_tumour, read_annotation_polygons,
                                     write_annotation_xml, write_pyramidal_tiff)
from test_scans import write_dicom


def _smooth_rgb(h=768, w=1024):
    y, x = np.mgrid[:h, :w]
    return np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.uint8)


def test_pyramid_opens_in_openslide_with_halving_levels(tmp_path):
    rgb = _smooth_rgb()
    write_pyramidal_tiff(tmp_path / "a.tif", rgb, mpp=0.5)
    s = openslide.OpenSlide(str(tmp_path / "a.tif"))
    assert s.level_dimensions == ((1024, 768), (512, 384), (256, 192))  # stops once a side fits one tile
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    top = np.asarray(s.read_region((512, 256), 0, (128, 128)))
    assert (top[..., 3] == 255).all()
    assert np.abs(top[..., :3].astype(int) - rgb[256:384, 512:640]).mean() < 2  # JPEG q90 on a smooth image
    half = rgb.reshape(384, 2, 512, 2, 3).mean((1, 3))
    lvl1 = np.asarray(s.read_region((0, 0), 1, (512, 384)))[..., :3]
    assert np.abs(lvl1 - half).mean() < 2


def test_pyramid_is_deterministic_lossless_option_and_atomic(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (300, 520, 3), dtype=np.uint8)  # odd halving: 150x260
    for name in ("a.tif", "b.tif"):
        write_pyramidal_tiff(tmp_path / name, rgb, tile=64, compression="zlib", levels=2)
    assert (tmp_path / "a.tif").read_bytes() == (tmp_path / "b.tif").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "b.tif"]  # no temporary files left
    s = openslide.OpenSlide(str(tmp_path / "a.tif"))
    assert s.level_dimensions == ((520, 300), (260, 150))
    assert (np.asarray(s.read_region((0, 0), 0, (520, 300)))[..., :3] == rgb).all()


def test_pyramid_rejects_non_rgb(tmp_path):
    with pytest.raises(ValueError, match="uint8 RGB"):
        write_pyramidal_tiff(tmp_path / "a.tif", np.zeros((64, 64), np.uint8))


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_list_slides_labels_and_annotations(tmp_path):
    for name in ("training/tumor/tumor_002.tif", "training/normal/normal_001.tif", "tumor_001.svs",
                 "tumor_001.xml", "annotations/tumor_002.xml", ".tumor_003.tif.tmp", "notes.txt"):
        _touch(tmp_path / name)
    recs = list_slides(tmp_path)
    assert [(r.slide_id, r.label) for r in recs] == [("normal_001", "normal"), ("tumor_002", "tumor"),
                                                     ("tumor_001", "tumor")]  # sorted by path
    assert recs[0].annotation is None
    assert recs[1].annotation == tmp_path / "annotations" / "tumor_002.xml"
    assert recs[2].annotation == tmp_path / "tumor_001.xml"


def test_list_slides_label_csv_and_errors(tmp_path):
    _touch(tmp_path / "slides" / "test_001.tif")
    _touch(tmp_path / "slides" / "normal_007.tif")
    with pytest.raises(ValueError, match="test_001.tif: cannot tell the slide's label"):
        list_slides(tmp_path / "slides")
    (tmp_path / "labels.csv").write_text("slide,label\ntest_001.tif,Tumour\nnormal_007,tumor\n")
    recs = list_slides(tmp_path / "slides", tmp_path / "labels.csv")
    assert [(r.slide_id, r.label) for r in recs] == [("normal_007", "tumor"), ("test_001", "tumor")]  # CSV wins
    (tmp_path / "labels.csv").write_text("slide,class\ntest_001,tumor\n")
    with pytest.raises(ValueError, match="missing column 'label'"):
        list_slides(tmp_path / "slides", tmp_path / "labels.csv")
    (tmp_path / "labels.csv").write_text("slide,label\ntest_001,malignant\n")
    with pytest.raises(ValueError, match="'test_001' has label 'malignant'"):
        list_slides(tmp_path / "slides", tmp_path / "labels.csv")
    with pytest.raises(ValueError, match="no slides"):
        list_slides(_touch(tmp_path / "empty" / "labels.csv").parent)


def write_dicom_wsi(folder: Path, rgb: np.ndarray, tile: int = 128, levels: int = 2) -> None:
    """A DICOM whole-slide image as scanners export it: one uncompressed TILED_FULL file per pyramid level
    (level k is rgb subsampled 2**k times) plus a label image, one series, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    images = [(f"level{k}.dcm", "VOLUME", rgb[::2 ** k, ::2 ** k]) for k in range(levels)]
    for name, flavor, image in [*images, ("label.dcm", "LABEL", rgb[:64, :64])]:
        h, w, _ = image.shape
        rows, cols = -(-h // tile), -(-w // tile)
        padded = np.full((rows * tile, cols * tile, 3), 255, np.uint8)
        padded[:h, :w] = image
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = DICOM_WSI, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = DICOM_WSI, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID, ds.Modality = study, series, frame, "SM"
        ds.ImageType = ["ORIGINAL", "PRIMARY", flavor, "NONE"]
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows, ds.TotalPixelMatrixFocalPlanes = w, h, 1
        ds.Rows = ds.Columns = tile
        ds.NumberOfFrames = rows * cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        spacing = Dataset()
        spacing.PixelSpacing, spacing.SliceThickness = [0.00025 * rgb.shape[1] / w] * 2, 0.001
        ds.SharedFunctionalGroupsSequence = Sequence([Dataset()])
        ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence = Sequence([spacing])
        path = Dataset()
        path.OpticalPathIdentifier = "1"
        ds.OpticalPathSequence, ds.NumberOfOpticalPaths = Sequence([path]), 1
        ds.PixelData = padded.reshape(rows, tile, cols, tile, 3).swapaxes(1, 2).tobytes()  # frames row by row
        ds.save_as(folder / name, enforce_file_format=True)


def test_dicom_slide_folder_is_one_slide_that_openslide_reads(tmp_path):
    rgb = _smooth_rgb(300, 520)
    write_dicom_wsi(tmp_path / "dicom" / "tumor_005", rgb)
    _touch(tmp_path / "dicom" / "tumor_005.xml")
    write_pyramidal_tiff(tmp_path / "normal_001.tif", rgb)
    (tmp_path / "dicom" / "ct").mkdir()
    write_dicom(tmp_path / "dicom" / "ct" / "slice1.dcm", np.zeros((8, 8), np.uint16))  # a DICOM of another kind
    (tmp_path / "dicom" / "broken.dcm").write_bytes(b"not dicom at all")
    unsupported = []
    recs = list_slides(tmp_path, unsupported=unsupported)
    # before: .dcm was no slide suffix, so the slide was left out without a word
    assert [(r.slide_id, r.label, r.path.name) for r in recs] == [("tumor_005", "tumor", "level0.dcm"),
                                                                  ("normal_001", "normal", "normal_001.tif")]
    assert recs[0].annotation == tmp_path / "dicom" / "tumor_005.xml"
    assert [u.split(":")[0] for u in unsupported] == [str(tmp_path / "dicom" / "broken.dcm"),
                                                      str(tmp_path / "dicom" / "ct" / "slice1.dcm")]
    assert "not a whole-slide image" in unsupported[1]
    s = openslide.OpenSlide(str(recs[0].path))
    assert s.level_dimensions == ((520, 300), (260, 150))
    assert (np.asarray(s.read_region((0, 0), 0, (520, 300)))[..., :3] == rgb).all()


def test_one_file_under_two_slide_names_is_refused(tmp_path):
    write_pyramidal_tiff(tmp_path / "normal_001.tif", _smooth_rgb(256, 256))
    write_pyramidal_tiff(tmp_path / "normal_002.tif", _smooth_rgb(256, 384))
    assert len(list_slides(tmp_path)) == 2
    (tmp_path / "tumor_009.tif").write_bytes((tmp_path / "normal_001.tif").read_bytes())
    with pytest.raises(ValueError, match=r"slides 'normal_001' and 'tumor_009' are the same file .*remove the copy"):
        list_slides(tmp_path)


CAMELYON_XML = """<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
    <Annotation Name="_0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="2" X="1.0e+02" Y="100" />
        <Coordinate Order="0" X="0" Y="0" />
        <Coordinate Order="3" X="0" Y="100" />
        <Coordinate Order="1" X="100" Y="0" />
      </Coordinates>
    </Annotation>
    <Annotation Name="_1" Type="Polygon" PartOfGroup="_1" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="0" X="200" Y="200" /><Coordinate Order="1" X="260" Y="200" />
        <Coordinate Order="2" X="230" Y="250" />
      </Coordinates>
    </Annotation>
    <Annotation Name="_2" Type="Polygon" PartOfGroup="_2" Color="#64FE2E">
      <Coordinates>
        <Coordinate Order="0" X="40" Y="40" /><Coordinate Order="1" X="60" Y="40" />
        <Coordinate Order="2" X="60" Y="60" /><Coordinate Order="3" X="40" Y="60" />
      </Coordinates>
    </Annotation>
    <Annotation Name="dot" Type="Dot" PartOfGroup="_0">
      <Coordinates><Coordinate Order="0" X="5" Y="5" /></Coordinates>
    </Annotation>
  </Annotations>
  <AnnotationGroups><Group Name="_0" PartOfGroup="None" Color="#FF0000"><Attributes /></Group></AnnotationGroups>
</ASAP_Annotations>
"""


def test_read_camelyon_xml_with_exclusion_group(tmp_path):
    (tmp_path / "t.xml").write_text(CAMELYON_XML)
    tumour = read_annotation_polygons(tmp_path / "t.xml")
    holes = read_annotation_polygons(tmp_path / "t.xml", exclusion=True)
    assert len(tumour) == 2 and len(holes) == 1  # the one-point Dot encloses nothing
    assert np.array_equal(tumour[0], [[0, 0], [100, 0], [100, 100], [0, 100]])  # vertices in Order
    pts = [(20, 20), (50, 50), (230, 215), (150, 150), (99, 50)]
    assert points_in_tumour(pts, tumour, holes).tolist() == [True, False, True, False, True]


def test_xml_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tumour = [rng.uniform(0, 5000, (30, 2)).round(2), np.array([[0, 0], [10, 0], [5, 9.5]])]
    holes = [np.array([[1, 1], [3, 1], [2, 2.25]])]
    write_annotation_xml(tmp_path / "a.xml", tumour, holes)
    back, back_holes = (read_annotation_polygons(tmp_path / "a.xml", e) for e in (False, True))
    assert len(back) == 2 and len(back_holes) == 1
    assert all(np.allclose(a, b) for a, b in zip(back + back_holes, tumour + holes))


def test_bad_xml_is_a_clear_error(tmp_path):
    (tmp_path / "bad.xml").write_text("<ASAP_Annotations><Annotations>")
    with pytest.raises(ValueError, match="bad.xml: not a readable ASAP XML"):
        read_annotation_polygons(tmp_path / "bad.xml")
    (tmp_path / "nox.xml").write_text(CAMELYON_XML.replace('X="100" Y="0"', 'Y="0"'))
    with pytest.raises(ValueError, match="nox.xml: annotation '_0' has a coordinate without"):
        read_annotation_polygons(tmp_path / "nox.xml")
