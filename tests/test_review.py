"""The pull-request review page: params and committed metrics against the base branch, and the smoke Table 3."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from biomedsynth.report import TASK_NAMES
from biomedsynth.review import MARKER, review_markdown

ROOT = Path(__file__).resolve().parents[1]


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", *args], cwd=repo, check=True,
                   capture_output=True)


def _project(repo: Path, lr: float, accuracy: float) -> None:
    (repo / "params.yaml").write_text(f"gan:\n  lr: {lr}\nseed: 0\n")
    (repo / "dvc.yaml").write_text("stages:\n  classify:\n    cmd: 'true'\n    params: [gan.lr, seed]\n"
                                   "    metrics:\n      - m.json:\n          cache: false\n")
    (repo / "m.json").write_text(json.dumps({"vgg16": {"real": {"accuracy": accuracy}}}))


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


def test_review_shows_what_the_branch_changed_and_the_smoke_table(repo):
    _project(repo, 0.001, 0.75)  # the pull request: a new learning rate and the metrics it produced
    text = review_markdown("main", ROOT / "metrics" / "summary.json", repo)
    lines = text.splitlines()
    assert lines[0] == MARKER
    params = next(line for line in lines if "gan.lr" in line)
    assert "0.0002" in params and "0.001" in params
    metric = next(line for line in lines if "vgg16.real.accuracy" in line)
    assert "0.8" in metric and "0.75" in metric and "-0.05" in metric
    assert "seed" not in text.split("### Committed")[0]  # unchanged params are left out
    smoke = text.split("smoke run")[1]
    assert "Table 3" in smoke and all(f"| {name} |" in smoke for name in TASK_NAMES.values())


def test_review_says_no_change_when_nothing_changed(repo):
    text = review_markdown("main", None, repo)
    assert text.count("No change.") == 2 and "Table 3" not in text
