"""X-ray scans listed by a CSV manifest, e.g. a PACS export; also the row checks every scan CSV shares.

Manifest columns: `path, patient_id, sex, age` (required), `image_id`, `normal` or `finding` (optional);
other columns are ignored. Paths are relative to `root`, or to the CSV's folder when no root is given,
or absolute; a path that leads outside that folder (`..`, an absolute path, a symlink) is skipped unopened and
counted (outside_root) unless allow_outside_root (sources.xray.allow_outside_root). Any format read_scan decodes
(PNG/JPEG/TIFF/DICOM, with or without .dcm) may be listed: decoding, and skipping what cannot be decoded, happens
at ingest.

Bad rows (unknown sex, unparseable age, missing image, ...) are skipped and counted, not fatal: a few bad
rows in a 100k-row export should not stop a run. The first row skipped for each reason is logged
(rows are counted from 1 after the header). No usable row at all, a missing column, or an image id on
two rows (all such ids are listed) is fatal.
"""
from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from pathlib import Path

import pandas as pd

from biomedsynth.sources import ScanRecord, inside

log = logging.getLogger(__name__)

SEXES = {"m": "M", "male": "M", "f": "F", "female": "F"}
TRUE, FALSE = {"1", "1.0", "true", "t", "yes", "y"}, {"0", "0.0", "false", "f", "no", "n"}
# "58", "58.0", or a DICOM age string: "058Y", "006M", "010W", "020D"
AGE = re.compile(r"(\d+)(?:\.0*)?\s*([DWMY]?)", re.IGNORECASE)
DAYS_PER = {"": 365.25, "y": 365.25, "m": 365.25 / 12, "w": 7, "d": 1}
MAX_AGE = 120


def skip(skipped: Counter, reason: str, what: str) -> None:
    """Count a skipped row or file under `reason`; log the first of each reason as an example."""
    if not skipped[reason]:
        log.warning("skipping %s (%s); further ones are only counted", what, reason)
    skipped[reason] += 1


def read_table(csv: Path, columns: list[str]) -> pd.DataFrame:
    """A CSV as strings (empty cells ""), with names stripped; a missing required column is fatal."""
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise ValueError(f"{csv}: file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"{csv}: not a readable CSV ({str(e).strip().splitlines()[0]})") from None
    table.columns = [str(c).strip() for c in table.columns]
    for c in columns:
        if c not in table.columns:
            raise ValueError(f"{csv}: missing column {c!r} (columns: {', '.join(table.columns)})")
    return table


def parse_sex(value: str) -> str | None:
    return SEXES.get(value.strip().lower())


def parse_age(value: str) -> int | None:
    """Whole years, or None when unparseable or outside 0..MAX_AGE (NIH's CSV has a few ages like 412)."""
    m = AGE.fullmatch(value.strip())
    if not m:
        return None
    years = int(int(m[1]) * DAYS_PER[m[2].lower()] // 365.25)
    return years if years <= MAX_AGE else None


def scan_records(table: pd.DataFrame, csv: Path, id_hint: str = "", outside: list[bool] | None = None
                 ) -> tuple[list[ScanRecord], dict[str, int]]:
    """Check rows already mapped to ScanRecord's fields as raw values: `path` (Path, or None when no file
    was found), `image_id`, `patient_id`, `sex`, `age` (strings), `normal` (bool, or None when unparseable);
    `outside`, per row, whether its path leads outside the source's root (never opened). Returns the good rows
    as records and the skipped ones counted by reason."""
    records, skipped, rows_of = [], Counter(), defaultdict(list)
    for i, r in enumerate(table[list(ScanRecord._fields)].itertuples(index=False), 1):
        where = f"{csv} row {i}"
        sex, age, image_id, patient_id = parse_sex(r.sex), parse_age(r.age), r.image_id.strip(), r.patient_id.strip()
        if outside is not None and outside[i - 1]:
            skip(skipped, "outside_root", f"{where}: {r.path} lies outside the source's root (to read it, set "
                                          "sources.xray.allow_outside_root: true)")
        elif r.path is None:
            skip(skipped, "missing_image", f"{where}: no image file for {image_id!r}")
        elif not image_id:
            skip(skipped, "bad_image_id", f"{where}: empty image id")
        elif not patient_id:
            skip(skipped, "bad_patient_id", f"{where}: empty patient id")
        elif sex is None:
            skip(skipped, "bad_sex", f"{where}: sex {r.sex!r} is not M/F")
        elif age is None:
            skip(skipped, "bad_age", f"{where}: age {r.age!r} is not a number of years in 0..{MAX_AGE}")
        elif r.normal is None:
            skip(skipped, "bad_normal", f"{where}: cannot tell whether the scan is normal")
        else:
            rows_of[image_id].append(i)
            records.append(ScanRecord(r.path, image_id, patient_id, sex, age, bool(r.normal)))
    if not records:
        raise ValueError(f"{csv}: no usable rows (skipped: {dict(skipped) or 'none, the table is empty'})")
    _check_unique(rows_of, csv, id_hint)
    return records, dict(skipped)


def _check_unique(rows_of: dict[str, list[int]], csv: Path, id_hint: str) -> None:
    """Every image listed once: a repeated row would put one image in the data twice, under one patient or
    (worse, leaking it across the split) two. All repeats are counted, the first ten shown."""
    repeated = [(image_id, rows) for image_id, rows in rows_of.items() if len(rows) > 1]
    if repeated:
        shown = "; ".join(f"{image_id!r} on rows {', '.join(map(str, rows))}" for image_id, rows in repeated[:10])
        more = "; ... (the first 10 shown)" if len(repeated) > 10 else ""
        raise ValueError(f"{csv}: {len(repeated)} image id(s) listed more than once: {shown}{more}; "
                         f"de-duplicate the table so each image is listed once{id_hint}")


def _normal(table: pd.DataFrame, csv: Path) -> list[bool | None]:
    """From `normal` (booleans) or `finding` (normal iff "No Finding", as in NIH); every scan when neither."""
    if "normal" in table.columns and "finding" in table.columns:
        raise ValueError(f"{csv}: has both 'normal' and 'finding' columns; keep one")
    if "normal" in table.columns:
        return [True if v in TRUE else False if v in FALSE else None for v in table["normal"].str.strip().str.lower()]
    if "finding" in table.columns:
        return list(table["finding"].str.strip().str.lower() == "no finding")
    return [True] * len(table)


def manifest_records(csv: Path, root: Path | None = None, allow_outside_root: bool = False
                     ) -> tuple[list[ScanRecord], dict[str, int]]:
    """Scans listed in a manifest CSV; returns (records in CSV order, skipped rows counted by reason)."""
    csv = Path(csv)
    table = read_table(csv, ["path", "patient_id", "sex", "age"])
    base = Path(root) if root is not None else csv.parent
    paths = [base / p.strip() if p.strip() else None for p in table["path"]]
    outside = [p is not None and not allow_outside_root and not inside(p, base) for p in paths]
    has_ids = "image_id" in table.columns
    return scan_records(pd.DataFrame({
        "path": pd.Series([p if p is not None and (out or p.is_file()) else None for p, out in zip(paths, outside)],
                          dtype=object),
        "image_id": table["image_id"] if has_ids else [p.stem if p is not None else "" for p in paths],
        "patient_id": table["patient_id"], "sex": table["sex"], "age": table["age"],
        "normal": pd.Series(_normal(table, csv), dtype=object),
    }), csv, id_hint="" if has_ids else " (ids are the file names without extension)", outside=outside)
