"""bida.data.png: the PNG decoder against Pillow, and the files it refuses."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from bida.data.png import decode_png

from fixtures import write_png


@pytest.mark.parametrize("shape, dtype", [((9, 7, 3), np.uint8), ((5, 6, 2), np.uint8), ((6, 5), np.uint8)])
def test_decode_png_matches_pillow_on_8_bit(tmp_path, shape, dtype):
    pixels = np.random.default_rng(0).integers(0, 256, shape).astype(dtype)
    write_png(tmp_path / "x.png", pixels)
    decoded = decode_png((tmp_path / "x.png").read_bytes())
    assert np.array_equal(decoded.reshape(shape), pixels)
    assert np.array_equal(np.array(Image.open(tmp_path / "x.png")).reshape(shape), pixels)


def _png(width, height, depth, color, interlace, raw: bytes, idat: bytes | None = None) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw) if idat is None else idat)
            + chunk(b"IEND", b""))


def test_decode_png_rejects_what_it_cannot_decode():
    row = b"\x00" + bytes(6)  # filter byte + one 16-bit RGB pixel
    assert decode_png(_png(1, 1, 16, 2, 0, row)).tolist() == [[[0, 0, 0]]]
    with pytest.raises(ValueError, match="not a PNG"):
        decode_png(b"GIF89a" + bytes(40))
    with pytest.raises(ValueError, match="interlaced"):
        decode_png(_png(1, 1, 16, 2, 1, row))
    with pytest.raises(ValueError, match="colour type 3"):
        decode_png(_png(1, 1, 8, 3, 0, b"\x00\x00"))
    with pytest.raises(ValueError, match="row filter 5"):
        decode_png(_png(1, 1, 16, 2, 0, b"\x05" + bytes(6)))
    with pytest.raises(ValueError, match="has 6 bytes, expected 7"):
        decode_png(_png(1, 1, 16, 2, 0, row[:-1]))
    with pytest.raises(ValueError, match="corrupt PNG image data"):
        decode_png(_png(1, 1, 16, 2, 0, row, idat=b"not zlib"))
