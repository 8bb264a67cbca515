"""Argument checks shared by the package: one rule and one message shape for every count,
size and limit a user passes (``name=value must be an int >= 1 (what it means)``)."""

from __future__ import annotations

import math
import numbers


def check_int(name: str, value, minimum: int = 1, maximum: int | None = None,
              meaning: str | None = None) -> int:
    """``value`` as an int if it is an integer (not a bool; numpy integers too) in
    [minimum, maximum], else a ValueError naming ``name``, the value, the allowed range and,
    when given, what the value means."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum or (
            maximum is not None and value > maximum):
        allowed = (f"an int in {minimum}..{maximum}" if maximum is not None
                   else f"an int >= {minimum}")
        raise ValueError(f"{name}={value!r} must be {allowed}"
                         + (f" ({meaning})" if meaning else ""))
    return int(value)


def grid_side(image_tokens: int) -> int:
    """The side of a square code grid with ``image_tokens`` codes (64 -> 8); a ValueError
    naming the value when it is not a positive square number."""
    whole = isinstance(image_tokens, int) and not isinstance(image_tokens, bool)
    side = math.isqrt(image_tokens) if whole and image_tokens > 0 else 0
    if side == 0 or side * side != image_tokens:
        raise ValueError(f"image_tokens={image_tokens!r} must be a positive square number "
                         "(h * w codes of a square grid, e.g. 64 for 8x8 = 64x64 pixels; "
                         "CogView: 1024 = 32x32 codes = 256x256 pixels)")
    return side
