"""Nothing that identifies a patient reaches git, MLflow or the pull-request page (issue 24): the check
(biomedsynth.privacy) against known answers. tests/test_cohort.py runs it end to end, on a cohort whose patient ids
and file names carry a distinctive mark, over git, MLflow, the review page and the run's log."""
import base64
import io

import numpy as np
from PIL import Image

from biomedsynth.privacy import RealData, real_data, scan_bytes
from biomedsynth.store import ImageSetWriter

MARK = "ZQXW"  # every id and file name of a fixture starts with it


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_the_check_finds_ids_file_names_and_real_images_and_nothing_else(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    with ImageSetWriter(tmp_path / "interim" / "xray", (8, 8, 1)) as w:
        for i, image in enumerate(images):
            w.add(image, image_id=f"{MARK}-scan-{i}.png", patient_id=f"{MARK}-P{i}" if i else "17",
                  source=f"raw/scans/{MARK}-scan-{i}.png")
    real = real_data(tmp_path / "interim")
    assert real.too_short == 1 and len(real.digests) == 3  # "17" cannot be told from other numbers
    assert scan_bytes(f'{{"rows": 3, "slide": "{MARK}-P2"}}'.encode(), real) == ["patient or slide ids"]
    assert scan_bytes(f"see raw/scans/{MARK}-scan-1.png".encode(), real) == ["file names", "image ids", "source paths"]
    assert scan_bytes(b'{"accuracy": 0.93, "patients": 17}', real) == []
    assert scan_bytes(b"\x80\x02weights" + f"{MARK}-P2".encode(), real) == []  # binary, not text: not read for ids
    assert scan_bytes(_png(images[1, :, :, 0]), real) == ["a real image"]
    assert scan_bytes(_png(255 - images[1, :, :, 0]), real) == ["an image"]  # git-tracked outputs hold no image
    page = b'<img src="data:image/png;base64,' + base64.b64encode(_png(images[2, :, :, 0])) + b'">'
    assert scan_bytes(page, real) == ["a real image (embedded)"]


def test_ids_are_found_wherever_they_start(tmp_path):
    real = RealData()
    for value in ("abcdefgh", "abcdefXY", "bcdefghi"):
        real.add_identifier(value, "patient or slide id")
    assert real.kinds_in("..abcdefXY..") == {"patient or slide id"}
    assert real.kinds_in("abcdefg") == set() and real.kinds_in("xabcdefghi") == {"patient or slide id"}
