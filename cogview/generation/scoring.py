"""How well an image and a text fit, scored by either direction of the model.

Caption score (CogView's post-selection): the mean log-probability of the text's tokens given
the image under a captioning model,

    score(image, text) = 1/n * sum_i log P(text_i | [BASE] [BOI1] image [EOI1] [ROI1] text_<i)

Higher is better; a t2i run draws N candidates per prompt and keeps the best-scored ones.

Image score: the mean log-probability of the image's codes given the text under a t2i model,

    score(text, image) = 1/m * sum_j log P(code_j | [ROI1] text [BASE] [BOI1] code_<j)

which ranks candidate captions of one image (``Pipeline.caption(reranker=t2i_pipe)``): the
caption under which the t2i model finds the image most likely (noisy-channel reranking).

The probability is over the vocabulary the model was trained on: ``loss_vocab="span"``
normalises over the span's ids only (text ids and the caption's end ids; image codes), the
ids the model was scored against and samples from, ``"full"`` over the whole vocabulary.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from cogview.generation.interface import GenerativeModel
from cogview.generation.sampling import span_logits
from cogview.modules.losses import check_loss_vocab
from cogview.tokenization.layouts import caption_layout, collate_layouts, t2i_layout
from cogview.tokenization.vocab import CogViewVocab


def _check_pairs(loss_vocab: str, images: Sequence, texts: Sequence, hint: str) -> None:
    check_loss_vocab(loss_vocab)
    if len(images) != len(texts):
        raise ValueError(f"got {len(images)} images and {len(texts)} texts; {hint}")
    if not len(texts):
        raise ValueError("nothing to score: pass at least one (image, text) pair")


def _forward(model: GenerativeModel, vocab: CogViewVocab, layouts: list,
             return_hidden: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Right-padded layouts through the model in eval mode -> (logits or final hidden states
    [B, T, *], the collated batch on the model's device)."""
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in
             collate_layouts(layouts, vocab.pad_id, padding_side="right").items()}
    was_training = model.training
    model.eval()
    try:
        out = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"],
                    return_hidden=return_hidden)
    finally:
        model.train(was_training)
    return out, batch


@torch.inference_mode()
def caption_log_likelihood(model: GenerativeModel, vocab: CogViewVocab, image_codes_list: Sequence,
                           text_ids_list: Sequence, *,
                           max_text_len: int | None = None,
                           text_slots: int | None = None, loss_vocab: str = "full",
                           end_ids: Sequence[int] = ()) -> torch.Tensor:
    """Image codes + tokenizer-space text ids per pair -> FloatTensor [B]: mean log P(text | image).

    Only the caption's own tokens are scored (not an end token), over the whole vocabulary
    (``loss_vocab="full"``) or over the text ids and ``end_ids`` (``"span"``).
    """
    _check_pairs(loss_vocab, image_codes_list, text_ids_list, "pass one text per image")
    layouts = [caption_layout(vocab, text, codes, max_text_len=max_text_len, text_slots=text_slots)
               for codes, text in zip(image_codes_list, text_ids_list)]
    span = loss_vocab == "span"
    out, batch = _forward(model, vocab, layouts, return_hidden=span)  # (B, T, C) or (B, T, V)
    target = batch["input_ids"][:, 1:]  # position t predicts token t+1
    scored = batch["text_mask"][:, 1:] & batch["attention_mask"][:, 1:].bool()
    if span:  # text targets only: their logits over the text ids + end ids
        text_lo = vocab.text_range[0]
        logits = span_logits(model, out[:, :-1], vocab.text_range, [int(i) for i in end_ids])
        column = (target - text_lo).clamp(0, logits.shape[-1] - 1)  # non-text: masked below
    else:
        logits, column = out[:, :-1], target
    logp = F.log_softmax(logits.float(), dim=-1)
    token_logp = logp.gather(-1, column.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (token_logp * scored).sum(1).cpu() / scored.sum(1).clamp_min(1).cpu()


@torch.inference_mode()
def image_log_likelihood(model: GenerativeModel, vocab: CogViewVocab, text_ids_list: Sequence,
                         image_codes_list: Sequence, *, max_text_len: int | None = None,
                         text_slots: int | None = None, loss_vocab: str = "full") -> torch.Tensor:
    """Tokenizer-space text ids + image codes per pair -> FloatTensor [B]: mean log P(image | text)
    under a t2i model, over the image codes (``loss_vocab="span"``) or the whole vocabulary."""
    _check_pairs(loss_vocab, image_codes_list, text_ids_list, "pass one image per text")
    layouts = [t2i_layout(vocab, text, codes, max_text_len=max_text_len, text_slots=text_slots)
               for text, codes in zip(text_ids_list, image_codes_list)]
    hidden, batch = _forward(model, vocab, layouts, return_hidden=True)
    ids = batch["input_ids"]
    target = ids[:, 1:]  # position t predicts token t+1
    lo, hi = vocab.image_range
    scored = (target >= lo) & (target < hi) & batch["attention_mask"][:, 1:].bool()
    # the image tokens' logits only, in the weights' precision even under autocast: ranking
    # candidates compares sums over all codes, and bf16 logits' rounding is as large as the
    # differences between near-identical captions
    picked = hidden[:, :-1][scored].to(next(model.parameters()).dtype)
    with torch.autocast(ids.device.type, enabled=False):
        if loss_vocab == "span":
            logits, column = model.logits(picked, vocab.image_range), target[scored] - lo
        else:
            logits, column = model.logits(picked), target[scored]
    token_logp = F.log_softmax(logits.float(), dim=-1).gather(-1, column[:, None])[:, 0]
    total = torch.zeros(ids.shape[0], device=ids.device).index_add_(
        0, scored.nonzero()[:, 0], token_logp)
    return total.cpu() / scored.sum(1).clamp_min(1).cpu()
