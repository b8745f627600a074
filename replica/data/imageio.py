"""Reading one image file into the prepared form: RGB, shorter side 256, centre 256×256, uint8.

Every kind of bad input becomes either an RGB image or a :class:`BadImage` with a reason:
truncated or zero-byte files, non-images with an image extension, grayscale, CMYK, RGBA,
paletted and 16-bit images, and decompression bombs. An input is a path, or a :class:`Member`:
an image inside an uncompressed tar (ImageNet's archives, listed by :mod:`replica.data.tars`).
"""
from __future__ import annotations

import io
import os
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif"}


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension (what a class folder's images are)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS


class Member(NamedTuple):
    """An image stored inside an uncompressed tar: ``size`` bytes at ``offset`` of ``path``."""

    path: str
    offset: int
    size: int
    name: str

    def __str__(self) -> str:  # how a bad input is named in skipped.tsv and bad_inputs.tsv
        return f"{self.path}:{self.name}"

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self}: the archive ends {self.size - len(data):,} bytes early (truncated)")
        return data


def open_item(item):
    """What PIL can open: a path, or the bytes of an archive member."""
    return io.BytesIO(item.read()) if isinstance(item, Member) else item


# PIL's own default (89.5M pixels): larger images are refused as possible decompression bombs.
DEFAULT_MAX_PIXELS = 89_478_485


class BadImage(Exception):
    """An input file that cannot become an RGB image; the message says why."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16/32-bit grey: keep the top 8 bits
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode == "F":
        a = np.clip(np.round(np.asarray(img)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # composite on black, which is what dropping the alpha of premultiplied data means
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_rgb(path, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Open ``path`` as a fully decoded RGB PIL image, or raise :class:`BadImage`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(open_item(path)) as img:  # a file, or an image inside a tar
                w, h = img.size
                if w * h > max_pixels:
                    raise BadImage(f"{w}×{h} pixels exceeds the {max_pixels:,}-pixel limit (decompression bomb?)")
                if draft_size and img.format == "JPEG":
                    # let libjpeg decode at a reduced scale, never below the target size
                    img.draft("RGB", (draft_size, draft_size))
                img.load()
                return _to_rgb(img)
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image PIL can read (empty, or another format under an image extension)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"cannot decode: {e}") from None


def resize_center(img: Image.Image, size: int = 256) -> np.ndarray:
    """Shorter side to ``size`` (bilinear, antialiased), then the centre size×size: (3, size, size) uint8."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)  # (H, W, 3) → (3, H, W)


def prepared_from_array(chw: np.ndarray, size: int = 256) -> np.ndarray:
    """A (3, h, w) uint8 array (CIFAR-10's rows) → (3, size, size) uint8, like a file."""
    return resize_center(Image.fromarray(np.ascontiguousarray(chw.transpose(1, 2, 0)), "RGB"), size)


def read_prepared(path, size: int = 256, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """One file → (3, size, size) uint8, or :class:`BadImage`."""
    return resize_center(load_rgb(path, max_pixels, draft_size=size), size)


ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never half an image
