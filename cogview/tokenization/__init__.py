"""Text tokenizers, the unified CogView vocabulary and the task sequence layouts.

Training a SentencePiece model lives in `cogview.tokenization.train_sentencepiece` (function of
the same name, and a CLI: `python -m cogview.tokenization.train_sentencepiece input=... out=...`);
it is not imported here so that running it with -m stays clean.
"""

from .layouts import (
    TASKS,
    Layout,
    caption_layout,
    caption_prompt,
    collate_layouts,
    decode_text,
    extract_image_codes,
    extract_text_ids,
    image_codes_to_tensor,
    next_span_kind,
    sr_layout,
    sr_prompt,
    t2i_layout,
    t2i_prompt,
    text_ids_to_tensor,
    text_limit,
    text_slots_for,
)
from .text import (
    TOKENIZER_KINDS,
    CharTokenizer,
    SentencePieceTokenizer,
    TextTokenizer,
    build_text_tokenizer,
    char_vocabulary,
    encode_caption,
    load_text_tokenizer,
)
from .vocab import COMMAND_TOKENS, CogViewVocab

__all__ = [
    "COMMAND_TOKENS",
    "CogViewVocab",
    "TOKENIZER_KINDS",
    "TextTokenizer",
    "CharTokenizer",
    "SentencePieceTokenizer",
    "build_text_tokenizer",
    "load_text_tokenizer",
    "encode_caption",
    "char_vocabulary",
    "TASKS",
    "Layout",
    "t2i_layout",
    "caption_layout",
    "sr_layout",
    "t2i_prompt",
    "caption_prompt",
    "sr_prompt",
    "next_span_kind",
    "extract_image_codes",
    "extract_text_ids",
    "decode_text",
    "collate_layouts",
    "image_codes_to_tensor",
    "text_ids_to_tensor",
    "text_limit",
    "text_slots_for",
]
