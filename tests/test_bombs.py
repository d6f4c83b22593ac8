"""Decompression bombs (issue 13): every decoder checks the size its file's header declares against
ingest.max_pixels before it decodes; a file over the budget is skipped and counted by reason."""
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import h5py
import imagecodecs
import numpy as np
import openslide
import pydicom
import pytest
import tifffile
import yaml
from PIL import Image, ImageFile
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1

import biomedsynth
from biomedsynth.ingest import ingest
from biomedsynth.ingest.histology import ingest_histology
from biomedsynth.params import ParamsError, load_params
from biomedsynth.params_edit import set_params
from biomedsynth.sources import SlideRecord, scans
from biomedsynth.sources.budget import OverPixelBudget
from biomedsynth.sources.folder import read_rgb
from biomedsynth.sources.pcam import pcam_tiles
from biomedsynth.sources.scans import read_scan
from biomedsynth.sources.wsi import list_slides, write_pyramidal_tiff
from test_ingest_histology import _tissue_slide
from test_ingest_xray import CODE_ROOT, RAW, synthetic_chest, xray_project
from test_scans import BUDGET, write_dicom
from test_sources import pcam_tree


def test_every_skipped_scan_counted_by_reason_over_worker_processes(tmp_path, monkeypatch):
    p = xray_project(tmp_path, monkeypatch, ["a.png", "bomb.png", "bomb_dicom.dcm", "broken.png", "gone.png", "b.tif"],
                     "ingest.max_pixels=200000", "ingest.workers=2")
    Image.fromarray(synthetic_chest(seed=1)[0]).save(RAW / "a.png")      # 400 x 360 = 144,000 px
    tifffile.imwrite(RAW / "b.tif", synthetic_chest(seed=2)[0])
    Image.fromarray(np.zeros((500, 500), np.uint8)).save(RAW / "bomb.png")  # 250,000 px in a 1 KB file
    write_dicom(RAW / "bomb_dicom.dcm", np.zeros((500, 500), np.uint16))
    (RAW / "broken.png").write_bytes((RAW / "a.png").read_bytes()[:300])
    ingest("xray", p, Path("data/interim/xray"), Path("xray.json"))
    summary = json.loads(Path("xray.json").read_text())
    assert summary["skipped_by_reason"] == {"missing_image": 1, "over_pixel_budget": 2, "unreadable": 1}
    assert summary["written"] == 2 and summary["unreadable"] == 1 and summary["listing_skipped"] == {"missing_image": 1}
    # which scans: in the DVC-cached details beside the images, never in the git-tracked metrics
    assert "unreadable_examples" not in summary and summary["details"].startswith("data/interim/xray/ingest.json")
    assert len(json.loads(Path("data/interim/xray/ingest.json").read_text())["unreadable_examples"]) == 3


def _spy(monkeypatch, owner, name: str, calls: list) -> None:
    """Record each call of owner.name (a decoder) in `calls`."""
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(name) or real(*a, **k))


IMAGE = np.zeros((300, 200), np.uint16)  # 60,000 px
WRITERS = {
    "png": (lambda path: Image.fromarray(IMAGE).save(path), ImageFile.ImageFile, "load"),
    "tif": (lambda path: tifffile.imwrite(path, IMAGE, compression="zlib"), tifffile.TiffPage, "asarray"),
    "dcm": (lambda path: write_dicom(path, IMAGE), scans, "pixel_array"),
}


@pytest.mark.parametrize("kind", WRITERS)
def test_read_scan_checks_the_size_its_header_declares_before_decoding(tmp_path, monkeypatch, kind):
    write, decoder_owner, decoder = WRITERS[kind]
    path = tmp_path / f"scan.{kind}"
    write(path)
    calls = []
    _spy(monkeypatch, decoder_owner, decoder, calls)
    with pytest.raises(OverPixelBudget, match=f"scan.{kind}.*over the pixel budget"):
        read_scan(path, 59_999)
    assert calls == []
    assert read_scan(path, 60_000).shape == (300, 200) and calls


@pytest.mark.parametrize("syntax, encode", [
    (JPEGLosslessSV1, imagecodecs.ljpeg_encode),  # decoded by imagecodecs
    (JPEG2000Lossless, lambda f: imagecodecs.jpeg2k_encode(f, codecformat="J2K", reversible=True)),  # by PIL first
])
def test_compressed_frame_larger_than_rows_x_columns_is_not_decoded(tmp_path, monkeypatch, syntax, encode):
    write_dicom(tmp_path / "c.dcm", IMAGE[None], syntax=syntax, encode=encode)
    ds = pydicom.dcmread(tmp_path / "c.dcm")
    ds.Rows = ds.Columns = 8  # the header lies: 64 px, the frame holds 60,000
    ds.save_as(tmp_path / "c.dcm")
    calls = []
    _spy(monkeypatch, imagecodecs, "imread", calls)
    _spy(monkeypatch, ImageFile.ImageFile, "load", calls)
    with pytest.raises(OverPixelBudget, match=r"c\.dcm \(compressed frame\): 200 x 300 = 60,000 pixels"):
        read_scan(tmp_path / "c.dcm", 10_000)
    assert calls == []


def test_deflated_dicom_is_not_inflated_past_the_budget(tmp_path, monkeypatch):
    frames = np.zeros((6, 100, 100), np.uint16)  # 120 KB inflated, a few hundred bytes deflated
    write_dicom(tmp_path / "d.dcm", frames, syntax=DeflatedExplicitVRLittleEndian)
    assert (tmp_path / "d.dcm").stat().st_size < 2000
    calls = []
    _spy(monkeypatch, pydicom, "dcmread", calls)
    with pytest.raises(OverPixelBudget, match="deflated DICOM inflates to over 96,000 bytes"):
        read_scan(tmp_path / "d.dcm", 12_000)  # Rows x Columns = 10,000 fits, the data does not
    assert calls == []
    assert read_scan(tmp_path / "d.dcm", 60_000).shape == (100, 100)


def test_deflated_dicom_among_slides_is_left_out_unread(tmp_path, monkeypatch):
    write_pyramidal_tiff(tmp_path / "normal_001.tif", _tissue_slide(np.random.default_rng(0)))
    write_dicom(tmp_path / "scan.dcm", np.zeros((6, 100, 100), np.uint16), syntax=DeflatedExplicitVRLittleEndian)
    calls, unsupported = [], []
    _spy(monkeypatch, pydicom, "dcmread", calls)
    assert [r.slide_id for r in list_slides(tmp_path, unsupported=unsupported)] == ["normal_001"]
    assert unsupported == [f"{tmp_path / 'scan.dcm'}: deflated DICOM, not a whole-slide image (left unread)"]
    assert calls == []


def test_tiff_tile_larger_than_the_budget_is_not_decoded(tmp_path, monkeypatch):
    tifffile.imwrite(tmp_path / "t.tif", np.zeros((16, 16), np.uint8), tile=(512, 512), compression="zlib")
    calls = []
    _spy(monkeypatch, tifffile.TiffPage, "asarray", calls)
    with pytest.raises(OverPixelBudget, match=r"t\.tif \(one tile\): 512 x 512"):
        read_scan(tmp_path / "t.tif", 1000)
    assert calls == []


def test_pil_own_bomb_warning_and_error_become_the_budget_skip(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((300, 200, 3), np.uint8)).save(tmp_path / "t.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's own limit, far below the budget
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning fails the test
        assert read_rgb(tmp_path / "t.png", 60_000).shape == (300, 200, 3)  # the budget decides, not PIL
        for budget in (59_999, 20_000):  # PIL warns above its limit and raises above twice it: both skipped
            with pytest.raises(OverPixelBudget, match=r"t\.png: over the pixel budget \(ingest.max_pixels = "):
                read_rgb(tmp_path / "t.png", budget)
            with pytest.raises(OverPixelBudget):
                read_scan(tmp_path / "t.png", budget)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_tile_over_the_budget_skipped_and_counted_with_the_listing_skips(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiles = Path("data/raw/histology")
    for name, side in (("normal/s1_0.png", 40), ("tumor/s2_0.png", 40), ("tumor/s3_0.png", 100)):
        (tiles / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((side, side, 3), 200, np.uint8)).save(tiles / name)
    (tiles / "tumor" / "s4_0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tiles / "tumor" / "notes.txt").write_text("hi")
    shutil.copy(CODE_ROOT / "params.yaml", "params.yaml")
    set_params(["sources.histology.format=tiles", f"sources.histology.root={tiles}",
                r"sources.histology.slide_id=^(?P<slide>s\d+)_", "ingest.histology.tile_size=32",
                "ingest.max_pixels=4096"])
    ingest("histology", load_params(), Path("data/interim/histology"), Path("histology.json"))
    summary = json.loads(Path("histology.json").read_text())
    assert summary["skipped_by_reason"] == {"over_pixel_budget": 1, "unreadable": 1, "unsupported_format": 1}
    assert summary["written"] == 2


def _write_uniform_slide(path: Path, side: int, rgb: tuple[int, int, int], tile: int = 256) -> None:
    """A tiled pyramidal TIFF, side x side px of one colour, written from one compressed tile: a slide
    bigger than the budget in a fraction of a second and a few MB."""
    chunk = zlib.compress(np.full((tile, tile, 3), rgb, np.uint8).tobytes())
    with tifffile.TiffWriter(path) as tw:
        for k in range(math.ceil(math.log2(side / tile)) + 1):
            s = side >> k
            tw.write((chunk for _ in range(math.ceil(s / tile) ** 2)), shape=(s, s, 3), dtype=np.uint8,
                     tile=(tile, tile), compression="zlib", photometric="rgb", subfiletype=1 if k else 0, metadata=None)


def test_slides_read_region_by_region_and_only_what_one_read_decodes_is_limited(tmp_path, monkeypatch):
    rgb = _tissue_slide(np.random.default_rng(0))  # 1024 x 768 = 786,432 px
    write_pyramidal_tiff(tmp_path / "normal_001.tif", rgb)              # levels to 256 x 192: read
    write_pyramidal_tiff(tmp_path / "normal_002.tif", rgb, levels=1)    # one level, read whole for the mask
    write_pyramidal_tiff(tmp_path / "normal_003.tif", rgb, tile=512)    # 512 x 512 px stored tiles
    _write_uniform_slide(tmp_path / "normal_004.tif", 9000, (235, 165, 200))  # 81 M px of tissue
    reads, read_region = [], openslide.OpenSlide.read_region

    def spy(slide, location, level, size):
        reads.append(size[0] * size[1])
        return read_region(slide, location, level, size)

    monkeypatch.setattr(openslide.OpenSlide, "read_region", spy)
    slides = [SlideRecord(tmp_path / f"normal_00{i}.tif", f"normal_00{i}", "normal", None) for i in (1, 2, 3)]
    s = ingest_histology(slides, None, tmp_path / "set", tile_size=64, level=0, min_tissue=0.5, tiles_per_slide=5,
                         tumor_label="slide", seed=0, max_pixels=200_000)
    assert s["skipped_by_reason"] == {"over_pixel_budget": 2} and list(s["per_slide"]) == ["normal_001"]
    assert s["skipped_slides"]["normal_002"].startswith(f"over_pixel_budget: {tmp_path / 'normal_002.tif'} (level 0, "
                                                        "read whole for the tissue mask): 1024 x 768")
    assert "(a tile stored at level 1): 512 x 512" in s["skipped_slides"]["normal_003"]
    assert max(reads) <= 200_000
    # a slide far bigger than the budget (a Camelyon16 slide is ~100k x 200k px) is read as usual
    big = SlideRecord(tmp_path / "normal_004.tif", "normal_004", "normal", None)
    s = ingest_histology([big], None, tmp_path / "big", tile_size=256, level=0, min_tissue=0.5, tiles_per_slide=5,
                         tumor_label="slide", seed=0, max_pixels=BUDGET)
    assert s["skipped_by_reason"] == {} and s["per_slide"]["normal_004"]["kept"] == 5
    assert max(reads) < 9000 ** 2


def test_pcam_reads_at_most_the_budget_at_once_and_refuses_tiles_over_it(tmp_path, monkeypatch):
    pcam_tree(tmp_path, "train", 7, meta=True)
    rows_read, getitem = [], h5py.Dataset.__getitem__

    def spy(dataset, key):
        out = getitem(dataset, key)
        rows_read.append(len(out))
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    tiles, _ = pcam_tiles(tmp_path, allow_tile_level_split=False, max_pixels=2 * 96 * 96, splits=("train",))
    assert len(list(tiles)) == 7 and max(rows_read) == 2  # two 96 x 96 tiles a read, not 1024
    with pytest.raises(ValueError, match=r"tiles of 96 x 96 px are over the pixel budget"):
        pcam_tiles(tmp_path, allow_tile_level_split=False, max_pixels=96 * 96 - 1, splits=("train",))


def write_chunk_bomb(root: Path, tiles: int) -> None:
    """PatchCamelyon's train split whose `x` is one gzip chunk of `tiles` zero tiles: a file of a few MB that
    inflates whole (tiles x 27,648 bytes) on the first read of any tile. Written chunk-compressed by zlib (HDF5's
    gzip filter) block by block, so the test never holds the inflated chunk."""
    shape = (tiles, 96, 96, 3)
    deflate, block = zlib.compressobj(1), bytes(100 * 96 * 96 * 3)
    chunk = b"".join([deflate.compress(block) for _ in range(tiles // 100)] + [deflate.flush()])
    with h5py.File(root / "camelyonpatch_level_2_split_train_x.h5", "w") as f:
        f.create_dataset("x", shape, np.uint8, chunks=shape, compression="gzip").id.write_direct_chunk((0,) * 4, chunk)
    with h5py.File(root / "camelyonpatch_level_2_split_train_y.h5", "w") as f:
        f.create_dataset("y", data=np.zeros((tiles, 1, 1, 1), np.uint8))


# the peak is VmHWM, this process's own: getrusage's ru_maxrss keeps the forking pytest process's peak
PCAM_PEAK = """
import json, re, sys
from pathlib import Path
from biomedsynth.sources.pcam import pcam_tiles
tiles, skipped = pcam_tiles(sys.argv[1], True, int(sys.argv[2]), splits=("train", "valid"))
read = sum(1 for _ in tiles)
peak_kib = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1])
print(json.dumps({"read": read, "skipped": dict(skipped), "peak_mib": peak_kib / 1024}))
"""


def test_a_pcam_chunk_bomb_is_skipped_and_counted_under_300_mib(tmp_path):
    """The issue's bomb, scaled to a test: a 2.4 MB file whose one chunk inflates to 553 MB (184 M pixels, the
    budget is 67 M). The chunk's inflated size is checked before any read; the other split is read."""
    write_chunk_bomb(tmp_path, 20_000)
    pcam_tree(tmp_path, "valid", 5, meta=False)
    assert (tmp_path / "camelyonpatch_level_2_split_train_x.h5").stat().st_size < 3e6
    env = {**os.environ, "PYTHONPATH": str(Path(biomedsynth.__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", PCAM_PEAK, str(tmp_path), str(BUDGET)], env=env, check=True,
                         capture_output=True, text=True).stdout
    got = json.loads(out)
    assert got["read"] == 5 and got["skipped"] == {"over_pixel_budget": 1}, got
    assert got["peak_mib"] < 300, got


SCAN_PEAK = """
import json, re, sys
from pathlib import Path
from biomedsynth.ingest.xray import _process_chunk
from biomedsynth.sources import ScanRecord
done = _process_chunk([ScanRecord(Path(sys.argv[1]), f"a{i}", "p", "F", 40, True) for i in range(2)], 64,
                      "central", 5.0, 95.0, "pad", int(sys.argv[2]))
peak_kib = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1])
print(json.dumps({"status": [d[1] for d in done], "shape": done[0][0].shape, "peak_mib": peak_kib / 1024}))
"""
SCAN_AT_BUDGET_MIB = 750  # the README's and params.yaml's figure (measured 683 MiB, 160 of it Python and libraries)


def test_a_scan_at_the_pixel_budget_costs_a_worker_what_the_readme_says(tmp_path):
    """Two 16-bit 8192 x 8192 PNGs, the budget's largest scans, decoded and preprocessed as an ingest worker does:
    the process peaks under SCAN_AT_BUDGET_MIB (before: 996 MiB, where params.yaml said ~270 MB per worker)."""
    chest, _ = synthetic_chest(512, 512)
    Image.fromarray(np.repeat(np.repeat(chest, 16, 0), 16, 1)).save(tmp_path / "big.png", compress_level=1)
    env = {**os.environ, "PYTHONPATH": str(Path(biomedsynth.__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", SCAN_PEAK, str(tmp_path / "big.png"), str(BUDGET)], env=env,
                         check=True, capture_output=True, text=True).stdout
    got = json.loads(out)
    assert got["status"] == ["ok", "ok"] and got["shape"] == [64, 64], got
    assert got["peak_mib"] < SCAN_AT_BUDGET_MIB, got


def test_budget_knob_checked_and_a_stage_dependency(tmp_path):
    shutil.copy(CODE_ROOT / "params.yaml", tmp_path / "params.yaml")
    with pytest.raises(ParamsError) as err:
        set_params(["ingest.histology.tile_size=256", "ingest.max_pixels=60000"], tmp_path / "params.yaml")
    assert str(err.value) == ("set: ingest.max_pixels = 60000: below one histology tile "
                              "(ingest.histology.tile_size^2 = 65536)")
    stage = yaml.safe_load((CODE_ROOT / "dvc.yaml").read_text())["stages"]["ingest"]
    assert "ingest.max_pixels" in stage.get("do", stage)["params"]  # a foreach stage, or a matrix one
