import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from biomedsynth.cli import app
from biomedsynth.ingest import ingest
from biomedsynth.ingest.histology import TILE_LEVEL_WARNING, ingest_histology, tissue_mask
from biomedsynth.params import load_params
from biomedsynth.params_edit import set_params
from biomedsynth.sources import SlideRecord, Tile
from biomedsynth.sources.wsi import write_annotation_xml, write_pyramidal_tiff
from biomedsynth.store import ImageSet
from test_scans import BUDGET, write_dicom
from test_wsi import write_dicom_wsi

ROOT = Path(__file__).resolve().parents[1]
W, H = 1024, 768  # tissue fills x < 512, glass the rest


def _glass(rng, h, w):
    return np.clip(248 + rng.normal(0, 2, (h, w, 3)), 0, 255).astype(np.uint8)


def _tissue_slide(rng):
    rgb = _glass(rng, H, W)
    pink = np.array([235, 165, 200]) + rng.normal(0, 2, (H, W // 2, 3))
    dots = np.repeat(np.repeat(rng.random((H // 4, W // 8)) < 0.2, 4, 0), 4, 1)
    pink[dots] = [90, 60, 150]  # 4 px nuclei: texture that JPEG keeps well
    rgb[:, : W // 2] = np.clip(pink, 0, 255)
    return rgb


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    rng = np.random.default_rng(0)
    rgb = _tissue_slide(rng)
    for name in ("normal_001", "tumor_001", "tumor_002"):
        write_pyramidal_tiff(d / f"{name}.tif", rgb, compression="zlib")  # lossless: tiles compare exactly
    # tumour: the left 256 px, less an excluded 64 px square at x 64-128, y 128-192 (one tile)
    write_annotation_xml(d / "tumor_001.xml", [np.array([[-10, -10], [256, -10], [256, 778], [-10, 778]])],
                         [np.array([[64, 128], [128, 128], [128, 192], [64, 192]])])
    write_pyramidal_tiff(d / "twolevel_001.tif", rgb, levels=2)
    write_pyramidal_tiff(d / "glass_001.tif", _glass(rng, 512, 512))
    (d / "noise_001.tif").write_bytes(rng.bytes(4096))
    (d / "cut_001.tif").write_bytes((d / "normal_001.tif").read_bytes()[:60000])
    rec = {
        "normal": SlideRecord(d / "normal_001.tif", "normal_001", "normal", None),
        "tumor": SlideRecord(d / "tumor_001.tif", "tumor_001", "tumor", d / "tumor_001.xml"),
        "tumor_no_xml": SlideRecord(d / "tumor_002.tif", "tumor_002", "tumor", None),
        "two_levels": SlideRecord(d / "twolevel_001.tif", "twolevel_001", "normal", None),
        "noise": SlideRecord(d / "noise_001.tif", "noise_001", "normal", None),
        "cut": SlideRecord(d / "cut_001.tif", "cut_001", "normal", None),
        "glass": SlideRecord(d / "glass_001.tif", "glass_001", "normal", None),
    }
    return rec, rgb


def _ingest(slides, out, tiles=None, **kw):
    args = dict(tile_size=64, level=0, min_tissue=0.5, tiles_per_slide=1000, tumor_label="slide", seed=0,
                max_pixels=BUDGET)
    return ingest_histology(slides, tiles, out, **{**args, **kw})


def test_tissue_mask_finds_tissue_not_glass_dust_or_ink():
    rng = np.random.default_rng(1)
    img = _glass(rng, 200, 300)
    yy, xx = np.mgrid[:200, :300]
    disc = (yy - 100) ** 2 + (xx - 100) ** 2 < 50 ** 2
    img[disc] = [200, 120, 180]
    img[disc & (rng.random((200, 300)) < 0.3)] = [90, 60, 150]
    for y, x in rng.integers(10, 190, (15, 2)):
        img[y:y + 3, 200 + x % 90:203 + x % 90] = 185  # grey dust
    img[20, 160:290] = 170                             # a lint fibre
    img[150:175, 240:270] = [60, 160, 80]              # green marker
    img[185:187, 170:172] = [200, 120, 180]            # a stained speck, too small for tissue
    mask = tissue_mask(img)
    assert (mask & disc).sum() / (mask | disc).sum() > 0.95
    assert not mask[:, 150:].any()
    assert not tissue_mask(_glass(rng, 200, 300)).any()


def test_ingest_keeps_tissue_tiles_with_slide_labels(slides, tmp_path):
    rec, rgb = slides
    s = _ingest([rec["normal"], rec["tumor"]], tmp_path / "set")
    assert s["written"] == 2 * 96 and s["per_label"] == {"normal": 96, "tumor": 96}  # 8 x 12 tissue tiles each
    assert s["grid_tiles"] == 2 * 16 * 12 and s["background_tiles"] == 2 * 96
    assert s["slides_read"] == 2 and s["slides_skipped"] == {}
    assert s["per_slide"] == {"normal_001": {"grid": 192, "background": 96, "kept": 96},
                              "tumor_001": {"grid": 192, "background": 96, "kept": 96}}
    assert s["split_unit"] == "slide" and s["warnings"] == []
    ds = ImageSet(tmp_path / "set")
    m = ds.meta
    assert list(m.columns) == ["image_id", "patient_id", "label", "slide_label", "x", "y", "level",
                               "tissue_fraction", "source"]
    assert (m["x"].astype(int) < 512).all() and (m["x"].astype(int) % 64 == 0).all()
    assert (m["tissue_fraction"].astype(float) >= 0.5).all() and m["image_id"].is_unique
    assert ((m["patient_id"] == "tumor_001") == (m["label"] == "tumor")).all()
    for i in (0, 50, 150):
        x, y = int(m["x"][i]), int(m["y"][i])
        assert np.array_equal(ds[i], rgb[y:y + 64, x:x + 64])


def test_annotation_labels_follow_polygons_and_exclusions(slides, tmp_path):
    rec, _ = slides
    s = _ingest([rec["normal"], rec["tumor"]], tmp_path / "set", tumor_label="annotation")
    assert s["per_label"] == {"normal": 96 + 49, "tumor": 47}
    m = ImageSet(tmp_path / "set").meta
    t = m[m["patient_id"] == "tumor_001"]
    x, y = t["x"].astype(int), t["y"].astype(int)
    expect = (x < 256) & ~((x == 64) & (y == 128))
    assert ((t["label"] == "tumor") == expect).all() and (t["slide_label"] == "tumor").all()
    assert (m[m["patient_id"] == "normal_001"]["label"] == "normal").all()


def test_tiles_per_slide_is_a_seeded_sample(slides, tmp_path):
    rec, _ = slides
    ids = []
    for seed, out in ((0, "a"), (0, "b"), (1, "c")):
        s = _ingest([rec["normal"], rec["tumor"]], tmp_path / out, tiles_per_slide=10, seed=seed)
        assert s["written"] == 20 and s["per_slide"]["tumor_001"] == {"grid": 192, "background": 96, "kept": 10}
        ids.append(list(ImageSet(tmp_path / out).meta["image_id"]))
    assert ids[0] == ids[1] and ids[0] != ids[2]


def test_tiles_per_slide_counts_each_label_separately(slides, tmp_path):
    rec, _ = slides
    _ingest([rec["normal"], rec["tumor"]], tmp_path / "set", tiles_per_slide=7, tumor_label="annotation")
    m = ImageSet(tmp_path / "set").meta
    per = m.groupby(["patient_id", "label"]).size().to_dict()
    assert per == {("normal_001", "normal"): 7, ("tumor_001", "normal"): 7, ("tumor_001", "tumor"): 7}


def test_level_one_tiles(slides, tmp_path):
    rec, rgb = slides
    s = _ingest([rec["normal"]], tmp_path / "set", tile_size=32, level=1)
    assert s["written"] == 96  # the same 64 px squares of level 0, at half resolution
    ds = ImageSet(tmp_path / "set")
    m = ds.meta
    assert (m["level"].astype(int) == 1).all() and (m["x"].astype(int) % 64 == 0).all()
    x, y = int(m["x"][5]), int(m["y"][5])
    half = (rgb[y:y + 64, x:x + 64].astype(int).reshape(32, 2, 32, 2, 3).sum((1, 3)) + 2) // 4
    assert np.array_equal(ds[5], half)


def test_bad_slides_are_skipped_and_counted(slides, tmp_path):
    rec, _ = slides
    s = _ingest([rec["noise"], rec["normal"], rec["cut"], rec["tumor_no_xml"], rec["tumor"]], tmp_path / "set",
                tumor_label="annotation")
    assert s["slides_read"] == 2 and s["written"] == 2 * 96
    assert s["slides_skipped"] == {"unreadable": 2, "no_annotation": 1}
    assert sorted(s["skipped_slides"]) == ["cut_001", "noise_001", "tumor_002"]
    assert "noise_001.tif" in s["skipped_slides"]["noise_001"]


def test_slide_without_tissue_gives_no_tiles(slides, tmp_path):
    rec, _ = slides
    s = _ingest([rec["glass"], rec["normal"]], tmp_path / "set")
    assert s["slides_read"] == 2 and s["written"] == 96 and s["slides_without_tissue_tiles"] == ["glass_001"]
    assert s["per_slide"]["glass_001"] == {"grid": 64, "background": 64, "kept": 0}
    with pytest.raises(ValueError, match=r"wrote no tiles \(no tiles with tissue_fraction >= 0.5\)"):
        _ingest([rec["glass"]], tmp_path / "none")


def test_level_beyond_the_pyramid_is_a_clear_error(slides, tmp_path):
    rec, _ = slides
    s = _ingest([rec["two_levels"], rec["normal"]], tmp_path / "set", tile_size=16, level=2)
    assert s["slides_skipped"] == {"no_such_level": 1} and s["slides_read"] == 1
    assert "level 2 requested, the slide has 2 level(s) (0-1)" in s["skipped_slides"]["twolevel_001"]
    with pytest.raises(ValueError, match="wrote no tiles .*level 2 requested"):
        _ingest([rec["two_levels"]], tmp_path / "none", tile_size=16, level=2)
    assert not (tmp_path / "none").exists()


def test_ready_cut_tiles(tmp_path):
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    rgba = np.concatenate([img, np.full((96, 96, 1), 255, np.uint8)], 2)
    tiles = [Tile(img, "s1", "tumor", "a.png"), Tile(rgba, "s1", "normal", "b.png"),
             Tile(img[:64, :80], "s2", "normal", "c.png"), Tile(img, "s2", "benign", "d.png")]
    s = _ingest(None, tmp_path / "set", tiles=iter(tiles))
    assert s["tiles_in"] == 4 and s["written"] == 3 and s["tiles_skipped"] == {"bad_label": 1}
    assert s["per_slide"] == {"s1": {"kept": 2}, "s2": {"kept": 1}} and s["split_unit"] == "slide"
    ds = ImageSet(tmp_path / "set")
    assert ds.shape == (64, 64, 3)
    m = ds.meta
    assert list(m["label"]) == ["tumor", "normal", "normal"] and list(m["patient_id"]) == ["s1", "s1", "s2"]
    assert (m[["x", "y", "level"]].astype(int) == -1).all().all()
    assert np.array_equal(ds[2], img[:64, 8:72])  # 64x80: centre-cropped to 64x64, no resize
    assert abs(ds[0].astype(float).mean() - img.mean()) < 3


def _tile(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def test_tiles_without_slide_ids_are_split_by_tile_with_a_warning(tmp_path):
    tiles = [Tile(_tile(i), None, "normal", f"n{i}.png") for i in range(3)] + [Tile(_tile(9), "s1", "tumor", "t.png")]
    s = _ingest(None, tmp_path / "set", tiles=iter(tiles), tile_size=32)
    assert s["split_unit"] == "tile" and s["warnings"] == [TILE_LEVEL_WARNING]
    assert TILE_LEVEL_WARNING == "split by tile: slides may leak between train and test"
    assert list(ImageSet(tmp_path / "set").meta["patient_id"]) == ["tile_0", "tile_1", "tile_2", "s1"]
    assert s["per_slide"] == {"s1": {"kept": 1}}


def test_same_pixels_twice_in_a_slide_are_skipped_and_counted(tmp_path):
    blank = np.full((32, 32, 3), 240, np.uint8)  # one colour: no identity, never a duplicate
    tiles = [Tile(_tile(1), "s1", "normal", "a.png"), Tile(_tile(1), "s1", "normal", "a_copy.png"),
             Tile(_tile(2), "s2", "normal", "b.png"), Tile(blank, "s1", "normal", "w1.png"),
             Tile(blank, "s2", "normal", "w2.png")]
    s = _ingest(None, tmp_path / "set", tiles=iter(tiles), tile_size=32)
    assert s["written"] == 4 and s["tiles_skipped"] == {"duplicate_pixels": 1}
    assert list(ImageSet(tmp_path / "set").meta["source"]) == ["a.png", "b.png", "w1.png", "w2.png"]


def test_same_pixels_under_two_slides_stop_the_ingest_naming_both(tmp_path):
    tiles = [Tile(_tile(1), "tumor_001", "tumor", "tumor/a.png"), Tile(_tile(2), "tumor_001", "tumor", "tumor/b.png"),
             Tile(_tile(1), "tumor_002", "tumor", "tumor/c.png")]
    with pytest.raises(ValueError) as err:
        _ingest(None, tmp_path / "set", tiles=iter(tiles), tile_size=32)
    message = str(err.value)
    assert "\n" not in message and message.startswith("identical pixels under two slides: "
                                                      "'tumor_001' (tumor/a.png) and 'tumor_002' (tumor/c.png)")
    assert not (tmp_path / "set").exists()


def _tile_folder_project(tmp_path: Path) -> Path:
    """A project folder whose params.yaml reads a tile folder of Camelyon16-named tiles without slides.csv."""
    rng = np.random.default_rng(0)
    for name in ("normal/normal_001_x0_y0.png", "normal/normal_001_x64_y0.png", "tumor/tumor_001_x0_y0.png",
                 "tumor/tumor_002_x0_y0.png"):
        (tmp_path / "tiles" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "tiles" / name)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    set_params(["sources.histology.format=tiles", "sources.histology.root=tiles"], tmp_path / "params.yaml")
    return tmp_path / "params.yaml"


def test_cli_refuses_tiles_without_slide_ids_in_one_line_then_splits_by_tile_when_allowed(tmp_path, monkeypatch):
    params = _tile_folder_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["ingest", "histology", "--params", str(params)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("biomedsynth: tiles: tiles have no slide ids")
    assert "allow_tile_level_split=true" in lines[0]
    assert not (tmp_path / "metrics").exists()

    set_params(["sources.histology.allow_tile_level_split=true"], params)
    result = CliRunner().invoke(app, ["ingest", "histology", "--params", str(params)])
    assert result.exit_code == 0 and f"WARNING ingest@histology: {TILE_LEVEL_WARNING}\n" in result.output  # console
    metrics = json.loads((tmp_path / "metrics" / "ingest" / "histology.json").read_text())
    assert metrics["split_unit"] == "tile" and metrics["warnings"] == [TILE_LEVEL_WARNING]

    set_params(["sources.histology.slide_id=camelyon16"], params)  # real ids: split by slide, no warning
    assert CliRunner().invoke(app, ["ingest", "histology", "--params", str(params)]).exit_code == 0
    metrics = json.loads((tmp_path / "metrics" / "ingest" / "histology.json").read_text())
    assert metrics["split_unit"] == "slide" and metrics["warnings"] == []
    assert metrics["tiles_kept_per_slide"] == {"slides": 3, "min": 1, "median": 1.0, "max": 2}  # no slide id in git
    details = json.loads((tmp_path / "data" / "interim" / "histology" / "ingest.json").read_text())
    assert details["per_slide"] == {"normal_001": {"kept": 2}, "tumor_001": {"kept": 1}, "tumor_002": {"kept": 1}}


def test_dicom_slides_are_cut_and_other_dicom_files_counted_by_name(tmp_path):
    rgb = _tissue_slide(np.random.default_rng(3))
    write_dicom_wsi(tmp_path / "raw" / "normal_004", rgb, levels=3)
    (tmp_path / "raw" / "sr").mkdir()
    write_dicom(tmp_path / "raw" / "sr" / "report.dcm", np.zeros((4, 4), np.uint16))
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    set_params([f"sources.histology.root={tmp_path / 'raw'}", "ingest.histology.tumor_label=slide",
                "ingest.histology.tiles_per_slide=1000"], tmp_path / "params.yaml")
    s = ingest("histology", load_params(tmp_path / "params.yaml"), tmp_path / "set", tmp_path / "histology.json")
    assert s["per_slide"] == {"normal_004": {"grid": 192, "background": 96, "kept": 96}}
    assert s["listing_skipped"] == {"unsupported": 1}
    assert s["unsupported_files"] == [f"{tmp_path / 'raw' / 'sr' / 'report.dcm'}: DICOM of SOP class "
                                      "1.2.840.10008.5.1.4.1.1.7, not a whole-slide image"]
    assert json.loads((tmp_path / "set" / "ingest.json").read_text())["unsupported_files"] == s["unsupported_files"]
    assert json.loads((tmp_path / "histology.json").read_text())["unsupported_files"] == 1  # counted, not named
    ds = ImageSet(tmp_path / "set")
    x, y = int(ds.meta["x"][7]), int(ds.meta["y"][7])
    assert np.array_equal(ds[7], rgb[y:y + 64, x:x + 64])  # uncompressed DICOM: the very pixels
