"""Training loop of the train_gan stage: the models of one (architecture, study group, setup).

Setups (SPEC section 3): `uncond` trains one unconditional model per label of the group (the study's
64 sex-age models per architecture; a histology group has one label, so one model); `cond` trains one
model conditional on the label. The stage's output (models/gan/<name>) holds what later stages read:

    options.json              the stage's resolved settings
    <model>/epochs/NNN.pt     the sampling generator of each epoch that can be chosen (`gan.snapshots`: every
                              k-th epoch at full resolution, and the last; what `checkpoint: epoch_N` picks)
    <model>/grids/NNN.png     samples of a fixed latent per epoch
    <model>/log.jsonl         per epoch: losses, PGGAN depth/alpha, sg2ada's ADA p and r_t and mean R1, SWD,
                              KID and their real floor
                              (deterministic for a seed on CPU)
    <model>/speed.jsonl       per epoch: seconds and images/s; kept out of DVC's hash (.dvcignore), so
                              retraining on another machine or load changes no hash when the weights agree

The GANs learn from the group's `train` side only. Each epoch that `best` can choose (and each of PGGAN's growing
ones) is scored against its `val` side (real images of patients or slides the GAN never saw), in KID's case in the
feature space of the modality's net (the feature_net stage), so a generator is not rewarded for copying its
training images. Beside the curve, each model gets the same scores of real training images against the validation
images (the floor: what a perfect generator gets) and of noise and heavily blurred images (what one that learnt
nothing gets).

Training happens in a resume state outside the DVC output, .cache/gan/<name>/<hash of the options>/: the
same files plus <model>/checkpoint.pt (G, D, EMA, optimisers, sg2ada's ADA and path-length state, images seen,
after the last complete epoch). A run killed at any moment continues from there when the stage runs again, and
the output is written from it, whole, once every model is trained; so the output is the same bytes whether the run was
interrupted or not, DVC's run cache can restore it (it skips persistent outputs), and a change of options
trains under a new hash beside the old run's state instead of deleting it. Under torchrun the models of a
stage of several (the per-label ones) are divided among the ranks, each trained whole by one; a stage of one
model has every rank train on its share of each batch, with its own random streams, and gradients averaged;
rank 0 alone writes.

Beside this loop: each architecture's losses (gan/losses.py), the epochs' scores and the verdict on a trained model
(gan/verdict.py), the resume state and the output written from it (gan/run_state.py), and what later stages read of
a run (gan/checkpoint.py).
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from biomedsynth.distributed import dist_info, pick_device
from biomedsynth.gan import pggan, score
from biomedsynth.gan.checkpoint import (ARCHS, COND_MODEL, Options, best_epoch, cpu_weights, epoch_file, generate,
                                        generator, read_log, to_uint8)
from biomedsynth.gan.curves import write_curves
from biomedsynth.gan.losses import LOSSES
from biomedsynth.gan.ema import EMA, MIN_PHASE_SHARE, half_life_for, phase_shares
from biomedsynth.gan.feature_net import fingerprint
from biomedsynth.gan.run_state import SCORED, adopt, check_world, jsonl, prune, run_key, scoring, write_output
from biomedsynth.gan.verdict import Scorer, summarise, warn
from biomedsynth.lifetime import die_with_parent
from biomedsynth.store import ImageSet, atomic_write_text, load_weights, save_torch, write_json

GRID_COLUMNS = 8


# ---- models ----

def build(opt: Options, device: torch.device = torch.device("cpu"), ema_half_life: float | None = None):
    """(G, D or None, opt_g, opt_d or None, ema or None, the architecture's loss object) on `device`, initialised on
    the CPU from the options' seed (the same weights on every device); on CUDA in channels_last with fused Adam."""
    G = generator(opt)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    G, D = G.to(device, memory_format=fmt), None
    if LOSSES[opt.arch].adversarial:
        d_net = {k: v for k, v in opt.net.items() if k != "mapping_layers"}  # sg2ada's mapping network is G's alone
        D = ARCHS[opt.arch].Discriminator(opt.resolution, opt.channels, n_classes=opt.n_classes, **d_net)
        D = D.to(device, memory_format=fmt)
    opt_g, opt_d = ARCHS[opt.arch].make_optimizers(G, D, opt.lr, opt.betas, fused=device.type == "cuda")
    loss = LOSSES[opt.arch](opt, device)
    return G, D, opt_g, opt_d, EMA(G, ema_half_life, opt.ema_rampup) if loss.uses_ema else None, loss


def phase_schedule(opt: Options, images_per_epoch: int) -> pggan.PhaseSchedule:
    """PGGAN's growth. epochs_per `depth` (the study: same batch and epochs at every depth): depth 0 trains
    `epochs`, every later depth fades in over half of them and stabilises over the other half. `total`:
    the epochs spread evenly over the 2 * depths + 1 phases."""
    max_depth = pggan.check_shape(opt.resolution, opt.channels)
    total = opt.total_epochs * images_per_epoch
    if opt.images_per_phase is not None or opt.epochs_per == "total":
        per_phase = opt.images_per_phase or max(1, total // (2 * max_depth + 1))
        schedule = pggan.PhaseSchedule(opt.resolution, per_phase)
    else:
        per_depth = opt.epochs * images_per_epoch
        schedule = pggan.PhaseSchedule(opt.resolution, max(1, per_depth // 2), per_depth)
    if schedule.growth_images > total:
        raise ValueError(f"PGGAN: {opt.total_epochs} epochs of {images_per_epoch} images end before the growth to "
                         f"{opt.resolution} px ({schedule.growth_images} images); lower images_per_phase or raise "
                         "the epochs")
    return schedule


def save_grid(images: np.ndarray, path: Path, columns: int = GRID_COLUMNS) -> None:
    """uint8 (N, H, W, C) images tiled row-major into one PNG, 2 px gaps."""
    n, h, w, c = images.shape
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + 2), columns * (w + 2), c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, columns)
        grid[r * (h + 2):r * (h + 2) + h, q * (w + 2):q * (w + 2) + w] = img
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # replaced, never rewritten: the output may link to it
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(tmp, format="PNG")
    os.replace(tmp, path)


# ---- one model ----

@dataclass
class ModelData:
    """The real images of one model: indices into the group's training set (what it learns from) and
    validation set (what its epochs are scored against), with class ids (conditional models only)."""
    name: str
    indices: np.ndarray
    class_ids: np.ndarray | None
    val_indices: np.ndarray
    val_class_ids: np.ndarray | None


@dataclass(frozen=True)
class ModelPlan:
    """How one model trains: steps, PGGAN's growth and the sampling generator's half-life, checked up front."""
    steps_per_epoch: int
    images_per_epoch: int                  # over all processes
    schedule: pggan.PhaseSchedule | None
    ema_half_life: float | None
    ema_phase_shares: dict[str, float]     # per growth phase: its share in the sampled generator at its end


def plan_epochs(opt: Options, data: ModelData) -> ModelPlan:
    """ValueError when the model's images do not fill one batch, its epochs end before PGGAN's full side, or
    the EMA's half-life leaves a growth phase under MIN_PHASE_SHARE of the sampled generator. sg2ada does not
    grow: its whole run is its one phase, so its default half-life is stylegan2-ada's (ema.DEFAULT_HALF_LIFE)
    capped at a quarter of the run (a cap the ramp-up already keeps to unless it is over 0.25), not of an epoch:
    nothing changes between epochs that the average must catch up with."""
    n = len(data.indices)
    if n < opt.batch_size:
        raise ValueError(f"model {data.name}: {n} training images, fewer than one batch of {opt.batch_size}; "
                         "lower the batch size or enlarge the group")
    steps_per_epoch = n // opt.batch_size
    images_per_epoch = steps_per_epoch * opt.batch_size
    if not LOSSES[opt.arch].uses_ema:
        return ModelPlan(steps_per_epoch, images_per_epoch, None, None, {})
    total = opt.total_epochs * images_per_epoch
    schedule = phase_schedule(opt, images_per_epoch) if LOSSES[opt.arch].grows else None
    phases = schedule.phases(total) if schedule is not None else [("training", 0, total)]
    shortest = min(end - start for _, start, end in phases)
    half_life = half_life_for(shortest, opt.ema_half_life)
    shares = phase_shares(phases, opt.batch_size, half_life, opt.ema_rampup)
    low = min(shares, key=shares.get)
    if shares[low] < MIN_PHASE_SHARE:
        raise ValueError(f"model {data.name}: an EMA half-life of {half_life:g} images keeps {shares[low]:.0%} of its "
                         f"{low} phase in the sampled generator; set gan.{opt.arch}.ema_half_life at most "
                         f"{shortest / math.log2(1 / (1 - MIN_PHASE_SHARE)):.0f} or null")
    return ModelPlan(steps_per_epoch, images_per_epoch, schedule, half_life, {k: round(v, 4) for k, v in shares.items()})


class TrainingImages:
    """One model's training images at the GAN side as uint8 (N, C, side, side), read and area-downsampled
    once and held on a GPU when they fit in a quarter of its free memory; else (and on the CPU) read per
    batch, downsampled on the device. Both round the downsampled images to uint8, so they agree."""

    def __init__(self, images: ImageSet, indices: np.ndarray, resolution: int, device: torch.device):
        self.images, self.indices, self.resolution, self.device = images, indices, resolution, device
        self.resident = None
        if device.type == "cuda":
            c = images.shape[2]
            if len(indices) * c * resolution ** 2 < torch.cuda.mem_get_info(device)[0] // 4:
                self.resident = torch.empty((len(indices), c, resolution, resolution), dtype=torch.uint8,
                                            device=device)
                for part in np.array_split(np.arange(len(indices)), -(-len(indices) // 1024)):
                    self.resident[torch.from_numpy(part).to(device)] = self._read(part)

    def _read(self, positions: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.stack([self.images[int(i)] for i in self.indices[positions]]))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)  # pinned: the copy overlaps the last step
        x = (x[..., None] if x.ndim == 3 else x).permute(0, 3, 1, 2).float()
        if x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=self.resolution, mode="area")
        return x.round().to(torch.uint8)

    def batch(self, positions: np.ndarray) -> torch.Tensor:
        """Float (N, C, side, side) in [-1, 1] on the device, the images at these positions of `indices`."""
        x = (self.resident[torch.from_numpy(positions).to(self.device)] if self.resident is not None
             else self._read(positions))
        return x.float() / 127.5 - 1.0


def _epoch_rng(opt: Options, share: int, epoch: int, device: torch.device) -> torch.Generator:
    """Everything random in one process's steps of one epoch (latents, the penalty's mixing): seeded by
    (seed * world + share, epoch), share being the process's part of each batch, so the opt.world processes of one
    model draw their own numbers and a resumed epoch draws the same ones."""
    seed = np.random.SeedSequence([opt.seed * opt.world + share, epoch]).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(seed))


def _snapshot(opt: Options, epoch: int, grown: bool) -> bool:
    """Whether an epoch's sampling generator is kept: only epochs `best` can choose (at the full side, fully
    faded in), every snapshot_every-th of them and the last."""
    return grown and (epoch % opt.snapshot_every == 0 or epoch == opt.total_epochs)


def kept_epochs(opt: Options, images: int) -> list[int]:
    """The epochs whose sampling generator a model of `images` training images keeps (see _snapshot)."""
    plan = plan_epochs(opt, ModelData("model", np.arange(images), None, np.arange(1), None))
    growth = plan.schedule.growth_images if plan.schedule is not None else 0
    return [e for e in range(1, opt.total_epochs + 1) if _snapshot(opt, e, e * plan.images_per_epoch >= growth)]


def snapshot_bytes(opt: Options) -> int:
    """Bytes of one kept sampling generator: its parameters and buffers at the snapshot dtype."""
    with torch.device("meta"):
        G = generator(opt)
    size = torch.finfo(getattr(torch, opt.snapshot_dtype)).bits // 8
    return sum(t.numel() * (size if t.is_floating_point() else t.element_size())
               for t in (*G.parameters(), *G.buffers()))


def train_model(opt: Options, data: ModelData, images: ImageSet, model_dir: Path, scorer: Scorer,
                device: torch.device, rank: int = 0, log=print, tracker=None) -> list[dict]:
    """Train one model to opt.total_epochs in model_dir (its resume state), resuming from model_dir/checkpoint.pt;
    returns its log rows up to that epoch (a state trained further serves fewer epochs: its first ones)."""
    # this process's part of each batch: the rank where opt.world processes share the model; 0 where the ranks
    # divide a stage's models and this one trains it whole, as one process would, and writes it (rank 1 once
    # read past the epoch's images, drew seed + 1's numbers and wrote nothing)
    share = rank if opt.world > 1 else 0
    plan = plan_epochs(opt, data)
    nets = build(opt, device, plan.ema_half_life)
    G, D, opt_g, opt_d, ema, loss = nets
    n, epochs, per_rank = len(data.indices), opt.total_epochs, opt.batch_size // opt.world
    start_epoch, images_seen = 0, 0
    ckpt_path = model_dir / "checkpoint.pt"
    if ckpt_path.is_file():
        ck = load_weights(ckpt_path, device)
        G.load_state_dict(ck["G"]), opt_g.load_state_dict(ck["opt_g"])
        if D is not None:
            D.load_state_dict(ck["D"]), opt_d.load_state_dict(ck["opt_d"])
        if ema is not None:
            ema.model.load_state_dict(ck["ema"])
        loss.load_state_dict(ck["sg2ada"])  # the key of every resume state written so far
        start_epoch, images_seen = ck["epoch"], ck["images_seen"]
        log(f"{data.name}: " + (f"resuming after epoch {start_epoch} of {epochs}" if start_epoch < epochs
                                else f"already trained ({start_epoch} epochs, {epochs} asked for)"))
    rows = [r for r in read_log(model_dir) if r["epoch"] <= start_epoch]  # drop a half-written epoch's line
    if share == 0:
        rows = rescored(opt, data, model_dir, rows, scorer, device, log)
    if start_epoch >= epochs:
        return rows[:epochs]
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format  # as build's
    train = TrainingImages(images, data.indices, opt.resolution, device)
    sampler = ema.model if ema is not None else G
    g_fixed = torch.Generator().manual_seed(opt.seed)  # the grid's latent: the same every epoch and run
    grid_labels = _grid_labels(opt, data)
    z_grid = torch.randn(len(grid_labels) if grid_labels is not None else 2 * GRID_COLUMNS, opt.latent_dim,
                         generator=g_fixed)
    y_all = None if data.class_ids is None else torch.from_numpy(data.class_ids).to(device)
    sums = torch.zeros(3, device=device)  # loss D, loss G, penalty gradient norm: read once per epoch

    for epoch in range(start_epoch + 1, epochs + 1):
        order = np.random.default_rng((opt.seed, epoch)).permutation(n)  # resumable without saved state
        rng = _epoch_rng(opt, share, epoch, device)
        sums.zero_()
        penalised, t0 = 0, time.perf_counter()
        for step in tqdm(range(plan.steps_per_epoch), desc=f"{data.name} epoch {epoch}", unit="step", leave=False,
                         disable=None if share == 0 else True):  # None: shown on a terminal only
            first = step * opt.batch_size + share * per_rank
            chunk = np.sort(order[first:first + per_rank])  # sorted reads are kinder to memory-maps
            real = train.batch(chunk).contiguous(memory_format=fmt)
            y = None if y_all is None else y_all[torch.from_numpy(chunk).to(device)]
            extra, depth, alpha = (), None, 1.0
            if plan.schedule is not None:
                depth, alpha = plan.schedule(images_seen)
                real, extra = pggan.fade_reals(real, depth, alpha), (depth, alpha)
            loss_d, loss_g, norm = loss.train_step(nets, real, y, extra, images_seen, rng, device.type == "cuda")
            images_seen += opt.batch_size
            sums[0] += loss_d
            sums[1] += loss_g
            if norm is not None:
                sums[2] += norm
                penalised += 1
        loss_d, loss_g, grad_norm = sums.tolist()  # the epoch's one host sync
        seconds = time.perf_counter() - t0
        depth, alpha = plan.schedule(images_seen) if plan.schedule is not None else (None, 1.0)
        if share == 0:
            speed = {"epoch": epoch, "seconds": round(seconds, 2),
                     "images_per_s": round(plan.images_per_epoch / seconds, 1)}
            # every file here is replaced, never written in place: the stage output may hard-link to it
            atomic_write_text(model_dir / "speed.jsonl", jsonl(read_log(model_dir, "speed.jsonl") + [speed]))
            grown = depth is None or (depth == plan.schedule.max_depth and alpha >= 1.0)
            row = {"epoch": epoch, "images_seen": images_seen, "loss_d": loss_d / plan.steps_per_epoch,
                   "loss_g": loss_g / plan.steps_per_epoch, "snapshot": _snapshot(opt, epoch, grown)}
            if depth is not None:
                row.update(depth=depth, side=4 << depth, alpha=round(alpha, 4))
            row.update(loss.epoch_row(round(grad_norm / max(penalised, 1), 4)))
            if row["snapshot"]:
                dtype = getattr(torch, opt.snapshot_dtype)
                save_torch({"state_dict": {k: v.to(dtype) if v.is_floating_point() else v
                                           for k, v in cpu_weights(sampler).items()}, "depth": depth, "alpha": alpha},
                           epoch_file(model_dir, epoch))
            y_grid = None if grid_labels is None else torch.from_numpy(grid_labels).to(device)
            save_grid(to_uint8(generate(sampler, opt, z_grid.to(device), y_grid, depth, alpha)),
                      model_dir / "grids" / f"{epoch:03d}.png")
            # an epoch `best` cannot choose at the full side is left unscored, as a rescore leaves it: with
            # gan.snapshots.every k the diffusion model draws a k-th of its scored images; growth epochs are scored
            row.update(scorer.score(sampler, opt, data, depth, alpha, epoch) if row["snapshot"] or not grown
                       else _unscored(scorer, opt, data))
            rows.append(row)
            atomic_write_text(model_dir / "log.jsonl", jsonl(rows))
            save_torch({"G": G.state_dict(), "D": None if D is None else D.state_dict(), "opt_g": opt_g.state_dict(),
                        "opt_d": None if D is None else opt_d.state_dict(),
                        "ema": ema.model.state_dict() if ema else None,
                        "sg2ada": loss.state_dict(), "epoch": epoch, "images_seen": images_seen},
                       ckpt_path)
            losses = (f"loss D {row['loss_d']:.3f} G {row['loss_g']:.3f}" if row["loss_d"] is not None
                      else f"loss {row['loss_g']:.4f}")
            scores = (f"SWD {row['swd']:.4f} (real {row['swd_floor']:.4f}), KID {row['kid']:.4f} "
                      f"(real {row['kid_floor']:.4f})" if row["swd"] is not None else "not kept, not scored")
            log(f"{data.name} epoch {epoch}/{epochs}: {losses}, {scores}, {speed['images_per_s']} img/s"
                + (f", {row['side']} px alpha {row['alpha']:.2f}" if depth is not None else "")
                + (f", ADA p {row['ada_p']:.3f}" if "ada_p" in row else ""))
            if tracker is not None:
                log_rows(tracker, data.name, [row], [speed])
        if opt.world > 1:
            dist.barrier()  # ranks leave an epoch together, so none reads a checkpoint being written
    return rows


def _unscored(scorer: Scorer, opt: Options, data: ModelData) -> dict:
    """The scores of an epoch whose generator was not kept: none, beside the model's real floors."""
    floors = scorer.reference(opt, data).scores
    return {"swd": None, "kid": None, "swd_floor": floors["swd_floor"], "kid_floor": floors["kid_floor"]}


def rescored(opt: Options, data: ModelData, model_dir: Path, rows: list[dict], scorer: Scorer, device: torch.device,
             log=print) -> list[dict]:
    """A model's log rows scored under opt's scoring options (run_state.SCORING): as they are where its scores were
    computed under them (SCORED); else every kept generator is scored again, without training, and the epochs whose
    generator was not kept lose their scores (None), whatever they were. SCORED records the options either way."""
    now = scoring(opt)
    if rows and (model_dir / SCORED).is_file() and json.loads((model_dir / SCORED).read_text()) != now:
        for row in rows:
            row.update(_unscored(scorer, opt, data))
            if row["snapshot"]:
                snap = load_weights(epoch_file(model_dir, row["epoch"]), device)
                G = generator(opt).to(device)
                G.load_state_dict(snap["state_dict"])
                row.update(scorer.score(G, opt, data, snap["depth"], snap["alpha"], row["epoch"]))
        atomic_write_text(model_dir / "log.jsonl", jsonl(rows))  # before SCORED: a kill between rescores again
        log(f"{data.name}: the scoring options changed; {sum(r['swd'] is not None for r in rows)} kept epoch(s) of "
            f"{len(rows)} rescored, none trained again")
    write_json(model_dir / SCORED, now)
    return rows


def log_rows(tracker, name: str, rows: list[dict], speeds: list[dict]) -> None:
    """A model's epoch rows (and their speed) as tracked metrics, one step per epoch."""
    by_epoch = {s["epoch"]: s for s in speeds}
    for row in rows:
        tracker.log_metrics({f"{name}.{k}": v for k, v in {**row, **by_epoch.get(row["epoch"], {})}.items()
                             if k != "epoch" and isinstance(v, (int, float))}, step=row["epoch"])


def _grid_labels(opt: Options, data: ModelData) -> np.ndarray | None:
    """Class ids for the grid: one row of GRID_COLUMNS samples per label (conditional models only)."""
    if data.class_ids is None:
        return None
    return np.repeat(np.arange(len(opt.labels)), GRID_COLUMNS)


# ---- the stage ----

def model_data(meta, val_meta, opt: Options) -> list[ModelData]:
    """The models of a setup: one per label (uncond) or one over all labels (cond), each with the training
    and validation images of its label(s)."""
    labels, val_labels = meta["label"].to_numpy(), val_meta["label"].to_numpy()
    if opt.setup == "cond":
        val = np.flatnonzero(np.isin(val_labels, opt.labels))
        ids = lambda lbs: np.searchsorted(np.asarray(opt.labels), lbs)  # noqa: E731
        models = [ModelData(COND_MODEL, np.arange(len(meta)), ids(labels), val, ids(val_labels[val]))]
    else:
        models = [ModelData(lb, np.flatnonzero(labels == lb), None, np.flatnonzero(val_labels == lb), None)
                  for lb in opt.labels]
    for m in models:
        if len(m.val_indices) == 0:
            raise ValueError(f"model {m.name}: no validation images to score it against; raise the group's "
                             "studygroups val_fraction or widen its age bins")
    return models


def stage_world(n_models: int, processes: int) -> int:
    """Processes sharing each batch: all of them for a stage of one model; none for several (train_gan
    divides the models among the processes, each training its own alone, as it would in one process)."""
    return processes if n_models == 1 else 1


def stage_options(p, arch: str, modality: str, setup: str, train_set: Path, processes: int) -> Options:
    """The options of a train_gan stage from the params models and its training set (labels, channels), run by
    `processes` processes; ValueError, one line, for a setting Options refuses."""
    real = ImageSet(train_set)
    labels = tuple(sorted(real.meta["label"].unique()))
    world = stage_world(1 if setup == "cond" else len(labels), processes)
    return Options.from_params(p, arch, modality, setup, labels, real.shape[2], world)


def check_run(opt: Options, train_set: Path, val_set: Path, feature_net: Path, stage_states: Path,
              processes: int) -> tuple[Options, list[ModelData], dict[str, ModelPlan]]:
    """Everything the data, the feature net or a resume state can refuse in a stage's run (a ValueError, one
    line), checked before anything is written: train_gan runs it, and so does the check_gan stage for every GAN
    stage before DVC clears any of their outputs. Returns the options stamped with the feature net and the
    processes sharing each batch, the stage's models and their plans."""
    images, val = ImageSet(train_set), ImageSet(val_set)
    if images.shape[2] != opt.channels:
        raise ValueError(f"{train_set}: images have {images.shape[2]} channel(s), the GAN expects {opt.channels}")
    resolution = score.load_feature_net(feature_net).info.get("resolution")
    if resolution != opt.resolution:
        raise ValueError(f"{feature_net} was trained on {resolution} px images, the GAN draws "
                         f"{opt.resolution} px; run its feature_net stage again")
    models = model_data(images.meta, val.meta, opt)
    opt = replace(opt, feature_net=fingerprint(feature_net), world=stage_world(len(models), processes))
    plans = {data.name: plan_epochs(opt, data) for data in models}
    check_world(stage_states, opt)
    return opt, models, plans


def train_gan(opt: Options, train_set: Path, val_set: Path, feature_net: Path, out: Path, metrics_path: Path,
              scores_path: Path, losses_path: Path, stage_states: Path, trend_tail: float = 0.2,
              stage: str = "train_gan", tracking_params: dict | None = None, tracking_real_images: bool = False,
              models_per_device: int = 1,
              log=print) -> dict:
    """Train every model of one stage on `train_set`, scoring its epochs against `val_set` with the
    modality's KID feature net, in its resume state under `stage_states` (one folder per run_key); then write
    the stage output `out`, the per-stage metrics and the mean score and loss curves. Everything that can
    refuse the run is checked before anything is written.

    Under torchrun the per-label models of an unconditional stage are divided among the processes, each
    training its own alone; a stage of one model shares each batch among them. `models_per_device` trains
    that many models at once on every device (in processes of their own), spread over all visible GPUs."""
    from biomedsynth import tracking

    rank, world = dist_info()
    device = pick_device(rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes per growth phase: autotuned convolutions pay
    opt, models, plans = check_run(opt, train_set, val_set, feature_net, stage_states, world)
    state = stage_states / run_key(opt)
    if rank == 0:
        adopt(stage_states, opt)
        write_json(state / "options.json", opt.to_json())  # its time says which state was used last (prune)
    if world > 1:
        dist.barrier()
    mine = models if opt.world > 1 else models[rank::world]
    with tracking.run(stage, tracking_params or opt.to_json(), enabled=rank == 0,
                      real_images=tracking_real_images) as tracker:
        trained = _train_models(opt, mine, train_set, val_set, feature_net, state, device, rank,
                                models_per_device, log, tracker)
        if world > 1 and opt.world == 1:  # divided among the processes: rank 0 writes them all
            parts = [None] * world
            dist.all_gather_object(parts, trained)
            trained = {name: got for part in parts for name, got in part.items()}
        if rank == 0:
            results = {d.name: trained[d.name][0] for d in models}
            write_output(state, out, opt, results)
            prune(stage_states, state)
            summary = summarise(results, {d.name: trained[d.name][1] for d in models}, plans, opt, trend_tail)
            write_json(metrics_path, summary)
            write_curves(results, scores_path, losses_path)
            warn(summary, log)
            tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            tracker.log_artifact(scores_path)
            for name, rows in results.items():  # drawn from real images, no gate passed: tracking.real_images
                tracker.log_artifact(out / name / "grids" / f"{opt.total_epochs:03d}.png", real_images=True)
                # the model: the generator of the epoch `synthesize.checkpoint: best` samples from
                tracker.log_artifact(out / name / "epochs" / f"{best_epoch(rows):03d}.pt", f"model/{name}",
                                     real_images=True)
    if world > 1:
        dist.barrier()
    return summary if rank == 0 else {}


def _devices(device: torch.device, world: int) -> list[torch.device]:
    """Where a process trains its models: every visible GPU when it is the only process and no device was
    pinned (BIOMEDSYNTH_DEVICE), else its own device."""
    if device.type == "cuda" and world == 1 and "BIOMEDSYNTH_DEVICE" not in os.environ:
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [device]


def _train_models(opt: Options, models: list[ModelData], train_set: Path, val_set: Path, feature_net: Path,
                  state: Path, device: torch.device, rank: int, per_device: int, log, tracker) -> dict:
    """{model: (log rows, reference scores)} of `models`, trained one after another in this process, or
    models_per_device at a time on each device in worker processes (the same computation: a model's weights
    do not depend on where or beside what it trained, given the same number of CPU threads)."""
    devices = _devices(device, dist_info()[1])
    workers = min(per_device * len(devices), len(models))
    if workers <= 1 or opt.world > 1:
        scorer = Scorer(ImageSet(train_set), ImageSet(val_set), score.load_feature_net(feature_net, device),
                        device, opt.seed)
        return {d.name: (train_model(opt, d, scorer.train, state / d.name, scorer, device, rank, log, tracker),
                         scorer.reference(opt, d).scores) for d in models}
    threads = max(1, torch.get_num_threads() // workers)
    log(f"{len(models)} models, {workers} at a time on {', '.join(map(str, devices))}, {threads} CPU thread(s) each")
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"),
                               initializer=die_with_parent, initargs=(os.getpid(),))
    try:
        futures = {pool.submit(train_alone, opt, d, train_set, val_set, feature_net, state / d.name,
                               str(devices[k % len(devices)]), threads): d.name for k, d in enumerate(models)}
        trained = {}
        for future in as_completed(futures):
            name = futures[future]
            trained[name] = future.result()
            if tracker is not None:
                log_rows(tracker, name, trained[name][0], read_log(state / name, "speed.jsonl"))
        return trained
    except BaseException:
        for proc in list(pool._processes.values()):  # Python < 3.14 has no public way to stop a running worker
            proc.kill()
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def train_alone(opt: Options, data: ModelData, train_set: Path, val_set: Path, feature_net: Path, model_dir: Path,
                device_name: str, threads: int) -> tuple[list[dict], dict]:
    """One model in a worker process: (its log rows, its reference scores)."""
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    scorer = Scorer(ImageSet(train_set), ImageSet(val_set), score.load_feature_net(feature_net, device), device,
                    opt.seed)
    return train_model(opt, data, scorer.train, model_dir, scorer, device), scorer.reference(opt, data).scores


