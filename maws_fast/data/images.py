"""Encoded images: a cheap structural check of JPEG / PNG bytes, and the PIL decode.

:func:`inspect_image` reads only the container structure (markers, chunk headers), never the
compressed pixels, so it costs microseconds per image. It is what the loaders run on every
sample before the GPU decoder sees it: a DALI decoder that meets a broken file stops its
whole pipeline without saying which file it was, so the two kinds of bad file a week-long run
actually meets -- a file that is not an image, and a file cut short by a failed copy -- are
caught here, by name. Damage inside the entropy-coded data is only found by a full decode
(:func:`decode_pil`, which ``maws-data verify`` runs on every sample).
"""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass

import numpy as np

IMAGE_EXTS = (".jpg", ".jpeg", ".png")  # what an image folder or file list may hold

# Start-of-frame markers carry the image size: SOF0-3, 5-7, 9-11, 13-15 (C4 = DHT, C8 = JPG,
# CC = DAC are not frames).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class ImageInfo:
    """What the container says about an encoded image.

    Attributes:
        format: "jpeg", "png", or "" when the bytes are not a supported image.
        height: pixel rows (0 when unknown).
        width: pixel columns (0 when unknown).
        channels: colour components (1 grey, 3 colour, 4 CMYK / RGBA; 0 when unknown).
        progressive: True for a progressive JPEG.
        problem: "" for a structurally sound image, else why it cannot be decoded.
    """

    format: str
    height: int = 0
    width: int = 0
    channels: int = 0
    progressive: bool = False
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem


def _bad(fmt: str, why: str) -> ImageInfo:
    return ImageInfo(fmt, problem=why)


def _inspect_jpeg(buf: bytes | memoryview) -> ImageInfo:
    n = len(buf)
    pos = 2
    frame = None
    while pos + 4 <= n:
        if buf[pos] != 0xFF:
            return _bad("jpeg", f"bad marker at byte {pos}")
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn, TEM: no length field
            pos += 2
            continue
        if marker == 0xD9:
            return _bad("jpeg", "end of image before any scan")
        (length,) = struct.unpack_from(">H", buf, pos + 2)
        if length < 2 or pos + 2 + length > n:
            return _bad("jpeg", f"segment at byte {pos} runs past the end of the file (truncated)")
        if marker in _SOF:
            if length < 8:
                return _bad("jpeg", "frame header too short")
            h, w = struct.unpack_from(">HH", buf, pos + 5)
            frame = (h, w, buf[pos + 9], marker == 0xC2 or marker == 0xC6 or marker == 0xCA)
        if marker == 0xDA:  # start of scan: the entropy-coded data follows
            scan = pos + 2 + length
            break
        pos += 2 + length
    else:
        return _bad("jpeg", "no image data (the file ends inside its headers: truncated)")
    if frame is None:
        return _bad("jpeg", "no frame header (SOF) before the image data")
    h, w, c, progressive = frame
    if h == 0 or w == 0:
        return _bad("jpeg", f"frame header says {w}x{h} pixels")
    # FF D9 cannot occur inside entropy-coded data (an FF there is followed by 00 or RSTn), so an
    # EOI anywhere after the scan starts means the data is complete; phones append trailers after it.
    if bytes(buf[scan:]).rfind(b"\xff\xd9") < 0:
        return _bad("jpeg", "no end-of-image marker after the image data (truncated)")
    return ImageInfo("jpeg", h, w, c, progressive)


_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


def _inspect_png(buf: bytes | memoryview) -> ImageInfo:
    if len(buf) < 33 or bytes(buf[12:16]) != b"IHDR":
        return _bad("png", "no IHDR header")
    w, h = struct.unpack_from(">II", buf, 16)
    color = buf[25]
    if h == 0 or w == 0 or color not in _PNG_CHANNELS:
        return _bad("png", f"IHDR says {w}x{h} pixels, colour type {color}")
    if bytes(buf[33:]).rfind(b"IEND") < 0:
        return _bad("png", "no IEND chunk at the end of the file (truncated)")
    return ImageInfo("png", h, w, _PNG_CHANNELS[color])


def inspect_image(buf: bytes | memoryview | np.ndarray) -> ImageInfo:
    """Checks the container structure of encoded JPEG / PNG bytes without decoding pixels.

    Args:
        buf: the encoded file's bytes (a uint8 numpy array works too).

    Returns:
        An :class:`ImageInfo`; ``info.ok`` is False (with ``info.problem`` saying why) for
        anything that is not a structurally complete JPEG or PNG.
    """
    if isinstance(buf, np.ndarray):
        buf = memoryview(np.ascontiguousarray(buf, dtype=np.uint8)).cast("B")
    if len(buf) == 0:
        return _bad("", "empty file")
    if len(buf) >= 3 and buf[0] == 0xFF and buf[1] == 0xD8 and buf[2] == 0xFF:
        return _inspect_jpeg(buf)
    if bytes(buf[:8]) == _PNG_MAGIC:
        return _inspect_png(buf)
    head = bytes(buf[:8])
    return _bad("", f"not a JPEG or PNG (starts with {head!r})")


def decode_pil(buf: bytes | memoryview | np.ndarray, mode: str = "RGB") -> np.ndarray:
    """Decodes encoded bytes fully with PIL.

    Args:
        buf: the encoded file's bytes.
        mode: PIL mode of the result ("RGB" or "L").

    Returns:
        uint8 ``(H, W, 3)`` for RGB, ``(H, W)`` for L.

    Raises:
        ValueError: with PIL's reason, for anything PIL cannot decode completely (truncated
            data is an error here, not grey pixels).
    """
    from PIL import Image, ImageFile

    if isinstance(buf, np.ndarray):
        buf = np.ascontiguousarray(buf, dtype=np.uint8).tobytes()
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(io.BytesIO(bytes(buf))) as im:
            im.load()
            return np.asarray(im.convert(mode))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        why = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e))  # same text every run
        raise ValueError(f"{type(e).__name__}: {why}") from None


def encode_jpeg(pixels: np.ndarray, quality: int = 95, progressive: bool = False) -> bytes:
    """Encodes uint8 ``(H, W)`` grey or ``(H, W, 3)`` RGB pixels as a baseline/progressive JPEG."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(out, "JPEG", quality=quality, progressive=progressive)
    return out.getvalue()
