"""The sampler: span rule, KV cache vs recomputation, per-sample seeding, CFG, stop ids."""

import copy

import pytest
import torch

from cogview.generation import (
    filter_logits,
    generate_captions,
    generate_images,
    generate_span,
    generate_sr,
    row_generators,
    sample_logits,
    unconditional_prompt,
)
from cogview.modules.transformer import CogViewTransformer, TransformerConfig
from cogview.tokenization import (
    CogViewVocab,
    caption_prompt,
    collate_layouts,
    sr_prompt,
    t2i_prompt,
)

VOCAB = CogViewVocab(num_image_codes=32, text_vocab_size=50)
K = VOCAB.num_image_codes
IMAGE_TOKENS = 16


def tiny_model(attention: str = "pb_relax", **overrides) -> CogViewTransformer:
    torch.manual_seed(0)
    config = TransformerConfig(num_layers=2, hidden_size=64, num_heads=4, max_positions=64,
                               vocab_size=VOCAB.size, attention=attention, **overrides)
    return CogViewTransformer(config).eval()


@pytest.fixture(scope="module")
def model() -> CogViewTransformer:
    return tiny_model()


def prefer(model: CogViewTransformer, token_id: int, logit: float) -> CogViewTransformer:
    """A copy of ``model`` whose logit for ``token_id`` is about ``logit`` at every position.

    The final LayerNorm's output is zero-mean per token, so with bias 1 and that token's
    (tied) embedding row set to a constant c, its logit is hidden_size * c whatever the input.
    """
    model = copy.deepcopy(model)
    hidden = model.config.hidden_size
    with torch.no_grad():
        model.final_layernorm.bias.fill_(1.0)
        model.word_embeddings.weight[token_id] = logit / hidden
    return model


def naive_greedy(model, prompt_ids: torch.Tensor, kind: str, num_tokens: int,
                 uncond_ids: torch.Tensor | None = None, cfg_scale: float = 1.0) -> torch.Tensor:
    """Reference: recompute the whole unpadded sequence each step, full-vocabulary logits
    with every id outside the span masked, argmax (optionally mixed with CFG)."""
    allowed = VOCAB.id_mask(kind)
    seq, useq, out = prompt_ids.clone(), None if uncond_ids is None else uncond_ids.clone(), []
    with torch.no_grad():
        for _ in range(num_tokens):
            logits = model(seq[None])[0, -1]  # (V,)
            if useq is not None:
                uncond = model(useq[None])[0, -1]
                logits = uncond + cfg_scale * (logits - uncond)
            token = logits.masked_fill(~allowed, float("-inf")).argmax()
            out.append(int(token))
            seq = torch.cat([seq, token[None]])
            if useq is not None:
                useq = torch.cat([useq, token[None]])
    return torch.tensor(out)


def naive_greedy_at(model, prompt, num_tokens: int) -> torch.Tensor:
    """Reference for prompts with their own position ids: recompute, next position = last + 1."""
    allowed = VOCAB.id_mask(prompt.next_kind)
    seq, pos, out = prompt.input_ids.clone(), prompt.position_ids.clone(), []
    with torch.no_grad():
        for _ in range(num_tokens):
            logits = model(seq[None], pos[None])[0, -1]  # (V,)
            token = logits.masked_fill(~allowed, float("-inf")).argmax()
            out.append(int(token))
            seq, pos = torch.cat([seq, token[None]]), torch.cat([pos, pos[-1:] + 1])
    return torch.tensor(out)


def t2i_prompts(*texts):
    return [t2i_prompt(VOCAB, text) for text in texts]


# ------------------------------------------------------------------------------------------------
# sample_logits


def test_temperature_zero_and_top_k_one_are_argmax():
    logits = torch.randn(6, 40)
    generators = row_generators(range(6))
    assert torch.equal(sample_logits(logits, temperature=0.0), logits.argmax(-1))
    assert torch.equal(sample_logits(logits, greedy=True), logits.argmax(-1))
    assert torch.equal(sample_logits(logits, top_k=1, generator=generators), logits.argmax(-1))


def test_temperature_controls_diversity():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))  # (1, 4)

    def draws(temperature):
        return [int(sample_logits(logits, temperature, generator=[g]))
                for g in row_generators(range(200))]

    assert set(draws(0.01)) == {0}  # sharpened to the argmax
    assert set(draws(1.0)) == {0, 1, 2, 3}
    counts = torch.bincount(torch.tensor(draws(5.0)), minlength=4)
    assert counts.min() > 25  # flattened towards uniform (50 each)


@pytest.mark.parametrize("top_k, top_p, expected", [
    (2, 1.0, {0, 1}),
    (200, 1.0, {0, 1, 2, 3}),  # top_k above V' is capped, not an error
    (None, 0.5, {0}),
    (None, 0.7, {0, 1}),
    (None, 0.85, {0, 1, 2}),
    (3, 0.7, {0, 1}),
])
def test_top_k_and_top_p_keep_only_the_best_ids(top_k, top_p, expected):
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    drawn = {int(sample_logits(logits, top_k=top_k, top_p=top_p, generator=[g]))
             for g in row_generators(range(300))}
    assert drawn == expected
    kept = torch.isfinite(filter_logits(logits, top_k, top_p))[0].nonzero().flatten().tolist()
    assert set(kept) == expected


def test_per_row_generators_make_rows_independent():
    logits = torch.randn(3, 50)
    together = sample_logits(logits, generator=row_generators([5, 6, 7]))
    alone = sample_logits(logits[2:], generator=row_generators([7]))
    assert int(together[2]) == int(alone[0])


# ------------------------------------------------------------------------------------------------
# span rule


def test_image_span_draws_only_image_codes_even_when_the_model_prefers_a_command(model):
    biased = prefer(model, VOCAB.eoi1_id, logit=20.0)
    prompt = t2i_prompts([1, 2, 3])[0]
    with torch.no_grad():
        assert int(biased(prompt.input_ids[None])[0, -1].argmax()) == VOCAB.eoi1_id
    for greedy in (True, False):
        codes = generate_images(biased, VOCAB, [[1, 2, 3], [4]], IMAGE_TOKENS, seeds=[0, 1],
                                greedy=greedy, top_k=None)
        assert codes.shape == (2, IMAGE_TOKENS)
        assert bool(((codes >= 0) & (codes < K)).all())


def test_caption_span_draws_only_text_ids_or_the_stop_id(model):
    biased = prefer(model, VOCAB.sep_id, logit=3.0)  # [SEP] likely, but not certain
    prompts = [caption_prompt(VOCAB, torch.arange(IMAGE_TOKENS) % K)] * 2
    free = generate_span(biased, prompts, "text", 10, VOCAB, seeds=[0, 1])
    assert bool(VOCAB.is_text(free).all())  # [SEP] is not drawable without stop_ids
    stopped = generate_span(biased, prompts, "text", 10, VOCAB, seeds=[0, 1],
                            stop_ids=[VOCAB.sep_id])
    allowed = VOCAB.is_text(stopped) | (stopped == VOCAB.sep_id) | (stopped == VOCAB.pad_id)
    assert bool(allowed.all())


# ------------------------------------------------------------------------------------------------
# KV cache, padding, seeding


@pytest.mark.parametrize("attention", ["pb_relax", "sdpa", "eager"])
def test_kv_cached_greedy_equals_full_recomputation(attention):
    model = tiny_model(attention)
    texts = [[3, 1, 4, 1, 5], [9]]
    prompts = t2i_prompts(*texts)
    cached = generate_span(model, prompts, "image", IMAGE_TOKENS, VOCAB, greedy=True)
    recomputed = generate_span(model, prompts, "image", IMAGE_TOKENS, VOCAB, greedy=True,
                               use_kv_cache=False)
    assert torch.equal(cached, recomputed)
    for row, prompt in enumerate(prompts):
        expected = naive_greedy(model, prompt.input_ids, "image", IMAGE_TOKENS)
        assert torch.equal(cached[row], expected)


def test_text_slots_prompts_continue_from_their_own_positions(model):
    """With reserved text slots the sampled tokens sit where training put them: at the
    prompt's last position + 1 onwards, not at the prompt's length."""
    texts = [[3], [1, 2, 3, 4, 5]]
    prompts = [t2i_prompt(VOCAB, text, text_slots=8) for text in texts]
    batched = generate_images(model, VOCAB, texts, IMAGE_TOKENS, greedy=True, text_slots=8)
    for row, prompt in enumerate(prompts):
        expected = naive_greedy_at(model, prompt, IMAGE_TOKENS)  # image ids are the codes
        assert torch.equal(batched[row], expected)
    sequential = generate_images(model, VOCAB, texts[:1], IMAGE_TOKENS, greedy=True)
    assert not torch.equal(sequential[0], batched[0])  # the positions do reach the model
    captions = generate_captions(model, VOCAB, [torch.arange(16)], 5, greedy=True, text_slots=8)
    prompt = caption_prompt(VOCAB, torch.arange(16), text_slots=8)
    assert captions[0] == (naive_greedy_at(model, prompt, 5) - K).tolist()
    lowres = torch.arange(4)
    sr = generate_sr(model, VOCAB, [[2]], [lowres], 16, greedy=True, text_slots=8)
    expected = naive_greedy_at(model, sr_prompt(VOCAB, [2], lowres, text_slots=8), 16)
    assert torch.equal(sr[0], expected)


def test_left_padded_batch_gives_each_prompt_its_own_tokens(model):
    texts = [[7], [1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12, 13]]  # prompt lengths 4, 7, 12
    batched = generate_images(model, VOCAB, texts, IMAGE_TOKENS, greedy=True)
    for row, text in enumerate(texts):
        alone = generate_images(model, VOCAB, [text], IMAGE_TOKENS, greedy=True)
        assert torch.equal(batched[row], alone[0])


def test_a_collated_batch_gives_the_same_tokens_as_the_layouts(model):
    prompts = t2i_prompts([1, 2], [3, 4, 5, 6])
    batch = collate_layouts(prompts, VOCAB.pad_id, padding_side="left")
    from_layouts = generate_span(model, prompts, "image", 8, VOCAB, seeds=[4, 5])
    from_batch = generate_span(model, batch, "image", 8, VOCAB, seeds=[4, 5])
    assert torch.equal(from_layouts, from_batch)


def test_a_sample_depends_on_its_seed_and_prompt_not_on_its_batch(model):
    a, b = [1, 2, 3], [4, 5, 6, 7, 8, 9]
    kwargs = dict(temperature=1.0, top_k=20, top_p=0.95)
    ab = generate_images(model, VOCAB, [a, b], IMAGE_TOKENS, seeds=[11, 22], **kwargs)
    b_alone = generate_images(model, VOCAB, [b], IMAGE_TOKENS, seeds=[22], **kwargs)
    ba = generate_images(model, VOCAB, [b, a], IMAGE_TOKENS, seeds=[22, 11], **kwargs)
    assert torch.equal(ab[1], b_alone[0])
    assert torch.equal(ab[1], ba[0])
    assert torch.equal(ab[0], ba[1])
    other_seed = generate_images(model, VOCAB, [b], IMAGE_TOKENS, seeds=[23], **kwargs)
    assert not torch.equal(other_seed[0], b_alone[0])


def test_different_seeds_give_distinct_samples(model):
    codes = generate_images(model, VOCAB, [[1, 2]] * 6, IMAGE_TOKENS, seeds=list(range(6)))
    assert len({tuple(row) for row in codes.tolist()}) == 6


def test_top_k_one_equals_greedy(model):
    texts = [[1, 2, 3], [8, 9]]
    greedy = generate_images(model, VOCAB, texts, IMAGE_TOKENS, greedy=True)
    top1 = generate_images(model, VOCAB, texts, IMAGE_TOKENS, seeds=[3, 4], top_k=1)
    assert torch.equal(greedy, top1)


# ------------------------------------------------------------------------------------------------
# classifier-free guidance


@pytest.mark.parametrize("slots", [None, 6])
def test_unconditional_prompt_is_the_prompt_with_an_empty_caption(slots):
    lowres = torch.arange(4)
    for prompt, empty in [
        (t2i_prompt(VOCAB, [1, 2, 3], text_slots=slots),
         t2i_prompt(VOCAB, [], allow_empty_text=True, text_slots=slots)),
        (sr_prompt(VOCAB, [4, 5], lowres, window=3, text_slots=slots),
         sr_prompt(VOCAB, [], lowres, window=3, allow_empty_text=True, text_slots=slots)),
    ]:
        uncond = unconditional_prompt(prompt)
        assert torch.equal(uncond.input_ids, empty.input_ids)
        assert torch.equal(uncond.position_ids, empty.position_ids)
        assert uncond.spans == empty.spans and uncond.next_kind == empty.next_kind
        assert uncond.text_slots == slots
    with pytest.raises(ValueError, match="with no text span has nothing to drop"):
        unconditional_prompt(t2i_prompt(VOCAB, [], allow_empty_text=True))


@pytest.mark.parametrize("slots", [None, 6])
def test_unconditional_caption_prompt_drops_the_image(slots):
    prompt = caption_prompt(VOCAB, torch.arange(4), text_slots=slots)
    uncond = unconditional_prompt(prompt)
    assert uncond.tokens(VOCAB) == ["[BASE]", "[BOI1]", "[EOI1]", "[ROI1]"]
    assert uncond.next_kind == "text" and uncond.text_slots == slots
    assert not any(kind == "image" for _, _, kind in uncond.spans)
    if slots is None:  # positions close up over the dropped image
        assert uncond.position_ids.tolist() == [0, 1, 2, 3]
    else:  # reserved positions stay: the image part at its t2i positions, [ROI1] at 0
        keep = [0, 1, 6, 7]
        assert uncond.position_ids.tolist() == prompt.position_ids[keep].tolist()
    with pytest.raises(ValueError, match="with no image span"):
        unconditional_prompt(uncond)


def test_cfg_scale_one_equals_no_guidance(model):
    prompts = t2i_prompts([1, 2, 3], [4, 5])
    uncond = [unconditional_prompt(p) for p in prompts]
    for kwargs in (dict(greedy=True), dict(seeds=[7, 8])):
        plain = generate_span(model, prompts, "image", IMAGE_TOKENS, VOCAB, **kwargs)
        guided = generate_span(model, prompts, "image", IMAGE_TOKENS, VOCAB, cfg_scale=1.0,
                               uncond_prompts=uncond, **kwargs)
        assert torch.equal(plain, guided)


def test_cfg_mixes_conditional_and_unconditional_logits(model):
    prompts = t2i_prompts([1, 2, 3], [4, 5, 6, 7, 8])
    uncond = [unconditional_prompt(p) for p in prompts]
    guided = generate_span(model, prompts, "image", IMAGE_TOKENS, VOCAB, greedy=True, cfg_scale=3.0)
    for row, prompt in enumerate(prompts):
        expected = naive_greedy(model, prompt.input_ids, "image", IMAGE_TOKENS,
                                uncond_ids=uncond[row].input_ids, cfg_scale=3.0)
        assert torch.equal(guided[row], expected)
    # scale 0 keeps only the unconditional logits
    only_uncond = generate_span(model, prompts, "image", IMAGE_TOKENS, VOCAB, greedy=True,
                                cfg_scale=0.0)
    unconditional = generate_span(model, uncond, "image", IMAGE_TOKENS, VOCAB, greedy=True)
    assert torch.equal(only_uncond, unconditional)


# ------------------------------------------------------------------------------------------------
# captions and sr


def test_caption_stop_id_ends_rows_and_pads_after(model):
    codes = [torch.arange(IMAGE_TOKENS) % K, (torch.arange(IMAGE_TOKENS) * 7) % K]
    prompts = [caption_prompt(VOCAB, c) for c in codes for _ in range(4)]
    biased = prefer(model, VOCAB.sep_id, logit=3.5)
    ids = generate_span(biased, prompts, "text", 12, VOCAB, seeds=list(range(8)),
                        stop_ids=[VOCAB.sep_id])
    stop_steps = []
    for row in ids.tolist():
        assert VOCAB.sep_id in row
        stop = row.index(VOCAB.sep_id)
        stop_steps.append(stop)
        assert all(VOCAB.is_text(t) for t in row[:stop])
        assert all(t == VOCAB.pad_id for t in row[stop + 1:])
    assert len(set(stop_steps)) > 1 and max(stop_steps) > 0  # rows stop at different steps

    images = [c for c in codes for _ in range(4)]  # the prompts' order
    captions = generate_captions(biased, VOCAB, images, max_len=12, seeds=list(range(8)),
                                 greedy=False, stop_id="[SEP]")
    assert captions == [[t - K for t in row[:row.index(VOCAB.sep_id)]] for row in ids.tolist()]
    certain = prefer(model, VOCAB.sep_id, logit=50.0)
    assert generate_captions(certain, VOCAB, codes, max_len=5, stop_id=VOCAB.sep_id) == [[], []]


def test_greedy_captions_are_tokenizer_text_ids(model):
    codes = [torch.arange(IMAGE_TOKENS) % K]
    captions = generate_captions(model, VOCAB, codes, max_len=6)
    assert len(captions) == 1 and len(captions[0]) == 6
    assert all(0 <= t < VOCAB.text_vocab_size for t in captions[0])
    ids = generate_span(model, [caption_prompt(VOCAB, codes[0])], "text", 6, VOCAB, greedy=True)
    assert captions[0] == (ids[0] - K).tolist()


def test_sr_generates_high_res_codes_per_window(model):
    lowres = [torch.arange(4), torch.arange(4, 8)]
    codes = generate_sr(model, VOCAB, [[1, 2], [3]], lowres, hr_tokens=IMAGE_TOKENS, seeds=[0, 1],
                        windows=[0, 5])
    assert codes.shape == (2, IMAGE_TOKENS) and bool(((codes >= 0) & (codes < K)).all())
    alone = generate_sr(model, VOCAB, [[3]], lowres[1:], hr_tokens=IMAGE_TOKENS, seeds=[1],
                        windows=5)
    assert torch.equal(codes[1], alone[0])


# ------------------------------------------------------------------------------------------------
# precision, model state, errors


def test_bf16_autocast_on_cpu_with_cfg(model):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = generate_images(model, VOCAB, [[1, 2], [3, 4, 5]], IMAGE_TOKENS, seeds=[0, 1],
                                cfg_scale=2.0)
        captions = generate_captions(model, VOCAB, list(codes), max_len=4)
    assert codes.shape == (2, IMAGE_TOKENS) and bool(((codes >= 0) & (codes < K)).all())
    assert all(len(c) == 4 and all(0 <= t < VOCAB.text_vocab_size for t in c) for c in captions)


def test_generation_restores_train_mode_and_frees_the_cache():
    model = tiny_model(dropout=0.5).train()
    first = generate_images(model, VOCAB, [[1, 2]], IMAGE_TOKENS, greedy=True)
    second = generate_images(model, VOCAB, [[1, 2]], IMAGE_TOKENS, greedy=True)
    assert torch.equal(first, second)  # no dropout while sampling
    assert model.training
    assert all(layer.attention.kv_cache is None for layer in model.layers)


def test_bad_arguments_raise_clear_errors(model):
    prompts = t2i_prompts([1, 2])
    with pytest.raises(ValueError, match="empty"):
        generate_span(model, [], "image", 4, VOCAB, greedy=True)
    with pytest.raises(ValueError, match="num_tokens=-1"):
        generate_span(model, prompts, "image", -1, VOCAB, greedy=True)
    for top_p in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=f"top_p={top_p}"):
            generate_span(model, prompts, "image", 4, VOCAB, seeds=[0], top_p=top_p)
    with pytest.raises(ValueError, match="temperature=-1"):
        sample_logits(torch.zeros(1, 4), temperature=-1.0)
    with pytest.raises(ValueError, match="seeds is None"):
        generate_span(model, prompts, "image", 4, VOCAB)
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        generate_span(model, prompts, "image", 4, VOCAB, seeds=[0, 1])
    with pytest.raises(ValueError, match="span_kind='text'"):
        generate_span(model, prompts, "text", 4, VOCAB, greedy=True)
    with pytest.raises(ValueError, match="stop id 3"):
        generate_span(model, prompts, "image", 4, VOCAB, greedy=True, stop_ids=[3])
    with pytest.raises(ValueError, match="max_positions=64"):
        generate_span(model, prompts, "image", 64, VOCAB, greedy=True)
    right_padded = collate_layouts(t2i_prompts([1], [1, 2, 3]), VOCAB.pad_id, padding_side="right")
    with pytest.raises(ValueError, match="not left-padded"):
        generate_span(model, right_padded, "image", 4, VOCAB, greedy=True)
    with pytest.raises(ValueError, match="a list of prompt Layouts"):
        generate_span(model, prompts[0], "image", 4, VOCAB, greedy=True)
    assert generate_span(model, prompts, "image", 0, VOCAB, greedy=True).shape == (1, 0)


def test_repeated_prompts_are_prefilled_once_and_sample_as_alone(model):
    """Candidate captions of one image: the same prompt on several rows is computed once in
    the prefill, and every row still draws what it draws alone with its seed."""
    image = torch.arange(IMAGE_TOKENS) % K
    prompts = [caption_prompt(VOCAB, image), caption_prompt(VOCAB, image),
               caption_prompt(VOCAB, (image * 3) % K), caption_prompt(VOCAB, image)]
    seeds = [3, 4, 5, 6]
    prefill_rows = []
    forward = model.forward

    def counting(*args, start_pos=None, **kwargs):
        if start_pos == 0:
            prefill_rows.append(args[0].shape[0])
        return forward(*args, start_pos=start_pos, **kwargs)

    model.forward = counting
    try:
        together = generate_span(model, prompts, "text", 6, VOCAB, seeds=seeds)
    finally:
        del model.forward
    assert prefill_rows == [2]  # two distinct prompts for four rows
    for row, (prompt, seed) in enumerate(zip(prompts, seeds)):
        alone = generate_span(model, [prompt], "text", 6, VOCAB, seeds=[seed])
        assert torch.equal(together[row], alone[0]), row
    assert not torch.equal(together[0], together[1])  # same prompt, other seed
