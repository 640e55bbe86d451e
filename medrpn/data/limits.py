"""How much decoded pixel data one image file may make medrpn hold, checked from its header.

A few kilobytes of RLE, deflate or PNG can declare gigabytes of pixels (a decompression bomb); a
decoder allocates what the header declares before it finds out that the data do not fill it, and
a process killed for memory inside a decoder cannot report anything. So every reader computes
the decoded size from the header (rows x columns x frames x samples x bytes per sample, a NIfTI
volume's shape x its voxel size) and refuses the file before decoding when it is over
`data.read.max_decoded_bytes` (`medrpn predict --max-decoded-bytes`).

The default, 1 GiB, admits every clinical image we know of with room to spare (a 4096 x 3328
16-bit mammogram is 26 MiB, a 100-frame breast tomosynthesis 2457 x 1890 x 100 x 16 bits 886 MiB,
a 512 x 512 x 1000 CT volume 500 MiB) and keeps the worst case of one reader (the decoded array
plus its float32 working copies) to a few GiB.
"""

from __future__ import annotations

from pathlib import Path

from medrpn.errors import DataError

DEFAULT_MAX_DECODED_BYTES = 2**30
SETTING = "data.read.max_decoded_bytes (medrpn predict: --max-decoded-bytes)"


def human_bytes(n: int) -> str:
    """A byte count for messages: "8.0 GiB", "64.0 MiB", "512 bytes"."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def check_decoded_size(path: str | Path, declared: str, size: int, limit: int) -> None:
    """Raise a `DataError` naming the file when `size` decoded bytes (described by `declared`) exceed `limit`."""
    if size > limit:
        raise DataError(
            path,
            f"declares {declared} = {human_bytes(size)} decoded, over the limit of {human_bytes(limit)} "
            f"(a decompression bomb or a damaged header?); set {SETTING} higher to read it",
        )
