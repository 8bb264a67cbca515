"""Autoregressive sampling from a CogViewTransformer: span-restricted, KV-cached, seeded per sample.

The core loop, plain functions that drive any model with the interface of
``cogview.generation.interface.GenerativeModel`` (the model owns its preallocated KV cache):

    sample_logits       logits [B, V'] -> indices [B]  (temperature, top-k, top-p, greedy)
    span_logits         hidden states -> logits over one span's ids only
    generate_span       prompts -> the next `num_tokens` vocabulary ids of one image or text span

The per-task drivers (t2i, captions, sr) build their prompts and call it:
``cogview.generation.drivers``; beam search: ``cogview.generation.beam``.

Span rule: inside an image span only image ids can be drawn and inside a text span only text
ids (plus optional stop ids such as [SEP]), so logits are computed only for that slice of the
tied embedding, never for the whole vocabulary.

Per-sample seeding: every row draws from its own torch.Generator seeded with the row's seed,
so a sample depends only on (its seed, its prompt), not on the batch it ran in or its row.

Classifier-free guidance stacks the conditional and the unconditional prompts (the same
layout with the condition removed: the text of t2i and sr prompts, the image of caption
prompts) into one batch of 2B rows and mixes their logits: ``uncond + cfg_scale * (cond - uncond)``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Sequence

import torch

from cogview.generation.interface import GenerativeModel
from cogview.tokenization.layouts import Layout, collate_layouts
from cogview.tokenization.vocab import CogViewVocab
from cogview.validate import check_int

SPAN_KINDS = ("image", "text")
PromptBatch = dict[str, torch.Tensor]  # input_ids, position_ids, attention_mask: [N, L]


# ------------------------------------------------------------------------------------------------
# one token from logits


def check_sampling_args(temperature: float, top_k: int | None, top_p: float) -> None:
    """Raise ValueError naming a bad temperature, top_k or top_p."""
    if not temperature >= 0:  # also refuses NaN
        raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy argmax)")
    if top_k is not None:
        check_int("top_k", top_k, 0, meaning="0 or None: no top-k")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must lie in (0, 1] (1 means no nucleus filtering)")


def filter_logits(logits: torch.Tensor, top_k: int | None = None,
                  top_p: float = 1.0) -> torch.Tensor:
    """Sets to -inf every logit outside the top-k and outside the top-p nucleus, row by row.

    logits [B, V']; top_k is capped by V' (0/None: off); top_p=1: off. The most likely id of
    each row always survives.
    """
    vocab_size = logits.shape[-1]
    if top_k and top_k < vocab_size:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V')
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of better-ranked ids
        drop_sorted = mass_above >= top_p  # keep the smallest prefix whose mass reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = 200,
                  top_p: float = 1.0, generator=None, greedy: bool = False) -> torch.Tensor:
    """Draws one index per row of logits [B, V'] -> LongTensor [B] in [0, V').

    temperature 0 or ``greedy=True``: argmax. ``generator``: None (global RNG), one
    torch.Generator for the whole batch, or a sequence of B generators, one per row; the
    last makes each row's draw depend only on its own logits and generator.
    """
    check_sampling_args(temperature, top_k, top_p)
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [B, V'], got {tuple(logits.shape)}")
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)  # (B, V') in fp32
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    generators = list(generator)
    if len(generators) != probs.shape[0]:
        raise ValueError(f"got {len(generators)} generators for {probs.shape[0]} rows of logits; "
                         "pass one generator per row")
    # One uniform number per row from the row's own generator, whatever else is in the batch,
    # then inverse-CDF lookup (cheaper than a multinomial per row, which draws V' numbers).
    uniform = torch.cat([torch.rand(1, generator=gen, device=probs.device)
                         for gen in generators])  # (B,) in [0, 1)
    cdf = probs.cumsum(dim=-1)  # (B, V')
    target = (uniform * cdf[:, -1]).unsqueeze(1)  # (B, 1)
    # right=True: the first id whose cdf exceeds the target, so ids of zero probability never win
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_max(probs.shape[1] - 1)


def row_generators(seeds: Sequence[int],
                   device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One torch.Generator per sample, seeded with that sample's seed."""
    generators = []
    for seed in seeds:
        if isinstance(seed, torch.Tensor):
            seed = int(seed)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed {seed!r} is not an int; pass one int seed per prompt")
        generators.append(torch.Generator(device=device).manual_seed(seed))
    return generators


# ------------------------------------------------------------------------------------------------
# prompts


# The span classifier-free guidance drops, per layout: the caption of t2i and sr prompts, the
# image of caption prompts (what CaptionTask's image_dropout trains on).
CONDITION_SPAN = {"t2i": "text", "sr": "text", "caption": "image"}


def unconditional_prompt(prompt: Layout) -> Layout:
    """The same prompt with its condition span removed: the unconditional input of CFG.

    t2i and sr prompts lose their text: exactly what ``t2i_prompt`` / ``sr_prompt`` build
    from an empty caption (``allow_empty_text=True``), i.e. what caption dropout trains on.
    Caption prompts lose their image, as ``CaptionTask``'s ``image_dropout`` trains them.
    """
    dropped = CONDITION_SPAN.get(prompt.task, "text")
    keep = torch.ones(len(prompt), dtype=torch.bool)
    for start, end, kind in prompt.spans:
        if kind == dropped:
            keep[start:end] = False
    if bool(keep.all()):
        raise ValueError(f"a {prompt.task} prompt with no {dropped} span has nothing to drop "
                         "for classifier-free guidance; use cfg_scale=1 or pass uncond_prompts")
    kept_before = torch.cat([torch.zeros(1, dtype=torch.long), keep.long().cumsum(0)])  # (T+1,)
    spans = [(int(kept_before[s]), int(kept_before[s]) + e - s, k)
             for s, e, k in prompt.spans if k != dropped]
    input_ids = prompt.input_ids[keep]
    length = input_ids.numel()
    # sequential positions close up over the dropped text; reserved text slots stay reserved
    positions = torch.arange(length) if prompt.text_slots is None else prompt.position_ids[keep]
    return Layout(task=prompt.task, input_ids=input_ids, position_ids=positions,
                  loss_mask=torch.zeros(length, dtype=torch.bool),
                  text_mask=torch.zeros(length, dtype=torch.bool), spans=spans,
                  next_kind=prompt.next_kind, text_slots=prompt.text_slots)


def prompt_batch(prompts, vocab: CogViewVocab, what: str) -> PromptBatch:
    """Layouts or an already collated batch -> left-padded input_ids/position_ids/attention_mask."""
    if isinstance(prompts, dict):
        if "input_ids" not in prompts or "attention_mask" not in prompts:
            raise ValueError(f"{what}: a collated batch needs 'input_ids' and 'attention_mask'; "
                             f"got keys {sorted(prompts)}")
        input_ids = torch.as_tensor(prompts["input_ids"]).long()
        mask = torch.as_tensor(prompts["attention_mask"]).bool()
        if input_ids.dim() != 2 or input_ids.shape != mask.shape or input_ids.shape[0] == 0:
            raise ValueError(f"{what}: input_ids {tuple(input_ids.shape)} and attention_mask "
                             f"{tuple(mask.shape)} must both be [B, L] with B >= 1")
        if not bool(mask[:, -1].all()) or bool((mask[:, 1:].long() < mask[:, :-1].long()).any()):
            raise ValueError(f"{what}: the batch is not left-padded (every row must end with real "
                             "tokens); collate with collate_layouts(..., padding_side='left')")
        position_ids = prompts.get("position_ids")
        if position_ids is None:
            # positions count from each row's first real token
            position_ids = (mask.long().cumsum(-1) - 1).clamp_min(0)
        return {"input_ids": input_ids, "position_ids": torch.as_tensor(position_ids).long(),
                "attention_mask": mask}
    if isinstance(prompts, Layout) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"{what} must be a list of prompt Layouts or a collated batch dict, "
                         f"got {type(prompts).__name__}")
    if not prompts:
        raise ValueError(f"{what} is empty: pass at least one prompt")
    batch = collate_layouts(prompts, vocab.pad_id, padding_side="left")
    return {key: batch[key] for key in ("input_ids", "position_ids", "attention_mask")}


def _left_pad(batch: PromptBatch, length: int, pad_id: int) -> PromptBatch:
    """Left-pads every tensor of a prompt batch to ``length`` columns."""
    extra = length - batch["input_ids"].shape[1]
    if extra == 0:
        return batch
    rows = batch["input_ids"].shape[0]
    fill = {"input_ids": pad_id, "position_ids": 0, "attention_mask": False}
    return {key: torch.cat([torch.full((rows, extra), fill[key], dtype=value.dtype), value], dim=1)
            for key, value in batch.items()}


def _stack_prompts(cond: PromptBatch, uncond: PromptBatch, pad_id: int) -> PromptBatch:
    """Conditional rows [0, B) then unconditional rows [B, 2B), left-padded to one length."""
    length = max(cond["input_ids"].shape[1], uncond["input_ids"].shape[1])
    cond, uncond = _left_pad(cond, length, pad_id), _left_pad(uncond, length, pad_id)
    return {key: torch.cat([cond[key], uncond[key]]) for key in cond}


def guidance_batch(prompts, cond: PromptBatch, uncond_prompts, cfg_scale: float,
                    vocab: CogViewVocab) -> tuple[PromptBatch, bool]:
    """The rows to run: cond [B, L], or with guidance cond then uncond [2B, L]; and whether
    guidance is on (cfg_scale != 1, or uncond_prompts given)."""
    if cfg_scale == 1.0 and uncond_prompts is None:
        return cond, False
    if uncond_prompts is None:
        if isinstance(prompts, dict):
            raise ValueError("classifier-free guidance on a collated batch needs "
                             "uncond_prompts (the same prompts without their condition span)")
        uncond_prompts = [unconditional_prompt(p) for p in prompts]
    uncond = prompt_batch(uncond_prompts, vocab, "uncond_prompts")
    batch_size = cond["input_ids"].shape[0]
    if uncond["input_ids"].shape[0] != batch_size:
        raise ValueError(f"got {uncond['input_ids'].shape[0]} uncond_prompts for "
                         f"{batch_size} prompts; pass one per prompt")
    return _stack_prompts(cond, uncond, vocab.pad_id), True


# ------------------------------------------------------------------------------------------------
# the decoding loop


@contextmanager
def generation_mode(model: GenerativeModel):
    """Eval mode (no dropout) while sampling; restores the mode and frees the KV cache after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.clear_kv_cache()
        model.train(was_training)


def cache_dtype(model: GenerativeModel, device: torch.device) -> torch.dtype:
    """The dtype keys and values are computed in: the autocast dtype when autocast is on."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


def span_logits(model: GenerativeModel, hidden: torch.Tensor, span_range: tuple[int, int],
                stop_ids: Sequence[int] = ()) -> torch.Tensor:
    """Final hidden states [N, C] -> logits [N, (hi - lo) + len(stop_ids)]: the span's ids,
    then the stop ids (one embedding row each, so far cheaper than the full vocabulary).

    Raises NonFiniteLogitsError when any logit is NaN or infinite (diverged or overflowing
    weights): sampling from them would silently draw one id everywhere.
    """
    logits = model.logits(hidden, span_range)  # (N, hi - lo)
    if stop_ids:
        extra = [model.logits(hidden, (stop, stop + 1)) for stop in stop_ids]  # each (N, 1)
        logits = torch.cat([logits, *extra], dim=-1)
    if not bool(torch.isfinite(logits).all()):
        rows = (~torch.isfinite(logits)).any(dim=-1).nonzero().flatten().tolist()
        raise NonFiniteLogitsError(
            f"the model's logits are NaN or infinite for {len(rows)} of {logits.shape[0]} rows "
            f"(first rows {rows[:5]}), computed in {logits.dtype}: its weights diverged or "
            "overflow in this dtype; check them (cogview.safe_load.check_finite) or run in "
            "float32 (dtype=float32)")
    return logits


class NonFiniteLogitsError(FloatingPointError):
    """Logits with NaN or inf values during generation or scoring."""


def decode_buffers(model: GenerativeModel, batch: PromptBatch, num_tokens: int, pad_id: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole sequence of each left-padded prompt row, prompt then the ``num_tokens`` to come:
    ids (pad where not yet generated), position ids and key mask, each [N, prompt_len + num_tokens].
    Generated tokens continue each row's positions from its last prompt position + 1."""
    rows, prompt_len = batch["input_ids"].shape
    next_position = batch["position_ids"][:, -1] + 1  # (N,) the last column is real
    needed = int(next_position.max()) + num_tokens - 1
    if needed > model.config.max_positions:
        raise ValueError(f"a prompt of {prompt_len} tokens + num_tokens={num_tokens} needs "
                         f"{needed} positions but model.max_positions={model.config.max_positions}; "
                         "shorten the prompt or sample fewer tokens")
    steps = torch.arange(num_tokens)
    ids = torch.cat([batch["input_ids"], torch.full((rows, num_tokens), pad_id)], dim=1)
    positions = torch.cat([batch["position_ids"], next_position[:, None] + steps], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones(rows, num_tokens, dtype=torch.bool)],
                     dim=1)
    return ids.to(device), positions.to(device), mask.to(device)


def span_candidates(vocab: CogViewVocab, span_kind: str, stop_ids: Sequence[int],
                    device: torch.device) -> tuple[tuple[int, int], torch.Tensor]:
    """The span's id range and the vocabulary id of each logit column of ``span_logits``:
    the span's ids, then the stop ids -> LongTensor [V']."""
    span_range = vocab.image_range if span_kind == "image" else vocab.text_range
    candidates = torch.cat([torch.arange(*span_range), torch.tensor(stop_ids, dtype=torch.long)])
    return span_range, candidates.to(device)


def resolve_span_kind(prompts, span_kind: str | None) -> str | None:
    """The span to generate: ``span_kind``, or the prompt Layouts' common ``next_kind``."""
    layouts = isinstance(prompts, (list, tuple)) and all(isinstance(p, Layout) for p in prompts)
    if layouts and prompts:
        kinds = {p.next_kind for p in prompts}
        if span_kind is None and len(kinds) == 1:
            span_kind = kinds.pop()
        elif span_kind is not None and kinds - {span_kind, None}:
            raise ValueError(f"span_kind={span_kind!r} but the prompts continue with "
                             f"{sorted(k for k in kinds if k)}; build prompts for that span kind")
    return span_kind


def check_generate_args(model, vocab: CogViewVocab, span_kind: str, num_tokens: int,
                         stop_ids: Sequence[int], cfg_scale: float) -> None:
    if span_kind not in SPAN_KINDS:
        raise ValueError(f"span_kind={span_kind!r} must be one of {SPAN_KINDS} (None only "
                         "works for prompt Layouts that all have the same next_kind)")
    check_int("num_tokens", num_tokens, 0)
    if model.config.vocab_size < vocab.num_used:
        raise ValueError(f"the model's vocab_size={model.config.vocab_size} is smaller than the "
                         f"vocabulary ({vocab!r}); build the model with vocab_size={vocab.size}")
    lo, hi = vocab.image_range if span_kind == "image" else vocab.text_range
    for stop in stop_ids:
        if not 0 <= stop < vocab.num_used or lo <= stop < hi:
            raise ValueError(f"stop id {stop} must be a vocabulary id outside the {span_kind} "
                             f"range [{lo}, {hi}), e.g. vocab.sep_id={vocab.sep_id}")
    if not cfg_scale == cfg_scale:  # NaN
        raise ValueError(f"cfg_scale={cfg_scale} is not a number")


def shared_prefill(model: GenerativeModel, ids: torch.Tensor, positions: torch.Tensor,
                   mask: torch.Tensor, max_length: int, device: torch.device) -> torch.Tensor:
    """Sets up the KV cache for the N left-padded prompt rows [N, L] and fills it -> the last
    prompt position's hidden state per row [N, C]. Identical rows (the same prompt drawn with
    several seeds, e.g. candidate captions of one image) are computed once and their keys and
    values repeated: the prefill costs the distinct prompts, not the rows."""
    rows = ids.shape[0]
    unique, inverse = torch.unique(torch.cat([ids, positions, mask.long()], dim=1), dim=0,
                                   return_inverse=True)
    shared = unique.shape[0] < rows
    if shared:
        length = ids.shape[1]
        ids, positions, mask = (unique[:, :length], unique[:, length:2 * length],
                                unique[:, 2 * length:].bool())
    model.setup_kv_cache(ids.shape[0], max_length, dtype=cache_dtype(model, device), device=device)
    # batched prefill; the last column is a real token in every (left-padded) row
    hidden = model(ids, positions, mask, start_pos=0, return_hidden=True)[:, -1]
    if shared:
        model.reorder_kv_cache(inverse)
        hidden = hidden[inverse]
    return hidden


@torch.inference_mode()
def generate_span(model: GenerativeModel, prompts, span_kind: str | None, num_tokens: int,
                  vocab: CogViewVocab, *, temperature: float = 1.0, top_k: int | None = 200,
                  top_p: float = 1.0, seeds: Sequence[int] | None = None, greedy: bool = False,
                  stop_ids: Sequence[int] | None = None, cfg_scale: float = 1.0,
                  uncond_prompts=None, use_kv_cache: bool = True, known: torch.Tensor | None = None,
                  callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Samples the next ``num_tokens`` ids of an image or text span -> LongTensor [B, num_tokens].

    prompts: a list of prompt Layouts (``t2i_prompt`` ...) or a batch collated with
        ``padding_side="left"`` (input_ids, attention_mask, optional position_ids).
    span_kind: "image" (only image ids are drawn) or "text" (only text ids, plus ``stop_ids``);
        None takes the Layouts' ``next_kind``.
    seeds: one int per prompt (needed unless greedy); a row's tokens depend only on its seed
        and its prompt, not on the rest of the batch.
    stop_ids: ids that end a row (e.g. [vocab.sep_id] for captions); the stop id is kept in
        the output and every later token of that row is [PAD].
    cfg_scale, uncond_prompts: classifier-free guidance, run when cfg_scale != 1 or
        uncond_prompts is given; uncond_prompts default to the prompts without their text.
    use_kv_cache: False recomputes the whole sequence at every step (reference, benchmarks).
    known: LongTensor [B, num_tokens] of vocabulary ids to keep (-1: sample this position):
        image completion and sliding-window super-resolution feed known tokens in place.
        Known positions still draw their row's random number, so the sampled positions depend
        only on (seed, prompt, known), not on the rest of the batch.
    callback: called as ``callback(step, num_tokens)`` after each generated position.
    Returns vocabulary ids (image codes are ids [0, K); text ids are tokenizer ids + K).
    """
    check_sampling_args(temperature, top_k, top_p)
    span_kind = resolve_span_kind(prompts, span_kind)
    stop_ids = [int(s) for s in (stop_ids or ())]
    check_generate_args(model, vocab, span_kind, num_tokens, stop_ids, cfg_scale)
    cond = prompt_batch(prompts, vocab, "prompts")
    batch_size = cond["input_ids"].shape[0]
    sampling = not (greedy or temperature == 0)
    if sampling:
        if seeds is None:
            raise ValueError("seeds is None: pass one int seed per prompt (or greedy=True)")
        if len(seeds) != batch_size:
            raise ValueError(f"got {len(seeds)} seeds for {batch_size} prompts; "
                             "pass one per prompt")

    if known is not None:
        known = torch.as_tensor(known).long()
        if known.shape != (batch_size, num_tokens):
            raise ValueError(f"known has shape {tuple(known.shape)}; it must be "
                             f"[{batch_size}, {num_tokens}] (one row per prompt, -1 = sample)")
        lo, hi = vocab.image_range if span_kind == "image" else vocab.text_range
        given = known[known >= 0]
        if given.numel() and (int(given.min()) < lo or int(given.max()) >= hi):
            raise ValueError(f"known ids must be -1 or {span_kind} ids in [{lo}, {hi}); got "
                             f"values in [{int(given.min())}, {int(given.max())}]")
    batch, guided = guidance_batch(prompts, cond, uncond_prompts, cfg_scale, vocab)

    device = next(model.parameters()).device
    out = torch.full((batch_size, num_tokens), vocab.pad_id, dtype=torch.long, device=device)
    if num_tokens == 0:
        return out
    rows, prompt_len = batch["input_ids"].shape
    ids, positions, mask = decode_buffers(model, batch, num_tokens, vocab.pad_id, device)
    total = prompt_len + num_tokens - 1  # the last sampled token is never fed back
    span_range, candidates = span_candidates(vocab, span_kind, stop_ids, device)
    stops = torch.tensor(stop_ids, dtype=torch.long, device=device)
    generators = row_generators(seeds, device) if sampling else None
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    if known is not None:
        known = known.to(device)

    with generation_mode(model):
        if use_kv_cache:
            hidden = shared_prefill(model, ids[:, :prompt_len], positions[:, :prompt_len],
                                    mask[:, :prompt_len], total, device)  # (N, C)
        for step in range(num_tokens):
            end = prompt_len + step  # tokens known so far
            if not use_kv_cache:
                hidden = model(ids[:, :end], positions[:, :end], mask[:, :end],
                               return_hidden=True)[:, -1]  # (N, C)
            logits = span_logits(model, hidden, span_range, stop_ids).float()  # (N, V')
            if guided:
                cond_logits, uncond_logits = logits[:batch_size], logits[batch_size:]
                logits = uncond_logits + cfg_scale * (cond_logits - uncond_logits)  # (B, V')
            choice = sample_logits(logits, temperature, top_k, top_p, generators, not sampling)
            token = candidates[choice]  # (B,)
            if known is not None:
                token = torch.where(known[:, step] >= 0, known[:, step], token)
            token = token.masked_fill(finished, vocab.pad_id)
            out[:, step] = token
            finished |= torch.isin(token, stops)
            if callback is not None:
                callback(step + 1, num_tokens)
            if step + 1 == num_tokens or bool(finished.all()):
                break
            ids[:, end] = token.repeat(rows // batch_size)  # cond and uncond rows alike
            if use_kv_cache:
                hidden = model(ids[:, end:end + 1], positions[:, end:end + 1], mask[:, :end + 1],
                               start_pos=end, return_hidden=True)[:, -1]  # (N, C)
    return out
