"""The GAN training loop: a resumed run gives an uninterrupted run's weights and output bytes, a refused knob
touches no trained model, resume states per options hash, checkpoint choice, sampling."""
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import biomedsynth
from biomedsynth.cli import app
from biomedsynth.gan import score
from biomedsynth.gan import checkpoint as C
from biomedsynth.gan import train as T
from biomedsynth.gan import run_state as R
from biomedsynth.gan import verdict as V
from biomedsynth.gan.feature_net import chance_summary, fingerprint, heldout_accuracy
from biomedsynth.gan.losses import LOSSES, DcganLoss
from biomedsynth.params import ParamsError, load_params
from biomedsynth.store import ImageSet, ImageSetWriter, write_json

# the project of the biomedsynth imported (PYTHONPATH may name another checkout): its code, params.yaml, dvc.yaml
ROOT = Path(biomedsynth.__file__).resolve().parents[2]
PYTHONPATH = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])  # child processes
CLI = [sys.executable, "-c", "from biomedsynth.cli import app; app()"]


def tiny_group(path: Path, n: int = 32, side: int = 32, channels: int = 1, labels=("F_a", "M_a"), seed: int = 0) -> ImageSet:
    """A disc whose brightness depends on the label, plus noise; patients `<seed>-<i>`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    disc = ((yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (side / 3) ** 2)
    with ImageSetWriter(path, (side, side, channels)) as w:
        for i in range(n):
            label = labels[i % len(labels)]
            img = 40 + 120 * disc * (1 + labels.index(label)) / len(labels) + rng.normal(0, 10, (side, side))
            w.add(np.repeat(np.clip(img, 0, 255).astype(np.uint8)[..., None], channels, 2), label=label,
                  patient_id=f"{seed}-{i}")
    return ImageSet(path)


def tiny_study(root: Path, group: str = "x_norm", n: int = 32, modality: str = "xray") -> tuple[ImageSet, ImageSet]:
    """<root>/data/studygroups/<group>/{train,val}, <root>/models/feature_net/<modality>.pt and its metrics (whether
    it beats chance: synthesize reads them), as the stages read them."""
    train = tiny_group(root / "data/studygroups" / group / "train", n=n)
    val = tiny_group(root / "data/studygroups" / group / "val", n=16, seed=1)
    net = feature_net(train)
    score.save_feature_net(net, root / "models/feature_net" / f"{modality}.pt", resolution=32)
    write_json(root / "metrics/feature_net" / f"{modality}.json", net_metrics(net, val, modality))
    return train, val


def net_metrics(net: score.FeatureNet, val: ImageSet, modality: str) -> dict:
    """The chance test of metrics/feature_net/<modality>.json for a net with one head (the label), measured on the
    held-out `val` as the feature_net stage measures its heads."""
    classes = sorted(val.meta["label"].astype(str).unique())
    accuracy = heldout_accuracy(net, score.read_batch(val, np.arange(len(val)), 32), val.meta[["label"]], [classes])
    return {"modality": modality, **chance_summary(modality, accuracy)}


def feature_net(images: ImageSet) -> score.FeatureNet:
    return score.train_feature_net(score.read_batch(images, np.arange(len(images)), 32), images.meta["label"].to_numpy(),
                                   epochs=1)


# sg2ada: R1, path length and a (3-step) ADA interval all fall inside a 2-epoch run of 4-step epochs, and p moves
# (a low target: D's early r_t is 0.25-0.5)
SG2ADA = dict(net=dict(channel_base=256, channel_max=16, mapping_layers=2), r1_gamma=0.05, r1_interval=4,
              augment="xray", ada_target=0.1, ada_interval=3, ada_speed_images=48, ema_rampup=0.05)


# diffusion: the smallest UNet (8-16 maps, attention at 8 px), DPM-Solver++ in 4 steps with guidance
DIFFUSION = dict(net=dict(base_width=8, width_max=16, attention_below=8, layers_per_block=1), latent_dim=32 * 32,
                 label_dropout=0.1, sampling=dict(sampler="dpm++", steps=4, guidance=1.5), betas=(0.9, 0.999))


def options(arch: str, setup: str = "cond", epochs: int = 2, **kw) -> C.Options:
    net = dict(base_width=8) if arch == "dcgan" else dict(fmap_base=128, fmap_max=16)
    extra = {"dcgan": {}, "pggan": dict(images_per_phase=8), "sg2ada": SG2ADA, "diffusion": DIFFUSION}[arch]
    base = dict(arch=arch, setup=setup, labels=("F_a", "M_a"), resolution=32, channels=1, latent_dim=16,
                batch_size=8, epochs=epochs, seed=3,
                lr={"dcgan": 2e-4, "pggan": 1e-3, "sg2ada": 2.5e-3, "diffusion": 2e-4}[arch],
                betas=(0.5, 0.999) if arch == "dcgan" else (0.0, 0.99), net=net, score_images=16)
    return C.Options(**{**base, **extra, **kw})


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """(root, train set, validation set) of a tiny X-Norm group with its feature net."""
    root = tmp_path_factory.mktemp("g")
    return (root, *tiny_study(root))


@pytest.fixture(scope="module")
def group(study):
    return study[1]


@pytest.fixture(scope="module")
def val(study):
    return study[2]


def scorer_for(train: ImageSet, val: ImageSet) -> V.Scorer:
    return V.Scorer(train, val, feature_net(train), torch.device("cpu"), 0)


class Killed(Exception):
    pass


def kill_after_epoch(epoch: int):
    def log(msg: str):
        if f"epoch {epoch}/" in msg:  # printed after the epoch's checkpoint is on disk
            raise Killed
    return log


@pytest.mark.parametrize("arch", ["dcgan", "pggan", "sg2ada", "diffusion"])
def test_resume_after_a_kill_gives_the_weights_of_a_straight_run(group, val, tmp_path, arch):
    opt = options(arch)
    data = T.model_data(group.meta, val.meta, opt)[0]
    scorer = scorer_for(group, val)
    straight = T.train_model(opt, data, group, tmp_path / "a", scorer, torch.device("cpu"), log=lambda m: None)
    with pytest.raises(Killed):
        T.train_model(opt, data, group, tmp_path / "b", scorer, torch.device("cpu"), log=kill_after_epoch(1))
    assert len(C.read_log(tmp_path / "b")) == 1
    resumed = T.train_model(opt, data, group, tmp_path / "b", scorer, torch.device("cpu"), log=lambda m: None)
    a, b = (torch.load(p / "checkpoint.pt", weights_only=False) for p in (tmp_path / "a", tmp_path / "b"))
    for key in ("G",) + (("D",) if arch != "diffusion" else ()) + (("ema",) if arch != "dcgan" else ()):
        for name, w in a[key].items():
            assert torch.equal(w, b[key][name]), f"{key}.{name} differs after resume"
    if arch == "sg2ada":  # ADA's p, r_t and half-counted interval (8 steps, interval 3), the path-length mean
        torch.testing.assert_close(a["sg2ada"], b["sg2ada"], rtol=0, atol=0)
        assert a["sg2ada"]["ada"]["steps"] == 2 and a["sg2ada"]["path_length"]["mean"] > 0
        assert [r["ada_p"] for r in straight] == [r["ada_p"] for r in resumed] and straight[-1]["ada_p"] > 0
    assert a["images_seen"] == b["images_seen"] == 2 * 32
    assert [r["loss_d"] for r in straight] == [r["loss_d"] for r in resumed]
    assert all(np.isfinite(r[k]) for r in resumed for k in ("loss_g", "swd", "kid", "swd_floor", "kid_floor"))
    assert all((r["loss_d"] is None) == (arch == "diffusion") for r in resumed)  # no discriminator
    assert (tmp_path / "b" / "grids" / "002.png").is_file() and C.epoch_file(tmp_path / "b", 2).is_file()


def test_pggan_grows_to_full_resolution_and_logs_depth(group, val, tmp_path):
    opt = options("pggan", epochs=4, images_per_phase=None)  # 4 epochs x 32 images over 2 x 3 + 1 phases
    rows = T.train_model(opt, T.model_data(group.meta, val.meta, opt)[0], group, tmp_path, scorer_for(group, val),
                         torch.device("cpu"), log=lambda m: None)
    assert [r["side"] for r in rows] == sorted(r["side"] for r in rows)
    assert rows[-1]["side"] == 32 and rows[-1]["alpha"] == 1.0 and rows[0]["side"] < 32
    # a generator is kept only where `best` may choose it: at the full side, faded in
    grown = [r["epoch"] for r in rows if r["side"] == 32 and r["alpha"] == 1.0]
    assert [r["epoch"] for r in rows if r["snapshot"]] == grown == [4]
    assert [C.epoch_file(tmp_path, r["epoch"]).is_file() for r in rows] == [r["snapshot"] for r in rows]


def test_pggan_refuses_epochs_that_end_before_full_growth():
    with pytest.raises(ValueError, match="end before the growth to 32 px"):
        T.phase_schedule(options("pggan", epochs=1, images_per_phase=64), images_per_epoch=32)


def test_a_label_smaller_than_one_batch_is_named(group, val, tmp_path):
    opt = options("dcgan", setup="uncond", batch_size=32)
    with pytest.raises(ValueError, match="model F_a: 16 training images, fewer than one batch of 32"):
        T.train_model(opt, T.model_data(group.meta, val.meta, opt)[0], group, tmp_path, None, torch.device("cpu"))


def test_uncond_trains_one_model_per_label_and_cond_one_model():
    meta = pd.DataFrame({"label": ["M_a", "F_a", "M_a", "F_a", "F_a"]})
    val = pd.DataFrame({"label": ["F_a", "X_b", "M_a"]})  # X_b: a label without training images
    uncond = T.model_data(meta, val, options("dcgan", setup="uncond"))
    assert [(d.name, d.indices.tolist(), d.val_indices.tolist()) for d in uncond] == [
        ("F_a", [1, 3, 4], [0]), ("M_a", [0, 2], [2])]
    (cond,) = T.model_data(meta, val, options("dcgan", setup="cond"))
    assert cond.name == C.COND_MODEL and cond.class_ids.tolist() == [1, 0, 1, 0, 0]
    assert cond.val_indices.tolist() == [0, 2] and cond.val_class_ids.tolist() == [0, 1]
    with pytest.raises(ValueError, match="model M_a: no validation images"):
        T.model_data(meta, val.iloc[:2], options("dcgan", setup="uncond"))


@pytest.mark.parametrize("bad, match", [(dict(arch="wgan"), "arch must be"), (dict(setup="both"), "setup must be"),
                                        (dict(resolution=48), "power of two"), (dict(channels=2), "channels"),
                                        (dict(labels=("F/a",)), "cannot name a model folder")])
def test_options_refuse_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(options("dcgan"), **bad)


@pytest.mark.parametrize("bad, match", [
    (dict(augment=""), "sg2ada's augment must be one of xray, histology"),
    (dict(r1_gamma=None), "r1_gamma must be >= 0, got None .StyleGAN2-ADA's heuristic here: 0.0256"),
    (dict(r1_gamma=-1.0), "r1_gamma must be >= 0"),
    (dict(r1_interval=0), "r1_interval must be >= 1"),
    (dict(pl_weight=-2.0), "pl_weight >= 0"),
    (dict(ada_target=1.0), "ada target must be in"),
    (dict(ada_speed_images=0), "speed_images must be >= 1"),
    (dict(net=dict(channel_base=16, channel_max=16, mapping_layers=2)), "channel_base must be >= the resolution"),
    (dict(net=dict(channel_base=256, channel_max=16, mapping_layers=0)), "mapping_layers must be >= 1"),
    (dict(net=dict(fmap_base=256, fmap_max=16)), "net needs channel_base, channel_max and mapping_layers"),
    (dict(batch_size=6), "sg2ada's minibatch stddev groups 4 images"),
    (dict(resolution=16), "power of two in 32..512"),
])
def test_sg2ada_options_refuse_bad_values_in_one_line(bad, match):
    with pytest.raises(ValueError, match=match) as err:
        dataclasses.replace(options("sg2ada"), **bad)
    assert "\n" not in str(err.value)


def test_checkpoint_choice_best_last_and_epoch(tmp_path):
    (tmp_path / "epochs").mkdir()
    rows = [{"epoch": e, "swd": s, "snapshot": e < 5} for e, s in ((1, 0.5), (2, 0.2), (3, 0.2), (4, 0.3), (5, 0.1))]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for e in range(1, 5):
        C.epoch_file(tmp_path, e).touch()
    assert C.resolve_checkpoint(tmp_path, "best") == 2  # lowest SWD of the kept epochs, the earlier of a tie
    assert C.resolve_checkpoint(tmp_path, "last") == 4
    assert C.resolve_checkpoint(tmp_path, "epoch_3") == 3
    with pytest.raises(ValueError, match="keeps the generators of epochs 1, 2, 3, 4"):
        C.resolve_checkpoint(tmp_path, "epoch_5")
    with pytest.raises(ValueError, match="allowed best, last, epoch_N"):
        C.resolve_checkpoint(tmp_path, "newest")


@pytest.mark.parametrize("every, kept", [(1, [3, 4, 5, 6]), (2, [4, 6]), (4, [4, 6])])
def test_snapshots_only_of_grown_epochs_every_kth_and_the_last(every, kept):
    opt = options("pggan", epochs=6, snapshot_every=every)
    assert [e for e in range(1, 7) if T._snapshot(opt, e, grown=e >= 3)] == kept


def test_train_gan_stage_then_synthesizer_samples_each_label(study, tmp_path, monkeypatch):
    monkeypatch.setenv("BIOMEDSYNTH_MLFLOW", "0")
    root, group, val = study
    net = root / "models/feature_net/xray.pt"
    opt = options("dcgan", setup="cond")
    out = tmp_path / "models"
    lines = []
    summary = T.train_gan(opt, group.path, val.path, net, out, tmp_path / "m.json", tmp_path / "s.csv",
                          tmp_path / "l.csv", tmp_path / "states", log=lines.append)
    assert summary["models"] == 1 and summary["epochs"] == 2
    assert summary["score_images"] == summary["val_images"] == 16  # all of val
    assert json.loads((tmp_path / "m.json").read_text()) == summary
    model = summary["per_model"][C.COND_MODEL]
    assert 0 < model["swd_floor"] < model["swd_noise"] and summary["swd_floor"] == model["swd_floor"]
    assert summary["learnt"] == model["learnt"] is (model["swd_relative"] < V.LEARNT_BELOW)
    assert any("learnt nothing" in line for line in lines) != model["learnt"]  # a 2-epoch GAN: warned
    assert json.loads((out / "options.json").read_text())["feature_net"] == fingerprint(net)
    rows = C.read_log(out / C.COND_MODEL)
    assert all(r["swd_floor"] == model["swd_floor"] for r in rows)  # the per-model log shows the floor
    assert (tmp_path / "s.csv").read_text().splitlines() == [
        "epoch,swd,kid,swd_floor,kid_floor",
        *(f"{r['epoch']},{r['swd']:.6f},{r['kid']:.6f},{r['swd_floor']:.6f},{r['kid_floor']:.6f}" for r in rows)]
    assert (tmp_path / "l.csv").read_text().splitlines()[0] == "epoch,loss_d,loss_g"
    gen = C.Synthesizer(out, "last", torch.device("cpu"))
    images = gen.sample("M_a", 5, np.random.default_rng(0))
    assert images.shape == (5, 32, 32, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, gen.sample("M_a", 5, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="label 'X' was not trained"):
        gen.sample("X", 1, np.random.default_rng(0))
    assert {p.name for p in out.rglob("*") if p.is_file()} == {  # what later stages read, no checkpoint
        "options.json", "log.jsonl", "speed.jsonl", "001.pt", "002.pt", "001.png", "002.png"}
    first_state = tmp_path / "states" / R.run_key(dataclasses.replace(opt, feature_net=fingerprint(net)))
    # changed options: trained from scratch in a state of their own; the output is the new run, the old state stays
    T.train_gan(dataclasses.replace(opt, seed=4, epochs=1), group.path, val.path, net, out, tmp_path / "m.json",
                tmp_path / "s.csv", tmp_path / "l.csv", tmp_path / "states", log=lambda m: None)
    assert len(C.read_log(out / C.COND_MODEL)) == 1 and json.loads((out / "options.json").read_text())["seed"] == 4
    assert len(C.read_log(first_state / C.COND_MODEL)) == 2 and len(list((tmp_path / "states").iterdir())) == 2
    score.save_feature_net(feature_net(group), tmp_path / "net64.pt", resolution=64)
    with pytest.raises(ValueError, match="trained on 64 px images, the GAN draws 32 px"):
        T.train_gan(opt, group.path, val.path, tmp_path / "net64.pt", out, tmp_path / "m.json", tmp_path / "s.csv",
                    tmp_path / "l.csv", tmp_path / "states", log=lambda m: None)


@pytest.mark.usefixtures("one_thread")
def test_sg2ada_stage_from_params_writes_the_layout_logs_ada_and_samples_each_label(tmp_path, monkeypatch):
    """tasks.xray.arch: sg2ada selects its stage under gan.stages=table3 (the others sg2ada has are no stages); train-gan
    writes the stage layout, logs ADA's p and r_t and R1 per epoch, and its Synthesizer draws every label, the
    same images for the same seed."""
    monkeypatch.setenv("BIOMEDSYNTH_MLFLOW", "0")
    monkeypatch.chdir(smoke_project(tmp_path))
    assert CliRunner().invoke(app, ["set", "gan.stages=table3", "tasks.xray.arch=sg2ada", "export.sets=table3"]).exit_code == 0
    result = CliRunner().invoke(app, ["train-gan", "sg2ada-x_norm-cond"])
    assert result.exit_code == 0, result.output
    out = Path("models/gan/sg2ada-x_norm-cond")
    opt = C.Options.from_json(json.loads((out / "options.json").read_text()))
    assert opt.augment == "xray" and opt.r1_gamma == pytest.approx(0.0002 * 32 ** 2 / 8)  # the heuristic at 32 px
    assert {p.name for p in out.rglob("*") if p.is_file()} == {
        "options.json", "log.jsonl", "speed.jsonl", "001.pt", "002.pt", "001.png", "002.png"}
    rows = C.read_log(out / C.COND_MODEL)
    assert [r["epoch"] for r in rows] == [1, 2] and all(0 <= r["ada_p"] <= 1 and -1 <= r["ada_rt"] <= 1 for r in rows)
    model = json.loads(Path("metrics/gan/sg2ada-x_norm-cond.json").read_text())["per_model"][C.COND_MODEL]
    assert model["ema_half_life"] == 2 * 64 / 4  # a quarter of the run: 2 epochs of 64 images
    gen = C.Synthesizer(out, "best", torch.device("cpu"))
    for label in opt.labels:
        images = gen.sample(label, 3, np.random.default_rng(0))
        assert images.shape == (3, 32, 32, 1) and images.dtype == np.uint8
        np.testing.assert_array_equal(images, gen.sample(label, 3, np.random.default_rng(0)))
    left_out = CliRunner().invoke(app, ["train-gan", "sg2ada-h_norm-uncond"])
    assert left_out.exit_code == 2 and "'sg2ada-h_norm-uncond' is not a GAN stage" in left_out.output


class Replay(torch.nn.Module):
    """A 'generator' that draws given images in turn (real ones: a perfect generator) whatever its input."""

    def __init__(self, images: torch.Tensor):
        super().__init__()
        self.images = images

    def forward(self, z, y=None):
        return self.images[torch.arange(len(z)) % len(self.images)]


def test_floor_and_learnt_flag_against_noise_and_blur(group, val):
    opt = options("dcgan", setup="uncond")
    data = T.model_data(group.meta, val.meta, opt)[0]
    scorer = scorer_for(group, val)
    real = score.read_batch(group, data.indices, 32)
    noise = torch.rand(64, 1, 32, 32) * 2 - 1
    ref = scorer.reference(opt, data).scores
    assert ref["val_images"] == 8 and ref["images"] == 16  # all 8 of the label's, repeated up to score_images
    assert 0 < ref["swd_floor"] < min(ref["swd_noise"], ref["swd_blur"])
    assert ref["kid_floor"] < ref["kid_noise"]  # KID is unbiased: ~0 (either side) for one distribution
    verdicts = {}
    for name, G in (("real", Replay(real)), ("noise", Replay(noise))):
        rows = [{"epoch": 1, "snapshot": True, **scorer.score(G, opt, data, None, 1.0, 1)}]
        verdicts[name] = V.model_summary(rows, ref, 0.2)
    assert verdicts["real"]["learnt"] and verdicts["real"]["swd_relative"] < 0.2
    assert not verdicts["noise"]["learnt"] and verdicts["noise"]["swd_relative"] > 0.8


@pytest.mark.parametrize("swd, improving", [
    ([0.9, 0.7, 0.6, 0.5, 0.45, 0.4, 0.38, 0.36, 0.33, 0.31], True),   # best last, still falling
    ([0.9, 0.5, 0.4, 0.35, 0.3, 0.32, 0.33, 0.35, 0.36, 0.38], False),  # best at epoch 5, rising since
    ([0.9, 0.5, 0.4, 0.35, 0.3, 0.32, 0.33, 0.35, 0.29, 0.30], False),  # best in the tail, but no longer falling
])
def test_still_improving_needs_a_late_best_and_a_falling_tail(swd, improving):
    rows = [{"epoch": e, "swd": s, "snapshot": True} for e, s in enumerate(swd, 1)]
    trend = V.trend(rows, 0.2)
    assert trend["still_improving"] is improving and (trend["swd_tail_slope"] < 0) == (swd[-1] < swd[-2])


def smoke_project(root: Path, n: int = 64) -> Path:
    """A tiny X-Norm study group and feature net at `root`, with the smoke profile's params."""
    tiny_study(root, n=n)
    (root / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    subprocess.run(CLI + ["profile", "smoke"], cwd=root, check=True, capture_output=True)
    return root


def stage_files(root: Path, name: str) -> dict:
    """What DVC hashes of models/gan/<name> (all but speed.jsonl, .dvcignored), path -> bytes."""
    out = root / "models/gan" / name
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != "speed.jsonl"}


@pytest.mark.e2e
def test_kill_9_of_the_cli_stage_resumes_to_the_bytes_of_a_straight_run(tmp_path):
    """The real thing: SIGKILL train-gan after its first epoch, run it again: the stage output is the same bytes
    as an uninterrupted run's (so dvc.lock does not depend on whether a run was interrupted)."""
    env = {**os.environ, "BIOMEDSYNTH_MLFLOW": "0", "PYTHONPATH": PYTHONPATH, "PYTHONUNBUFFERED": "1"}
    cmd = CLI + ["train-gan", "pggan-x_norm-cond"]  # PGGAN: layers join the optimiser after the resume
    straight, killed = (smoke_project(tmp_path / name) for name in ("straight", "killed"))
    for root in (straight, killed):
        subprocess.run(CLI + ["set", "gan.xray.epochs_cond=4"], cwd=root, check=True, capture_output=True)
    subprocess.run(cmd, cwd=straight, env=env, check=True, capture_output=True)
    proc = subprocess.Popen(cmd, cwd=killed, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if "epoch 1/4" in line:  # printed once epoch 1 is saved
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.fail("the run finished before it could be killed; make the test's run longer")
    output_after_kill = (killed / "models/gan/pggan-x_norm-cond").exists()
    subprocess.run(cmd, cwd=killed, env=env, check=True, capture_output=True)
    a, b = (stage_files(root, "pggan-x_norm-cond") for root in (straight, killed))
    assert [path for path in a if a[path] != b.get(path)] == []
    kept = sum(r["snapshot"] for r in C.read_log(straight / "models/gan/pggan-x_norm-cond/conditional"))
    assert list(a) == list(b) and len(a) == 1 + 1 + 4 + kept >= 7  # options.json; the log, 4 grids, generators
    assert not output_after_kill  # written whole once training ends: never a half-trained output


@pytest.mark.e2e
def test_launch_two_cpu_processes_train_with_rank_0_writing(tmp_path):
    """`launch.nproc_per_node: 2`: train-gan starts 2 gloo ranks through torchrun; they share each epoch's
    batches; rank 0 alone writes."""
    tiny_study(tmp_path, n=64)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    subprocess.run(CLI + ["profile", "smoke"], cwd=tmp_path, check=True, capture_output=True)
    subprocess.run(CLI + ["set", "launch.nproc_per_node=2"], cwd=tmp_path, check=True, capture_output=True)
    env = {**os.environ, "BIOMEDSYNTH_MLFLOW": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH,
           "BIOMEDSYNTH_DEVICE": "cpu"}  # gloo on CPU even where a GPU is present
    run = subprocess.run([*CLI, "train-gan", "pggan-x_norm-cond"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("2 processes: torchrun --standalone --nproc-per-node 2 --module biomedsynth") == 1
    model = tmp_path / "models/gan/pggan-x_norm-cond" / C.COND_MODEL
    rows = C.read_log(model)
    assert [r["epoch"] for r in rows] == [1, 2]  # one line per epoch: only rank 0 logged
    assert rows[-1]["images_seen"] == 2 * 64  # 64 images per epoch: 8 steps of batch 8, 4 on each rank
    assert run.stdout.count("epoch 2/2") == 1
    ck = torch.load(next((tmp_path / ".cache/gan/pggan-x_norm-cond").glob(f"*/{C.COND_MODEL}/checkpoint.pt")),
                    weights_only=False)
    assert ck["epoch"] == 2 and all(torch.isfinite(w).all() for w in ck["G"].values())


@pytest.mark.e2e
def test_a_multi_label_stage_trains_the_same_weights_in_one_process_and_in_two(tmp_path):
    """Reproduced first: under `launch.nproc_per_node: 2` the per-label models of an unconditional stage are divided
    among the ranks, and rank 1 trained its model as if it held the second share of a shared batch: it read one
    batch past the epoch's images (exit 1, "need at least one array to stack"), drew seed + 1's numbers and would
    have written nothing. A model trained whole by one process now trains as in a one-process run on any rank:
    both runs write the same bytes."""
    env = {**os.environ, "BIOMEDSYNTH_MLFLOW": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH,
           "BIOMEDSYNTH_DEVICE": "cpu"}  # one thread per process in both runs: the same arithmetic
    outputs = []
    for processes in (1, 2):
        root = smoke_project(tmp_path / f"{processes}-processes")
        subprocess.run(CLI + ["set", f"launch.nproc_per_node={processes}"], cwd=root, check=True, capture_output=True)
        run = subprocess.run([*CLI, "train-gan", "dcgan-x_norm-uncond"], cwd=root, env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        outputs.append(stage_files(root, "dcgan-x_norm-uncond"))
    one, two = outputs
    assert sorted(p.parts[0] for p in one if p.name == "log.jsonl") == ["F_a", "M_a"]  # two models, one per rank
    assert list(one) == list(two) and [path for path in one if one[path] != two[path]] == []


@pytest.mark.e2e
def test_two_nodes_of_one_process_train_the_bytes_of_one_node_of_two(tmp_path):
    """`launch.nnodes: 2` for real: two nodes (here two clones of the project, as on two machines) of one process
    each meet at node 0's rdzv_endpoint on the loopback address and train a conditional PGGAN whose batches they
    share; node 0 writes the stage output, the same bytes as one node of two processes."""
    import socket

    env = {**os.environ, "BIOMEDSYNTH_MLFLOW": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH,
           "BIOMEDSYNTH_DEVICE": "cpu"}
    cmd = [*CLI, "train-gan", "pggan-x_norm-cond"]
    one = smoke_project(tmp_path / "one-node")
    subprocess.run(CLI + ["set", "launch.nproc_per_node=2"], cwd=one, check=True, capture_output=True)
    run = subprocess.run(cmd, cwd=one, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    with socket.socket() as s:  # a free port for node 0's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = []
    for rank in (0, 1):
        root = smoke_project(tmp_path / f"node{rank}")
        subprocess.run(CLI + ["set", "launch.nnodes=2", f"launch.node_rank={rank}",
                              f"launch.rdzv_endpoint=127.0.0.1:{port}"], cwd=root, check=True, capture_output=True)
        nodes.append((root, subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True)))
    for root, proc in nodes:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        assert "2 processes: torchrun --nnodes 2 --node-rank" in out
    a, b = stage_files(one, "pggan-x_norm-cond"), stage_files(nodes[0][0], "pggan-x_norm-cond")
    assert list(a) == list(b) and [path for path in a if a[path] != b[path]] == []
    assert not (nodes[1][0] / "models/gan/pggan-x_norm-cond").exists()  # node 1 trains, node 0 writes


@pytest.mark.parametrize("arch, per_phase, epochs, same", [
    ("dcgan", None, 3, True),    # more epochs continue the run
    ("dcgan", None, 1, True),    # fewer take its first epochs
    ("pggan", 8, 3, True),       # a fixed growth schedule: the same
    ("pggan", None, 3, False),   # phases spread over the epochs stretch with them: another run
    ("sg2ada", None, 3, True),   # its EMA's ramp-up (0.05) keeps the half-life below a quarter of any run
    ("sg2ada", "no ramp-up", 3, False),  # then the half-life is a quarter of the run: it stretches with the epochs
])
def test_runs_share_a_resume_state_only_where_more_epochs_extend_a_run(arch, per_phase, epochs, same):
    extra = ({"images_per_phase": per_phase} if arch == "pggan" else
             {"ema_rampup": None} if per_phase == "no ramp-up" else {})
    assert (R.run_key(options(arch, epochs=2, **extra)) == R.run_key(options(arch, epochs=epochs, **extra))) == same
    assert R.run_key(options(arch, **extra)) != R.run_key(options(arch, seed=4, **extra))
    assert R.run_key(options(arch, **extra)) != R.run_key(options(arch, world=2, **extra))  # the batch split in 2


def trained_epochs(log_lines: list[str]) -> list[int]:
    """The epochs a run trained, from its per-epoch log lines."""
    return [int(m[1]) for line in log_lines if (m := re.search(r" epoch (\d+)/", line))]


def test_more_epochs_continue_the_run_and_fewer_take_its_first_epochs(study, tmp_path, monkeypatch):
    monkeypatch.setenv("BIOMEDSYNTH_MLFLOW", "0")
    root, group, val = study

    def run(epochs: int, out: str) -> list[int]:
        """The epochs trained by a run of the stage to `epochs` into tmp_path/out."""
        lines = []
        T.train_gan(options("dcgan", epochs=epochs), group.path, val.path, root / "models/feature_net/xray.pt",
                    tmp_path / out / "models/gan/x", *(tmp_path / f for f in ("m.json", "s.csv", "l.csv", "states")),
                    log=lines.append)
        return trained_epochs(lines)

    assert run(2, "two") == [1, 2]
    assert run(3, "three") == [3]
    assert run(2, "again") == []
    assert stage_files(tmp_path / "again", "x") == stage_files(tmp_path / "two", "x")
    assert len(stage_files(tmp_path / "three", "x")) == 1 + 1 + 3 * 2


def test_a_scoring_option_rescores_the_kept_generators_without_training_again(study, tmp_path, monkeypatch):
    """score_images, swd_directions and the feature net shape no weight: the run key leaves them out, and a run under
    other ones rescores its kept generators (an epoch whose generator was not kept loses its scores) instead of
    training again; back on the first options, the scores are those training logged, to the digit. A state keyed
    when the key still hashed them (an earlier version) is found and renamed, not trained again."""
    monkeypatch.setenv("BIOMEDSYNTH_MLFLOW", "0")
    root, group, val = study
    net, states = root / "models/feature_net/xray.pt", tmp_path / "states"

    def run(opt: C.Options) -> tuple[list[int], list[dict], list[str]]:
        """(the epochs trained, the conditional model's log rows, the log lines) of a 3-epoch run under `opt`."""
        lines = []
        T.train_gan(opt, group.path, val.path, net, tmp_path / "models/gan/x",
                    *(tmp_path / f for f in ("m.json", "s.csv", "l.csv")), states, log=lines.append)
        return trained_epochs(lines), C.read_log(tmp_path / "models/gan/x" / C.COND_MODEL), lines

    first = options("dcgan", epochs=3, snapshot_every=2)  # epochs 2 and 3 (the last) keep their generator
    trained, logged, lines = run(first)
    assert trained == [1, 2, 3] and [r["snapshot"] for r in logged] == [False, True, True]
    assert logged[0]["swd"] is None and logged[0]["swd_floor"] == logged[1]["swd_floor"]  # best can't choose it:
    assert "not kept, not scored" in next(line for line in lines if " epoch 1/3" in line)  # nothing drawn to score
    ckpt = next(states.glob(f"*/{C.COND_MODEL}/checkpoint.pt"))
    before = ckpt.stat().st_mtime_ns
    more = dataclasses.replace(first, score_images=32, swd_directions=256)
    trained, rescored, lines = run(more)
    assert trained == [] and ckpt.stat().st_mtime_ns == before  # nothing trained, the state untouched
    assert f"{C.COND_MODEL}: the scoring options changed; 2 kept epoch(s) of 3 rescored, none trained again" in lines
    assert rescored[0]["swd"] is None and rescored[0]["kid"] is None  # no generator kept: no score
    assert all(r["swd"] != o["swd"] and r["swd_floor"] != o["swd_floor"] for r, o in zip(rescored[1:], logged[1:]))
    assert [r["loss_d"] for r in rescored] == [r["loss_d"] for r in logged]  # the training log itself unchanged
    assert json.loads((tmp_path / "m.json").read_text())["per_model"][C.COND_MODEL]["best_epoch"] in (2, 3)
    assert (tmp_path / "s.csv").read_text().splitlines()[1].startswith("1,,,")  # the curve's unscored epoch
    _, again, _ = run(first)
    assert [(r["swd"], r["kid"]) for r in again] == [(r["swd"], r["kid"]) for r in logged]
    # a state named by the key of an earlier version (it hashed the scoring options too) is adopted
    state = ckpt.parent.parent
    state.rename(state.with_name("0123456789abcdef"))
    trained, _, _ = run(first)
    assert trained == [] and [d.name for d in states.iterdir()] == [state.name]


def test_runs_that_crash_before_an_epoch_never_displace_a_trained_resume_state(study, tmp_path, monkeypatch):
    """The issue's sequence: a trained run, two runs under other options that crash before their first epoch
    ends (their states hold only options.json), then a good run under yet other options. The trained state
    survives the good run's pruning, and back on its options more epochs continue it instead of epoch 1."""
    monkeypatch.setenv("BIOMEDSYNTH_MLFLOW", "0")
    root, group, val = study
    net, states = root / "models/feature_net/xray.pt", tmp_path / "states"

    def run(opt: C.Options) -> list[int]:
        """The epochs trained by a run of the stage under `opt`."""
        lines = []
        T.train_gan(opt, group.path, val.path, net, tmp_path / "out",
                    *(tmp_path / f for f in ("m.json", "s.csv", "l.csv")), states, log=lines.append)
        return trained_epochs(lines)

    def crash(*args, **kwargs):
        raise Killed

    trained, good = options("dcgan", epochs=1), options("dcgan", epochs=1, seed=6)
    assert run(trained) == [1]
    with monkeypatch.context() as m:
        m.setattr(DcganLoss, "train_step", crash)
        for seed in (4, 5):
            with pytest.raises(Killed):
                run(options("dcgan", epochs=1, seed=seed))
    assert len(list(states.iterdir())) == 3
    assert run(good) == [1]
    assert {d.name for d in states.iterdir()} == {R.run_key(dataclasses.replace(o, feature_net=fingerprint(net)))
                                                  for o in (trained, good)}
    assert run(dataclasses.replace(trained, epochs=2)) == [2]


@pytest.mark.parametrize("arch, knob, error", [
    ("dcgan", "gan.xray.batch_size=1000", "64 training images, fewer than one batch of 1000"),
    ("pggan", "gan.pggan.images_per_phase=100000", "end before the growth to 32 px"),
])
def test_a_knob_the_data_cannot_serve_leaves_the_trained_model_as_it_was(tmp_path, monkeypatch, arch, knob, error):
    """A knob the data cannot serve stops train-gan in one line before it touches the trained model: its
    output and its resume state keep every byte."""
    root = smoke_project(tmp_path)
    monkeypatch.chdir(root)
    monkeypatch.setenv("BIOMEDSYNTH_MLFLOW", "0")
    assert CliRunner().invoke(app, ["train-gan", f"{arch}-x_norm-cond"]).exit_code == 0
    trained = {p: p.read_bytes() for p in sorted(Path().rglob("*")) if p.is_file() and p.parts[0] in ("models", ".cache")}
    assert CliRunner().invoke(app, ["set", knob]).exit_code == 0
    result = CliRunner().invoke(app, ["train-gan", f"{arch}-x_norm-cond"])
    assert {p: p.read_bytes() for p in sorted(Path().rglob("*")) if p.is_file() and p.parts[0] in ("models", ".cache")} \
        == trained
    assert result.exit_code == 1 and result.output.count("\n") == 1 and error in result.output, result.output


@pytest.mark.parametrize("side", [48, 100])
def test_a_gan_side_that_is_not_a_power_of_two_is_refused_at_params_load(tmp_path, monkeypatch, side):
    monkeypatch.chdir(tmp_path)
    text = (ROOT / "params.yaml").read_text().replace("resolution: 64", f"resolution: {side}", 1)  # gan.xray's
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match=f"gan.xray.resolution = {side}: .*must be a power of two"):
        load_params(tmp_path / "params.yaml")
    result = CliRunner().invoke(app, ["train-gan", "dcgan-x_norm-cond"])
    assert result.exit_code == 2 and "gan.xray.resolution" in result.output


def test_the_training_loop_never_asks_which_architecture_it_trains():
    """One training object per architecture (gan/losses.py), the names written once (gan.ARCH_NAMES): the loop
    once tested `opt.arch ==` 15 times and each d_loss had its own signature."""
    import inspect

    from biomedsynth.gan import ARCH_NAMES

    assert tuple(LOSSES) == tuple(C.ARCHS) == ARCH_NAMES
    for fn in (T.train_model, T.build, T.plan_epochs):
        assert "opt.arch ==" not in inspect.getsource(fn) and "opt.arch !=" not in inspect.getsource(fn), fn
    for name, loss in LOSSES.items():  # the same methods, each with the same signature; a GAN's step asks for four more
        gan_parts = ("g_inputs", "d_loss", "after_d_step", "g_loss") if loss.adversarial else ()
        for method in ("train_step", "epoch_row", "state_dict", "load_state_dict", *gan_parts):
            assert list(inspect.signature(getattr(loss, method)).parameters) == \
                list(inspect.signature(getattr(LOSSES["dcgan"], method)).parameters), (name, method)
