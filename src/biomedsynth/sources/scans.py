"""Decode one X-ray scan of any common format and bit depth into the display convention:
a float32 2-D array where higher = brighter = more attenuation (air dark, bone bright).

PNG / JPEG / BMP and friends go through PIL, TIFF through tifffile (16-bit, compressed, multi-page),
DICOM (a .dcm name or the DICM preamble) through pydicom (imagecodecs for compressed syntaxes that
pydicom has no decoder for). Whatever cannot be decoded raises UnreadableInput with one line naming
the file and the reason, so ingest can skip and count it.
"""
from __future__ import annotations

from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import tifffile
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_modality_lut, pixel_array

from biomedsynth.sources import UnreadableInput

LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as PIL's RGB -> L


def _to_gray(a: np.ndarray) -> np.ndarray:
    """(H, W) as is; (H, W, C): gray+alpha keeps channel 0, RGB(A) becomes luma."""
    if a.ndim == 3 and a.shape[-1] in (1, 2):
        a = a[..., 0]
    elif a.ndim == 3 and a.shape[-1] in (3, 4):
        a = a[..., :3].astype(np.float32) @ LUMA
    return a


def _invert(a: np.ndarray) -> np.ndarray:
    """Flip dark and bright within the image's own range (MONOCHROME1, MINISWHITE)."""
    return a.min() + a.max() - a


def _first_frame(ds: pydicom.Dataset) -> np.ndarray:
    """The first frame, decoded alone. Compressed pixel data that pydicom has no decoder installed
    for (JPEG lossless, JPEG-LS, JPEG 2000: common in PACS exports) is decoded by imagecodecs."""
    try:
        return pixel_array(ds, index=0)
    except (RuntimeError, NotImplementedError):
        if not ds.file_meta.TransferSyntaxUID.is_compressed:
            raise
        frames = generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1))
        return imagecodecs.imread(next(frames))


def _read_dicom(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path, force=True)
    a = _first_frame(ds)
    a = apply_modality_lut(a, ds) if ds.get("SamplesPerPixel", 1) == 1 else _to_gray(a)
    a = np.asarray(a, np.float32)
    return _invert(a) if ds.get("PhotometricInterpretation", "") == "MONOCHROME1" else a


def _read_tiff(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        a = page.asarray()
        if page.photometric == tifffile.PHOTOMETRIC.PALETTE:
            a = np.moveaxis(page.colormap[:, a], 0, -1)  # (3, H, W) -> (H, W, 3) RGB
        elif page.axes.endswith("SYX"):  # planar RGB
            a = np.moveaxis(a, -3, -1)
        a = _to_gray(np.asarray(a, np.float32))
        return _invert(a) if page.photometric == tifffile.PHOTOMETRIC.MINISWHITE else a


def _read_pil(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        if im.mode in ("L", "LA", "I", "F") or im.mode.startswith("I;16"):  # gray: keep the full depth
            return _to_gray(np.asarray(im)).astype(np.float32)
        return np.asarray(im.convert("L"), np.float32)  # palette, RGB(A), CMYK, YCbCr, 1-bit


def read_scan(path: Path) -> np.ndarray:
    """Decode `path` into a float32 (H, W) array, higher = more attenuation; UnreadableInput if it can't."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        if not head:
            raise ValueError("empty file")
        if path.suffix.lower() == ".dcm" or head[128:132] == b"DICM":
            a = _read_dicom(path)
        elif head[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
            a = _read_tiff(path)
        else:
            a = _read_pil(path)
        if a.ndim != 2 or min(a.shape) < 1:
            raise ValueError(f"not a single 2-D image (decoded shape {a.shape})")
        if not np.isfinite(a).all():
            raise ValueError("pixel values include NaN or infinity")
    except Exception as e:  # any decoder failure is a property of the file, reported as one line
        why = (str(e).strip().splitlines() or [""])[0]
        raise UnreadableInput(f"{path}: cannot decode scan ({type(e).__name__}: {why})") from e
    return a
