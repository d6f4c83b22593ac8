"""The README's bring-your-own-data recipes, run as written (bash -euo pipefail) in a copy of the project on
files written here in each source's real layout: NIH ChestX-ray14, a PACS export (DICOM + manifest),
Camelyon16 slides with and without annotations, PatchCamelyon, and a team remote pushed and pulled."""
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from biomedsynth.sources.phantom_wsi import write_histology_sample
from biomedsynth.sources.phantom_xray import write_xray_sample
from test_scans import write_dicom
from test_sources import pcam_tree

ROOT = Path(__file__).resolve().parents[1]


def readme_recipes() -> dict[str, str]:
    blocks = re.findall(r"```bash\n# recipe: (\S+)\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return dict(blocks)


def test_readme_has_every_recipe():
    assert set(readme_recipes()) == {"nih", "pacs", "camelyon16", "camelyon16-slide-labels", "pcam", "team-remote"}


@pytest.fixture
def project(tmp_path):
    """A clone-like copy of the project (tracked files, a fresh git repo, no results yet) and the recipes' env."""
    proj = tmp_path / "project"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file() and f != "dvc.lock":  # nothing run yet: dvc.lock comes from the recipes
            (proj / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, proj / f)
    (tmp_path / "home").mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HOME": str(tmp_path / "home"), "BIOMEDSYNTH_MLFLOW": "0", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t.invalid", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t.invalid"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "clone"]):
        subprocess.run(cmd, cwd=proj, env=env, check=True, capture_output=True)
    return proj, env


def run_recipe(name: str, project, **inputs) -> dict:
    proj, env = project
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_recipes()[name]], cwd=proj,
                         env={**env, **{k: str(v) for k, v in inputs.items()}}, capture_output=True, text=True)
    assert run.returncode == 0, f"recipe {name} failed:\n{run.stdout[-1500:]}\n{run.stderr[-2500:]}"
    return run


def _ingested(proj: Path, modality: str) -> dict:
    return json.loads((proj / "metrics" / "ingest" / f"{modality}.json").read_text())


def _xray_download(root: Path) -> pd.DataFrame:
    """A small NIH-style sample (16-bit PNGs + the CSV), laid out as the official download."""
    write_xray_sample(root / "src", n_patients=24, seed=3, difficulty=0.6, abnormal_fraction=0.15,
                      scans_per_patient=(1, 2), min_side=256, max_side=320)
    return pd.read_csv(root / "src" / "Data_Entry.csv")


@pytest.mark.e2e
def test_nih_recipe(project, tmp_path):
    table = _xray_download(tmp_path)
    nih = tmp_path / "nih"
    (nih / "images_001").mkdir(parents=True)
    shutil.move(tmp_path / "src" / "images", nih / "images_001" / "images")
    table.to_csv(nih / "Data_Entry_2017_v2020.csv", index=False)
    run_recipe("nih", project, NIH=nih)
    got = _ingested(project[0], "xray")
    assert got["written"] == int((table["Finding Labels"] == "No Finding").sum()) > 10, got


@pytest.mark.e2e
def test_pacs_recipe_dicom_and_manifest(project, tmp_path):
    table = _xray_download(tmp_path)
    pacs = tmp_path / "pacs"
    rows = []
    for i, r in table.iterrows():
        path = f"studies/{r['Patient ID']}/{i:04d}.dcm"
        (pacs / path).parent.mkdir(parents=True, exist_ok=True)
        write_dicom(pacs / path, np.asarray(Image.open(tmp_path / "src" / "images" / r["Image Index"])))
        rows.append({"path": path, "patient_id": r["Patient ID"], "sex": r["Patient Gender"],
                     "age": f"{int(r['Patient Age']):03d}Y", "finding": r["Finding Labels"], "site": "A"})
    pd.DataFrame(rows).to_csv(pacs / "manifest.csv", index=False)
    run_recipe("pacs", project, PACS=pacs)
    got = _ingested(project[0], "xray")
    assert got["written"] == int((table["Finding Labels"] == "No Finding").sum()) > 10, got


@pytest.fixture(scope="module")
def camelyon(tmp_path_factory):
    """normal/, tumor/ and lesion_annotations/ as Camelyon16's training folder has them."""
    src, root = tmp_path_factory.mktemp("cam_src"), tmp_path_factory.mktemp("camelyon")
    write_histology_sample(src, n_normal=1, n_tumor=1, seed=0, width=1536, height=1024)
    for folder, pattern in (("normal", "normal_*.tif"), ("tumor", "tumor_*.tif"), ("lesion_annotations", "*.xml")):
        (root / folder).mkdir()
        for f in src.glob(pattern):
            shutil.copy(f, root / folder / f.name)
    return root


@pytest.mark.e2e
def test_camelyon16_recipe_with_annotations(project, camelyon):
    run_recipe("camelyon16", project, CAMELYON=camelyon)
    got = _ingested(project[0], "histology")
    assert set(got["per_label"]) == {"normal", "tumor"} and got["slides_read"] == 2, got


@pytest.mark.e2e
def test_camelyon16_recipe_without_annotations(project, camelyon, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(camelyon, bare, ignore=shutil.ignore_patterns("*.xml"))
    run_recipe("camelyon16-slide-labels", project, CAMELYON=bare)
    assert set(_ingested(project[0], "histology")["per_label"]) == {"normal", "tumor"}


@pytest.mark.e2e
def test_pcam_recipe(project, tmp_path):
    pcam = tmp_path / "pcam"
    pcam.mkdir()
    for split, n in (("train", 24), ("valid", 8), ("test", 8)):
        pcam_tree(pcam, split, n, meta=True)
    run_recipe("pcam", project, PCAM=pcam)
    assert _ingested(project[0], "histology")["written"] == 40


@pytest.mark.e2e
def test_team_remote_recipe_push_and_pull(project, tmp_path):
    _xray_download(tmp_path)
    run_recipe("nih", project, NIH=tmp_path / "src")
    proj, env = project
    run_recipe("team-remote", project, REMOTE=tmp_path / "remote", REPO=proj)
    clone = Path(env["HOME"]) / "study"
    for folder in ("data/raw/xray", "data/interim/xray"):  # the data and the ingest stage's output came back
        cmp = filecmp.dircmp(proj / folder, clone / folder)
        assert not (cmp.left_only or cmp.right_only or cmp.diff_files), folder
    assert (clone / "data/interim/xray/info.json").read_bytes() == (proj / "data/interim/xray/info.json").read_bytes()
