"""Per-task drivers over the core loop (``cogview.generation.sampling.generate_span``):

    generate_images     t2i:     text ids -> image codes (known codes kept: completion)
    generate_captions   caption: image codes -> text ids (sampled, greedy or beam search)
    generate_sr         sr:      text ids + low-res codes -> high-res codes

Each builds its task's prompts from ``cogview.tokenization.layouts`` and decodes one span;
imports flow one way: drivers -> beam -> sampling (the core).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from cogview.generation.beam import beam_search_span, check_num_beams
from cogview.generation.interface import GenerativeModel
from cogview.generation.sampling import generate_span
from cogview.tokenization.layouts import caption_prompt, sr_prompt, t2i_prompt
from cogview.tokenization.vocab import CogViewVocab
from cogview.validate import check_int


def _check_same_length(name_a: str, a: Sequence, name_b: str, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} has {len(a)} entries but {name_b} has {len(b)}; "
                         "pass one per sample")


def generate_images(model: GenerativeModel, vocab: CogViewVocab, text_ids_list: Sequence,
                    image_tokens: int, seeds: Sequence[int] | None = None, *,
                    temperature: float = 1.0, top_k: int | None = 200, top_p: float = 1.0,
                    greedy: bool = False, cfg_scale: float = 1.0,
                    max_text_len: int | None = None, known_codes: torch.Tensor | None = None,
                    callback: Callable[[int, int], None] | None = None,
                    text_slots: int | None = None) -> torch.Tensor:
    """t2i: tokenizer-space text ids per sample -> image codes [B, image_tokens] in [0, K).

    The prompt is ``[ROI1] text [BASE] [BOI1]``; with cfg_scale != 1 the unconditional prompt
    is the same with an empty caption. known_codes [B, image_tokens] (codes, -1 = generate)
    keeps those codes in place: image completion.
    """
    check_int("image_tokens", image_tokens, meaning="h * w codes")
    prompts = [t2i_prompt(vocab, text, max_text_len=max_text_len, text_slots=text_slots)
               for text in text_ids_list]
    ids = generate_span(model, prompts, "image", image_tokens, vocab, temperature=temperature,
                        top_k=top_k, top_p=top_p, seeds=seeds, greedy=greedy, cfg_scale=cfg_scale,
                        known=_known_ids(vocab, known_codes), callback=callback)
    return ids - vocab.image_range[0]


def _known_ids(vocab: CogViewVocab, known_codes: torch.Tensor | None) -> torch.Tensor | None:
    """Image codes with -1 for unknown -> vocabulary ids with -1 for unknown."""
    if known_codes is None:
        return None
    known_codes = torch.as_tensor(known_codes).long()
    return torch.where(known_codes >= 0, known_codes + vocab.image_range[0], known_codes)


def generate_captions(model: GenerativeModel, vocab: CogViewVocab, image_codes_list: Sequence,
                      max_len: int, seeds: Sequence[int] | None = None, *, greedy: bool = True,
                      stop_id: int | str | None = None, temperature: float = 1.0,
                      top_k: int | None = 200, top_p: float = 1.0,
                      text_slots: int | None = None, num_beams: int = 1,
                      cfg_scale: float = 1.0) -> list[list[int]]:
    """caption: image codes per sample -> up to ``max_len`` tokenizer-space text ids each.

    The prompt is ``[BASE] [BOI1] image [EOI1] [ROI1]``. ``stop_id`` (an id or a command
    name such as "[SEP]", for a captioner trained with that end token) ends a caption early;
    it is not part of the returned ids. ``num_beams`` > 1: the most likely caption found by
    beam search (``cogview.generation.beam``) instead of greedy decoding or sampling.
    ``cfg_scale`` != 1: classifier-free guidance against the caption without its image, for a
    captioner trained with ``task.image_dropout`` > 0 (it offsets the captions' language prior,
    e.g. the colour-shape pairs training never showed together).
    """
    check_num_beams(num_beams, greedy or temperature == 0)
    if isinstance(stop_id, str):
        stop_id = vocab.command(stop_id)
    prompts = [caption_prompt(vocab, codes, text_slots=text_slots) for codes in image_codes_list]
    stop_ids = None if stop_id is None else [stop_id]
    if num_beams > 1:
        ids = beam_search_span(model, prompts, "text", max_len, vocab, num_beams=num_beams,
                               stop_ids=stop_ids, cfg_scale=cfg_scale)
    else:
        ids = generate_span(model, prompts, "text", max_len, vocab, temperature=temperature,
                            top_k=top_k, top_p=top_p, seeds=seeds, greedy=greedy,
                            stop_ids=stop_ids, cfg_scale=cfg_scale)
    captions = []
    for row in ids.tolist():
        text = []
        for token in row:
            if not vocab.is_text(token):  # the stop id, then padding
                break
            text.append(token - vocab.num_image_codes)
        captions.append(text)
    return captions


def generate_sr(model: GenerativeModel, vocab: CogViewVocab, text_ids_list: Sequence,
                lowres_codes_list: Sequence, hr_tokens: int, seeds: Sequence[int] | None = None, *,
                windows: int | Sequence[int] = 0, temperature: float = 1.0,
                top_k: int | None = 200, top_p: float = 1.0, greedy: bool = False,
                cfg_scale: float = 1.0, max_text_len: int | None = None,
                known_codes: torch.Tensor | None = None,
                callback: Callable[[int, int], None] | None = None,
                text_slots: int | None = None) -> torch.Tensor:
    """sr: caption + low-res codes per sample -> high-res codes LongTensor [B, hr_tokens] in [0, K).

    ``windows``: the [POS<w>] window (0..8) of every sample, or one per sample.
    ``known_codes`` [B, hr_tokens] (-1 = generate): high-res codes already fixed, e.g. by the
    overlapping windows of ``cogview.generation.superres.sliding_window_sr``.
    """
    check_int("hr_tokens", hr_tokens, meaning="h * w high-res codes")
    _check_same_length("text_ids_list", text_ids_list, "lowres_codes_list", lowres_codes_list)
    if isinstance(windows, int):
        windows = [windows] * len(text_ids_list)
    _check_same_length("text_ids_list", text_ids_list, "windows", windows)
    prompts = [sr_prompt(vocab, text, lowres, window=window, max_text_len=max_text_len,
                         text_slots=text_slots)
               for text, lowres, window in zip(text_ids_list, lowres_codes_list, windows)]
    ids = generate_span(model, prompts, "image", hr_tokens, vocab, temperature=temperature,
                        top_k=top_k, top_p=top_p, seeds=seeds, greedy=greedy, cfg_scale=cfg_scale,
                        known=_known_ids(vocab, known_codes), callback=callback)
    return ids - vocab.image_range[0]
