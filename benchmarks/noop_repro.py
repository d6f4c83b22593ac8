"""What a `dvc repro` with nothing to do costs here, beside DVC's own floor for as many stages.

    .venv/bin/python benchmarks/noop_repro.py [--runs 3]

Run in a project whose pipeline is up to date (after `make repro`). It prints the project's dvc.lock lines and
stages, the seconds of a no-op `dvc repro` (best of --runs), and the same for a scratch DVC project of as many
trivial stages (each one small file in, one out, one params key): what DVC itself costs for that many stages on
this machine, whatever the stages hold.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import yaml


def noop_seconds(folder: Path, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(["dvc", "repro", "-q"], cwd=folder, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return min(times)


def scratch_project(folder: Path, stages: int) -> None:
    """A git + DVC project of `stages` chained trivial stages, reproduced once."""
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=folder, check=True)
    (folder / "params.yaml").write_text("seed: 0\n")
    (folder / "in.txt").write_text("0\n")
    chain = {f"s{i}": {"cmd": f"echo {i} > out{i}.txt", "deps": ["in.txt" if i == 0 else f"out{i - 1}.txt"],
                       "params": ["seed"], "outs": [f"out{i}.txt"]} for i in range(stages)}
    (folder / "dvc.yaml").write_text(yaml.safe_dump({"stages": chain}))
    subprocess.run(["dvc", "repro", "-q"], cwd=folder, check=True, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    lock = yaml.safe_load(Path("dvc.lock").read_text())["stages"]
    lines = len(Path("dvc.lock").read_text().splitlines())
    mine = noop_seconds(Path("."), args.runs)
    scratch = Path(tempfile.mkdtemp(prefix="noop-repro-"))
    try:
        scratch_project(scratch, len(lock))
        floor = noop_seconds(scratch, args.runs)
    finally:
        shutil.rmtree(scratch)
    print(f"this project: {len(lock)} stages, dvc.lock {lines} lines, no-op dvc repro {mine:.2f} s (best of {args.runs})")
    print(f"DVC's floor: {len(lock)} trivial stages, no-op dvc repro {floor:.2f} s")


if __name__ == "__main__":
    main()
