"""The pull-request review page: params and committed metrics against the base branch, and the smoke Table 3."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from biomedsynth.report import TASK_NAMES
from biomedsynth.review import MARKER, review_markdown
from biomedsynth.table3 import write_table3
from test_table3 import HOLDS, STAGES, plant


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", *args], cwd=repo, check=True,
                   capture_output=True)


def _project(repo: Path, lr: float, accuracy: float, verdict: int = 1, left_out_because: str | None = None) -> None:
    (repo / "params.yaml").write_text(f"gan:\n  lr: {lr}\nseed: 0\n")
    (repo / "dvc.yaml").write_text("stages:\n  classify:\n    cmd: 'true'\n    params: [gan.lr, seed]\n"
                                   "    metrics:\n      - m.json:\n          cache: false\n"
                                   "      - metrics/table3.json:\n          cache: false\n")
    (repo / "m.json").write_text(json.dumps({"vgg16": {"real": {"accuracy": accuracy}}}))
    (repo / "metrics").mkdir(exist_ok=True)
    (repo / "metrics" / "table3.json").write_text(json.dumps({
        "xray_sex.vgg16.real": accuracy, "xray_sex.vgg16.synthetic": 0.7, "xray_sex.vgg16.drop": 0.1,
        "xray_sex.vgg16.is_degenerate": 0, "verdict": verdict, "verdict_low": 0.01 * verdict - 0.02,
        "verdict_high": 0.05, "cells_used": 12, "xray_sex.vgg16.in_verdict": int(left_out_because is None),
        **({"xray_sex.vgg16.left_out_because": left_out_because} if left_out_because else {})}))


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A DVC project whose main branch has one commit of params and metrics."""
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # the venv's dvc
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    subprocess.run(["dvc", "init", "-q"], cwd=repo, check=True)
    _project(repo, 0.0002, 0.8)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "base")
    return repo


def test_review_leads_with_table3_then_what_else_changed_and_the_smoke_table(repo):
    _project(repo, 0.001, 0.75, verdict=0,  # the pull request: a new learning rate and the metrics it produced
             left_out_because="GAN learnt nothing: pggan-x_norm-cond")
    plant(repo.parent / "smoke", HOLDS, patients=40)
    smoke = repo.parent / "smoke"
    write_table3(smoke, smoke / "predictions", STAGES, repo.parent / "summary.json", repo.parent / "table3.json", 100)
    text = review_markdown("main", repo.parent / "summary.json", repo)
    lines = text.splitlines()
    assert lines[0] == MARKER
    first_table = text.split("<details>")[0]
    assert "holds [-0.010, +0.050], 12 cells → **inconclusive [-0.020, +0.050], 12 cells**" in first_table
    assert "| xray_sex.vgg16 | 0.800 → **0.750** | 0.700 | - | 10.0% | - | no | yes → **no: GAN learnt nothing: " \
           "pggan-x_norm-cond** |" in first_table
    assert "gan.lr" not in first_table and "gan.lr" in text.split("<details>")[1]
    params = next(line for line in lines if "gan.lr" in line)
    assert "0.0002" in params and "0.001" in params
    metric = next(line for line in lines if "vgg16.real.accuracy" in line)
    assert "0.8" in metric and "0.75" in metric and "-0.05" in metric
    assert "seed" not in text.split("### Committed")[0]  # unchanged params are left out
    smoke = text.split("smoke run")[1]
    assert "Table 3" in smoke and all(f"| {name} |" in smoke for name in TASK_NAMES.values())


def test_review_says_no_change_when_nothing_changed(repo):
    text = review_markdown("main", None, repo)
    assert text.count("No change.") == 2 and "smoke run" not in text and "→" not in text
