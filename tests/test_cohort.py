"""A real cohort's first run, end to end (issue 26): a few hundred chest X-rays of ~200 patients in a PACS-style
manifest (8- and 16-bit PNGs of three sizes, ages skewed old, a tenth of the scans not normal) and PatchCamelyon
files without their _meta.csv (no slide ids: the split goes by tile). From ingest to a passing `plan` in one
`plan --fit --apply`, then the whole pipeline at smoke size, then the datasheet of an exported histology set.
The walk-through in the README's "Your own data" section is this test's path.

The same run is the privacy scan end to end (issue 24): every patient id and file name of the cohort starts
with a distinctive mark, MLflow is on, and afterwards every file `git add -A` would commit, the review page, the
run's log and the MLflow store are scanned for them and for the real images; then a planted id and tile are found."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from test_privacy import MARK, _png

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HISTOLOGY_SET = "dcgan-h_tumor-uncond"


def xray_cohort(scans: Path, patients: int = 200, seed: int = 0) -> pd.DataFrame:
    """Chest-like scans whose lungs follow sex and age; 1-3 scans per patient, ~15% of patients under 40."""
    rng = np.random.default_rng(seed)
    scans.mkdir(parents=True)
    rows = []
    for p in range(patients):
        sex = "M" if rng.random() < 0.55 else "F"
        age = int(np.clip(rng.normal(62, 12) if rng.random() < 0.85 else rng.uniform(18, 40), 18, 90))
        for s in range(int(rng.integers(1, 4))):
            h, w = [(320, 300), (256, 256), (300, 340)][int(rng.integers(3))]
            y, x = np.mgrid[:h, :w] / np.array([h, w])[:, None, None]
            lung = 0.30 + 0.06 * (sex == "M") + 0.002 * (age - 50)
            body = 0.1 + 0.6 * (((y - 0.55) / 0.45) ** 2 + ((x - 0.5) / 0.42) ** 2 <= 1)
            for cx in (0.32, 0.68):
                body[((y - 0.45) / (lung + 0.1)) ** 2 + ((x - cx) / (lung * 0.45)) ** 2 <= 1] = 0.25
            img = np.clip(body + rng.normal(0, 0.03, body.shape), 0, 1)
            name = f"{MARK}-scan-{len(rows):04d}.png"
            Image.fromarray((img * 255).astype(np.uint8) if s % 2 else (img * 60000).astype(np.uint16)).save(
                scans / name)
            rows.append({"path": name, "patient_id": f"{MARK}-pt{p:04d}", "sex": sex, "age": age,
                         "finding": "No Finding" if rng.random() < 0.9 else "Effusion"})
    table = pd.DataFrame(rows)
    table.to_csv(scans / "manifest.csv", index=False)
    return table


def pcam_without_slide_ids(tiles: Path, n: int = 600, seed: int = 0) -> None:
    """PatchCamelyon's x/y files of the three splits, 96 px RGB, tumour tiles with dark nuclei; no _meta.csv."""
    rng = np.random.default_rng(seed)
    tiles.mkdir(parents=True)
    y = (np.arange(n) % 2).astype(np.uint8)
    nuclei = y[:, None, None, None] * (rng.random((n, 96, 96, 1)) < 0.3)
    x = np.clip(rng.integers(120, 200, (n, 1, 1, 3)) + rng.normal(0, 25, (n, 96, 96, 3)) - 60 * nuclei,
                0, 255).astype(np.uint8)
    for split, rows in (("train", slice(0, 400)), ("valid", slice(400, 500)), ("test", slice(500, n))):
        with h5py.File(tiles / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
            f.create_dataset("x", data=x[rows], chunks=(1, 96, 96, 3))
        with h5py.File(tiles / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
            f.create_dataset("y", data=y[rows].reshape(-1, 1, 1, 1))


@pytest.mark.e2e
def test_a_real_shaped_cohort_goes_from_ingest_to_a_passing_plan_in_one_fit_then_through_the_pipeline(tmp_path):
    work = tmp_path / "project"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (ROOT / name).is_file() and not name.startswith(("metrics/", "tests/", "data/")):
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, work / name)
    cohort = xray_cohort(work / "data/raw/xray")
    pcam_without_slide_ids(work / "data/raw/histology")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "BIOMEDSYNTH_MLFLOW": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t.invalid"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's own sqlite store, which the scan reads

    def sh(*cmd, ok=True):
        run = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        assert (run.returncode == 0) == ok, (cmd, run.stdout[-3000:], run.stderr[-3000:])
        return run

    # the README's walk-through, as written there
    sh("biomedsynth", "profile", "smoke")
    sh("biomedsynth", "set", "sources.xray.format=manifest", "sources.xray.root=data/raw/xray",
       "sources.xray.csv=data/raw/xray/manifest.csv", "sources.histology.format=pcam",
       "sources.histology.root=data/raw/histology", "sources.histology.allow_tile_level_split=true",
       "gan.stages=table3", f"export.sets=[{HISTOLOGY_SET}]", f"export.allow_unlearnt=[{HISTOLOGY_SET}]",
       "export.with_generator=false")
    sh("biomedsynth", "set", "classify.replicates=1", "synthesize.draws=1")  # not the walk-through's: CI's time
    for cmd in (["git", "init", "-q"], ["dvc", "add", "-q", "data/raw"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "a cohort"]):
        sh(*cmd)
    ingest = sh("dvc", "repro", "ingest@xray", "ingest@histology")
    assert "WARNING ingest@histology: " in ingest.stdout + ingest.stderr  # the tile split, on the console
    before = sh("biomedsynth", "plan")
    assert "advice: none" not in before.stdout and "biomedsynth set " in before.stdout, before.stdout
    fitted = sh("biomedsynth", "plan", "--fit", "--apply")
    assert "advice: none" in fitted.stdout, fitted.stdout
    after = sh("biomedsynth", "plan")
    assert "advice: none" in after.stdout, after.stdout

    repro = sh("dvc", "repro")
    log = repro.stdout + repro.stderr
    assert "is empty" not in log  # stages that only write notes leave no empty output
    ingested = json.loads((work / "metrics/ingest/xray.json").read_text())
    assert ingested["scans_listed"] == len(cohort) and ingested["written"] > 300
    table3 = json.loads((work / "metrics/table3.json").read_text())
    assert sum(v for k, v in table3.items() if k.endswith(".in_verdict")) == table3["cells_used"]
    assert all(f"{k.rsplit('.', 1)[0]}.left_out_because" in table3
               for k, v in table3.items() if k.endswith(".in_verdict") and v == 0)
    report = log[log.rindex("Running stage 'report'"):]
    assert "WARNING" in report and "tile" in report  # the run's warnings again at the end of dvc repro

    sheet = (work / "exports" / HISTOLOGY_SET / "datasheet.md").read_text()
    assert "by tile, not by slide" in sheet and "no slide independence" in sheet
    assert "other slides" not in sheet
    croissant = json.loads((work / "exports" / HISTOLOGY_SET / "croissant.json").read_text())
    assert "tile" in json.dumps(croissant)
    assert not any(pid in (work / "params.yaml").read_text() for pid in cohort["patient_id"].unique())
    assert yaml.safe_load((work / "params.yaml").read_text())["studygroups"]["xray"]["test_fraction"] > 0

    # no patient id, file name or real image reached git, MLflow, the review page or the run's log
    (work / "repro.log").write_text(log)
    with open(work / ".git" / "info" / "exclude", "a") as f:
        f.write("repro.log\nreview.md\n")
    sh("biomedsynth", "review", "--base", "HEAD", "--smoke-summary", "metrics/summary.json", "--out", "review.md")
    meta = pd.read_csv(work / "data" / "interim" / "xray" / "meta.csv")
    assert meta["patient_id"].str.startswith(MARK).all() and (work / "mlflow.db").is_file()
    scan = sh("biomedsynth", "check-privacy", "--also", "review.md", "--also", "repro.log")
    assert "hold none of" in scan.stdout, scan.stdout
    committable = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=work, env=env,
                                 capture_output=True, text=True).stdout.split()
    assert "metrics/summary.json" in committable and not [n for n in committable if n.endswith(".png")]
    # the check can fail: a patient id and a real tile planted in git-tracked metrics are named, the values not
    tile = np.squeeze(np.load(sorted((work / "data" / "interim" / "histology").glob("shard-*.npy"))[0])[0])
    (work / "metrics" / "leak.png").write_bytes(_png(tile))
    (work / "metrics" / "leak.json").write_text(json.dumps({"slowest": meta["patient_id"].iloc[0]}))
    leak = sh("biomedsynth", "check-privacy", "--also", "review.md", ok=False)
    assert leak.returncode == 1
    assert "metrics/leak.png: a real image" in leak.stderr
    assert "metrics/leak.json: patient or slide ids" in leak.stderr and MARK not in leak.stderr
