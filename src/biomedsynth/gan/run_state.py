"""A GAN run's resume state outside DVC, .cache/gan/<name>/<run key>/, and the stage output written from it whole
(see gan/train.py): the key that names a run, the check that a run continues under the process count that began
it, what its epochs were scored under, the output built beside the old one and renamed into place, and the pruning
that keeps two runs per stage."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

from biomedsynth.gan.checkpoint import Options, epoch_file, read_log
from biomedsynth.gan.ema import PHASE_QUARTERS
from biomedsynth.store import atomic_write_text, remove_tree, write_json


# How epochs are scored, not what the weights become: left out of the run key, so changing one rescores the kept
# generators of a trained run (gan/train.py rescored) instead of training it again
SCORING = ("score_images", "swd_directions", "feature_net", "sampling")
SCORED = "scored.json"  # per model: the SCORING options its log's scores were computed under


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def scoring(opt: Options) -> dict:
    return {field: value for field, value in opt.to_json().items() if field in SCORING}


def run_key(opt: Options) -> str:
    """The name of a run's resume state: a hash of what shapes the weights, the options but the SCORING ones (the
    number of processes sharing a batch among them). `epochs` is left out where a longer run only adds epochs to a
    shorter one: always for DCGAN, for PGGAN with a fixed images_per_phase (else the growth phases stretch
    with the epochs), for sg2ada and the diffusion model unless its EMA's default half-life (a quarter of the run)
    can act: a half-life set, or a ramp-up of at most 1 / PHASE_QUARTERS, which keeps it below that. Raising the
    epochs then continues the trained models, and lowering them takes the first epochs of the longer run without
    training."""
    key = {k: v for k, v in opt.to_json().items() if k not in SCORING}
    ema_fixed = opt.ema_half_life is not None or (opt.ema_rampup or 1.0) <= 1 / PHASE_QUARTERS
    if opt.arch == "dcgan" or opt.images_per_phase is not None or (opt.arch in ("sg2ada", "diffusion") and ema_fixed):
        del key["epochs"]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def adopt(stage_states: Path, opt: Options) -> Path:
    """This run's resume state, `stage_states / run_key(opt)`, ready to train in: a state of the same run kept under
    another name (its key once hashed the SCORING options too) is renamed to it, and each of its models records
    what its scores were computed under (SCORED), so that train_model can rescore them rather than train again."""
    state = stage_states / run_key(opt)
    for other in ([d for d in stage_states.iterdir() if d.is_dir() and d != state] if stage_states.is_dir() else []):
        try:
            old = Options.from_json(json.loads((other / "options.json").read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if run_key(old) == run_key(opt) and not state.exists():
            other.rename(state)
    if (state / "options.json").is_file():
        earlier = scoring(Options.from_json(json.loads((state / "options.json").read_text())))
        for model in (d for d in state.iterdir() if (d / "log.jsonl").is_file() and not (d / SCORED).is_file()):
            write_json(model / SCORED, earlier)
    return state


def check_world(stage_states: Path, opt: Options) -> None:
    """ValueError when this stage's run was begun by another number of processes sharing each batch: its
    stddev groups and per-rank seeds would change under this one, so it cannot continue, and a new run beside
    it would silently set its training aside."""
    if any((stage_states / run_key(opt)).glob("*/checkpoint.pt")) or not stage_states.is_dir():
        return
    for state in stage_states.iterdir():
        try:
            other = Options.from_json(json.loads((state / "options.json").read_text()))
        except (OSError, ValueError, TypeError):  # no options, or those of an older version
            continue
        if (other.world != opt.world and run_key(replace(other, world=opt.world)) == run_key(opt)
                and any(state.glob("*/checkpoint.pt"))):
            raise ValueError(f"{state} holds this stage's run begun by {other.world} process(es) sharing each batch, "
                             f"this run has {opt.world}: set launch to {other.world} processes to continue it, or "
                             "delete that folder to start over")


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the filesystem allows (the resume state's files are replaced, never rewritten, so
    nothing writes through the link, neither into DVC's cache should DVC link the output there), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_output(state: Path, out: Path, opt: Options, results: dict[str, list[dict]]) -> None:
    """The stage output from a trained resume state: options.json and, per model, epochs 1..total_epochs of the
    log, grids and speed, and the generators kept. Built beside `out` and renamed into place, so `out` is always one whole run."""
    tmp, old = out.with_name(f".{out.name}.tmp-new"), out.with_name(f".{out.name}.tmp-old")
    for leftover in (tmp, old):  # of a run killed while writing
        remove_tree(leftover)
    write_json(tmp / "options.json", opt.to_json())
    for name, rows in results.items():
        atomic_write_text(tmp / name / "log.jsonl", jsonl(rows))
        speed = {r["epoch"]: r for r in read_log(state / name, "speed.jsonl")}  # a killed epoch's line: its rerun's
        atomic_write_text(tmp / name / "speed.jsonl", jsonl(speed[r["epoch"]] for r in rows if r["epoch"] in speed))
        for r in rows:
            kept = [epoch_file(Path(name), r["epoch"])] if r["snapshot"] else []
            for path in kept + [Path(name) / "grids" / f"{r['epoch']:03d}.png"]:
                _link_or_copy(state / path, tmp / path)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    remove_tree(old)


def prune(stage_states: Path, kept: Path) -> None:
    """Remove the stage's resume states but `kept` and the most recently used other one that completed an epoch,
    so a setting tried and reverted (or a run given up for another) can still continue, and the folder stays at
    two runs. A state with no completed epoch (a run that crashed before its first ended) has nothing to resume:
    it goes, however recent, and never displaces one that has."""
    others = [d for d in stage_states.iterdir() if d.is_dir() and d != kept]
    resumable = sorted((d for d in others if any(d.glob("*/checkpoint.pt"))),
                       key=lambda d: (d / "options.json").stat().st_mtime if (d / "options.json").is_file() else 0)
    for d in others:
        if d not in resumable[-1:]:
            shutil.rmtree(d)
