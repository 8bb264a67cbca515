"""Image decoding and resizing shared by every data path."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError


class ImageDecodeError(ValueError):
    """Image bytes that cannot be decoded; data pipelines catch it and count a skip."""


def load_image(source: bytes | str | Path, name: str = "") -> Image.Image:
    """Decodes image bytes or a file into an RGB PIL image (any mode, EXIF-rotated).

    Raises ImageDecodeError naming ``name`` (or the path) for unreadable or truncated data.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        if isinstance(source, bytes):
            image = Image.open(io.BytesIO(source))
        else:
            image = Image.open(source)
        image.load()  # decode now, so truncated files fail here and not later
        image = ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageDecodeError(f"cannot decode image {label}: {error}") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, RGBA, P, I;16, I, F, CMYK, ...) -> RGB; alpha composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

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
