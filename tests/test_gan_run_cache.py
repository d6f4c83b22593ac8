"""DVC and the GAN stages: the run cache restores a GAN setting switched away from and back without training it
again, and a knob the data cannot serve stops `dvc repro` before DVC clears a trained model."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from biomedsynth.params import gan_stage_table
from test_gan_train import CLI, PYTHONPATH, ROOT, smoke_project, stage_files

pytestmark = pytest.mark.e2e  # dvc repro on a trimmed project, twice per test

STAGE = "dcgan-x_norm-cond"


def dvc_project(root: Path) -> dict:
    """A git + DVC project at `root` whose dvc.yaml is this project's train_gan stage for STAGE alone and the check
    stages before it, with a tiny X-Norm group, its feature net, the stages' code dependencies and the smoke params;
    returns its env."""
    smoke_project(root)
    subprocess.run(CLI + ["set", "export.sets=table3"], cwd=root, check=True,  # the smoke profile's export set is
                   capture_output=True)                                        # no stage of this dvc.yaml
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    stages = {name: stage for name, stage in pipeline.items() if name in ("check_params", "check_gan", "train_gan")}
    stages["train_gan"] = {**stages["train_gan"], "foreach": {STAGE: gan_stage_table()[STAGE]}}
    stages["check_gan"]["cmd"] += f" {STAGE}"  # the one GAN stage this project runs (params list all twenty-four)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    for stage in stages.values():
        for dep in stage.get("do", stage)["deps"]:
            if dep.startswith("src/"):
                subprocess.run(["cp", "-r", "--parents", dep, str(root)], cwd=ROOT, check=True)
    shutil.copy(root / "models/feature_net/xray.pt", root / "models/feature_net/histology.pt")  # check_gan's dep
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": PYTHONPATH, "BIOMEDSYNTH_MLFLOW": "0"}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, env=env, check=True)
    return env


def repro(root: Path, env: dict, *knobs: str) -> subprocess.CompletedProcess:
    """`biomedsynth set` the knobs, then `dvc repro`."""
    if knobs:
        subprocess.run(CLI + ["set", *knobs], cwd=root, env=env, check=True, capture_output=True)
    return subprocess.run(["dvc", "repro"], cwd=root, env=env, capture_output=True, text=True)


def test_a_gan_knob_switched_away_and_back_is_restored_from_the_run_cache(tmp_path):
    root = tmp_path / "project"
    env = dvc_project(root)

    def repro_ok(lr: str) -> str:
        run = repro(root, env, f"gan.dcgan.lr={lr}")
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        return run.stdout

    assert "epoch 2/2" in repro_ok("0.0002")
    first = stage_files(root, STAGE)
    assert "epoch 2/2" in repro_ok("0.001")
    assert stage_files(root, STAGE) != first
    back = repro_ok("0.0002")
    assert f"Stage 'train_gan@{STAGE}' is cached - skipping run, checking out outputs" in back, back[:400]
    assert "epoch 1/2" not in back  # nothing trained
    assert stage_files(root, STAGE) == first


def test_a_knob_the_data_cannot_serve_stops_dvc_repro_before_it_clears_the_model(tmp_path):
    """A GAN batch larger than the model's 64 images (within params' bound of 1,024) stops `dvc repro` at check_gan
    in one line, before DVC clears train_gan's output (before the check, DVC cleared it and then train-gan refused).
    A check that passes again reruns nothing after it."""
    root = tmp_path / "project"
    env = dvc_project(root)
    first = repro(root, env)
    assert first.returncode == 0 and "epoch 2/2" in first.stdout, first.stdout[-2000:] + first.stderr[-2000:]
    trained = stage_files(root, STAGE)
    refused = repro(root, env, "gan.xray.batch_size=1000")
    assert refused.returncode != 0 and stage_files(root, STAGE) == trained
    assert f"biomedsynth: train_gan@{STAGE}: model conditional: 64 training images, fewer than one batch of 1000; " \
           "lower the batch size or enlarge the group\n" in refused.stderr, refused.stderr[-2000:]
    again = repro(root, env, "gan.xray.batch_size=8", "gan.histology.epochs=3")  # back, and a knob only the check reads
    assert again.returncode == 0 and "Running stage 'check_gan'" in again.stdout, again.stdout[-2000:]
    assert f"Stage 'train_gan@{STAGE}' didn't change, skipping" in again.stdout and "epoch" not in again.stdout
    assert stage_files(root, STAGE) == trained
