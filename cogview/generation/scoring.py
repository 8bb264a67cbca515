"""Caption score (CogView's post-selection): how well a caption describes an image, as the
mean log-probability of its text tokens given the image under a captioning model,

    score(image, text) = 1/n * sum_i log P(text_i | [BASE] [BOI1] image [EOI1] [ROI1] text_<i)

Higher is better; a t2i run draws N candidates per prompt and keeps the best-scored ones.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cogview.tokenization.layouts import caption_layout, collate_layouts
from cogview.tokenization.vocab import CogViewVocab


@torch.inference_mode()
def caption_log_likelihood(model: nn.Module, vocab: CogViewVocab, image_codes_list: Sequence,
                           text_ids_list: Sequence, *,
                           max_text_len: int | None = None,
                           text_slots: int | None = None) -> torch.Tensor:
    """Image codes + tokenizer-space text ids per pair -> FloatTensor [B]: mean log P(text | image).

    Only the caption's own tokens are scored (not an end token), over the whole vocabulary.
    """
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
    try:
        logits = model(ids, batch["position_ids"].to(device),
                       batch["attention_mask"].to(device))  # (B, T, V)
    finally:
        model.train(was_training)
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # position t predicts token t+1
    target = ids[:, 1:]
    token_logp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    scored = batch["text_mask"][:, 1:].to(device) & batch["attention_mask"][:, 1:].to(device)
    return (token_logp * scored).sum(1).cpu() / scored.sum(1).clamp_min(1).cpu()
