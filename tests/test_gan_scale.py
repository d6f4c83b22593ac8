"""GAN training at scale: per-rank random streams, the world size of a run, several models at once."""
import datetime
import json
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from biomedsynth.distributed import dist_info
from biomedsynth.gan import checkpoint as C
from biomedsynth.gan import train as T
from biomedsynth.gan import run_state as R
from test_gan_train import options, tiny_study


def _latents_of_rank(rank: int, world: int, init_file: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    rank, world = dist_info()
    opt = options("pggan", world=world)
    z = torch.randn(4, opt.latent_dim, generator=T._epoch_rng(opt, rank, epoch=1, device=torch.device("cpu")))
    again = torch.randn(4, opt.latent_dim, generator=T._epoch_rng(opt, rank, epoch=1, device=torch.device("cpu")))
    gathered = [torch.empty_like(z) for _ in range(world)]
    dist.all_gather(gathered, z)
    if rank == 0:
        torch.save({"z": gathered, "repeatable": torch.equal(z, again)}, out)
    dist.destroy_process_group()


def test_each_rank_of_a_two_process_gloo_run_draws_its_own_latents(tmp_path):
    """Every rank drawing the same latents shows D the same fakes N times (the fault): ranks must differ, and a
    rank's epoch must draw the same numbers again on resume."""
    out = tmp_path / "z.pt"
    mp.spawn(_latents_of_rank, args=(2, str(tmp_path / "init"), str(out)), nprocs=2)
    got = torch.load(out)
    assert got["repeatable"]
    assert not torch.equal(got["z"][0], got["z"][1])


def _ada_of_rank(rank: int, world: int, init_file: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))
    sg2 = T.build(options("sg2ada", setup="uncond", ada_interval=2, ada_speed_images=8))[5]  # world 1: its own model
    logits = torch.ones(4) if rank == 0 else -torch.ones(4)  # rank 0's D overfits, rank 1's does not
    for _ in range(2 + 2 * rank):  # rank 0's model trains 2 steps (one adjustment of p), rank 1's 4 (two)
        sg2.adaptive.observe(logits)
    torch.save(sg2.adaptive.p.item(), f"{out}.{rank}")
    dist.destroy_process_group()


def test_models_divided_among_processes_keep_their_own_ada_p():
    """The per-label sg2ada models of a stage divided among torchrun processes train apart (world 1 each): ADA must
    not all-reduce one model's statistics with another rank's model (the fault: wrong p, then a hang, as their step
    counts differ)."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ada_of_rank, args=(2, f"{tmp}/init", f"{tmp}/p"), nprocs=2)
        assert [torch.load(f"{tmp}/p.{rank}") for rank in (0, 1)] == [1.0, 0.0]


def _state(root, opt: C.Options, trained: bool):
    state = root / R.run_key(opt)
    (state / "F_a").mkdir(parents=True)
    (state / "options.json").write_text(json.dumps(opt.to_json()))
    if trained:
        (state / "F_a" / "checkpoint.pt").write_bytes(b"")
    return state


def test_a_run_begun_by_another_number_of_processes_stops_with_one_line(tmp_path):
    two = options("pggan", world=2)
    begun = _state(tmp_path, two, trained=True)
    with pytest.raises(ValueError, match=f"{begun} holds this stage's run begun by 2 process.*this run has 1"):
        R.check_world(tmp_path, options("pggan", world=1))
    R.check_world(tmp_path, two)  # the same world continues it
    R.check_world(tmp_path, options("pggan", world=1, seed=9))  # another run altogether starts beside it


def test_several_models_are_divided_among_processes_so_their_run_is_the_same_under_any_number():
    assert [T.stage_world(n, processes) for n, processes in ((1, 4), (2, 4), (64, 8), (1, 1))] == [4, 1, 1, 1]
    assert R.run_key(options("dcgan", setup="uncond", world=T.stage_world(2, 8))) == R.run_key(
        options("dcgan", setup="uncond", world=T.stage_world(2, 1)))


def test_models_trained_at_once_in_worker_processes_equal_those_trained_one_after_another(tmp_path, monkeypatch):
    """Given the same CPU threads per model (1 here), models_per_device = 2 gives the weights of a sequential run."""
    monkeypatch.setenv("BIOMEDSYNTH_MLFLOW", "0")
    tiny_study(tmp_path, n=32)
    opt = options("dcgan", setup="uncond", epochs=2)
    group = tmp_path / "data/studygroups/x_norm"
    runs = {}
    threads = torch.get_num_threads()
    for per_device, run_threads in ((1, 1), (2, 2)):  # 2 threads over 2 workers: 1 each
        torch.set_num_threads(run_threads)
        root = tmp_path / f"run{per_device}"
        T.train_gan(opt, group / "train", group / "val", tmp_path / "models/feature_net/xray.pt", root / "out",
                    root / "m.json", root / "s.csv", root / "l.csv", root / "states", models_per_device=per_device,
                    log=lambda m: None)
        runs[per_device] = root
    torch.set_num_threads(threads)
    for label in ("F_a", "M_a"):
        a, b = (torch.load(next((runs[k] / "states").glob(f"*/{label}/checkpoint.pt")), weights_only=False)
                for k in (1, 2))
        for net in ("G", "D"):
            assert all(torch.equal(w, b[net][k]) for k, w in a[net].items()), f"{label} {net}"
        assert (runs[1] / "out" / label / "log.jsonl").read_text() == (runs[2] / "out" / label / "log.jsonl").read_text()
    assert json.loads((runs[1] / "m.json").read_text()) == json.loads((runs[2] / "m.json").read_text())
