"""The privacy gate (SPEC 8): the one check every way synthetic images leave the pipeline passes: `export` (a set's
PNGs), shipping its generator (`--with-generator`), `generate NAME` (more images from the pipeline's generator) and
`generate --generator` (more images from a shipped one).

- The verdict (`admit`): a set the memorisation test (evidence.py, synthesize's metrics) flags as copying training
  images is refused with one line naming the evidence, unless the caller overrides it; the record `admit` returns
  says so, and each exit writes it where its output lands (datasheet, card.json, generation.json).
- The screen: every image that leaves, not a sample, is checked for being a near copy of a training image
  (synthesize.NearCopyScreen, in every evidence space) and dropped if it is, in a set that passes too: synthesize
  marks each image of the set, export leaves the marked ones out, generate screens what it draws. A shipped
  generator's images are drawn where the training images are not, so nothing screens them: the card says so.
"""
from __future__ import annotations

from biomedsynth.datasheet import spaces


def _auc(m: dict) -> str:
    """A membership AUC and its interval; a bound the bootstrap could not form (one patient in a class) as such."""
    low, high = (f"{v:.2f}" if isinstance(v, float) else "undefined" for v in (m["low"], m["high"]))
    return f"{m['value']:.2f} [{low}, {high}]"


def evidence_line(evidence: dict) -> str:
    """The measures behind synthesize's verdict in one line: per flagged space C_T, the NN-ratio and near-copy
    shares beside the held-out ones and the test's p, and the membership AUC of every space."""
    parts = []
    for name, m in spaces(evidence).items():
        if m["copying"]:
            c_t = f"{m['c_t']:.2f}" if m["c_t"] is not None else "none"
            parts.append(f"{name}: C_T {c_t}, NN ratio < {m['nn_ratio_threshold']:g} for {m['nn_ratio_share']:.0%} "
                         f"(held out {m['nn_ratio_share_heldout']:.0%}), near copies {m['near_copy_share']:.0%} "
                         f"(held out {m['near_copy_share_heldout']:.0%}, p {m['near_copy_p']:.2g})")
    auc = ", ".join(f"{name} {_auc(m['membership'])}" for name, m in spaces(evidence).items())
    return "; ".join(parts + [f"membership AUC {auc}"])


def verdict(synth: dict) -> dict:
    """What the gate judges a drawn set by, from synthesize's metrics; JSON-ready, so a shipped generator's card
    carries it to `generate --generator`."""
    ev = synth["evidence"]
    if "screen" not in ev:
        raise ValueError("synthesize's metrics predate the privacy gate (no near-copy screen, no membership AUC); "
                         "run synthesize again (dvc repro)")
    undefined = "undefined: a class of the bootstrap holds one patient"
    return {"flagged": bool(ev["copying"]), "evidence": evidence_line(ev), "rule": ev["rule"], "alpha": ev["alpha"],
            "false_positive_rate": ev["false_positive_rate"],
            "membership_auc": {name: {k: undefined if v is None else v for k, v in m["membership"].items()}
                               for name, m in spaces(ev).items()},
            "near_copies_in_set": ev["screen"]}


def refusal(found: dict) -> str | None:
    """Why a set with this `verdict` may not leave, or None when the memorisation test does not flag it."""
    return (f"the memorisation test flags it as copying training images ({found['evidence']})"
            if found["flagged"] else None)


def admit(name: str, found: dict, *, allow_flagged: bool, action: str) -> dict:
    """The gate: ValueError (one line: the evidence and how to override) when `found` (a `verdict`) is flagged and
    not allowed; otherwise the record to write beside what leaves (`overridden`: flagged, and let out anyway)."""
    if (why := refusal(found)) and not allow_flagged:
        raise ValueError(f"{name}: {why}; pass --allow-flagged to {action} anyway")
    return {**found, "overridden": found["flagged"]}
