"""Sources outside the project are dependencies: each ingest stage depends on its source's root, wherever it
is, so `dvc status` sees an external dataset change; a CSV outside that root is refused at params load; manifest
rows that lead outside the root are skipped and counted unless allowed; symlink loops in a root are skipped and
counted, and listed in .dvcignore so DVC runs on."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dvc.repo import Repo

import biomedsynth
from biomedsynth.params import ParamsError, load_params
from biomedsynth.params_edit import set_params
from test_faults import CLI, ENV, xray_project

# the project of the biomedsynth imported (PYTHONPATH may name another checkout): its dvc.yaml and params.yaml
PROJECT = Path(biomedsynth.__file__).resolve().parents[2]


def _params(path: Path, modality: str, **source) -> Path:
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["sources"][modality].update(source)
    path.write_text(yaml.safe_dump(params))
    return path


def _manifest(folder: Path, rows: int) -> None:
    folder.mkdir(exist_ok=True)
    lines = ["path,patient_id,sex,age"] + [f"s{i}.png,p{i},F,40" for i in range(rows)]
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")


def _ingested(project: Path, **xray_source) -> None:
    """A DVC project of this dvc.yaml, with ingest@xray's code, params and outputs, locked as if it had run."""
    shutil.copytree(PROJECT / "src/biomedsynth", project / "src/biomedsynth",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT / "dvc.yaml", project)
    _params(project / "params.yaml", "xray", **xray_source)
    for name in ("data/raw/xray/.keep", "data/checked/params.txt", "data/interim/xray/info.json",
                 "metrics/ingest/xray.json"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("{}")
    Repo.init(project, no_scm=True).close()
    with Repo(project) as repo:
        repo.commit("ingest@xray", force=True)


def test_an_external_manifest_that_loses_rows_changes_ingest(tmp_path, monkeypatch):
    """The source's root (with its manifest) is outside the project; after half the manifest's rows go,
    `dvc status` says ingest@xray's dependency changed (it said up to date when the stage depended on
    data/raw/xray whatever the root)."""
    external, project = tmp_path / "pacs-export", tmp_path / "project"
    _manifest(external, rows=4)
    project.mkdir()
    monkeypatch.chdir(project)
    _ingested(project, format="manifest", root=str(external), csv=str(external / "manifest.csv"))
    with Repo(project) as repo:
        assert repo.status(["ingest@xray"]) == {}
    _manifest(external, rows=2)
    with Repo(project) as repo:
        assert str(external) in json.dumps(repo.status(["ingest@xray"]))


@pytest.mark.parametrize("modality, key", [("xray", "csv"), ("histology", "labels_csv")])
def test_a_csv_outside_its_root_is_refused_naming_the_key_and_the_fix(tmp_path, modality, key):
    root = tmp_path / "raw" / modality
    for outside in (tmp_path / "elsewhere.csv", root / ".." / "labels.csv"):
        with pytest.raises(ParamsError, match=rf"sources\.{modality}\.{key} = .*outside the source's root {root}.*"
                                              rf"move it into {root}, or set root to a folder that holds both"):
            load_params(_params(tmp_path / "params.yaml", modality, root=str(root), **{key: str(outside)}))
    inside = load_params(_params(tmp_path / "params.yaml", modality, root=str(root), **{key: str(root / "a.csv")}))
    assert getattr(inside.sources, modality).root == root


def _ingest_xray(root: Path) -> dict:
    """`biomedsynth ingest xray` in the project at `root`; its metrics."""
    subprocess.run(CLI + ["ingest", "xray"], cwd=root, env=ENV, check=True, capture_output=True)
    return json.loads((root / "metrics/ingest/xray.json").read_text())


def test_manifest_rows_outside_the_root_are_skipped_and_counted_unless_allowed(tmp_path):
    """An absolute path (/etc/passwd), a `../` path and a symlink out of the root are skipped and counted as
    outside_root, never opened (before: /etc/passwd was opened and counted unreadable, the others ingested);
    sources.xray.allow_outside_root: true reads them."""
    root = xray_project(tmp_path, rows=3, distinct=3)
    scans = root / "data/raw/xray"
    (scans / "scan1.png").rename(root / "data/raw/up.png")
    (scans / "scan2.png").rename(root / "data/raw/linked.png")
    (scans / "link.png").symlink_to(root / "data/raw/linked.png")
    (scans / "list.csv").write_text("path,patient_id,sex,age,image_id\nscan0.png,p1,F,40,in\n"
                                    "/etc/passwd,p2,F,40,abs\n../up.png,p3,F,40,up\nlink.png,p4,F,40,link\n")
    kept = _ingest_xray(root)
    assert kept["written"] == 1 and kept["skipped_by_reason"] == {"outside_root": 3}, kept["skipped_by_reason"]
    set_params(["sources.xray.allow_outside_root=true"], root / "params.yaml")
    allowed = _ingest_xray(root)
    assert allowed["written"] == 3 and allowed["skipped_by_reason"] == {"unreadable": 1}  # /etc/passwd


@pytest.mark.e2e
def test_a_symlink_loop_in_a_source_root_is_skipped_and_counted_and_dvc_runs_on(tmp_path):
    """Two links to each other in data/raw/xray stop `dvc status` (exit 255: DVC, hashing the root, cannot stat
    them); check-params lists them in .dvcignore, after which `dvc repro ingest@xray` runs and ingest counts them
    (symlink_loop) beside the scans it writes."""
    root = xray_project(tmp_path, rows=2, distinct=2)
    scans = root / "data/raw/xray"
    (scans / "a.png").symlink_to("b.png")
    (scans / "b.png").symlink_to("a.png")
    shutil.copy(PROJECT / "dvc.yaml", root)
    shutil.copytree(PROJECT / "src/biomedsynth", root / "src/biomedsynth", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run(dvc + ["init", "--no-scm", "-q"], cwd=root, env=env, check=True)
    stopped = subprocess.run(dvc + ["status", "ingest@xray"], cwd=root, env=env, capture_output=True, text=True)
    assert stopped.returncode == 255 and "Too many levels of symbolic links" in stopped.stderr  # the fault
    checked = subprocess.run(CLI + ["check-params"], cwd=root, env=env, capture_output=True, text=True)
    assert checked.returncode == 0 and "2 symlink loop(s) in the source roots listed in .dvcignore" in checked.stdout
    assert "/data/raw/xray/a.png\n/data/raw/xray/b.png\n" in (root / ".dvcignore").read_text()
    run = subprocess.run(dvc + ["repro", "ingest@xray"], cwd=root, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    metrics = json.loads((root / "metrics/ingest/xray.json").read_text())
    assert metrics["written"] == 2 and metrics["skipped_by_reason"] == {"symlink_loop": 2}
