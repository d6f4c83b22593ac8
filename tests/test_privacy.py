"""Nothing that identifies a patient reaches git, MLflow or the pull-request page (issue 24).

The check (biomedsynth.privacy) against known answers, then the pipeline end to end under `dvc repro` on a
fixture whose patient ids, slide ids and file names are distinctive strings and whose images carry a distinctive
pixel pattern: afterwards every file `git add -A` would commit, the review page, the run's log and the MLflow
store's params, tags and artifacts are scanned."""
import base64
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml
from PIL import Image

from biomedsynth.params import apply_profile
from biomedsynth.privacy import RealData, real_data, scan_bytes
from biomedsynth.sources.wsi import write_pyramidal_tiff
from biomedsynth.store import ImageSetWriter

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MARK = "ZQXW"  # every id and file name of the fixture starts with it


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


def _distinctive(image: np.ndarray) -> np.ndarray:
    """The fixture's pixel pattern: a 16 px checkerboard of 0 and 255 in the top-left corner."""
    image = image.copy()
    checker = (np.indices((16, 16)).sum(0) % 2 * 255).astype(image.dtype)
    image[:16, :16] = checker if image.ndim == 2 else checker[..., None]
    return image


def _rename_sample(raw: Path) -> None:
    """The phantom sample as a hospital's export might name it: scans under distinctive file names with a manifest
    of distinctive patient ids, slides under distinctive names with a labels CSV; every image stamped. params.yaml
    (beside data/) reads them from there."""
    entries = pd.read_csv(raw / "xray" / "Data_Entry.csv", dtype=str)
    rows = []
    (raw / "scans").mkdir()
    for i, e in enumerate(entries.to_dict("records")):
        name = f"{MARK}-scan-{i:04d}.png"
        pixels = np.asarray(Image.open(raw / "xray" / "images" / e["Image Index"]))
        Image.fromarray(_distinctive(pixels)).save(raw / "scans" / name)
        rows.append({"path": name, "image_id": name, "patient_id": f"{MARK}-patient-{e['Patient ID']}",
                     "sex": e["Patient Gender"], "age": e["Patient Age"], "finding": e["Finding Labels"]})
    shutil.rmtree(raw / "xray")
    pd.DataFrame(rows).to_csv(raw / "scans" / "manifest.csv", index=False)
    (raw / "slides").mkdir()
    labels = []
    for tif in sorted((raw / "histology").glob("*.tif")):
        name = f"{MARK}-slide-{'T' if tif.stem.startswith('tumor') else 'N'}{tif.stem[-3:]}"
        write_pyramidal_tiff(raw / "slides" / f"{name}.tif", _distinctive(tifffile.imread(tif, key=0)))
        if (xml := tif.with_suffix(".xml")).is_file():
            shutil.copy(xml, raw / "slides" / f"{name}.xml")
        labels.append({"slide": name, "label": "tumor" if tif.stem.startswith("tumor") else "normal"})
    shutil.rmtree(raw / "histology")
    pd.DataFrame(labels).to_csv(raw / "slides" / "labels.csv", index=False)
    params = yaml.safe_load((raw.parents[1] / "params.yaml").read_text())
    params["sources"]["xray"].update(format="manifest", root="data/raw/scans", csv="data/raw/scans/manifest.csv")
    params["sources"]["histology"].update(root="data/raw/slides", labels_csv="data/raw/slides/labels.csv")
    (raw.parents[1] / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _project(work: Path) -> None:
    """A copy of the project with the fixture's params: the smoke profile on a small sample, MLflow on."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (ROOT / name).is_file() and not name.startswith(("metrics/", "tests/")):
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, work / name)
    (work / "data.dvc").unlink()
    apply_profile("smoke", work / "params.yaml")
    p = yaml.safe_load((work / "params.yaml").read_text())
    p["sample"]["xray"].update(patients=120, min_side=256, max_side=320)
    p["sample"]["histology"].update(normal_slides=8, tumor_slides=8, width=1024, height=768)
    p["studygroups"]["xray"].update(test_fraction=0.3, val_fraction=0.3)
    p["studygroups"]["min_fill"] = 0.25
    p["studygroups"]["xray"]["x_norm"].update(train=40, test=12)
    p["studygroups"]["xray"]["x_norm_l"].update(train=40, test=12)
    p["studygroups"]["histology"].update(test_fraction=0.3, val_fraction=0.3)  # 2 tumour slides held out
    p["gan"]["stages"] = "table3"
    p["export"]["with_generator"] = False
    p["classify"]["replicates"], p["synthesize"]["draws"] = 1, 1  # what is scanned, at half the smoke profile's time
    (work / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


@pytest.mark.e2e
def test_no_id_file_name_or_real_image_reaches_git_mlflow_the_review_or_the_log(tmp_path):
    work = tmp_path / "project"
    work.mkdir()
    _project(work)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "BIOMEDSYNTH_MLFLOW": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t.invalid"}
    env.pop("MLFLOW_TRACKING_URI", None)

    def sh(*cmd, check=True):
        run = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        assert run.returncode == 0 or not check, (cmd, run.stdout[-3000:], run.stderr[-3000:])
        return run

    sh("biomedsynth", "sample")
    _rename_sample(work / "data" / "raw")
    sh("git", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "base")
    repro = sh("dvc", "repro")
    (work / "repro.log").write_text(repro.stdout + repro.stderr)  # not in git: .gitignore'd below
    with open(work / ".git" / "info" / "exclude", "a") as f:
        f.write("repro.log\nreview.md\n")
    sh("biomedsynth", "review", "--base", "HEAD", "--smoke-summary", "metrics/summary.json", "--out", "review.md")
    meta = pd.read_csv(work / "data" / "interim" / "histology" / "meta.csv")
    assert meta["patient_id"].str.startswith(MARK).all() and len(meta) > 0  # the fixture reached the pipeline
    assert (work / "mlflow.db").is_file() and (work / "data" / "predictions" / "histology" / "knn.csv").is_file()
    result = sh("biomedsynth", "check-privacy", "--also", "review.md", "--also", "repro.log", check=False)
    assert result.returncode == 0 and "hold none of" in result.stdout, result.stderr
    committable = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=work, env=env,
                                 capture_output=True, text=True).stdout.split()
    assert "metrics/summary.json" in committable and not [n for n in committable if n.endswith(".png")]
    # the check can fail: a slide id and a real tile planted in git-tracked metrics are named, the values not
    tile = np.squeeze(np.load(sorted((work / "data" / "interim" / "histology").glob("shard-*.npy"))[0])[0])
    (work / "metrics" / "leak.png").write_bytes(_png(tile))
    (work / "metrics" / "leak.json").write_text(json.dumps({"slowest": meta["patient_id"].iloc[0]}))
    result = sh("biomedsynth", "check-privacy", "--also", "review.md", check=False)
    assert result.returncode == 1
    assert "metrics/leak.png: a real image" in result.stderr
    assert "metrics/leak.json: patient or slide ids" in result.stderr and MARK not in result.stderr
