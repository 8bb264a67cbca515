"""Beam search over one span: the most likely continuation under the model, not the greedy one.

Greedy decoding commits to each token in turn. A captioner that has two objects to describe
can put the first object's colour with the second object's shape that way, although the
caption that binds them correctly is the more likely one as a whole. Beam search keeps the
``num_beams`` best prefixes at every step (scored by the sum of their tokens' log-probabilities
over the span's ids and the stop ids) and returns the best finished sequence:

    beam_search_span(model, prompts, "text", max_len, vocab, num_beams=4, stop_ids=[sep])

A finished sequence (one that drew a stop id) is final as soon as no live beam can beat it:
log-probabilities only add negative terms, so a live beam's score only falls. A row that
reaches ``num_tokens`` without a stop competes with its score so far. Scores are not
normalised by length: this is a search for the most likely sequence, and the most likely
sequence can be shorter than the greedy one. ``num_beams=1`` is greedy decoding
(``generate_span(greedy=True)``).

With classifier-free guidance (``cfg_scale`` != 1) every beam has an unconditional twin row
(the prompt without its condition: for captions, without the image) that follows the same
tokens, and the beams are scored with the log-softmax of the guided logits
``uncond + cfg_scale * (cond - uncond)``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from cogview.generation.interface import GenerativeModel
from cogview.generation.sampling import (
    cache_dtype,
    check_generate_args,
    decode_buffers,
    generate_span,
    generation_mode,
    guidance_batch,
    prompt_batch,
    resolve_span_kind,
    span_candidates,
    span_logits,
)
from cogview.tokenization.vocab import CogViewVocab
from cogview.validate import check_int


def check_num_beams(num_beams, greedy: bool = True) -> None:
    """num_beams must be an int >= 1, and beam search (> 1) goes with greedy decoding
    (``greedy``: the caller decodes greedily, e.g. greedy=True or temperature 0)."""
    check_int("num_beams", num_beams, meaning="1 = greedy decoding")
    if num_beams > 1 and not greedy:
        raise ValueError(f"num_beams={num_beams} searches for the most likely sequence and does "
                         "not sample; pass greedy=True with it (or num_beams=1 to sample)")


@torch.inference_mode()
def beam_search_span(model: GenerativeModel, prompts, span_kind: str | None, num_tokens: int,
                     vocab: CogViewVocab, *, num_beams: int, stop_ids: Sequence[int] | None = None,
                     cfg_scale: float = 1.0, uncond_prompts=None, use_kv_cache: bool = True,
                     callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The best of ``num_beams`` beams per prompt -> LongTensor [B, num_tokens] of vocabulary ids.

    prompts, span_kind, stop_ids, cfg_scale, uncond_prompts, use_kv_cache and callback as in
    ``generate_span``; the output has the same form (the stop id kept, [PAD] after it).
    """
    check_num_beams(num_beams)
    if num_beams == 1:
        return generate_span(model, prompts, span_kind, num_tokens, vocab, greedy=True,
                             stop_ids=stop_ids, cfg_scale=cfg_scale, uncond_prompts=uncond_prompts,
                             use_kv_cache=use_kv_cache, callback=callback)
    span_kind = resolve_span_kind(prompts, span_kind)
    stop_ids = [int(s) for s in (stop_ids or ())]
    check_generate_args(model, vocab, span_kind, num_tokens, stop_ids, cfg_scale)
    cond = prompt_batch(prompts, vocab, "prompts")
    batch_size = cond["input_ids"].shape[0]
    # guided: rows [0, B) the prompts, [B, 2B) their unconditional twins
    batch, guided = guidance_batch(prompts, cond, uncond_prompts, cfg_scale, vocab)
    copies, prompt_len = batch["input_ids"].shape[0] // batch_size, batch["input_ids"].shape[1]
    device = next(model.parameters()).device
    best = torch.full((batch_size, num_tokens), vocab.pad_id, dtype=torch.long, device=device)
    if num_tokens == 0:
        return best
    beams = num_beams
    # row b * beams + k is beam k of prompt b (N = B * beams rows; guided: N more rows, the
    # unconditional twins in the same order); a prompt's beams share positions and mask
    rows = torch.arange(batch_size * copies, device=device).repeat_interleave(beams)
    ids, positions, mask = (t[rows] for t in decode_buffers(model, batch, num_tokens,
                                                            vocab.pad_id, device))
    span_range, candidates = span_candidates(vocab, span_kind, stop_ids, device)
    width = candidates.numel()
    stops = torch.tensor(stop_ids, dtype=torch.long, device=device)
    # one live beam at first, so the first step does not pick the same token `beams` times
    scores = torch.full((batch_size, beams), float("-inf"), device=device)
    scores[:, 0] = 0.0
    best_score = torch.full((batch_size,), float("-inf"), device=device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    prompt_rows = torch.arange(batch_size, device=device)[:, None]  # (B, 1)

    with generation_mode(model):
        if use_kv_cache:
            model.setup_kv_cache(batch_size * copies, prompt_len + num_tokens - 1,
                                 dtype=cache_dtype(model, device), device=device)
            hidden = model(ids[::beams, :prompt_len], positions[::beams, :prompt_len],
                           mask[::beams, :prompt_len], start_pos=0, return_hidden=True)[:, -1]
            hidden = hidden[rows]  # (copies * N, C)
            model.reorder_kv_cache(rows)
        for step in range(num_tokens):
            end = prompt_len + step  # tokens known so far
            if not use_kv_cache:
                hidden = model(ids[:, :end], positions[:, :end], mask[:, :end],
                               return_hidden=True)[:, -1]  # (copies * N, C)
            logits = span_logits(model, hidden, span_range, stop_ids).float()
            if guided:
                cond_logits, uncond_logits = logits.chunk(2)
                logits = uncond_logits + cfg_scale * (cond_logits - uncond_logits)  # (N, V')
            logp = F.log_softmax(logits, dim=-1)
            total = (scores[:, :, None] + logp.view(batch_size, beams, width))
            # The best 2 * beams candidates. When stops take more than `beams` of them, fewer
            # beams go on, but every candidate left out ranks below a finished sequence and
            # could never beat it.
            top, index = total.view(batch_size, -1).topk(min(2 * beams, beams * width), dim=1)
            parent, token = index // width, candidates[index % width]  # each (B, 2 * beams)
            is_stop = torch.isin(token, stops)

            # a candidate that stops is a finished sequence: keep it if it beats the best so far
            stop_score, stop_pick = top.masked_fill(~is_stop, float("-inf")).max(dim=1)
            for b in torch.nonzero((stop_score > best_score) & ~done).flatten().tolist():
                pick = int(stop_pick[b])
                best[b, :step] = ids[b * beams + int(parent[b, pick]), prompt_len:end]
                best[b, step] = token[b, pick]
                best[b, step + 1:] = vocab.pad_id
                best_score[b] = stop_score[b]

            # the best `beams` candidates that go on are the next live beams
            scores, pick = top.masked_fill(is_stop, float("-inf")).topk(beams, dim=1)
            parent, token = parent.gather(1, pick), token.gather(1, pick)  # (B, beams)
            done |= best_score >= scores[:, 0]  # no live beam can catch up any more
            source = (prompt_rows * beams + parent).flatten()  # (N,) each new beam's parent row
            if guided:  # the twins follow their beams
                source = torch.cat([source, source + batch_size * beams])
            ids = ids[source]
            ids[:, end] = token.flatten().repeat(copies)
            if callback is not None:
                callback(step + 1, num_tokens)
            if step + 1 == num_tokens:
                # out of room: the best live beam competes with its score so far
                for b in torch.nonzero((scores[:, 0] > best_score) & ~done).flatten().tolist():
                    best[b] = ids[b * beams, prompt_len:]
                break
            if bool(done.all()):
                break
            if use_kv_cache:  # a prompt's beams share its prompt's keys: reorder the rest
                model.reorder_kv_cache(source, start=prompt_len, end=end)
                hidden = model(ids[:, end:end + 1], positions[:, end:end + 1], mask[:, :end + 1],
                               start_pos=end, return_hidden=True)[:, -1]  # (copies * N, C)
    return best
