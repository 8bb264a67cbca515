"""Beam search: the most likely continuation (checked exhaustively), greedy at one beam, the
KV cache, batching, and the caption entry points."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from cogview.generation import (
    beam_search_span,
    generate_captions,
    generate_span,
    span_logits,
    unconditional_prompt,
)
from cogview.modules.transformer import CogViewTransformer, TransformerConfig
from cogview.tokenization import CogViewVocab, caption_prompt, t2i_prompt

VOCAB = CogViewVocab(num_image_codes=32, text_vocab_size=50)
# three text ids and [SEP]: every caption of up to three tokens can be enumerated
SMALL = CogViewVocab(num_image_codes=8, text_vocab_size=3)
IMAGE_TOKENS = 16


def tiny_model(vocab: CogViewVocab, seed: int = 0) -> CogViewTransformer:
    torch.manual_seed(seed)
    config = TransformerConfig(num_layers=2, hidden_size=64, num_heads=4, max_positions=64,
                               vocab_size=vocab.size)
    return CogViewTransformer(config).eval()


def with_stop_logit(model: CogViewTransformer, stop_id: int, logit: float) -> CogViewTransformer:
    """A copy whose logit for ``stop_id`` is about ``logit`` everywhere (see test_sampling)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.final_layernorm.bias.fill_(1.0)
        model.word_embeddings.weight[stop_id] = logit / model.config.hidden_size
    return model


def last_logits(model, vocab, prompt_ids, positions, stop_ids):
    hidden = model(prompt_ids[None], positions[None], return_hidden=True)[0, -1:]
    return span_logits(model, hidden, vocab.text_range, stop_ids)[0]


def sequence_logp(model, vocab, prompt, tokens: list[int], stop_ids: list[int],
                  cfg_scale: float = 1.0) -> float:
    """Reference: recompute every step, log-softmax over the text ids and the stop ids; with
    cfg_scale != 1 of the guided logits (the unconditional prompt: the caption's image dropped)."""
    rows = [prompt] if cfg_scale == 1.0 else [prompt, unconditional_prompt(prompt)]
    seqs = [p.input_ids.clone() for p in rows]
    positions = [p.position_ids.clone() for p in rows]
    total = 0.0
    columns = list(range(*vocab.text_range)) + stop_ids
    with torch.no_grad():
        for token in tokens:
            logits = [last_logits(model, vocab, s, p, stop_ids) for s, p in zip(seqs, positions)]
            if cfg_scale != 1.0:
                logits = [logits[1] + cfg_scale * (logits[0] - logits[1])]
            total += float(F.log_softmax(logits[0], -1)[columns.index(token)])
            seqs = [torch.cat([s, torch.tensor([token])]) for s in seqs]
            positions = [torch.cat([p, p[-1:] + 1]) for p in positions]
    return total


def exhaustive_best(model, vocab, prompt, num_tokens: int, stop_ids: list[int],
                    cfg_scale: float = 1.0) -> list[int]:
    """The most likely sequence of all: ended by a stop id after 0..num_tokens-1 text ids,
    or num_tokens text ids with no stop."""
    text = list(range(*vocab.text_range))
    sequences = [list(p) + [stop] for n in range(num_tokens) for stop in stop_ids
                 for p in itertools.product(text, repeat=n)]
    sequences += [list(p) for p in itertools.product(text, repeat=num_tokens)]
    scores = [sequence_logp(model, vocab, prompt, s, stop_ids, cfg_scale) for s in sequences]
    return sequences[max(range(len(scores)), key=scores.__getitem__)]


def as_sequence(row: torch.Tensor, vocab: CogViewVocab) -> list[int]:
    return [t for t in row.tolist() if t != vocab.pad_id]


def small_prompts(seed: int) -> list:
    images = [torch.randint(0, SMALL.num_image_codes, (IMAGE_TOKENS,),
                            generator=torch.Generator().manual_seed(seed * 10 + i))
              for i in range(4)]
    return [caption_prompt(SMALL, codes) for codes in images]


# (model seed, stop logit, stop ids): the most likely sequences stop at once (-1), some stop
# and some run to the end (-2), or none stops and greedy misses the best (-3, seed 1); and two
# likely stop ids, which take most of the candidates
@pytest.mark.parametrize("seed, stop_logit, stops", [
    (0, -1.0, ["[SEP]"]), (1, -2.0, ["[SEP]"]), (1, -3.0, ["[SEP]"]), (2, -3.0, ["[SEP]"]),
    (1, 0.5, ["[SEP]", "[EOI1]"]),
])
def test_enough_beams_find_the_most_likely_sequence(seed, stop_logit, stops):
    # at most 9 live prefixes before the last step: 9 beams search exhaustively
    stop_ids = [SMALL.command(s) for s in stops]
    model = tiny_model(SMALL, seed)
    for stop in stop_ids:
        model = with_stop_logit(model, stop, stop_logit)
    prompts = small_prompts(seed)
    expected = [exhaustive_best(model, SMALL, p, 3, stop_ids) for p in prompts]
    for cache in (True, False):
        found = beam_search_span(model, prompts, "text", 3, SMALL, num_beams=9,
                                 stop_ids=stop_ids, use_kv_cache=cache)
        assert [as_sequence(row, SMALL) for row in found] == expected


def test_beam_search_beats_greedy_where_greedy_commits_early():
    model = with_stop_logit(tiny_model(SMALL, 1), SMALL.sep_id, -3.0)
    prompts = small_prompts(1)
    greedy = generate_span(model, prompts, "text", 3, SMALL, greedy=True, stop_ids=[SMALL.sep_id])
    beam = beam_search_span(model, prompts, "text", 3, SMALL, num_beams=3,
                            stop_ids=[SMALL.sep_id])
    better = 0
    for prompt, g, b in zip(prompts, greedy, beam):
        g_score = sequence_logp(model, SMALL, prompt, as_sequence(g, SMALL), [SMALL.sep_id])
        b_score = sequence_logp(model, SMALL, prompt, as_sequence(b, SMALL), [SMALL.sep_id])
        assert b_score >= g_score - 1e-5
        better += b_score > g_score + 1e-3
    assert better >= 1


@pytest.mark.parametrize("cfg_scale", [0.0, 2.5])
def test_guided_beams_find_the_most_likely_sequence_under_the_guided_logits(cfg_scale):
    """Guided beams are scored with the log-softmax of uncond + s * (cond - uncond), where the
    unconditional row is the caption prompt without its image; checked exhaustively."""
    stop_ids = [SMALL.sep_id]
    model = with_stop_logit(tiny_model(SMALL, 1), SMALL.sep_id, -2.0)
    prompts = small_prompts(1)
    expected = [exhaustive_best(model, SMALL, p, 3, stop_ids, cfg_scale) for p in prompts]
    for cache in (True, False):
        found = beam_search_span(model, prompts, "text", 3, SMALL, num_beams=9,
                                 stop_ids=stop_ids, cfg_scale=cfg_scale, use_kv_cache=cache)
        assert [as_sequence(row, SMALL) for row in found] == expected
    if cfg_scale == 0.0:  # only the unconditional logits: every image gets the same caption
        assert len({tuple(e) for e in expected}) == 1
    # scale 1 with the unconditional rows given is plain beam search
    uncond = [unconditional_prompt(p) for p in prompts]
    assert torch.equal(
        beam_search_span(model, prompts, "text", 3, SMALL, num_beams=4, stop_ids=stop_ids,
                         cfg_scale=1.0, uncond_prompts=uncond),
        beam_search_span(model, prompts, "text", 3, SMALL, num_beams=4, stop_ids=stop_ids))


def test_guided_captions_one_beam_is_guided_greedy():
    model = with_stop_logit(tiny_model(VOCAB, 2), VOCAB.sep_id, logit=0.0)
    images = [torch.arange(IMAGE_TOKENS) * k % VOCAB.num_image_codes for k in (1, 3, 5)]
    beam = generate_captions(model, VOCAB, images, max_len=8, stop_id="[SEP]", num_beams=1,
                             cfg_scale=3.0)
    greedy = generate_captions(model, VOCAB, images, max_len=8, stop_id="[SEP]", cfg_scale=3.0)
    plain = generate_captions(model, VOCAB, images, max_len=8, stop_id="[SEP]")
    assert beam == greedy
    assert greedy != plain  # guidance changed something


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_beam_is_greedy(seed):
    # a stop that ranks second early on does not end a one-beam search
    model = with_stop_logit(tiny_model(SMALL, seed), SMALL.sep_id, logit=0.0)
    prompts = small_prompts(seed)
    beam = beam_search_span(model, prompts, "text", 6, SMALL, num_beams=1, stop_ids=[SMALL.sep_id])
    greedy = generate_span(model, prompts, "text", 6, SMALL, greedy=True, stop_ids=[SMALL.sep_id])
    assert torch.equal(beam, greedy)


def test_kv_cache_and_batching_do_not_change_the_result():
    model = tiny_model(VOCAB)
    prompts = [t2i_prompt(VOCAB, text) for text in ([1, 2, 3, 4, 5], [6], [7, 8, 9])]
    cached = beam_search_span(model, prompts, "image", 6, VOCAB, num_beams=3)
    recomputed = beam_search_span(model, prompts, "image", 6, VOCAB, num_beams=3,
                                  use_kv_cache=False)
    assert torch.equal(cached, recomputed)
    assert all(VOCAB.is_image(t) for t in cached.flatten().tolist())
    for i, prompt in enumerate(prompts):  # left padding in a batch changes nothing
        alone = beam_search_span(model, [prompt], "image", 6, VOCAB, num_beams=3)
        assert torch.equal(alone[0], cached[i])


def test_beam_search_ends_rows_at_the_stop_id_and_pads_after():
    model = with_stop_logit(tiny_model(VOCAB), VOCAB.sep_id, logit=2.0)
    prompts = [caption_prompt(VOCAB, torch.arange(IMAGE_TOKENS) * k % VOCAB.num_image_codes)
               for k in range(1, 9)]
    steps = []
    out = beam_search_span(model, prompts, "text", 10, VOCAB, num_beams=4, stop_ids=[VOCAB.sep_id])
    for row in out.tolist():
        if VOCAB.sep_id in row:
            stop = row.index(VOCAB.sep_id)
            steps.append(stop)
            assert all(VOCAB.is_text(t) for t in row[:stop])
            assert all(t == VOCAB.pad_id for t in row[stop + 1:])
        else:
            assert all(VOCAB.is_text(t) for t in row)
    assert steps  # some rows stopped


def test_generate_captions_with_beams():
    model = with_stop_logit(tiny_model(VOCAB), VOCAB.sep_id, logit=2.0)
    images = [torch.arange(IMAGE_TOKENS) * k % VOCAB.num_image_codes for k in (1, 3)]
    captions = generate_captions(model, VOCAB, images, max_len=10, stop_id="[SEP]", num_beams=4)
    ids = beam_search_span(model, [caption_prompt(VOCAB, c) for c in images], "text", 10, VOCAB,
                           num_beams=4, stop_ids=[VOCAB.sep_id])
    assert captions == [[t - VOCAB.num_image_codes for t in as_sequence(row, VOCAB)
                         if VOCAB.is_text(t)] for row in ids]
    assert generate_captions(model, VOCAB, images, max_len=10, stop_id="[SEP]", num_beams=1) == \
        generate_captions(model, VOCAB, images, max_len=10, stop_id="[SEP]")


@pytest.mark.parametrize("num_beams, greedy, message", [
    (0, True, "must be an int >= 1"),
    (True, True, "must be an int >= 1"),
    (2.0, True, "must be an int >= 1"),
    (4, False, "pass greedy=True"),
])
def test_bad_beam_arguments_raise_clear_errors(num_beams, greedy, message):
    model = tiny_model(VOCAB)
    with pytest.raises(ValueError, match=message):
        generate_captions(model, VOCAB, [torch.arange(IMAGE_TOKENS)], max_len=4, greedy=greedy,
                          seeds=[0], num_beams=num_beams)
