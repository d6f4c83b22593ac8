"""The pull-request review: one Markdown page a reviewer reads instead of rerunning anything.

It leads with what the study answers: Table 3 of the branch against its base branch (each arm, the drops,
the degenerate flags, the verdict and its interval), read from the committed metrics/table3.json of the
author's `make repro` and the base's. Every other params and metrics change follows in a collapsed block;
then the Table 3 of the smoke run CI just made, which shows the pipeline still runs end to end. The first
line is a marker, so CI edits its one comment instead of adding another on every push.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from biomedsynth.report import table3_markdown

MARKER = "<!-- biomedsynth-review -->"
TABLE3 = Path("metrics/table3.json")
VERDICTS = {1: "holds", 0: "inconclusive", -1: "fails"}


def _dvc_table(args: list[str], cwd: Path) -> str:
    """`dvc <args> --md`, or a line saying nothing changed when its table has no rows."""
    run = subprocess.run(["dvc", *args, "--md"], cwd=cwd, capture_output=True, text=True)
    if run.returncode != 0:
        raise ValueError(f"dvc {' '.join(args)} failed: {(run.stderr or run.stdout).strip().splitlines()[-1]}")
    rows = [line for line in run.stdout.splitlines() if line.startswith("|")]
    return "\n".join(rows) if len(rows) > 2 else "No change."


def _table3_at(base: str, repo: Path) -> dict:
    """The base branch's metrics/table3.json ({} where it has none)."""
    run = subprocess.run(["git", "show", f"{base}:{TABLE3.as_posix()}"], cwd=repo, capture_output=True, text=True)
    return json.loads(run.stdout) if run.returncode == 0 else {}


def table3_diff(old: dict, new: dict) -> str:
    """Markdown: the verdict old -> new with its interval, then per cell each arm, drop and flag old -> new."""
    def show(d, key, fmt="{:.3f}"):
        return "-" if key not in d else fmt.format(d[key])

    def both(key, fmt="{:.3f}"):
        a, b = show(old, key, fmt), show(new, key, fmt)
        return b if a == b else f"{a} → **{b}**"

    def verdict(d):
        if "verdict" not in d:
            return "-"
        interval = (f" [{d['verdict_low']:+.3f}, {d['verdict_high']:+.3f}]" if "verdict_low" in d else "")
        return f"{VERDICTS[d['verdict']]}{interval}, {d['cells_used']} cells"
    lines = [f"**Verdict** (mean over tasks of LBP minus deep chance-normalised drop, 95%): "
             + (verdict(new) if verdict(old) == verdict(new) else f"{verdict(old)} → **{verdict(new)}**"), "",
             "| cell | real | synthetic | real + synthetic | drop | chance-normalised drop | degenerate | in verdict |",
             "|---|---|---|---|---|---|---|---|"]
    cells = sorted({k.rsplit(".", 1)[0] for k in (*old, *new) if k.count(".") == 2})

    def changed(a: str, b: str) -> str:
        return b if a == b else f"{a} → **{b}**"

    for cell in cells:
        flag = lambda d: "-" if f"{cell}.is_degenerate" not in d else ("yes" if d[f"{cell}.is_degenerate"] else "no")  # noqa: E731
        used = lambda d: ("-" if f"{cell}.in_verdict" not in d else "yes" if d[f"{cell}.in_verdict"]  # noqa: E731
                          else f"no: {d.get(f'{cell}.left_out_because', '?')}")
        lines.append(f"| {cell} | " + " | ".join(both(f"{cell}.{k}", f) for k, f in (
            ("real", "{:.3f}"), ("synthetic", "{:.3f}"), ("real_synthetic", "{:.3f}"), ("drop", "{:.1%}"),
            ("drop_chance_normalised", "{:.1%}")))
            + f" | {changed(flag(old), flag(new))} | {changed(used(old), used(new))} |")
    return "\n".join(lines)


def review_markdown(base: str, smoke_summary: Path | None, repo: Path = Path(".")) -> str:
    """The review page: Table 3 of the working tree against `base`, other changes collapsed, the smoke Table 3."""
    repo = Path(repo)
    new = json.loads((repo / TABLE3).read_text()) if (repo / TABLE3).is_file() else {}
    parts = [MARKER, f"## biomedsynth against `{base}`",
             "### Table 3 of the committed `make repro` results", table3_diff(_table3_at(base, repo), new),
             "<details><summary>Every params and metrics change</summary>",
             "### Params (`dvc params diff`)", _dvc_table(["params", "diff", base], repo),
             "### Committed metrics (`dvc metrics diff`)",
             _dvc_table(["metrics", "diff", base, "--precision", "3"], repo), "</details>"]
    if smoke_summary is not None:
        summary = json.loads(Path(smoke_summary).read_text())
        parts += ["### This pull request's smoke run",
                  "The smoke profile trains every stage for seconds on a tiny sample: its numbers show that the "
                  "pipeline runs end to end, not how well synthetic data stands in.",
                  table3_markdown(summary)]
    return "\n\n".join(parts) + "\n"
