"""Croissant metadata (MLCommons, JSON-LD, version 1.0) of an exported synthetic set, so that dataset catalogues
index it and `mlcroissant` reads its records: the PNGs joined to metadata.csv's columns, with the datasheet's
license, version, description and its responsible-AI facts (use cases, limits, personal information), the unit
the real data's split kept apart (patient, slide or tile) and the run's warnings (schema.org additionalProperty
values split_unit and run_warning, and in words in rai:dataCollection and rai:dataLimitations).

Written here as plain JSON (no mlcroissant at run time); the tests validate it with mlcroissant.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

CROISSANT = "http://mlcommons.org/croissant/1.0"
# Croissant 1.0's @context (as its reference examples and mlcroissant write it) and the responsible-AI vocabulary
CONTEXT = {
    "@language": "en", "@vocab": "https://schema.org/", "citeAs": "cr:citeAs", "column": "cr:column",
    "conformsTo": "dct:conformsTo", "cr": "http://mlcommons.org/croissant/",
    "rai": "http://mlcommons.org/croissant/RAI/",
    "data": {"@id": "cr:data", "@type": "@json"}, "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "dct": "http://purl.org/dc/terms/", "equivalentProperty": "cr:equivalentProperty",
    "examples": {"@id": "cr:examples", "@type": "@json"}, "extract": "cr:extract", "field": "cr:field",
    "fileProperty": "cr:fileProperty", "fileObject": "cr:fileObject", "fileSet": "cr:fileSet", "format": "cr:format",
    "includes": "cr:includes", "isLiveDataset": "cr:isLiveDataset", "jsonPath": "cr:jsonPath", "key": "cr:key",
    "md5": "cr:md5", "parentField": "cr:parentField", "path": "cr:path", "recordSet": "cr:recordSet",
    "references": "cr:references", "regex": "cr:regex", "repeated": "cr:repeated", "replace": "cr:replace",
    "samplingRate": "cr:samplingRate", "sc": "https://schema.org/", "separator": "cr:separator", "source": "cr:source",
    "subField": "cr:subField", "transform": "cr:transform",
}
PNG_FILES = "png-files"   # the FileSet's id (ids are shared by files and record sets: it must differ from "images")


def _column_type(values: pd.Series) -> str:
    return "sc:Integer" if pd.api.types.is_integer_dtype(values) else "sc:Text"


def _file(path: str, sha256: str, fmt: str, description: str) -> dict:
    return {"@type": "cr:FileObject", "@id": path, "name": path, "contentUrl": path, "encodingFormat": fmt,
            "sha256": sha256, "description": description}


def metadata(sheet: dict, root: Path, checksums: dict[str, str]) -> dict:
    """croissant.json for the export at `root` (its metadata.csv written), from its datasheet and the SHA-256 of
    its files (`checksums`: relative path -> hex). No datePublished (optional in Croissant 1.0: mlcroissant warns):
    the only date a run has is its commit's or the clock's, and either would change the export on a rerun."""
    columns = pd.read_csv(Path(root) / "metadata.csv", nrows=50, keep_default_na=False)
    csv_fields = [{"@type": "cr:Field", "@id": f"metadata/{c}", "name": c, "dataType": _column_type(columns[c]),
                   "source": {"fileObject": {"@id": "metadata.csv"}, "extract": {"column": c}}}
                  for c in columns.columns]
    image_fields = [
        {"@type": "cr:Field", "@id": "images/image", "name": "image", "dataType": "sc:ImageObject",
         "description": "the synthetic image (PNG)",
         "source": {"fileSet": {"@id": PNG_FILES}, "extract": {"fileProperty": "content"}}},
        {"@type": "cr:Field", "@id": "images/file_name", "name": "file_name", "dataType": "sc:Text",
         "source": {"fileSet": {"@id": PNG_FILES}, "extract": {"fileProperty": "filepath"},
                    "transform": {"regex": r"^(?:.*/)?(images/[^/]+/[^/]+\.png)$"}},
         "references": {"field": {"@id": "metadata/file_name"}}},
        *({"@type": "cr:Field", "@id": f"images/{c}", "name": c, "dataType": _column_type(columns[c]),
           "source": {"field": {"@id": f"metadata/{c}"}}} for c in columns.columns if c != "file_name")]
    weights = sorted(p for p in checksums if p.startswith("generator/") and p.endswith(".pt"))
    distribution = [
        _file("metadata.csv", checksums["metadata.csv"], "text/csv",
              "one row per image: file_name (into images/), image_id, label and its parts, draw"),
        _file("datasheet.json", checksums["datasheet.json"], "application/json",
              "the datasheet: what the set is, how it was made, fidelity, memorisation, utility, limits"),
        {"@type": "cr:FileSet", "@id": PNG_FILES, "name": PNG_FILES, "encodingFormat": "image/png",
         "includes": "images/*/*.png", "description": "one PNG per image, in a folder named after its label"},
        *(_file(p, checksums[p], "application/octet-stream",
                "sampling generator weights (torch, bfloat16), read by `biomedsynth generate --generator`")
          for p in weights)]
    w, mem, src = sheet["what"], sheet["memorisation"], sheet["source_data"]
    warnings = sheet["run_warnings"] if isinstance(sheet["run_warnings"], list) else []
    return {
        "@context": CONTEXT, "@type": "sc:Dataset", "conformsTo": CROISSANT, "name": sheet["name"],
        "description": f"{w['summary']}. Memorisation test: {mem['verdict']}. See datasheet.md.",
        "license": f"https://spdx.org/licenses/{sheet['license']}.html", "version": sheet["version"],
        "keywords": ["synthetic data", "medical imaging", w["modality"].split(",")[0],
                     "generative adversarial network"],
        "citeAs": (f"@misc{{biomedsynth_{sheet['name'].replace('-', '_')}, title = {{{sheet['name']}: "
                   f"{w['summary']}}}, note = {{version {sheet['version']}, made by "
                   f"{sheet['how_made']['code']}}}}}"),
        "rai:dataCollection": f"{src['description']}; {sheet['how_made']['architecture']}, "
                              f"{sheet['how_made']['setup']}, drew every image. The real data were {src['split']}",
        "rai:dataUseCases": sheet["intended_use"],
        "rai:dataLimitations": " ".join(sheet["limits"]) + (
            f" Warnings about the run that made it: {'; '.join(warnings)}." if warnings else ""),
        # machine-readable: the unit the real data's split kept apart, and each of the run's warnings
        "additionalProperty": [
            {"@type": "sc:PropertyValue", "name": "split_unit", "value": src["split_unit"],
             "description": f"the real data were {src['split']}"},
            *({"@type": "sc:PropertyValue", "name": "run_warning", "value": line} for line in warnings)],
        "rai:personalSensitiveInformation": (
            f"None recorded: every image is drawn by a generator and every column derives from its label. The "
            f"memorisation test's verdict: {mem['verdict']}"
            + (" (exported anyway, by explicit override)" if mem["exported_despite_verdict"] else "") + "."),
        "distribution": distribution,
        "recordSet": [
            {"@type": "cr:RecordSet", "@id": "metadata", "name": "metadata", "key": {"@id": "metadata/image_id"},
             "description": "metadata.csv", "field": csv_fields},
            {"@type": "cr:RecordSet", "@id": "images", "name": "images", "key": {"@id": "images/image_id"},
             "description": "each image with its metadata.csv row", "field": image_fields}],
    }
