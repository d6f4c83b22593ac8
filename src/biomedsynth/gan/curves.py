"""A GAN stage's DVC plots: per epoch, the mean over its models of the scores and of the losses."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from biomedsynth.store import atomic_write_text

CURVES = (("swd", "kid", "swd_floor", "kid_floor"), ("loss_d", "loss_g"))  # the scores and losses CSVs' columns


def write_curves(results: dict[str, list[dict]], scores_path: Path, losses_path: Path) -> None:
    """Per epoch, the mean over the stage's models (`results`: name -> log rows) of SWD and KID with their
    real floors, and of the losses."""
    for path, keys in zip((scores_path, losses_path), CURVES):
        lines = ["epoch," + ",".join(keys)]
        for epoch in range(1, min((len(rows) for rows in results.values()), default=0) + 1):
            rows = [r for rs in results.values() for r in rs if r["epoch"] == epoch]
            values = [[r[k] for r in rows] for k in keys]  # None: an epoch rescored without its generator
            lines.append(f"{epoch}," + ",".join("" if None in v else f"{np.mean(v):.6f}" for v in values))
        atomic_write_text(path, "\n".join(lines) + "\n")
