import json
import math
import shutil
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

import biomedsynth
from biomedsynth.ingest import ingest
from biomedsynth.ingest.xray import fit_square, find_lungs, ingest_xray, lung_hull, normalise, preprocess_scan
from biomedsynth.params import load_params
from biomedsynth.params_edit import set_params
from biomedsynth.sources import ScanRecord
from biomedsynth.store import ImageSet
from test_scans import BUDGET


def synthetic_chest(h=400, w=360, scale=1.0, seed=0):
    """A PA chest whose lungs we know: air 0.05, body ellipse 0.7, two lung ellipses 0.3, spine 0.9,
    noise; uint16 like a detector. `scale` < 1 shrinks the patient inside more air.
    Returns (scan, true lung mask)."""
    rng = np.random.default_rng(seed)
    y, x = (np.mgrid[:h, :w] / np.array([h, w])[:, None, None] - 0.5) / scale + 0.5
    ellipse = lambda cy, cx, ry, rx: ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
    body = ellipse(0.5, 0.5, 0.45, 0.4)
    lungs = ellipse(0.45, 0.32, 0.22, 0.12) | ellipse(0.45, 0.68, 0.22, 0.12)
    img = np.full((h, w), 0.05) + 0.65 * body
    img[lungs] = 0.3
    img[body & (abs(x - 0.5) < 0.03)] = 0.9
    img += rng.normal(0, 0.02, img.shape)
    return (img * 4000).clip(0, 65535).astype(np.uint16), lungs


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize("h, w, scale", [(400, 360, 1.0), (300, 420, 1.0), (500, 500, 0.6), (128, 112, 1.0)])
def test_find_lungs_matches_known_lungs(h, w, scale):
    img, truth = synthetic_chest(h, w, scale)
    found = find_lungs(img.astype(np.float32))
    assert found is not None and found.shape == img.shape and found.dtype == bool
    assert iou(found, truth) > 0.8


def test_find_lungs_merged_or_open_to_the_air():
    img, truth = synthetic_chest()
    h, w = img.shape
    opened = img.copy()
    opened[int(0.44 * h):int(0.48 * h), : int(0.3 * w)] = 200  # a channel from the right lung to the outside
    found = find_lungs(opened.astype(np.float32))
    assert found is not None and iou(found, truth) > 0.8
    assert iou(found[:, : w // 2], truth[:, : w // 2]) > 0.8 and iou(found[:, w // 2:], truth[:, w // 2:]) > 0.8
    bridged, both = img.copy(), truth.copy()
    bridged[int(0.4 * h):int(0.5 * h), int(0.3 * w):int(0.7 * w)] = 1200  # both lungs one dark field
    both[int(0.4 * h):int(0.5 * h), int(0.3 * w):int(0.7 * w)] = True
    found = find_lungs(bridged.astype(np.float32))
    assert found is not None and iou(found, both) > 0.8


def test_find_lungs_none_without_lung_fields():
    rng = np.random.default_rng(1)
    assert find_lungs(np.full((300, 280), 1234.0, np.float32)) is None            # uniform
    assert find_lungs(rng.normal(size=(300, 280)).astype(np.float32)) is None     # white noise
    no_lungs, truth = synthetic_chest()
    no_lungs[truth] = 2800                                                          # lungs as dense as the body
    assert find_lungs(no_lungs.astype(np.float32)) is None


def test_lung_hull_is_the_convex_hull():
    mask = np.zeros((40, 60), bool)
    mask[10:20, 5:15] = mask[10:20, 40:50] = True
    hull = lung_hull(mask)
    expected = np.zeros_like(mask)
    expected[10:20, 5:50] = True
    np.testing.assert_array_equal(hull, expected)


def test_normalise_maps_region_percentiles_to_0_and_255():
    img = np.full((30, 40), 1000.0, np.float32)  # outside the region: far brighter -> clipped to 255
    img[:3, :] = -50.0                           # far darker -> clipped to 0
    region = np.zeros(img.shape, bool)
    region[10:20, 10:30] = True
    vals = np.arange(200, dtype=np.float32) * 2.0 + 100.0  # 100, 102, ..., 498
    img[region] = np.random.default_rng(0).permutation(vals)
    p5, p95 = np.percentile(vals, [5, 95])
    probe = img.copy()
    probe[0, 0], probe[0, 1], probe[0, 2] = p5, p95, p5 + 0.25 * (p95 - p5)
    out = normalise(probe, region, 5.0, 95.0)
    assert out.dtype == np.uint8 and out[0, 0] == 0 and out[0, 1] == 255 and out[0, 2] == 64  # 63.75 rounded
    assert out[29, 39] == 255 and out[1, 1] == 0
    inside = out[region]
    assert (inside[img[region] <= p5] == 0).all() and (inside[img[region] >= p95] == 255).all()
    assert 0.85 < ((inside > 0) & (inside < 255)).mean() < 0.95  # ~90% of the region keeps its contrast
    with pytest.raises(ValueError):
        normalise(img, region, 95.0, 5.0)
    with pytest.raises(ValueError):
        normalise(img, np.zeros_like(region), 5.0, 95.0)


def test_preprocess_scan_statuses():
    img, truth = synthetic_chest()
    out, status = preprocess_scan(img.astype(np.float32), 64, "skip", 5.0, 95.0, fit="pad")
    assert status == "ok" and out.shape == (64, 64) and out.dtype == np.uint8
    # the hull's darkest 5% (lung) is black, the spine between the lungs saturates
    assert out[29, 20] < 40 and out[29, 44] < 40 and out[29, 32] > 215
    flat = np.full((200, 180), 7.0, np.float32)
    assert preprocess_scan(flat, 32, "skip", fit="pad") == (None, "skipped")
    ramp = np.tile(np.linspace(0, 1, 200, dtype=np.float32), (200, 1))  # no lungs; central box = 0.25..0.75
    out, status = preprocess_scan(ramp, 40, "central", 0.0, 100.0, fit="stretch")
    assert status == "central" and out.shape == (40, 40)
    assert out[20, :8].max() == 0 and out[20, -8:].min() == 255 and 100 < out[20, 20] < 155
    with pytest.raises(ValueError, match="on_no_lungs"):
        preprocess_scan(ramp, 40, "guess", fit="pad")
    with pytest.raises(ValueError, match="fit = 'squash'"):
        preprocess_scan(ramp, 40, "central", fit="squash")


def test_fit_square_stretch_crop_and_pad():
    wide = np.arange(4 * 10, dtype=np.uint8).reshape(4, 10) + 100
    wide[0, :3] = wide[-1, :3] = 7  # the top and bottom edges' median stays 100-ish, not 7
    assert fit_square(wide, "stretch") is wide
    np.testing.assert_array_equal(fit_square(wide, "crop"), wide[:, 3:7])
    padded = fit_square(wide, "pad")
    background = np.rint(np.median(np.concatenate([wide[0], wide[-1]])))
    assert padded.shape == (10, 10) and padded.dtype == np.uint8
    np.testing.assert_array_equal(padded[3:7], wide)
    assert (padded[:3] == background).all() and (padded[7:] == background).all()
    tall = wide.T[:9]  # 9 x 4: an odd amount to add, the extra column goes to the right
    padded = fit_square(tall, "pad")
    assert padded.shape == (9, 9) and (padded[:, 2:6] == tall).all()
    assert (padded[:, :2] == np.rint(np.median(np.concatenate([tall[:, 0], tall[:, -1]])))).all()
    np.testing.assert_array_equal(fit_square(tall, "crop"), tall[2:6])


def _lung_aspect(out: np.ndarray) -> float:
    """Height over width of the largest dark component off the border (a lung) of a preprocessed scan."""
    lab, n = ndimage.label(out < 60)
    border = set(lab[[0, -1]].ravel()) | set(lab[:, [0, -1]].ravel())
    lung = max((k for k in range(1, n + 1) if k not in border), key=lambda k: (lab == k).sum())
    rows, cols = ndimage.find_objects((lab == lung).astype(int))[0]
    return (rows.stop - rows.start) / (cols.stop - cols.start)


def test_fit_modes_on_a_wide_scan():
    img, truth = synthetic_chest(h=300, w=420)  # landscape: lungs 132 px tall, 101 px wide
    rows, cols = ndimage.find_objects(truth[:, :210].astype(int))[0]
    true_aspect = (rows.stop - rows.start) / (cols.stop - cols.start)
    out = {fit: preprocess_scan(img.astype(np.float32), 128, "skip", fit=fit) for fit in ("stretch", "crop", "pad")}
    assert all(o.shape == (128, 128) and status == "ok" for o, status in out.values())
    pad, crop, stretch = out["pad"][0], out["crop"][0], out["stretch"][0]
    band = round((420 - 300) / 2 * 128 / 420) - 1  # rows added above and below, less one blended by the resize
    assert (pad[:band] == pad[0, 0]).all() and (pad[-band:] == pad[0, 0]).all() and pad[0, 0] < 20  # air: black
    assert abs(_lung_aspect(pad) / true_aspect - 1) < 0.1      # proportions kept
    assert abs(_lung_aspect(stretch) / true_aspect - 1) > 0.25  # squashed: lungs look taller and narrower
    assert abs(_lung_aspect(crop) / true_aspect - 1) < 0.1 and not (crop[:band] == crop[0, 0]).all()
    assert pad[64, 0] < 20 and stretch[64, 0] < 20 and crop[64, 0] > 100  # crop cuts through the chest wall


def _write_study(tmp_path):
    """Ten scans: 7 normal chests of different sizes, 1 blank (no lungs), 1 abnormal, 1 corrupt PNG."""
    records = []
    for i in range(10):
        path = tmp_path / f"scan{i}.png"
        if i == 8:
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(30))
        elif i == 7:
            Image.fromarray(np.full((150, 140), 900, np.uint16)).save(path)
        else:
            Image.fromarray(synthetic_chest(140 + 10 * i, 130 + 7 * i, seed=i)[0]).save(path)
        records.append(ScanRecord(path, f"img{i}", f"00{i // 2}", "FM"[i % 2], 20 + i, i != 9))
    return records


def test_ingest_xray_end_to_end(tmp_path):
    records = _write_study(tmp_path)
    kw = dict(size=32, normal_only=True, lo_pct=5.0, hi_pct=95.0, fit="pad", max_pixels=BUDGET)
    s2 = ingest_xray(records, tmp_path / "set2", on_no_lungs="central", workers=2, **kw)
    assert s2["scans_listed"] == 10 and s2["dropped_abnormal"] == 1 and s2["unreadable"] == 1
    assert s2["written"] == 8 and s2["lungs_not_found"] == {"central": 1, "skip": 0}
    assert s2["skipped"] == {"duplicate_pixels": 0}
    assert "scan8.png" in s2["unreadable_examples"][0] and s2["scans_per_s"] > 0
    ds = ImageSet(tmp_path / "set2")
    assert len(ds) == 8 and ds.shape == (32, 32, 1)
    m = ds.meta
    assert list(m.image_id) == [f"img{i}" for i in range(8)]
    assert list(m.patient_id) == ["000", "000", "001", "001", "002", "002", "003", "003"]
    assert list(m.lungs) == ["ok"] * 7 + ["central"] and list(m.age) == list(range(20, 28))
    assert m.source[0].endswith("scan0.png") and m.normal.all()
    # one process gives the same bytes; skipping drops the blank scan
    s1 = ingest_xray(records, tmp_path / "set1", on_no_lungs="skip", workers=1, **kw)
    assert s1["written"] == 7 and s1["lungs_not_found"] == {"central": 0, "skip": 1}
    ds1 = ImageSet(tmp_path / "set1")
    np.testing.assert_array_equal(np.stack([ds1[i] for i in range(7)]), np.stack([ds[i] for i in range(7)]))
    with pytest.raises(ValueError, match="on_no_lungs"):
        ingest_xray(records, tmp_path / "bad", on_no_lungs="maybe", workers=1, **kw)
    assert not (tmp_path / "bad").exists()


def test_same_pixels_twice_for_a_patient_skipped_and_under_two_patients_refused(tmp_path):
    scan, _ = synthetic_chest(seed=5)
    Image.fromarray(scan).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "a_again.tif", scan)  # the same pixels in another file and format
    Image.fromarray(synthetic_chest(seed=6)[0]).save(tmp_path / "b.png")
    blank = np.full((200, 180), 900, np.uint16)  # one value: no identity, never a duplicate
    Image.fromarray(blank).save(tmp_path / "blank1.png")
    Image.fromarray(blank).save(tmp_path / "blank2.png")
    rec = lambda name, patient: ScanRecord(tmp_path / name, name, patient, "F", 40, True)
    kw = dict(size=32, normal_only=True, on_no_lungs="central", lo_pct=5.0, hi_pct=95.0, fit="pad", workers=1,
              max_pixels=BUDGET)
    s = ingest_xray([rec("a.png", "p1"), rec("a_again.tif", "p1"), rec("b.png", "p2"), rec("blank1.png", "p3"),
                     rec("blank2.png", "p4")], tmp_path / "set", **kw)
    assert s["written"] == 4 and s["skipped"] == {"duplicate_pixels": 1}
    assert list(ImageSet(tmp_path / "set").meta.image_id) == ["a.png", "b.png", "blank1.png", "blank2.png"]
    with pytest.raises(ValueError) as err:
        ingest_xray([rec("a.png", "p1"), rec("b.png", "p2"), rec("a_again.tif", "p7")], tmp_path / "bad", **kw)
    message = str(err.value)
    assert "\n" not in message and message.startswith(
        f"identical pixels under two patients: 'p1' ({tmp_path / 'a.png'}) and 'p7' ({tmp_path / 'a_again.tif'})")
    assert not (tmp_path / "bad").exists()


# the params.yaml beside the code under test (its defaults), so a test runs against other versions too
CODE_ROOT = Path(biomedsynth.__file__).resolve().parents[2]
RAW = Path("data/raw/xray")


def xray_project(tmp_path: Path, monkeypatch, files: list[str], *assignments: str):
    """A project in tmp_path (the working folder) ingesting data/raw/xray/<files> through a manifest, one
    patient each, in one process; returns its params."""
    monkeypatch.chdir(tmp_path)
    RAW.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"path": files, "patient_id": [f"p{i}" for i in range(len(files))], "sex": "F", "age": "40"}
                 ).to_csv(RAW / "scans.csv", index=False)
    shutil.copy(CODE_ROOT / "params.yaml", "params.yaml")
    set_params(["sources.xray.format=manifest", f"sources.xray.csv={RAW / 'scans.csv'}", f"sources.xray.root={RAW}",
                "ingest.workers=1", *assignments])
    return load_params("params.yaml")


def write_zlib_tiff_bomb(path: Path, side: int = 30000, tile: int = 1024) -> None:
    """Issue 13's file: side x side uint8 zeros in zlib tiles, under 1 MB; written from one compressed tile,
    so writing it takes no memory either."""
    chunk = zlib.compress(bytes(tile * tile))
    tifffile.imwrite(path, (chunk for _ in range(math.ceil(side / tile) ** 2)), shape=(side, side), dtype=np.uint8,
                     tile=(tile, tile), compression="zlib")


def test_tiff_bomb_is_skipped_undecoded_at_the_default_budget_and_the_other_scans_kept(tmp_path, monkeypatch):
    p = xray_project(tmp_path, monkeypatch, ["chest1.tif", "bomb.tif", "chest2.png"])
    write_zlib_tiff_bomb(RAW / "bomb.tif")
    assert (RAW / "bomb.tif").stat().st_size < 1_000_000
    tifffile.imwrite(RAW / "chest1.tif", synthetic_chest(seed=1)[0])
    Image.fromarray(synthetic_chest(seed=2)[0]).save(RAW / "chest2.png")
    decoded, asarray = [], tifffile.TiffPage.asarray

    def spy(page, *args, **kwargs):
        decoded.append(page.shape)
        if page.imagewidth * page.imagelength > 10 ** 8:  # what a memory cap makes of it, without taking the memory
            raise MemoryError(f"decoding {page.shape}")
        return asarray(page, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffPage, "asarray", spy)
    ingest("xray", p, Path("data/interim/xray"), Path("xray.json"))
    assert decoded == [(400, 360)], "the 30000 x 30000 page was decoded"  # the good TIFF only
    summary = json.loads(Path("xray.json").read_text())
    assert summary["skipped_by_reason"] == {"over_pixel_budget": 1} and summary["written"] == 2
    assert f"{RAW / 'bomb.tif'}: 30000 x 30000 = 900,000,000 pixels, over the pixel budget" in \
        json.loads(Path("data/interim/xray/ingest.json").read_text())["unreadable_examples"][0]
