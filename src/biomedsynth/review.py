"""The pull-request review: one Markdown page a reviewer reads instead of rerunning anything.

It holds what the pull request changes against its base branch, from what git already has (params.yaml and
the committed metrics of the author's `make repro`), and the Table 3 of the smoke run CI just made, which
shows the pipeline still runs end to end. The first line is a marker, so CI edits its one comment instead
of adding another on every push.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from biomedsynth.report import table3_markdown

MARKER = "<!-- biomedsynth-review -->"


def _dvc_table(args: list[str], cwd: Path) -> str:
    """`dvc <args> --md`, or a line saying nothing changed when its table has no rows."""
    run = subprocess.run(["dvc", *args, "--md"], cwd=cwd, capture_output=True, text=True)
    if run.returncode != 0:
        raise ValueError(f"dvc {' '.join(args)} failed: {(run.stderr or run.stdout).strip().splitlines()[-1]}")
    rows = [line for line in run.stdout.splitlines() if line.startswith("|")]
    return "\n".join(rows) if len(rows) > 2 else "No change."


def review_markdown(base: str, smoke_summary: Path | None, repo: Path = Path(".")) -> str:
    """The review page: params and committed metrics of the working tree against `base`, then the smoke Table 3."""
    parts = [MARKER, f"## biomedsynth against `{base}`",
             "### Params (`dvc params diff`)", _dvc_table(["params", "diff", base], repo),
             "### Committed results of `make repro` (`dvc metrics diff`)",
             _dvc_table(["metrics", "diff", base, "--precision", "3"], repo)]
    if smoke_summary is not None:
        summary = json.loads(Path(smoke_summary).read_text())
        parts += ["### This pull request's smoke run",
                  "The smoke profile trains every stage for seconds on a tiny sample: its numbers show that the "
                  "pipeline runs end to end, not how well synthetic data stands in.",
                  table3_markdown(summary)]
    return "\n\n".join(parts) + "\n"
