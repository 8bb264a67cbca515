"""Argument checks shared by the package: one rule and one message shape for every count,
size and limit a user passes (``name=value must be an int >= 1 (what it means)``)."""

from __future__ import annotations

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
