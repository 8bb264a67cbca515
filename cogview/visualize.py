"""Image grids and side-by-side pictures for logs and reports."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

GAP_COLOR = (255, 255, 255)


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """Float [3, H, W] in [0, 1] -> PIL RGB."""
    array = image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def as_pil_list(images) -> list[Image.Image]:
    """A tensor [B, 3, H, W] or a sequence of PIL images / [3, H, W] tensors -> PIL list."""
    if isinstance(images, torch.Tensor):
        return [tensor_to_pil(image) for image in images]
    return [image if isinstance(image, Image.Image) else tensor_to_pil(image) for image in images]


def image_grid(images, columns: int = 8, gap: int = 2, scale: int = 1) -> Image.Image:
    """Lays images out row by row, ``columns`` per row, ``gap`` pixels apart."""
    pils = as_pil_list(images)
    if not pils:
        raise ValueError("image_grid needs at least one image")
    width, height = pils[0].size
    width, height = width * scale, height * scale
    columns = max(1, min(columns, len(pils)))
    rows = (len(pils) + columns - 1) // columns
    grid = Image.new("RGB", (columns * (width + gap) - gap, rows * (height + gap) - gap), GAP_COLOR)
    for index, image in enumerate(pils):
        if scale != 1:
            image = image.resize((width, height), Image.Resampling.NEAREST)
        row, column = divmod(index, columns)
        grid.paste(image, (column * (width + gap), row * (height + gap)))
    return grid


def comparison_grid(rows: Sequence, labels: Sequence[str] | None = None, scale: int = 2,
                    gap: int = 2) -> Image.Image:
    """Stacks equal-length rows of images (e.g. originals over reconstructions), labelled."""
    grids = [image_grid(row, columns=len(as_pil_list(row)), gap=gap, scale=scale) for row in rows]
    label_width = 90 if labels else 0
    width = max(g.width for g in grids) + label_width
    height = sum(g.height for g in grids) + gap * (len(grids) - 1)
    canvas = Image.new("RGB", (width, height), GAP_COLOR)
    draw = ImageDraw.Draw(canvas)
    top = 0
    for index, grid in enumerate(grids):
        canvas.paste(grid, (label_width, top))
        if labels:
            draw.text((4, top + grid.height // 2 - 6), labels[index], fill=(0, 0, 0))
        top += grid.height + gap
    return canvas


def psnr(reference: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [0, 1], shape [B, 3, H, W] -> [B]."""
    mse = (reference.float() - estimate.float().clamp(0, 1)).pow(2).flatten(1).mean(1)
    return -10.0 * torch.log10(mse.clamp_min(1e-12))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3]."""
    return images.detach().float().clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
