import numpy as np
import openslide
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage.filters import threshold_otsu

from biomedsynth.sources.phantom_wsi import write_histology_sample
from biomedsynth.sources.wsi import list_slides, read_annotation_polygons

W, H = 1024, 768


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    assert write_histology_sample(root, n_normal=2, n_tumor=1, seed=3, width=W, height=H) == 3
    return root


def test_files_and_listing(sample):
    assert sorted(p.name for p in sample.iterdir()) == ["normal_001.tif", "normal_002.tif", "tumor_001.tif",
                                                       "tumor_001.xml"]
    recs = list_slides(sample)
    assert [(r.slide_id, r.label, r.annotation is not None) for r in recs] == [
        ("normal_001", "normal", False), ("normal_002", "normal", False), ("tumor_001", "tumor", True)]


def test_openslide_reads_every_level(sample):
    for path in sorted(sample.glob("*.tif")):
        s = openslide.OpenSlide(str(path))
        assert s.level_count >= 3
        for k in range(1, s.level_count):
            (w0, h0), (w, h) = s.level_dimensions[k - 1], s.level_dimensions[k]
            assert (w, h) == (w0 // 2, h0 // 2)
        for k, (w, h) in enumerate(s.level_dimensions):
            rgba = np.asarray(s.read_region((0, 0), k, (w, h)))
            assert (rgba[..., 3] == 255).all()
            stained = (rgba[..., :3].min(2) < 200).mean()  # tissue, not glass
            assert 0.15 < stained < 0.7
            border = np.r_[rgba[0], rgba[-1], rgba[:, 0], rgba[:, -1]][:, :3]
            assert np.median(border.min(1)) > 230  # glass at the edges (bar dust and pen)
        centre = np.asarray(s.read_region((W // 2 - 32, H // 2 - 32), 0, (64, 64)))[..., :3]
        assert centre.min(2).mean() < 200  # the node sits in the middle


def test_deterministic_and_seeded(sample, tmp_path):
    write_histology_sample(tmp_path / "b", n_normal=2, n_tumor=1, seed=3, width=W, height=H, workers=2)
    for p in sample.iterdir():
        assert (tmp_path / "b" / p.name).read_bytes() == p.read_bytes(), p.name
    write_histology_sample(tmp_path / "c", n_normal=1, n_tumor=0, seed=4, width=W, height=H)
    assert (tmp_path / "c" / "normal_001.tif").read_bytes() != (sample / "normal_001.tif").read_bytes()


def test_fewer_slides_replace_a_larger_sample(tmp_path):
    write_histology_sample(tmp_path, n_normal=2, n_tumor=1, seed=0, width=512, height=512)
    (tmp_path / "mine.tif").write_bytes(b"x")
    assert write_histology_sample(tmp_path, n_normal=1, n_tumor=0, seed=0, width=512, height=512) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.tif", "normal_001.tif"]
    with pytest.raises(ValueError, match="width, height >= 256"):
        write_histology_sample(tmp_path, n_normal=1, n_tumor=0, seed=0, width=100, height=512)


def _large_share(dark, where):
    """Share of the dark (nuclear) pixels in `where` that belong to blobs at least 5 px across."""
    big = ndimage.binary_opening(dark, np.ones((5, 5), bool))
    return big[where].sum() / dark[where].sum()


def test_tumour_polygons_mark_large_nuclei(sample):
    tumour = read_annotation_polygons(sample / "tumor_001.xml")
    assert 1 <= len(tumour)
    rgb = np.asarray(openslide.OpenSlide(str(sample / "tumor_001.tif")).read_region((0, 0), 0, (W, H)))[..., :3]
    im = Image.new("1", (W, H))
    for p in tumour:
        ImageDraw.Draw(im).polygon([tuple(v) for v in p], fill=1)
    holes = Image.new("1", (W, H))
    for p in read_annotation_polygons(sample / "tumor_001.xml", exclusion=True):
        ImageDraw.Draw(holes).polygon([tuple(v) for v in p], fill=1)
    inside = np.asarray(im) & ~np.asarray(holes)
    tissue = ndimage.binary_closing(rgb.min(2) < 200, iterations=4)
    share = (inside & tissue).sum() / tissue.sum()
    assert 0.15 < share < 0.5  # a fair share of the tissue, not a speck
    normal = tissue & ~ndimage.binary_dilation(np.asarray(im), iterations=20)
    gray = rgb.mean(2)
    dark = ndimage.binary_fill_holes(gray < threshold_otsu(gray[tissue]) - 20)  # nuclei, vesicular ones filled
    # lymphocyte nuclei (3-4 px) vanish under a 5 px opening, most tumour nuclei (8-12 px) survive it
    big_in, big_out = _large_share(dark, inside & tissue), _large_share(dark, normal)
    assert big_in > 0.45 and big_in > 2.5 * big_out
