"""The generate command: more images from a generator, in the export layout (export.py: images/<label>/<id>.png
marked synthetic, metadata.csv, SHA256SUMS) with generation.json saying how they were drawn.

Two sources. A trained set of the pipeline (models/gan/<name>): the epochs synthesize drew from (its metrics'
checkpoint_epochs) and, where synthesize screened the set, the same image-hash screen (synthesize.HashScreen, its
threshold, the training images' hashes). A shared generator (export --with-generator's generator/ folder): its
checksums are verified and its weights read as tensors only before anything is loaded; it has no training images,
so no hash screen.

Label k's latents come from numpy's generator seeded (seed, k), so a seed and a label give the same images
whatever else is drawn; on the CPU, bit for bit. On a GPU sampling runs in batches under bf16 autocast.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from biomedsynth.export import CARD, PngWriter, generator_names, staged, verify_checksums, write_checksums
from biomedsynth.gan.train import Synthesizer
from biomedsynth.provenance import git_commit
from biomedsynth.store import ImageSet, write_json
from biomedsynth.synthesize import HashScreen, draw_label, set_hashes


@dataclass
class Source:
    """A loaded generator and what generation needs to know about it."""
    synthesizer: Synthesizer
    name: str                     # the synthetic set it drew
    modality: str
    screen: HashScreen | None
    screen_note: str
    max_tries_factor: float = 1.0  # draws allowed per image kept when screened (synthesize.max_tries_factor)


def from_pipeline(name: str, modality: str, model_root: Path, synthesize_metrics: Path, train_set: Path,
                  max_tries_factor: float, batch_size: int = 256) -> Source:
    """The generator synthesize drew set `name` from, with its hash screen."""
    if not synthesize_metrics.is_file():
        raise FileNotFoundError(f"{synthesize_metrics} is missing; run synthesize@{name} first (dvc repro)")
    synth = json.loads(synthesize_metrics.read_text())
    if synth.get("synthesized") is False:
        raise ValueError(f"{name}: its GAN was not trained ({synth['reason']})")
    epochs = synth["checkpoint_epochs"]
    # one epoch for all models passes as that epoch; per-model epochs came from a per-model rule (best, last)
    choice = next(iter(epochs.values())) if len(set(epochs.values())) == 1 else synth["checkpoint_rule"]["rule"]
    gen = Synthesizer(model_root, choice)
    if gen.epochs != epochs:
        raise ValueError(f"{model_root} now gives epochs {gen.epochs}, synthesize drew from {epochs}; "
                         f"run synthesize@{name} again (dvc repro)")
    if not synth["hash_screen"]:
        return Source(gen, name, modality, None, "not applied (synthesize did not screen this set)", max_tries_factor)
    screen = HashScreen(set_hashes(ImageSet(train_set), gen.opt.resolution, synth["hash_size"], batch_size),
                        synth["hash_threshold"], synth["hash_size"])
    return Source(gen, name, modality, screen, f"applied as synthesize did: {synth['hash_threshold']} bits "
                  f"({synth['hash_threshold_source']}), hash size {synth['hash_size']}", max_tries_factor)


def from_shared(folder: Path) -> Source:
    """A generator folder written by export --with-generator, checked before it is loaded."""
    folder = Path(folder)
    if not (folder / CARD).is_file():
        raise FileNotFoundError(f"{folder} is not a shared generator (no {CARD}); export --with-generator writes one")
    if bad := verify_checksums(folder):
        raise ValueError(f"{folder}: files differ from its SHA256SUMS ({'; '.join(bad[:3])}); refusing to load them")
    card = json.loads((folder / CARD).read_text())
    gen = Synthesizer(folder, "last")  # loads weights only: a pickle that would run code is refused, not run
    if gen.epochs != card["epochs"]:
        raise ValueError(f"{folder}: holds epochs {gen.epochs}, its card says {card['epochs']}")
    return Source(gen, card["set"], card["modality"], None,
                  "not applied: a shared generator has no training images to screen against")


def label_counts(labels: list[str], n: int, label: str | None) -> dict[str, int]:
    """n images of `label`, or n spread evenly over all labels (the first ones take the remainder)."""
    if label is not None:
        if label not in labels:
            raise ValueError(f"label {label!r} was not trained (the generator knows {', '.join(labels)})")
        return {label: n}
    base, extra = divmod(n, len(labels))
    return {lb: base + (k < extra) for k, lb in enumerate(labels) if base + (k < extra)}


def generate(source: Source, out: Path, n: int, label: str | None = None, seed: int = 0,
             batch_size: int = 256) -> dict:
    """Draw n images (of `label`, or spread over the labels) into `out` in the export layout; return a summary
    with the images per second of drawing and writing."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    gen = source.synthesizer
    labels = list(gen.opt.labels)
    counts = label_counts(labels, n, label)
    cuda = gen.device.type == "cuda"

    def sample(lb: str, k: int, rng: np.random.Generator) -> np.ndarray:
        with torch.autocast(gen.device.type, dtype=torch.bfloat16, enabled=cuda):
            return gen.sample(lb, k, rng)

    commit = git_commit()
    names = generator_names(gen.opt.arch, gen.opt.setup, gen.epochs, labels)
    shape = (gen.opt.resolution, gen.opt.resolution, gen.opt.channels)
    tally = {lb: {"images": c, "drawn": 0, "rejected": 0} for lb, c in counts.items()}
    t0 = time.perf_counter()
    with (staged(out) as tmp, PngWriter(tmp, source.name, source.modality, commit) as writer,
          tqdm(total=n, desc=f"generate {source.name}", unit="img") as bar):
        for lb, count in counts.items():
            rng = np.random.default_rng([seed, labels.index(lb)])
            written = 0
            for batch in draw_label(sample, lb, count, rng, shape=shape, screen=source.screen,
                                    max_tries_factor=source.max_tries_factor, batch_size=batch_size, tally=tally[lb]):
                for image in batch:
                    writer.add(image, f"gen-{seed}-{lb}-{written:06d}", lb, names[lb], seed=seed)
                    written += 1
                bar.update(len(batch))
        writer.write_metadata()
        write_json(tmp / "generation.json", {
            "set": source.name, "modality": source.modality, "arch": gen.opt.arch, "setup": gen.opt.setup,
            "epochs": gen.epochs, "seed": seed, "per_label": tally, "hash_screen": source.screen_note,
            "commit": commit, "synthetic": True})
        write_checksums(tmp)
    seconds = time.perf_counter() - t0
    return {"images": n, "per_label": tally, "device": str(gen.device), "seconds": round(seconds, 2),
            "images_per_s": round(n / seconds, 1), "hash_screen": source.screen_note, "out": str(out)}
