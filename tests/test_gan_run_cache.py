"""DVC's run cache restores a GAN setting switched away from and back, without training it again."""
import os
import subprocess
import sys
from pathlib import Path

import yaml

from test_gan_train import CLI, PYTHONPATH, ROOT, smoke_project, stage_files

STAGE = "dcgan-x_norm-cond"


def dvc_project(root: Path) -> dict:
    """A git + DVC project at `root` whose dvc.yaml is this project's train_gan stage for STAGE alone, with a
    tiny X-Norm group, its feature net, the stage's code dependencies and the smoke params; returns its env."""
    smoke_project(root)
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stage = pipeline["stages"]["train_gan"]
    models = stage["foreach"]
    if isinstance(models, str):  # "${name}" of the file's vars
        models = next(v[models[2:-1]] for v in pipeline["vars"] if models[2:-1] in v)
    stage = {**stage, "foreach": {STAGE: models[STAGE]}}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train_gan": stage}}))
    for dep in ("src/biomedsynth/gan", "src/biomedsynth/distributed.py", "src/biomedsynth/store.py"):
        subprocess.run(["cp", "-r", "--parents", dep, str(root)], cwd=ROOT, check=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": PYTHONPATH, "BIOMEDSYNTH_MLFLOW": "0"}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, env=env, check=True)
    return env


def test_a_gan_knob_switched_away_and_back_is_restored_from_the_run_cache(tmp_path):
    root = tmp_path / "project"
    env = dvc_project(root)

    def repro(lr: str) -> str:
        subprocess.run(CLI + ["set", f"gan.dcgan.lr={lr}"], cwd=root, env=env, check=True, capture_output=True)
        run = subprocess.run(["dvc", "repro"], cwd=root, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        return run.stdout

    assert "epoch 2/2" in repro("0.0002")
    first = stage_files(root, STAGE)
    assert "epoch 2/2" in repro("0.001")
    assert stage_files(root, STAGE) != first
    back = repro("0.0002")
    assert f"Stage 'train_gan@{STAGE}' is cached - skipping run, checking out outputs" in back, back[:400]
    assert "epoch 1/2" not in back  # nothing trained
    assert stage_files(root, STAGE) == first
