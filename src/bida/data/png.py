"""A PNG decoder for what Pillow reads wrong: 16-bit multi-channel labels (SYNTHIA).

Pillow keeps only the high byte of a 16-bit RGB PNG; :func:`decode_png` reads the chunks,
inflates the data with zlib and undoes the row filters with numpy.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_GRAY, _PNG_RGB, _PNG_GRAY_ALPHA, _PNG_RGBA = 0, 2, 4, 6
_PNG_CHANNELS = {_PNG_GRAY: 1, _PNG_RGB: 3, _PNG_GRAY_ALPHA: 2, _PNG_RGBA: 4}


def _png_chunks(data: bytes) -> tuple[bytes, bytes]:
    """(IHDR payload, concatenated IDAT payloads), checking signature and CRCs."""
    if data[:8] != _PNG_SIGNATURE:
        raise ValueError("not a PNG file")
    pos, header, idat = 8, b"", []
    while True:
        if pos + 8 > len(data):
            raise ValueError("truncated PNG (no IEND chunk)")
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        shown = kind.decode("latin-1")
        end = pos + 12 + length
        if end > len(data):
            raise ValueError(f"truncated PNG ({shown!r} chunk cut short)")
        payload = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(kind + payload) != crc:
            raise ValueError(f"corrupt PNG ({shown!r} chunk fails its CRC)")
        if kind == b"IHDR":
            header = payload
        elif kind == b"IDAT":
            idat.append(payload)
        elif kind == b"IEND":
            break
        pos = end
    if len(header) != 13:
        raise ValueError("PNG without a valid IHDR chunk")
    return header, b"".join(idat)


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """PNG Paeth predictor on int16 arrays: the neighbour closest to a + b - c."""
    pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _unfilter_rowwise(filtered: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """Undo filters None/Sub/Up, each row vectorised (Sub is a per-byte-lane cumsum).

    Shape:
        filtered: (H, W, bpp) uint8; filters: (H,); returns (H, W, bpp) uint8
    """
    out = np.empty_like(filtered)
    prior = np.zeros_like(filtered[0])
    for row, kind in enumerate(filters):
        if kind == 0:
            out[row] = filtered[row]
        elif kind == 1:
            out[row] = np.cumsum(filtered[row], axis=0, dtype=np.uint8)  # wraps mod 256
        else:
            out[row] = filtered[row] + prior
        prior = out[row]
    return out


def _unfilter_wavefront(filtered: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """Undo any mix of the five PNG filters.

    Average and Paeth make each pixel depend on its left, upper and upper-left
    neighbours, so pixels are reconstructed one anti-diagonal (row + column = d) at a
    time: H + W - 1 vectorised steps instead of H * W scalar ones.

    Shape:
        filtered: (H, W, bpp) uint8; filters: (H,); returns (H, W, bpp) uint8
    """
    height, width, bpp = filtered.shape
    recon = np.zeros((height + 1, width + 1, bpp), dtype=np.int16)  # zero row/column = outside
    source = filtered.astype(np.int16)
    for d in range(height + width - 1):
        rows = np.arange(max(0, d - width + 1), min(height - 1, d) + 1)
        cols = d - rows
        a, b, c = recon[rows + 1, cols], recon[rows, cols + 1], recon[rows, cols]
        kind = filters[rows][:, None]
        prediction = np.select(
            [kind == 1, kind == 2, kind == 3, kind == 4],
            [a, b, (a + b) >> 1, _paeth(a, b, c)],
            default=0,
        )
        recon[rows + 1, cols + 1] = (source[rows, cols] + prediction) & 0xFF
    return recon[1:, 1:].astype(np.uint8)


def decode_png(data: bytes) -> np.ndarray:
    """Decode a non-interlaced 8- or 16-bit grey/grey+alpha/RGB/RGBA PNG, losslessly.

    Used for 16-bit multi-channel labels, which Pillow reduces to their high byte.
    Raises ValueError for anything malformed or unsupported.

    Shape:
        returns (H, W, C) uint8 or uint16, C = 1, 2, 3 or 4
    """
    header, compressed = _png_chunks(data)
    width, height, depth, color, compression, filter_method, interlace = struct.unpack(
        ">IIBBBBB", header
    )
    if color not in _PNG_CHANNELS or depth not in (8, 16):
        raise ValueError(f"unsupported PNG (colour type {color}, bit depth {depth})")
    if compression != 0 or filter_method != 0 or interlace != 0:
        raise ValueError("unsupported PNG (interlaced or non-standard compression/filter)")
    if width == 0 or height == 0:
        raise ValueError("PNG with zero width or height")
    channels = _PNG_CHANNELS[color]
    bpp = channels * depth // 8
    try:
        raw = zlib.decompress(compressed)
    except zlib.error as err:
        raise ValueError(f"corrupt PNG image data ({err})") from None
    stride = 1 + width * bpp
    if len(raw) != height * stride:
        raise ValueError(f"PNG image data has {len(raw)} bytes, expected {height * stride}")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride)
    filters = rows[:, 0]
    if filters.max() > 4:
        raise ValueError(f"PNG row filter {filters.max()} is not one of 0..4")
    filtered = rows[:, 1:].reshape(height, width, bpp)
    if filters.max() <= 2:
        pixels = _unfilter_rowwise(filtered, filters)
    else:
        pixels = _unfilter_wavefront(filtered, filters)
    if depth == 8:
        return pixels.reshape(height, width, channels)
    return pixels.reshape(height, width, channels, 2).view(">u2")[..., 0].astype(np.uint16)
