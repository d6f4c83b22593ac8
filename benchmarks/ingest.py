"""Ingest throughput and peak memory on the phantom sample at 1x and 4x its size.

    .venv/bin/python benchmarks/ingest.py [--scales 1 4] [--keep DIR]

For each scale it writes a sample with `scale` times the patients and slides of params.yaml, then runs
`biomedsynth ingest xray` and `biomedsynth ingest histology` as child processes, sampling the resident
memory of the whole process tree (workers included). Memory should not grow with the data: the store
streams images to disk shard by shard.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run_measured(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Run `cmd`; return (seconds, peak MiB of the summed RSS of it and its children)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read()}")
    return time.perf_counter() - t0, peak / 2**20


def bench_scale(scale: int, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sample"]["xray"]["patients"] *= scale
    params["sample"]["histology"]["normal_slides"] *= scale
    params["sample"]["histology"]["tumor_slides"] *= scale
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    row = {"scale": scale}
    row["sample_s"], _ = run_measured([str(BIN / "biomedsynth"), "sample"], work)
    for modality in ("xray", "histology"):
        secs, mib = run_measured([str(BIN / "biomedsynth"), "ingest", modality], work)
        summary = json.loads((work / "metrics" / "ingest" / f"{modality}.json").read_text())
        n = summary["written"]
        row[modality] = {"written": n, "seconds": round(secs, 1), "per_s": round(n / secs, 1),
                         "peak_mib": round(mib)}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--keep", type=Path, help="write the samples here instead of a temporary folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        rows = [bench_scale(s, base / f"x{s}") for s in args.scales]
    print(f"ingest on {psutil.cpu_count()} CPU cores, {psutil.virtual_memory().total / 2**30:.0f} GiB "
          "(process start-up and imports included)")
    print(f"{'scale':>5} {'sample s':>9} | {'scans':>6} {'scans/s':>8} {'peak MiB':>9} | "
          f"{'tiles':>6} {'tiles/s':>8} {'peak MiB':>9}")
    for r in rows:
        x, h = r["xray"], r["histology"]
        print(f"{r['scale']:>5} {r['sample_s']:>9.1f} | {x['written']:>6} {x['per_s']:>8} {x['peak_mib']:>9} | "
              f"{h['written']:>6} {h['per_s']:>8} {h['peak_mib']:>9}")
    if len(rows) > 1:
        for m in ("xray", "histology"):
            print(f"{m}: peak memory at {rows[-1]['scale']}x / {rows[0]['scale']}x = "
                  f"{rows[-1][m]['peak_mib'] / rows[0][m]['peak_mib']:.2f}")


if __name__ == "__main__":
    main()
