"""Caption score (CogView's post-selection): how well a caption describes an image, as the
mean log-probability of its text tokens given the image under a captioning model,

    score(image, text) = 1/n * sum_i log P(text_i | [BASE] [BOI1] image [EOI1] [ROI1] text_<i)

Higher is better; a t2i run draws N candidates per prompt and keeps the best-scored ones.
The probability is over the vocabulary the captioner was trained on: ``loss_vocab="span"``
normalises over the text ids and the caption's end ids only (the ids the captioner was
scored against and samples from), ``"full"`` over the whole vocabulary.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from cogview.generation.interface import GenerativeModel
from cogview.generation.sampling import span_logits
from cogview.modules.losses import check_loss_vocab
from cogview.tokenization.layouts import caption_layout, collate_layouts
from cogview.tokenization.vocab import CogViewVocab


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
    check_loss_vocab(loss_vocab)
    if len(image_codes_list) != len(text_ids_list):
        raise ValueError(f"got {len(image_codes_list)} images and {len(text_ids_list)} texts; "
                         "pass one text per image")
    if not len(text_ids_list):
        raise ValueError("nothing to score: pass at least one (image, text) pair")
    layouts = [caption_layout(vocab, text, codes, max_text_len=max_text_len, text_slots=text_slots)
               for codes, text in zip(image_codes_list, text_ids_list)]
    batch = collate_layouts(layouts, vocab.pad_id, padding_side="right")
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)  # (B, T)
    was_training = model.training
    model.eval()
    span = loss_vocab == "span"
    try:
        out = model(ids, batch["position_ids"].to(device), batch["attention_mask"].to(device),
                    return_hidden=span)  # (B, T, C) or (B, T, V)
    finally:
        model.train(was_training)
    target = ids[:, 1:]  # position t predicts token t+1
    scored = batch["text_mask"][:, 1:].to(device) & batch["attention_mask"][:, 1:].to(device)
    if span:  # text targets only: their logits over the text ids + end ids
        text_lo = vocab.text_range[0]
        logits = span_logits(model, out[:, :-1], vocab.text_range, [int(i) for i in end_ids])
        column = (target - text_lo).clamp(0, logits.shape[-1] - 1)  # non-text: masked below
    else:
        logits, column = out[:, :-1], target
    logp = F.log_softmax(logits.float(), dim=-1)
    token_logp = logp.gather(-1, column.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (token_logp * scored).sum(1).cpu() / scored.sum(1).clamp_min(1).cpu()
