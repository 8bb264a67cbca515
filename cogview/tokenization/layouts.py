"""Sequence layouts of the three tasks, prompts for generation, and the way back from sequences.

    t2i:     [ROI1] text [BASE] [BOI1] image [EOI1]
    caption: [BASE] [BOI1] image [EOI1] [ROI1] text
    sr:      [ROI1] text [BASE] [BOI1] low-res image [EOI1]
             [ROI2] [POS<w>] [BASE] [BOI2] high-res image [EOI2]

Conventions (every tensor is 1-D over the T positions of one sequence):
- `input_ids`: vocabulary ids (text ids already shifted by K, see vocab.py).
- `position_ids`: 0..T-1 by default, as in CogView (learned absolute positions, sr included;
  the window a high-res patch covers is told by its [POS<w>] token). With `text_slots=S`
  (t2i and sr), the text keeps positions 1..n and every token after it is shifted as if the
  text had been padded to S tokens, without spending compute on padding: image tokens then
  have the same position ids whatever the caption's length, so a learned position embedding
  means one image cell (and in sr a high-res code and its low-res parent stay at a fixed
  distance). A caption layout with `text_slots=S` gives every token the position it has in
  the t2i layout: [BASE] [BOI1] image [EOI1] at S+1.., then [ROI1] text at 0, 1, ..; position
  ids need not grow along the sequence (attention is causal by index), so a captioner
  fine-tuned from a t2i model keeps that model's image and text position embeddings.
- `loss_mask[t]` is True when token t is a target, predicted from tokens < t. Training shifts:
  logits[:, :-1] are scored against input_ids[:, 1:] where loss_mask[:, 1:]. Position 0 is never
  a target. Targets per task:
    t2i      every token after [ROI1]: text, [BASE], [BOI1], image, [EOI1] (CogView pre-training;
             the text part is weighted with txt_loss_scale through text_mask)
    caption  the text (and the optional end token); the image is the condition
    sr       the high-res image and [EOI2]; text and low-res image are the condition
- `text_mask[t]` is True on text tokens (for the text-loss weight).
- `spans`: (start, end, kind) half-open position ranges, kind "image" or "text", whose tokens
  must be image ids only or text ids only; empty regions are left out.
- `text_truncated`: how many text tokens `max_text_len` dropped (0 when none).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from .vocab import CogViewVocab

from cogview.validate import check_int

TASKS = ("t2i", "caption", "sr")


@dataclass
class Layout:
    """One token sequence and its masks; prompts are Layouts with no targets and a `next_kind`."""

    task: str
    input_ids: torch.Tensor  # (T,) int64
    position_ids: torch.Tensor  # (T,) int64
    loss_mask: torch.Tensor  # (T,) bool, True = target
    text_mask: torch.Tensor  # (T,) bool, True = text token
    spans: list[tuple[int, int, str]] = field(default_factory=list)
    text_truncated: int = 0
    next_kind: str | None = None  # prompts: what the sampler draws next ("image" or "text")
    text_slots: int | None = None  # positions reserved for the text (None: sequential positions)

    def __len__(self) -> int:
        return self.input_ids.numel()

    def tokens(self, vocab: CogViewVocab) -> list[str]:
        """Readable tokens ('[ROI1]', 'txt:3', 'img:5', ...), for debugging and tests."""
        return [vocab.token_str(i) for i in self.input_ids.tolist()]


# ------------------------------------------------------------------------------------------------
# input checking


def _as_long_1d(values, name: str) -> torch.Tensor:
    """Tensor, array or (nested) list of ints -> LongTensor; floats and bools are refused."""
    if isinstance(values, torch.Tensor):
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise ValueError(f"{name} must hold integers, got dtype {values.dtype}")
        return values.long()
    array = np.asarray(values)
    if array.size == 0:
        return torch.zeros(array.shape, dtype=torch.long)
    if array.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got {array.dtype} values such as "
                         f"{array.reshape(-1)[0]!r}")
    return torch.from_numpy(array.astype(np.int64))


def image_codes_to_tensor(vocab: CogViewVocab, codes, name: str = "image codes") -> torch.Tensor:
    """Codes (tensor/array/list, [h*w] or [h, w]) -> LongTensor [h*w], checked against [0, K)."""
    tensor = _as_long_1d(codes, name)
    if tensor.dim() not in (1, 2):
        raise ValueError(f"{name} must have shape [h*w] or [h, w], got shape {tuple(tensor.shape)}")
    tensor = tensor.reshape(-1)  # (h*w,)
    if tensor.numel() == 0:
        raise ValueError(f"{name} are empty: an image needs at least one code")
    vocab.check_image_codes(tensor, name)
    return tensor


def text_ids_to_tensor(
    vocab: CogViewVocab, text_ids, *, max_text_len: int | None = None,
    allow_empty_text: bool = False,
) -> tuple[torch.Tensor, int]:
    """Tokenizer-space text ids -> (vocabulary ids LongTensor [n], number of ids truncated)."""
    tensor = _as_long_1d(text_ids, "text ids").reshape(-1)
    if tensor.numel() == 0 and not allow_empty_text:
        raise ValueError(
            "caption is empty (0 text tokens): give every image a non-empty caption; "
            "allow_empty_text=True is only for classifier-free-guidance caption dropout"
        )
    if max_text_len is not None:
        check_int("max_text_len", max_text_len, meaning="text tokens kept; None: no limit")
    truncated = 0
    if max_text_len is not None and tensor.numel() > max_text_len:
        truncated = tensor.numel() - max_text_len
        tensor = tensor[:max_text_len]
    return vocab.text_to_vocab(tensor), truncated


# ------------------------------------------------------------------------------------------------
# assembling


@dataclass
class _Segment:
    ids: torch.Tensor  # (n,)
    kind: str | None  # "image", "text" or None (command tokens)
    target: bool


def _commands(vocab: CogViewVocab, *names: str, target: bool) -> _Segment:
    return _Segment(torch.tensor([vocab.command(n) for n in names], dtype=torch.long), None, target)


def _assemble(task: str, segments: Sequence[_Segment], text_truncated: int,
              next_kind: str | None = None, text_slots: int | None = None) -> Layout:
    """Concatenate segments into a Layout; a prompt (next_kind set) has no targets.

    `text_slots`: positions after the (single) text segment start at the text's start + slots.
    """
    spans, start = [], 0
    for seg in segments:
        end = start + seg.ids.numel()
        if seg.kind is not None and end > start:
            spans.append((start, end, seg.kind))
        start = end
    input_ids = torch.cat([seg.ids for seg in segments])  # (T,)
    is_prompt = next_kind is not None
    loss_mask = torch.cat([torch.full((len(s.ids),), s.target and not is_prompt) for s in segments])
    text_mask = torch.cat([torch.full((len(s.ids),), s.kind == "text") for s in segments])
    loss_mask[0] = False  # nothing precedes the first token
    position_ids = torch.arange(input_ids.numel())
    if text_slots is not None:
        start = 0
        for seg in segments:
            if seg.kind == "text":
                position_ids[start + seg.ids.numel():] += text_slots - seg.ids.numel()
                break
            start += seg.ids.numel()
    return Layout(task=task, input_ids=input_ids, position_ids=position_ids,
                  loss_mask=loss_mask, text_mask=text_mask, spans=spans,
                  text_truncated=text_truncated, next_kind=next_kind, text_slots=text_slots)


def text_slots_for(fixed_image_positions: bool, max_text_len: int | None,
                   where: str = "task") -> int | None:
    """The `text_slots` of a model trained with `fixed_image_positions`: its max_text_len."""
    if not fixed_image_positions:
        return None
    if max_text_len is None:
        raise ValueError(f"{where}.fixed_image_positions=true reserves max_text_len positions for "
                         f"the text, but {where}.max_text_len is null; set it (e.g. 64) or use "
                         f"{where}.fixed_image_positions=false")
    return int(max_text_len)


def _check_text_slots(text_slots: int | None) -> None:
    if text_slots is not None:
        check_int("text_slots", text_slots, meaning="reserved text positions; None: none")


def text_limit(max_text_len: int | None, text_slots: int | None) -> int | None:
    """The text length kept: max_text_len, and never more than the reserved text slots."""
    _check_text_slots(text_slots)
    if text_slots is None:
        return max_text_len
    return text_slots if max_text_len is None else min(max_text_len, text_slots)


def _check_window(window: int) -> None:
    check_int("sr window", window, 0, 8, meaning="tokens [POS0]..[POS8]")


# ------------------------------------------------------------------------------------------------
# the three layouts


def t2i_layout(vocab: CogViewVocab, text_ids, image_codes, *, max_text_len: int | None = None,
               allow_empty_text: bool = False, text_slots: int | None = None) -> Layout:
    """[ROI1] text [BASE] [BOI1] image [EOI1]; targets: everything after [ROI1].

    `text_slots`: image positions independent of the caption's length (module docstring).
    """
    text, truncated = text_ids_to_tensor(vocab, text_ids,
                                         max_text_len=text_limit(max_text_len, text_slots),
                                         allow_empty_text=allow_empty_text)
    image = image_codes_to_tensor(vocab, image_codes)
    return _assemble("t2i", [
        _commands(vocab, "[ROI1]", target=False),
        _Segment(text, "text", True),
        _commands(vocab, "[BASE]", "[BOI1]", target=True),
        _Segment(image, "image", True),
        _commands(vocab, "[EOI1]", target=True),
    ], truncated, text_slots=text_slots)


def _caption_positions(layout: Layout, image_len: int, text_slots: int | None) -> Layout:
    """With text slots: the image part at its t2i positions (S+1..), [ROI1] text from 0."""
    if text_slots is not None:
        head = image_len + 3  # [BASE] [BOI1] image [EOI1]
        layout.position_ids = torch.cat([torch.arange(text_slots + 1, text_slots + 1 + head),
                                         torch.arange(len(layout) - head)])
        layout.text_slots = text_slots
    return layout


def caption_layout(vocab: CogViewVocab, text_ids, image_codes, *, max_text_len: int | None = None,
                   allow_empty_text: bool = False, end_token: str | None = None,
                   text_slots: int | None = None) -> Layout:
    """[BASE] [BOI1] image [EOI1] [ROI1] text; targets: the text.

    `end_token` (e.g. "[SEP]") appends a target command token after the text, so that a
    captioner learns where to stop; the default None keeps CogView's layout exactly.
    `text_slots`: every token at its t2i position (module docstring).
    """
    text, truncated = text_ids_to_tensor(vocab, text_ids,
                                         max_text_len=text_limit(max_text_len, text_slots),
                                         allow_empty_text=allow_empty_text)
    image = image_codes_to_tensor(vocab, image_codes)
    segments = [
        _commands(vocab, "[BASE]", "[BOI1]", target=False),
        _Segment(image, "image", False),
        _commands(vocab, "[EOI1]", "[ROI1]", target=False),
        _Segment(text, "text", True),
    ]
    if end_token is not None:
        segments.append(_commands(vocab, end_token, target=True))
    return _caption_positions(_assemble("caption", segments, truncated), image.numel(), text_slots)


def _sr_segments(
    vocab: CogViewVocab, text: torch.Tensor, lowres: torch.Tensor, window: int
) -> list[_Segment]:
    return [
        _commands(vocab, "[ROI1]", target=False),
        _Segment(text, "text", False),
        _commands(vocab, "[BASE]", "[BOI1]", target=False),
        _Segment(lowres, "image", False),
        _commands(vocab, "[EOI1]", "[ROI2]", f"[POS{window}]", "[BASE]", "[BOI2]", target=False),
    ]


def sr_layout(vocab: CogViewVocab, text_ids, lowres_codes, highres_codes, *, window: int = 0,
              max_text_len: int | None = None, allow_empty_text: bool = False,
              text_slots: int | None = None) -> Layout:
    """[ROI1] text [BASE] [BOI1] low-res [EOI1] [ROI2] [POS<window>] [BASE] [BOI2] high-res [EOI2].

    Targets: the high-res image and [EOI2]. `window` (0..8) picks [POS0]..[POS8], the 3x3
    window of a larger image that this high-res patch covers. `text_slots`: image positions
    independent of the caption's length (module docstring).
    """
    _check_window(window)
    text, truncated = text_ids_to_tensor(vocab, text_ids,
                                         max_text_len=text_limit(max_text_len, text_slots),
                                         allow_empty_text=allow_empty_text)
    lowres = image_codes_to_tensor(vocab, lowres_codes, "low-res image codes")
    highres = image_codes_to_tensor(vocab, highres_codes, "high-res image codes")
    return _assemble("sr", _sr_segments(vocab, text, lowres, window) + [
        _Segment(highres, "image", True),
        _commands(vocab, "[EOI2]", target=True),
    ], truncated, text_slots=text_slots)


# ------------------------------------------------------------------------------------------------
# prompts for generation


def t2i_prompt(vocab: CogViewVocab, text_ids, *, max_text_len: int | None = None,
               allow_empty_text: bool = False, text_slots: int | None = None) -> Layout:
    """[ROI1] text [BASE] [BOI1]: the sampler continues with image codes."""
    text, truncated = text_ids_to_tensor(vocab, text_ids,
                                         max_text_len=text_limit(max_text_len, text_slots),
                                         allow_empty_text=allow_empty_text)
    return _assemble("t2i", [
        _commands(vocab, "[ROI1]", target=False),
        _Segment(text, "text", False),
        _commands(vocab, "[BASE]", "[BOI1]", target=False),
    ], truncated, next_kind="image", text_slots=text_slots)


def caption_prompt(vocab: CogViewVocab, image_codes, *, text_slots: int | None = None) -> Layout:
    """[BASE] [BOI1] image [EOI1] [ROI1]: the sampler continues with text ids."""
    _check_text_slots(text_slots)
    image = image_codes_to_tensor(vocab, image_codes)
    return _caption_positions(_assemble("caption", [
        _commands(vocab, "[BASE]", "[BOI1]", target=False),
        _Segment(image, "image", False),
        _commands(vocab, "[EOI1]", "[ROI1]", target=False),
    ], 0, next_kind="text"), image.numel(), text_slots)


def sr_prompt(vocab: CogViewVocab, text_ids, lowres_codes, *, window: int = 0,
              max_text_len: int | None = None, allow_empty_text: bool = False,
              text_slots: int | None = None) -> Layout:
    """sr layout up to and including [BOI2]: the sampler continues with high-res image codes."""
    _check_window(window)
    text, truncated = text_ids_to_tensor(vocab, text_ids,
                                         max_text_len=text_limit(max_text_len, text_slots),
                                         allow_empty_text=allow_empty_text)
    lowres = image_codes_to_tensor(vocab, lowres_codes, "low-res image codes")
    return _assemble("sr", _sr_segments(vocab, text, lowres, window), truncated, next_kind="image",
                     text_slots=text_slots)


def next_span_kind(vocab: CogViewVocab, token_id: int) -> str | None:
    """The sampler's span rule: after [BOI*] only "image" ids, after [EOI*]/[ROI1] only "text"."""
    token_id = int(token_id)
    if token_id in (vocab.boi1_id, vocab.boi2_id, vocab.boi3_id):
        return "image"
    if token_id in (vocab.eoi1_id, vocab.eoi2_id, vocab.eoi3_id, vocab.roi1_id):
        return "text"
    return None


# ------------------------------------------------------------------------------------------------
# from sequences back to codes and text


def _ids_list(ids) -> list[int]:
    return ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]


def extract_image_codes(vocab: CogViewVocab, ids, which: int = 1) -> torch.Tensor:
    """Codes between the first [BOI<which>] and the next [EOI<which>] (or the end): [n]."""
    seq = _ids_list(ids)
    boi, eoi = vocab.command(f"[BOI{which}]"), vocab.command(f"[EOI{which}]")
    if boi not in seq:
        raise ValueError(f"sequence has no [BOI{which}] token, so it holds no image {which}")
    start = seq.index(boi) + 1
    end = seq.index(eoi, start) if eoi in seq[start:] else len(seq)
    codes = torch.tensor(seq[start:end], dtype=torch.long)
    if not bool(vocab.is_image(codes).all()):
        pos = int((~vocab.is_image(codes)).nonzero()[0])
        raise ValueError(f"image {which} holds the non-image token "
                         f"{vocab.token_str(seq[start + pos])} at position {start + pos}")
    return codes


def extract_text_ids(vocab: CogViewVocab, ids) -> torch.Tensor:
    """Tokenizer-space ids of the text run right after the first [ROI1]: LongTensor [n]."""
    seq = _ids_list(ids)
    if vocab.roi1_id not in seq:
        raise ValueError("sequence has no [ROI1] token, so it holds no text")
    out = []
    for i in seq[seq.index(vocab.roi1_id) + 1:]:
        if not vocab.is_text(i):
            break
        out.append(i - vocab.num_image_codes)
    return torch.tensor(out, dtype=torch.long)


def decode_text(vocab: CogViewVocab, tokenizer, ids: Iterable[int] | torch.Tensor) -> str:
    """Decode the text ids in `ids` with `tokenizer`, dropping every non-text id."""
    return tokenizer.decode([i - vocab.num_image_codes for i in _ids_list(ids) if vocab.is_text(i)])


# ------------------------------------------------------------------------------------------------
# batching


def collate_layouts(layouts: Sequence[Layout], pad_id: int, pad_to: int | None = None,
                    padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad layouts into a batch of [B, L] tensors.

    Keys: input_ids, position_ids, loss_mask, text_mask, attention_mask, and text_truncated [B].

    Padding uses `pad_id` in input_ids, position 0, and False in the masks; attention_mask is
    the key mask (True = real token). `pad_to` fixes L (else the longest layout); "left" padding
    suits batched prompts for generation (each layout keeps its own position ids).
    """
    if not layouts:
        raise ValueError("collate_layouts needs at least one layout")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    longest = max(len(x) for x in layouts)
    length = longest if pad_to is None else pad_to
    if length < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest layout ({longest} tokens); "
                         "raise pad_to or lower max_text_len")
    B = len(layouts)
    batch = {
        "input_ids": torch.full((B, length), int(pad_id), dtype=torch.long),
        "position_ids": torch.zeros((B, length), dtype=torch.long),
        "loss_mask": torch.zeros((B, length), dtype=torch.bool),
        "text_mask": torch.zeros((B, length), dtype=torch.bool),
        "attention_mask": torch.zeros((B, length), dtype=torch.bool),
    }
    for b, layout in enumerate(layouts):
        n = len(layout)
        cols = slice(0, n) if padding_side == "right" else slice(length - n, length)
        batch["input_ids"][b, cols] = layout.input_ids
        batch["position_ids"][b, cols] = layout.position_ids
        batch["loss_mask"][b, cols] = layout.loss_mask
        batch["text_mask"][b, cols] = layout.text_mask
        batch["attention_mask"][b, cols] = True
    batch["text_truncated"] = torch.tensor([x.text_truncated for x in layouts], dtype=torch.long)
    return batch
