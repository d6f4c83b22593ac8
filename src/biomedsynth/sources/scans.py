"""Decode one X-ray scan of any common format and bit depth into the display convention:
a float32 2-D array where higher = brighter = more attenuation (air dark, bone bright).

PNG / JPEG / BMP and friends go through PIL, TIFF through tifffile (16-bit, compressed, multi-page),
DICOM (a .dcm name or the DICM preamble) through pydicom (imagecodecs for compressed syntaxes that
pydicom has no decoder for). Whatever cannot be decoded raises UnreadableInput with one line naming
the file and the reason, so ingest can skip and count it; a file whose header declares more pixels than
the budget (sources/budget.py) raises OverPixelBudget before anything is decoded.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import tifffile
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.filereader import read_file_meta_info
from pydicom.pixels import apply_modality_lut, pixel_array
from pydicom.uid import DeflatedExplicitVRLittleEndian

from biomedsynth.sources import UnreadableInput
from biomedsynth.sources.budget import OverPixelBudget, check_pixels, pil_budget

LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as PIL's RGB -> L
# a deflated DICOM may inflate to this many bytes per pixel of the budget: a frame of 3 samples x 16 bits,
# plus room for its header and a few frames more
INFLATED_BYTES_PER_PIXEL = 8
# JPEG start-of-frame markers (FFC0-FFCF less DHT C4, JPG C8, DAC CC) and JPEG-LS's SOF55 (FFF7)
JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
J2K_SIZ = b"\xff\x4f\xff\x51"  # a JPEG 2000 codestream's start (SOC) and its image size segment (SIZ)


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


def _codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(width, height) that a JPEG, JPEG-LS or JPEG 2000 frame's header declares; None when it has none."""
    if frame[:2] != b"\xff\xd8":  # not JPEG: a bare JPEG 2000 codestream, or one in a JP2 box
        at = frame.find(J2K_SIZ)
        if at < 0 or len(frame) < at + 24:
            return None
        x, y, x0, y0 = struct.unpack_from(">4I", frame, at + 8)  # image area = (x0, y0) to (x, y)
        return x - x0, y - y0
    i = 2
    while i + 9 <= len(frame) and frame[i] == 0xFF:  # walk the marker segments up to the frame header
        if frame[i + 1] in JPEG_SOF:
            height, width = struct.unpack_from(">HH", frame, i + 5)
            return width, height
        i += 1 if frame[i + 1] == 0xFF else 2 + struct.unpack_from(">H", frame, i + 2)[0]  # fill byte, or a segment
    return None


def _first_frame(path: Path, ds: pydicom.Dataset, max_pixels: int) -> np.ndarray:
    """The first frame, decoded alone. Compressed pixel data that pydicom has no decoder installed
    for (JPEG lossless, JPEG-LS, JPEG 2000: common in PACS exports) is decoded by imagecodecs, after the
    size its own header declares (which may differ from Rows x Columns) is checked."""
    try:
        return pixel_array(ds, index=0)
    except (RuntimeError, NotImplementedError):
        if not ds.file_meta.TransferSyntaxUID.is_compressed:
            raise
        frames = generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1))
        frame = next(frames)
        size = _codestream_size(frame)
        if size is None:
            raise ValueError("compressed frame without a JPEG or JPEG 2000 header: its size is unknown") from None
        check_pixels(f"{path} (compressed frame)", *size, max_pixels)
        return imagecodecs.imread(frame)


def _check_inflated_size(path: Path, max_pixels: int) -> None:
    """dcmread inflates a deflated dataset whole, pixel data and all frames included, before any tag can be
    checked: inflate it here first, a block at a time keeping nothing, and stop past the budget's bytes."""
    with open(path, "rb") as f:
        if f.read(132)[128:] != b"DICM":  # no file meta, so no transfer syntax: not deflated
            return
    meta = read_file_meta_info(path)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return
    limit, size, inflate = INFLATED_BYTES_PER_PIXEL * max_pixels, 0, zlib.decompressobj(-zlib.MAX_WBITS)
    with open(path, "rb") as f:
        f.seek(132 + 12 + meta.FileMetaInformationGroupLength)  # preamble, the group length element, the rest
        while block := f.read(1 << 20):
            while block and size <= limit:
                size += len(inflate.decompress(block, 1 << 24))
                block = inflate.unconsumed_tail
            if size > limit:
                raise OverPixelBudget(f"{path}: deflated DICOM inflates to over {limit:,} bytes "
                                      f"({INFLATED_BYTES_PER_PIXEL} per pixel of ingest.max_pixels = {max_pixels:,}); "
                                      "not decoded")


def _read_dicom(path: Path, max_pixels: int) -> np.ndarray:
    _check_inflated_size(path, max_pixels)
    ds = pydicom.dcmread(path, force=True)
    check_pixels(f"{path} (DICOM Rows x Columns)", int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0),
                 max_pixels)
    a = _first_frame(path, ds, max_pixels)
    a = apply_modality_lut(a, ds) if ds.get("SamplesPerPixel", 1) == 1 else _to_gray(a)
    a = np.asarray(a, np.float32)
    return _invert(a) if ds.get("PhotometricInterpretation", "") == "MONOCHROME1" else a


def _read_tiff(path: Path, max_pixels: int) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]  # its size comes from its tags; no pixel data is read before asarray
        check_pixels(str(path), page.imagewidth, page.imagelength * page.imagedepth, max_pixels)
        if page.is_tiled:  # each stored tile is decoded whole, and a tile may be larger than the image
            check_pixels(f"{path} (one tile)", page.tilewidth, page.tilelength * page.tiledepth, max_pixels)
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
        if not (im.mode in ("L", "LA", "I", "F") or im.mode.startswith("I;16")):
            return np.asarray(im.convert("L"), np.float32)  # palette, RGB(A), CMYK, YCbCr, 1-bit
        a = np.asarray(im)
    return _to_gray(a).astype(np.float32)  # gray, at full depth: converted once PIL has let its copy go


def read_scan(path: Path, max_pixels: int) -> np.ndarray:
    """Decode `path` into a float32 (H, W) array, higher = more attenuation; UnreadableInput if it can't,
    OverPixelBudget (not decoded) if its header declares more than `max_pixels` pixels."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        if not head:
            raise ValueError("empty file")
        with pil_budget(str(path), max_pixels):  # PIL itself, and inside pydicom
            if path.suffix.lower() == ".dcm" or head[128:132] == b"DICM":
                a = _read_dicom(path, max_pixels)
            elif head[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
                a = _read_tiff(path, max_pixels)
            else:
                a = _read_pil(path)
        if a.ndim != 2 or min(a.shape) < 1:
            raise ValueError(f"not a single 2-D image (decoded shape {a.shape})")
        if not np.isfinite(a).all():
            raise ValueError("pixel values include NaN or infinity")
    except OverPixelBudget:
        raise
    except Exception as e:  # any decoder failure is a property of the file, reported as one line
        why = (str(e).strip().splitlines() or [""])[0]
        raise UnreadableInput(f"{path}: cannot decode scan ({type(e).__name__}: {why})") from e
    return a
