"""Real decompression bombs, built small: a few kilobytes of file that declare or inflate to far more pixels.

Each one is a valid file of its format up to the point where a decoder has allocated what the header
promised; none of them is ever decoded here.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian


def rle_bomb(path: Path, rows: int = 65535, columns: int = 65535) -> Path:
    """pydicom's RLE Lossless MR (64 x 64, 16 bits) declaring rows x columns: 7.8 kB of file."""
    ds = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
    ds.Rows, ds.Columns = rows, columns
    ds.save_as(path)
    return path


def deflated_dicom(path: Path, rows: int, columns: int) -> Path:
    """pydicom's MR with rows x columns of zeros (16 bits), written Deflated Explicit VR Little
    Endian: 8192 x 8192 (128 MiB of pixels) gives a 131 kB file."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.Rows, ds.Columns = rows, columns
    ds.PixelData = bytes(rows * columns * 2)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def one_bit_png(path: Path, width: int, height: int) -> Path:
    """A valid black 1-bit grey PNG, its rows compressed as they are made (never all in memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter type 0, then the packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grey, no interlace
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def nifti_bomb(path: Path, shape: tuple[int, int, int]) -> Path:
    """A .nii whose header declares an int16 volume of `shape` followed by 8 voxels of data."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    header.set_sform(np.eye(4), code=1)
    path.write_bytes(header.binaryblock + bytes(4) + bytes(16))
    return path
