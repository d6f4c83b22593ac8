"""The data stages end to end through the CLI, on a tiny phantom sample written by `biomedsynth sample`."""
import json
import shutil
from pathlib import Path

import yaml
from typer.testing import CliRunner

from biomedsynth.cli import app
from biomedsynth.params import apply_profile
from biomedsynth.store import ImageSet

ROOT = Path(__file__).resolve().parents[1]


def test_sample_ingest_studygroups(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "params.yaml", "params.yaml")
    apply_profile("smoke", "params.yaml")
    p = yaml.safe_load(Path("params.yaml").read_text())
    p["sample"]["xray"].update(patients=80, min_side=256, max_side=320)
    p["sample"]["histology"].update(normal_slides=2, tumor_slides=2, width=1024, height=768)
    p["studygroups"]["xray"].update(test_fraction=0.3)
    p["studygroups"]["xray"]["x_norm"].update(train=40, test=12)
    p["studygroups"]["xray"]["x_norm_l"].update(train=40, test=12)
    p["studygroups"]["histology"].update(test_fraction=0.5)
    Path("params.yaml").write_text(yaml.safe_dump(p))
    run = CliRunner().invoke
    for cmd in (["sample"], ["ingest", "xray"], ["ingest", "histology"], ["studygroups"]):
        result = run(app, cmd)
        assert result.exit_code == 0, (cmd, result.output)
    # the sample never overwrites data already there, and leaves no partial folder behind
    result = run(app, ["sample"])
    assert result.exit_code == 1 and "already holds data" in result.output
    assert sorted(p.name for p in Path("data").iterdir()) == ["interim", "raw", "studygroups"]
    # a corrupt scan in the user's data is skipped and counted, the rest still ingested
    scans = sorted(Path("data/raw/xray/images").glob("*.png"))
    scans[0].write_bytes(scans[0].read_bytes()[:200])
    assert run(app, ["ingest", "xray"]).exit_code == 0
    summary = json.loads(Path("metrics/ingest/xray.json").read_text())
    assert summary["unreadable"] == 1 and summary["written"] > 0
    assert ImageSet("data/interim/xray").shape == (32, 32, 1)
    assert ImageSet("data/interim/histology").shape == (32, 32, 3)
    groups = json.loads(Path("metrics/studygroups.json").read_text())
    for name in ("x_norm", "x_norm_l", "h_norm", "h_tumor"):
        train, test = (ImageSet(Path("data/studygroups") / name / side).meta for side in ("train", "test"))
        assert len(train) == groups[name]["train"]["images"] > 0 and len(test) > 0
        assert not set(train["patient_id"]) & set(test["patient_id"])
