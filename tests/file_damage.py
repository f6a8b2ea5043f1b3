"""Damage a file of ``torch.save`` as a disk or a copy might: one bit of a tensor's bytes."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path


def flip_tensor_byte(path: Path) -> bytes:
    """Flip one bit in the middle of the largest entry of ``path`` (a tensor's bytes; the
    zip's CRC-32 of that entry no longer matches) and return the new bytes."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack(
        "<HH", raw[info.header_offset + 26 : info.header_offset + 30]
    )
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.file_size // 2] ^= 0x40
    path.write_bytes(bytes(raw))
    return bytes(raw)
