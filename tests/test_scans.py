import imagecodecs
import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1,
                         SecondaryCaptureImageStorage, generate_uid)

from biomedsynth.sources import UnreadableInput
from biomedsynth.sources.scans import read_scan

BUDGET = 8192 ** 2  # params.yaml's ingest.max_pixels
RAMP16 = (np.arange(48 * 40, dtype=np.uint32).reshape(48, 40) * 31 % 65536).astype(np.uint16)


def write_dicom(path, frames: np.ndarray, photometric="MONOCHROME2", slope=1.0, intercept=0.0,
                syntax=ExplicitVRLittleEndian, encode=None):
    """A minimal 16-bit DICOM, one frame or several stacked on axis 0; `encode` compresses each frame
    (bytes) for a compressed transfer `syntax`."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = frames.shape[-2:]
    if frames.ndim == 3:
        ds.NumberOfFrames = frames.shape[0]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if encode is None:
        ds.PixelData = frames.astype("<u2").tobytes()
    else:
        ds.PixelData = encapsulate([encode(f) for f in frames.reshape(-1, *frames.shape[-2:])])
    ds.save_as(path, enforce_file_format=True)


def test_png_8bit_and_16bit_keep_their_values(tmp_path):
    Image.fromarray((RAMP16 % 256).astype(np.uint8)).save(tmp_path / "a8.png")
    im16 = Image.fromarray(RAMP16)
    assert im16.mode == "I;16"
    im16.save(tmp_path / "a16.png")
    a8, a16 = read_scan(tmp_path / "a8.png", BUDGET), read_scan(tmp_path / "a16.png", BUDGET)
    assert a8.dtype == a16.dtype == np.float32
    np.testing.assert_array_equal(a8, RAMP16 % 256)
    np.testing.assert_array_equal(a16, RAMP16)
    assert a16.max() > 50000


def test_rgb_jpeg_and_palette_png_become_gray(tmp_path):
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[:, :32] = (200, 100, 50)   # luma 0.299*200 + 0.587*100 + 0.114*50 = 124.2
    rgb[:, 32:] = (10, 250, 10)    # luma 150.9
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    Image.fromarray(rgb).quantize(4).save(tmp_path / "p.png")  # adaptive palette: exact colours
    Image.fromarray(np.dstack([rgb, np.full((64, 64), 255, np.uint8)])).save(tmp_path / "rgba.png")
    for name in ("c.jpg", "p.png", "rgba.png"):
        a = read_scan(tmp_path / name, BUDGET)
        assert a.shape == (64, 64)
        assert abs(a[20, 8] - 124.2) < 2 and abs(a[20, 56] - 150.9) < 2, name


def test_tiff_16bit_gray_rgb_and_miniswhite(tmp_path):
    tifffile.imwrite(tmp_path / "g.tif", RAMP16)
    tifffile.imwrite(tmp_path / "w.tiff", RAMP16, photometric="miniswhite")
    tifffile.imwrite(tmp_path / "rgb.tif", np.dstack([RAMP16] * 3), photometric="rgb")
    np.testing.assert_array_equal(read_scan(tmp_path / "g.tif", BUDGET), RAMP16)
    np.testing.assert_allclose(read_scan(tmp_path / "rgb.tif", BUDGET), RAMP16, rtol=1e-5)
    np.testing.assert_array_equal(read_scan(tmp_path / "w.tiff", BUDGET), float(RAMP16.min()) + RAMP16.max() - RAMP16)


def test_dicom_rescale_and_monochrome1_inverted(tmp_path):
    stored = np.array([[0, 10], [1000, 4095]], np.uint16)
    write_dicom(tmp_path / "m2.dcm", stored, slope=2.0, intercept=-100.0)
    np.testing.assert_array_equal(read_scan(tmp_path / "m2.dcm", BUDGET), [[-100, -80], [1900, 8090]])
    write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", slope=2.0, intercept=-100.0)
    m1 = read_scan(tmp_path / "m1.dcm", BUDGET)
    np.testing.assert_array_equal(m1, [[8090, 8070], [6090, -100]])  # brightest stored = darkest shown
    assert pydicom.dcmread(tmp_path / "m1.dcm").PhotometricInterpretation == "MONOCHROME1"


@pytest.mark.parametrize("syntax, encode", [
    (JPEGLosslessSV1, imagecodecs.ljpeg_encode),              # no pydicom decoder installed: imagecodecs
    (JPEG2000Lossless, lambda f: imagecodecs.jpeg2k_encode(f, codecformat="J2K", reversible=True)),
])
def test_compressed_dicom(tmp_path, syntax, encode):
    write_dicom(tmp_path / "c.dcm", np.stack([RAMP16, RAMP16 // 2]), syntax=syntax, encode=encode, slope=0.5)
    np.testing.assert_array_equal(read_scan(tmp_path / "c.dcm", BUDGET), RAMP16 * np.float32(0.5))


def test_dicom_multiframe_first_frame_and_preamble_without_suffix(tmp_path):
    frames = np.stack([RAMP16, RAMP16 // 2, RAMP16 // 3])
    write_dicom(tmp_path / "IM0001", frames)  # no .dcm suffix: found by its DICM preamble
    np.testing.assert_array_equal(read_scan(tmp_path / "IM0001", BUDGET), RAMP16)


def test_bad_files_raise_unreadable_input_naming_the_file(tmp_path):
    Image.fromarray(RAMP16).save(tmp_path / "good.png")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbled.png").write_bytes(data[:60] + bytes(200) + data[260:])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image at all\n")
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    (tmp_path / "header.tif").write_bytes(b"II*\0" + bytes(40))
    for name in ("truncated.png", "garbled.png", "empty.png", "notes.png", "bad.dcm", "missing.png", "header.tif"):
        with pytest.raises(UnreadableInput) as e:
            read_scan(tmp_path / name, BUDGET)
        msg = str(e.value)
        assert name in msg and "\n" not in msg, msg
