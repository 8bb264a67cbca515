"""Image completion (CogView's inpainting in token space): keep the codes outside a region,
sample the codes inside it, conditioned on the text and on every code before it.

    mask = region_mask("bottom", height=64, width=64)        # BoolTensor [8, 8], True = regenerate
    known = known_codes(codes, mask)                          # codes with -1 where regenerated
    generate_images(model, vocab, texts, 64, seeds, known_codes=known.flatten(1))
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

REGIONS = ("bottom", "top", "left", "right")


def region_mask(region: str | Sequence[int], height: int, width: int,
                factor: int = 8) -> torch.Tensor:
    """A region of an image -> BoolTensor [height/factor, width/factor], True = codes to redraw.

    region: "bottom" / "top" / "left" / "right" (that half), or a box (left, top, right, bottom)
    in pixels; a code is redrawn when its ``factor x factor`` pixel cell overlaps the box.
    """
    if height % factor or width % factor:
        raise ValueError(f"image size {width}x{height} must be a multiple of {factor} pixels")
    rows, cols = height // factor, width // factor
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    if isinstance(region, str):
        if region not in REGIONS:
            raise ValueError(f"region={region!r} must be one of {REGIONS} or a pixel box "
                             "[left, top, right, bottom]")
        half_r, half_c = rows // 2, cols // 2
        target = {"bottom": (slice(half_r, None), slice(None)), "top": (slice(None, half_r), slice(None)),
                  "left": (slice(None), slice(None, half_c)), "right": (slice(None), slice(half_c, None))}
        mask[target[region]] = True
        return mask
    box = [float(v) for v in region] if isinstance(region, (list, tuple)) else None
    if box is None or len(box) != 4:
        raise ValueError(f"region={region!r} must be one of {REGIONS} or a pixel box "
                         "[left, top, right, bottom]")
    left, top, right, bottom = box
    left, top = max(0.0, left), max(0.0, top)
    right, bottom = min(float(width), right), min(float(height), bottom)
    if right <= left or bottom <= top:
        raise ValueError(f"box {list(region)} covers no pixels of the {width}x{height} image; "
                         "give [left, top, right, bottom] with left < right, top < bottom inside it")
    mask[math.floor(top / factor):math.ceil(bottom / factor),
         math.floor(left / factor):math.ceil(right / factor)] = True
    return mask


def known_codes(codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Code grids [B, h, w] and a redraw mask [h, w] -> [B, h, w] with -1 where redrawn."""
    codes = torch.as_tensor(codes).long()
    if codes.shape[-2:] != mask.shape:
        raise ValueError(f"code grid {tuple(codes.shape[-2:])} and mask {tuple(mask.shape)} "
                         "differ; build the mask for the encoded image's size")
    if not bool(mask.any()):
        raise ValueError("the region covers no code: nothing to complete")
    return codes.masked_fill(mask, -1)
