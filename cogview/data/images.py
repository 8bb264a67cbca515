"""Image decoding and resizing shared by every data path."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


# The most pixels an image may have to be decoded: 64 megapixels (8192 x 8192), about 192 MB
# as RGB. A few kilobytes of PNG can claim 20000 x 20000 pixels (1.2 GB decoded): such a
# "decompression bomb" is refused from its header, before any pixel is decoded.
DEFAULT_MAX_PIXELS = 8192 * 8192


class ImageDecodeError(ValueError):
    """Image bytes that cannot be decoded (unreadable, truncated, above the pixel limit, or out
    of memory); data pipelines catch it and count a skip, inference writes an error row."""


def load_image(source: bytes | str | Path, name: str = "",
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decodes image bytes or a file into an RGB PIL image (any mode, EXIF-rotated).

    max_pixels: images whose header claims more pixels (width x height) are refused before
    decoding; None lifts it (Pillow still refuses above twice Image.MAX_IMAGE_PIXELS).
    Raises ImageDecodeError naming ``name`` (or the path) for unreadable, truncated or
    oversized data, and when decoding runs out of memory.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        if isinstance(source, bytes):
            image = Image.open(io.BytesIO(source))
        else:
            image = Image.open(source)
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageDecodeError(
                f"image {label} is {width}x{height} = {width * height:,} pixels, above the limit "
                f"of {max_pixels:,} (max_pixels): a decompression bomb or an image to scale down "
                "first; raise max_pixels to decode it anyway")
        image.load()  # decode now, so truncated files fail here and not later
        image = ImageOps.exif_transpose(image)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as error:  # PIL's own limit, if a caller set one lower
        raise ImageDecodeError(f"image {label} is too large to decode: {error}") from None
    except MemoryError:
        raise ImageDecodeError(f"image {label}: out of memory while decoding it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageDecodeError(f"cannot decode image {label}: {error}") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, RGBA, P, I;16, I, F, CMYK, ...) -> RGB; alpha composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        array = np.clip(array / peak * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resizes the short side to ``size`` (Lanczos) and centre-crops to size x size."""
    if size % 8:
        raise ValueError(f"image size {size} is not a multiple of 8 (the VQ-VAE downsampling)")
    if image.size == (size, size):
        return image
    return ImageOps.fit(image, (size, size), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
