"""Generation: span-restricted, KV-cached, per-sample seeded sampling (plain functions)."""

from .beam import beam_search_span
from .drivers import generate_captions, generate_images, generate_sr
from .interface import GenerativeModel
from .sampling import (
    check_sampling_args,
    filter_logits,
    generate_span,
    row_generators,
    sample_logits,
    span_logits,
    unconditional_prompt,
)

__all__ = [
    "beam_search_span",
    "check_sampling_args",
    "filter_logits",
    "GenerativeModel",
    "generate_captions",
    "generate_images",
    "generate_span",
    "generate_sr",
    "row_generators",
    "sample_logits",
    "span_logits",
    "unconditional_prompt",
]
