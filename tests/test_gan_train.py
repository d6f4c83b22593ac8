"""The GAN training loop: resume gives the same weights as an uninterrupted run, checkpoint choice, sampling."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from biomedsynth.gan import score
from biomedsynth.gan import train as T
from biomedsynth.store import ImageSet, ImageSetWriter

ROOT = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])  # child processes
CLI = [sys.executable, "-c", "from biomedsynth.cli import app; app()"]


def tiny_group(path: Path, n: int = 32, side: int = 32, channels: int = 1, labels=("F_a", "M_a")) -> ImageSet:
    """A disc whose brightness depends on the label, plus noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:side, :side]
    disc = ((yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (side / 3) ** 2)
    with ImageSetWriter(path, (side, side, channels)) as w:
        for i in range(n):
            label = labels[i % len(labels)]
            img = 40 + 120 * disc * (1 + labels.index(label)) / len(labels) + rng.normal(0, 10, (side, side))
            w.add(np.repeat(np.clip(img, 0, 255).astype(np.uint8)[..., None], channels, 2), label=label,
                  patient_id=str(i))
    return ImageSet(path)


def options(arch: str, setup: str = "cond", epochs: int = 2, **kw) -> T.Options:
    net = dict(base_width=8) if arch == "dcgan" else dict(fmap_base=128, fmap_max=16)
    extra = {} if arch == "dcgan" else dict(ema_decay=0.9, images_per_phase=8)
    base = dict(arch=arch, setup=setup, labels=("F_a", "M_a"), resolution=32, channels=1, latent_dim=16,
                batch_size=8, epochs=epochs, seed=3, lr=2e-4 if arch == "dcgan" else 1e-3,
                betas=(0.5, 0.999) if arch == "dcgan" else (0.0, 0.99), net=net, score_images=16, feature_epochs=1)
    return T.Options(**{**base, **extra, **kw})


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    return tiny_group(tmp_path_factory.mktemp("g") / "train")


def scorer_for(images: ImageSet) -> T.Scorer:
    net = score.train_feature_net(T.read_batch(images, np.arange(len(images)), 32), images.meta["label"].to_numpy(),
                                  epochs=1)
    return T.Scorer(images, net, torch.device("cpu"), 0)


class Killed(Exception):
    pass


def kill_after_epoch(epoch: int):
    def log(msg: str):
        if f"epoch {epoch}/" in msg:  # printed after the epoch's checkpoint is on disk
            raise Killed
    return log


@pytest.mark.parametrize("arch", ["dcgan", "pggan"])
def test_resume_after_a_kill_gives_the_weights_of_a_straight_run(group, tmp_path, arch):
    opt = options(arch)
    data = T.model_data(group.meta, opt)[0]
    scorer = scorer_for(group)
    straight = T.train_model(opt, data, group, tmp_path / "a", scorer, torch.device("cpu"), log=lambda m: None)
    with pytest.raises(Killed):
        T.train_model(opt, data, group, tmp_path / "b", scorer, torch.device("cpu"), log=kill_after_epoch(1))
    assert len(T.read_log(tmp_path / "b")) == 1
    resumed = T.train_model(opt, data, group, tmp_path / "b", scorer, torch.device("cpu"), log=lambda m: None)
    a, b = (torch.load(p / "checkpoint.pt", weights_only=False) for p in (tmp_path / "a", tmp_path / "b"))
    for key in ("G", "D") + (("ema",) if arch == "pggan" else ()):
        for name, w in a[key].items():
            assert torch.equal(w, b[key][name]), f"{key}.{name} differs after resume"
    assert a["images_seen"] == b["images_seen"] == 2 * 32
    assert [r["loss_d"] for r in straight] == [r["loss_d"] for r in resumed]
    assert all(np.isfinite(r[k]) for r in resumed for k in ("loss_d", "loss_g", "swd", "kid"))
    assert (tmp_path / "b" / "grids" / "002.png").is_file() and T.epoch_file(tmp_path / "b", 2).is_file()


def test_pggan_grows_to_full_resolution_and_logs_depth(group, tmp_path):
    opt = options("pggan", epochs=4, images_per_phase=None)  # 4 epochs x 32 images over 2 x 3 + 1 phases
    rows = T.train_model(opt, T.model_data(group.meta, opt)[0], group, tmp_path, scorer_for(group),
                         torch.device("cpu"), log=lambda m: None)
    assert [r["side"] for r in rows] == sorted(r["side"] for r in rows)
    assert rows[-1]["side"] == 32 and rows[-1]["alpha"] == 1.0 and rows[0]["side"] < 32


def test_pggan_refuses_epochs_that_end_before_full_growth():
    with pytest.raises(ValueError, match="end before the growth to 32 px"):
        T.phase_schedule(options("pggan", epochs=1, images_per_phase=64), images_per_epoch=32)


def test_a_label_smaller_than_one_batch_is_named(group, tmp_path):
    opt = options("dcgan", setup="uncond", batch_size=32)
    with pytest.raises(ValueError, match="model F_a: 16 training images, fewer than one batch of 32"):
        T.train_model(opt, T.model_data(group.meta, opt)[0], group, tmp_path, None, torch.device("cpu"))


def test_uncond_trains_one_model_per_label_and_cond_one_model():
    meta = pd.DataFrame({"label": ["M_a", "F_a", "M_a", "F_a", "F_a"]})
    uncond = T.model_data(meta, options("dcgan", setup="uncond"))
    assert [(d.name, d.indices.tolist()) for d in uncond] == [("F_a", [1, 3, 4]), ("M_a", [0, 2])]
    (cond,) = T.model_data(meta, options("dcgan", setup="cond"))
    assert cond.name == T.COND_MODEL and cond.class_ids.tolist() == [1, 0, 1, 0, 0]


@pytest.mark.parametrize("bad, match", [(dict(arch="wgan"), "arch must be"), (dict(setup="both"), "setup must be"),
                                        (dict(resolution=48), "power of two"), (dict(channels=2), "channels"),
                                        (dict(labels=("F/a",)), "cannot name a model folder")])
def test_options_refuse_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(options("dcgan"), **bad)


def test_checkpoint_choice_best_last_and_epoch(tmp_path):
    (tmp_path / "epochs").mkdir()
    rows = [{"epoch": e, "swd": s} for e, s in ((1, 0.5), (2, 0.2), (3, 0.2), (4, 0.3))]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for e in range(1, 5):
        T.epoch_file(tmp_path, e).touch()
    assert T.resolve_checkpoint(tmp_path, "best") == 2  # lowest SWD, the earlier of a tie
    assert T.resolve_checkpoint(tmp_path, "last") == 4
    assert T.resolve_checkpoint(tmp_path, "epoch_3") == 3
    with pytest.raises(ValueError, match="has epochs 1..4"):
        T.resolve_checkpoint(tmp_path, "epoch_9")
    with pytest.raises(ValueError, match="allowed best, last, epoch_N"):
        T.resolve_checkpoint(tmp_path, "newest")


def test_best_skips_pggan_epochs_before_full_growth():
    rows = [{"epoch": 1, "swd": 0.1, "side": 8, "alpha": 1.0}, {"epoch": 2, "swd": 0.2, "side": 16, "alpha": 0.5},
            {"epoch": 3, "swd": 0.4, "side": 16, "alpha": 1.0}, {"epoch": 4, "swd": 0.3, "side": 16, "alpha": 1.0}]
    assert T.best_epoch(rows) == 4  # the 8 px epoch scores lower but draws upsampled blocks


def test_train_gan_stage_then_synthesizer_samples_each_label(group, tmp_path, monkeypatch):
    monkeypatch.setenv("BIOMEDSYNTH_MLFLOW", "0")
    opt = options("dcgan", setup="cond")
    out = tmp_path / "models"
    summary = T.train_gan(opt, group.path, out, tmp_path / "m.json", tmp_path / "s.csv", tmp_path / "l.csv",
                          log=lambda m: None)
    assert summary["models"] == 1 and summary["epochs"] == 2
    assert json.loads((tmp_path / "m.json").read_text()) == summary
    rows = T.read_log(out / T.COND_MODEL)
    assert (tmp_path / "s.csv").read_text().splitlines() == [
        "epoch,swd,kid", *(f"{r['epoch']},{r['swd']:.6f},{r['kid']:.6f}" for r in rows)]
    assert (tmp_path / "l.csv").read_text().splitlines()[0] == "epoch,loss_d,loss_g"
    gen = T.Synthesizer(out, "last", torch.device("cpu"))
    images = gen.sample("M_a", 5, np.random.default_rng(0))
    assert images.shape == (5, 32, 32, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, gen.sample("M_a", 5, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="label 'X' was not trained"):
        gen.sample("X", 1, np.random.default_rng(0))
    # changed options: the old models are not resumed from but replaced
    T.train_gan(dataclasses.replace(opt, seed=4, epochs=1), group.path, out, tmp_path / "m.json",
                tmp_path / "s.csv", tmp_path / "l.csv", log=lambda m: None)
    assert len(T.read_log(out / T.COND_MODEL)) == 1


def test_kill_9_of_the_cli_stage_resumes(tmp_path):
    """The real thing: SIGKILL the train-gan command mid-run, run it again, get the straight run's weights."""
    def project(name: str) -> Path:
        root = tmp_path / name
        tiny_group(root / "data/studygroups/x_norm/train", n=64)
        params = (ROOT / "params.yaml").read_text()
        (root / "params.yaml").write_text(params)
        subprocess.run(CLI + ["profile", "smoke"], cwd=root, check=True, capture_output=True)
        return root

    env = {**os.environ, "BIOMEDSYNTH_MLFLOW": "0", "PYTHONPATH": PYTHONPATH}
    cmd = CLI + ["train-gan", "dcgan", "x_norm", "cond"]
    straight, killed = project("straight"), project("killed")
    subprocess.run(cmd, cwd=straight, env=env, check=True, capture_output=True)
    proc = subprocess.Popen(cmd, cwd=killed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "models/gan/dcgan-x_norm-cond" / T.COND_MODEL / "checkpoint.pt"
    deadline = time.time() + 60
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.fail("the run finished before it could be killed; make the test's run longer")
    epochs_done = len(T.read_log(ckpt.parent))
    subprocess.run(cmd, cwd=killed, env=env, check=True, capture_output=True)
    a, b = (torch.load(r / "models/gan/dcgan-x_norm-cond" / T.COND_MODEL / "checkpoint.pt", weights_only=False)
            for r in (straight, killed))
    assert epochs_done < a["epoch"] == b["epoch"]
    assert all(torch.equal(w, b["G"][k]) for k, w in a["G"].items())


def test_torchrun_two_cpu_processes_train_with_rank_0_writing(tmp_path):
    """torchrun with the gloo backend: 2 ranks share each epoch's batches; rank 0 alone writes."""
    tiny_group(tmp_path / "data/studygroups/x_norm/train", n=64)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    subprocess.run(CLI + ["profile", "smoke"], cwd=tmp_path, check=True, capture_output=True)
    env = {**os.environ, "BIOMEDSYNTH_MLFLOW": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH,
           "BIOMEDSYNTH_DEVICE": "cpu"}  # gloo on CPU even where a GPU is present
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--no-python",
                          *CLI, "train-gan", "pggan", "x_norm", "cond"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    model = tmp_path / "models/gan/pggan-x_norm-cond" / T.COND_MODEL
    rows = T.read_log(model)
    assert [r["epoch"] for r in rows] == [1, 2]  # one line per epoch: only rank 0 logged
    assert rows[-1]["images_seen"] == 2 * 64  # 64 images per epoch, 32 on each rank (batch 8 x 4 steps)
    assert run.stdout.count("epoch 2/2") == 1
    ck = torch.load(model / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 2 and all(torch.isfinite(w).all() for w in ck["G"].values())


@pytest.mark.parametrize("arch, per_phase, epochs, kept", [
    ("dcgan", None, 3, True),    # more epochs: the run continues
    ("pggan", 8, 3, True),       # a fixed growth schedule: continues too
    ("pggan", None, 3, False),   # phases spread over the epochs would stretch: start over
    ("dcgan", None, 1, False),   # fewer epochs: start over
    ("dcgan", None, 2, True),    # the same options
])
def test_a_previous_run_is_kept_only_when_continuing_it_equals_a_fresh_run(tmp_path, arch, per_phase, epochs, kept):
    extra = {"images_per_phase": per_phase} if arch == "pggan" else {}
    T._prepare_out(tmp_path / "out", options(arch, epochs=2, **extra), print)
    (tmp_path / "out" / "F_a").mkdir()  # a model trained before
    new = options(arch, epochs=epochs, **extra)
    T._prepare_out(tmp_path / "out", new, print)
    assert (tmp_path / "out" / "F_a").exists() == kept
    assert json.loads((tmp_path / "out" / "options.json").read_text()) == new.to_json()
