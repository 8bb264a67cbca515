"""Generation: span-restricted, KV-cached, per-sample seeded sampling (plain functions)."""

from .sampling import (
    check_sampling_args,
    filter_logits,
    generate_captions,
    generate_images,
    generate_span,
    generate_sr,
    row_generators,
    sample_logits,
    span_logits,
    unconditional_prompt,
)

__all__ = [
    "check_sampling_args",
    "filter_logits",
    "generate_captions",
    "generate_images",
    "generate_span",
    "generate_sr",
    "row_generators",
    "sample_logits",
    "span_logits",
    "unconditional_prompt",
]
