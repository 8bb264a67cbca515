"""Completion, sliding-window super-resolution and caption scores: the generation primitives
(known tokens kept, each high-res code sampled once, per-sample seeding) and the Pipeline."""

import numpy as np
import pytest
import torch
from PIL import Image

from cogview.generation import generate_images, generate_sr
from cogview.generation.completion import known_codes, region_mask
from cogview.generation.scoring import caption_log_likelihood, image_log_likelihood
from cogview.generation.superres import plan_sr_windows, sliding_window_sr, window_offsets
from cogview.modules.transformer import CogViewTransformer, TransformerConfig
from cogview.pipeline import PipelineOutput
from cogview.tokenization import CogViewVocab
from tests.helpers import make_exports, make_sr_export

VOCAB = CogViewVocab(num_image_codes=32, text_vocab_size=50)
K = VOCAB.num_image_codes


@pytest.fixture(scope="module")
def model() -> CogViewTransformer:
    torch.manual_seed(0)
    config = TransformerConfig(num_layers=2, hidden_size=64, num_heads=4, max_positions=320,
                               vocab_size=VOCAB.size)
    return CogViewTransformer(config).eval()


# ------------------------------------------------------------------------------ completion


@pytest.mark.parametrize("region, expected_rows, expected_cols", [
    ("bottom", slice(4, 8), slice(0, 8)), ("top", slice(0, 4), slice(0, 8)),
    ("right", slice(0, 8), slice(4, 8)), ("left", slice(0, 8), slice(0, 4)),
    ([10, 20, 30, 24], slice(2, 3), slice(1, 4)),  # pixels 10..30 wide, 20..24 high
])
def test_region_mask_marks_the_codes_whose_cells_overlap_the_region(region, expected_rows,
                                                                     expected_cols):
    mask = region_mask(region, 64, 64)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[expected_rows, expected_cols] = True
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("region, message", [
    ("middle", "must be one of"), ([5, 5, 5, 9], "covers no pixels"), ([1, 2, 3], "pixel box"),
    ([100, 100, 120, 120], "covers no pixels"),
])
def test_bad_regions_are_refused_with_the_fix(region, message):
    with pytest.raises(ValueError, match=message):
        region_mask(region, 64, 64)


def test_completion_keeps_known_codes_and_samples_the_rest_per_seed(model):
    torch.manual_seed(1)
    codes = torch.randint(0, K, (2, 4, 4))
    mask = region_mask("bottom", 32, 32)
    known = known_codes(codes, mask).flatten(1)  # (2, 16)
    texts = [[1, 2, 3], [4, 5]]
    out = generate_images(model, VOCAB, texts, 16, [7, 8], known_codes=known)
    keep = ~mask.flatten()
    assert torch.equal(out[:, keep], codes.flatten(1)[:, keep])
    assert out[:, ~keep].min() >= 0 and out[:, ~keep].max() < K
    # a row's completion does not depend on its batch
    alone = generate_images(model, VOCAB, texts[1:], 16, [8], known_codes=known[1:])
    assert torch.equal(alone[0], out[1])
    # the redrawn half really is sampled: other seeds give other codes there
    other = generate_images(model, VOCAB, texts, 16, [70, 80], known_codes=known)
    assert not torch.equal(other[:, ~keep], out[:, ~keep])


def test_known_tokens_are_checked(model):
    with pytest.raises(ValueError, match="known has shape"):
        generate_images(model, VOCAB, [[1]], 16, [0], known_codes=torch.full((1, 8), -1))
    with pytest.raises(ValueError, match="known ids must be"):
        generate_images(model, VOCAB, [[1]], 16, [0], known_codes=torch.full((1, 16), K + 5))


# ------------------------------------------------------------------------------ sliding-window sr


@pytest.mark.parametrize("side, window, offsets", [
    (4, 4, [0]), (8, 4, [0, 2, 4]), (16, 8, [0, 4, 8]), (12, 4, [0, 2, 4, 6, 8]),
])
def test_window_offsets_cover_the_grid_with_half_window_overlap(side, window, offsets):
    assert window_offsets(side, window) == offsets


@pytest.mark.parametrize("side, window", [(4, 4), (8, 4), (16, 8), (10, 4), (12, 4)])
def test_every_high_res_code_is_generated_by_exactly_one_window(side, window):
    counts = torch.zeros(2 * side, 2 * side, dtype=torch.long)
    plan = plan_sr_windows(side, window)
    for win in plan:
        t, l, b, r = win.hr_box
        assert (b - t, r - l) == (2 * window, 2 * window) and b <= 2 * side and r <= 2 * side
        counts[t:b, l:r] += win.new.long()
    assert torch.equal(counts, torch.ones_like(counts))
    if side == 2 * window:
        assert len(plan) == 9  # CogView's 3x3


def test_window_larger_than_the_image_is_refused():
    with pytest.raises(ValueError, match="smaller than the sr model's window"):
        plan_sr_windows(3, 4)


def test_sliding_windows_keep_earlier_windows_codes_and_sample_each_code_once(model):
    """The output equals a replay that runs the windows one by one with the known codes: each
    window keeps what earlier windows produced (the overlap) and samples only its new codes."""
    torch.manual_seed(2)
    lowres = torch.randint(0, K, (2, 8, 8))  # 8x8 low-res, window 4 -> 16x16 high-res, 9 windows
    texts = [[1, 2], [3]]
    calls = []
    out = sliding_window_sr(model, VOCAB, texts, lowres, 4, [3, 4],
                            callback=lambda d, t: calls.append((d, t)))
    assert out.shape == (2, 16, 16) and out.min() >= 0 and out.max() < K
    assert calls[-1] == (9 * 64, 9 * 64)
    canvas = torch.full((2, 16, 16), -1)
    for win in plan_sr_windows(8, 4):
        t, l, b, r = win.hr_box
        known = canvas[:, t:b, l:r].reshape(2, 64)
        assert torch.equal(known >= 0, ~win.new.flatten().expand(2, -1))
        codes = generate_sr(model, VOCAB, texts,
                            list(lowres[:, win.top:win.top + 4, win.left:win.left + 4].reshape(2, 16)),
                            64, [3 * 1000 + win.index, 4 * 1000 + win.index], known_codes=known)
        assert torch.equal(codes[known >= 0], known[known >= 0])  # overlap kept
        canvas[:, t:b, l:r] = codes.view(2, 8, 8)
    assert torch.equal(canvas, out)
    single = sliding_window_sr(model, VOCAB, texts[1:], lowres[1:], 4, [4])
    assert torch.equal(single[0], out[1])  # per-sample seeding holds across windows


# ------------------------------------------------------------------------------ caption score


def test_caption_score_is_the_mean_log_probability_of_the_text(model):
    codes = [torch.arange(16) % K, (torch.arange(16) * 3) % K]
    texts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    scores = caption_log_likelihood(model, VOCAB, codes, texts)
    for b in range(2):  # reference: one unpadded sequence, log-softmax at each text position
        from cogview.tokenization.layouts import caption_layout

        layout = caption_layout(VOCAB, texts[b], codes[b])
        ids = layout.input_ids[None]
        with torch.no_grad():
            logits = model(ids, layout.position_ids[None], torch.ones_like(ids, dtype=torch.bool))
        logp = torch.log_softmax(logits[0, :-1].float(), -1)
        picked = [float(logp[t, ids[0, t + 1]]) for t in range(ids.shape[1] - 1)
                  if layout.text_mask[t + 1]]
        assert len(picked) == len(texts[b])
        assert float(scores[b]) == pytest.approx(sum(picked) / len(picked), abs=1e-5)


@pytest.mark.parametrize("loss_vocab", ["full", "span"])
def test_image_score_is_the_mean_log_probability_of_the_image_codes(model, loss_vocab):
    from cogview.tokenization.layouts import t2i_layout

    texts = [[1, 2, 3], [4, 5, 6, 7, 8]]  # different lengths: the batch is padded
    codes = [torch.arange(16) % K, (torch.arange(16) * 3) % K]
    scores = image_log_likelihood(model, VOCAB, texts, codes, loss_vocab=loss_vocab)
    for b in range(2):  # reference: one unpadded sequence, log-softmax at each image position
        layout = t2i_layout(VOCAB, texts[b], codes[b])
        ids = layout.input_ids[None]
        with torch.no_grad():
            logits = model(ids, layout.position_ids[None], torch.ones_like(ids, dtype=torch.bool))
        logits = logits[0, :-1].float()
        if loss_vocab == "span":  # over the image codes only (ids 0..K-1)
            logits = logits[:, :K]
        logp = torch.log_softmax(logits, -1)
        picked = [float(logp[t, ids[0, t + 1]]) for t in range(ids.shape[1] - 1)
                  if ids[0, t + 1] < K]
        assert len(picked) == 16
        assert float(scores[b]) == pytest.approx(sum(picked) / len(picked), abs=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the head stays in fp32 under autocast
        mixed = image_log_likelihood(model, VOCAB, texts, codes, loss_vocab=loss_vocab)
    assert torch.allclose(mixed, scores, atol=0.05)


def test_caption_score_bad_input():
    with pytest.raises(ValueError, match="one text per image"):
        caption_log_likelihood(None, VOCAB, [torch.zeros(4)], [[1], [2]])
    with pytest.raises(ValueError, match="one image per text"):
        image_log_likelihood(None, VOCAB, [[1], [2]], [torch.zeros(4)])
    with pytest.raises(ValueError, match="nothing to score"):
        image_log_likelihood(None, VOCAB, [], [])


# ------------------------------------------------------------------------------ the Pipeline


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    from cogview import Pipeline

    root = tmp_path_factory.mktemp("gen_exports")
    make_exports(root, 8, 8)
    make_sr_export(root, text_len=8, hr_tokens=64)
    return {name: Pipeline.from_pretrained(root / name, precision="32-true") for name in ("t2i", "caption", "sr")}


def noise_image(size: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def test_pipeline_super_resolves_one_window_and_sliding_windows(pipes):
    sr = pipes["sr"]
    assert sr.sr_window == 4  # 8x8 high-res codes from 4x4 low-res per window
    calls = []
    one = sr.super_resolve(noise_image(32), "红色", seed=1, progress=False,
                           callback=lambda d, t: calls.append((d, t))).images
    # progress: 64 high-res codes, then as much again for the refinement
    assert [image.size for image in one] == [(64, 64)] and calls[-1] == (128, 128)
    many = sr.super_resolve([noise_image(64, 1), noise_image(64, 2)], ["红色", "蓝色"],
                            seed=1, progress=False, max_inference_batch_size=1)
    assert isinstance(many, PipelineOutput)  # the result type of every image-making call
    assert (many.prompts, many.seeds) == (["红色", "蓝色"], [1, 2])
    assert [image.size for image in many.images] == [(128, 128)] * 2
    with pytest.raises(ValueError, match="smaller than the sr model's window"):
        sr.super_resolve(noise_image(16), "红色", progress=False)
    with pytest.raises(ValueError, match="one prompt per image"):
        sr.super_resolve([noise_image(32)] * 2, ["a", "b", "c"], progress=False)


def test_pipeline_completion_and_rerank(pipes):
    t2i, caption = pipes["t2i"], pipes["caption"]
    source = noise_image(64)
    completed = t2i.complete(source, "红色", region="right", num_images=3, seed=0, progress=False)
    assert isinstance(completed, PipelineOutput)
    assert (completed.prompts, completed.samples, completed.seeds) == (["红色"] * 3, [0, 1, 2],
                                                                        [0, 1, 2])
    filled = completed.images
    assert len(filled) == 3 and all(image.size == (64, 64) for image in filled)
    from cogview.generation.completion import region_mask

    assert int(region_mask("right", 64, 64).sum()) == 32  # right half of 8x8 codes redrawn
    with pytest.raises(ValueError, match="empty"):
        t2i.complete(source, " ", progress=False)

    output = t2i("红色", num_images=2, reranker=caption, num_candidates=4, seed=3,
                 progress=False)
    best, scores = output.images, output.scores  # the same type as without a reranker
    assert len(best) == 2 and scores == sorted(scores, reverse=True)
    assert output.seeds == [3 + i for i in output.samples]
    candidates = t2i("红色", num_images=4, seed=3, progress=False).images
    all_scores = caption.caption_scores(candidates, "红色", progress=False)
    assert scores == sorted(all_scores, reverse=True)[:2]
    for image, score in zip(best, scores):
        index = image.info["sample"]
        assert image.info["seed"] == 3 + index and all_scores[index] == score
        assert np.array_equal(np.asarray(image), np.asarray(candidates[index]))
    with pytest.raises(ValueError, match="num_candidates=1 is below"):
        t2i("红色", num_images=2, reranker=caption, num_candidates=1, progress=False)
    with pytest.raises(ValueError, match="needs a reranker"):
        t2i("红色", num_images=2, num_candidates=4, progress=False)


# ------------------------------------------------------------------------------ sr refinement


def test_sr_code_candidates_are_each_windows_teacher_forced_top_k(model):
    """Every high-res position gets the top-k codes of the window that generated it, given
    that window's codes before it: the same as one unpadded forward pass per window."""
    from cogview.generation.superres import sr_code_candidates
    from cogview.tokenization.layouts import sr_layout

    torch.manual_seed(3)
    lowres = torch.randint(0, K, (2, 8, 8))
    texts = [[1, 2, 3, 4], [5]]  # different lengths: the batch is padded
    highres = torch.randint(0, K, (2, 16, 16))
    got = sr_code_candidates(model, VOCAB, texts, lowres, highres, 4, 3)
    assert got.shape == (2, 16, 16, 3)
    expected = torch.full_like(got, -1)
    first = VOCAB.image_range[0]
    for win in plan_sr_windows(8, 4):
        t, l, b, r = win.hr_box
        for i in range(2):
            layout = sr_layout(VOCAB, texts[i], lowres[i, win.top:win.top + 4,
                                                      win.left:win.left + 4].reshape(-1),
                               highres[i, t:b, l:r].reshape(-1))
            ids = layout.input_ids[None]
            with torch.no_grad():
                logits = model(ids, layout.position_ids[None], torch.ones_like(ids, dtype=torch.bool))
            where = (ids[0] >= first) & (ids[0] < first + K)
            starts = where.nonzero()[:, 0][16:]  # the 64 high-res codes after the 16 low-res
            top = logits[0, starts - 1, first:first + K].topk(3, -1).indices.view(8, 8, 3)
            expected[i, t:b, l:r][win.new] = top[win.new]
    assert (expected >= 0).all()
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="expected"):
        sr_code_candidates(model, VOCAB, texts, lowres, highres[:, :8], 4, 3)
    with pytest.raises(ValueError, match="got 1 captions for 2 images"):
        sr_code_candidates(model, VOCAB, texts[:1], lowres, highres, 4, 3)
    with pytest.raises(ValueError, match="num_candidates=0"):
        sr_code_candidates(model, VOCAB, texts, lowres, highres, 4, 0)


def paint(codes: torch.Tensor) -> torch.Tensor:
    """A decoder whose code c is an 8x8 patch of grey level c / (K - 1): [N, h, w] -> pixels."""
    grey = codes.float() / (K - 1)
    return grey.repeat_interleave(8, -1).repeat_interleave(8, -2)[:, None].expand(-1, 3, -1, -1)


def downsample(pixels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.interpolate(pixels, scale_factor=0.5, mode="bicubic",
                                           antialias=True, align_corners=False)


def test_refinement_finds_the_codes_whose_pixels_match_the_low_res_input():
    from cogview.generation.superres import refine_sr_codes

    torch.manual_seed(4)
    truth = torch.randint(0, K, (2, 6, 6))
    lowres = downsample(paint(truth))  # [2, 3, 24, 24]
    start = torch.randint(0, K, (2, 6, 6))
    wrong = torch.randint(0, K, (2, 6, 6, 4))
    rank = torch.randint(0, 5, (2, 6, 6, 1))  # the truth hides at a random rank of 5
    candidates = torch.cat([wrong, wrong[..., :1]], -1).scatter(-1, rank, truth[..., None])
    calls = []
    refined = refine_sr_codes(paint, start, candidates, lowres, sweeps=5,
                              callback=lambda d, t: calls.append((d, t)))
    assert torch.equal(refined, truth)
    assert calls[-1] == (45, 45) and len(calls) < 46  # converged sweeps end the search early
    # decoding the candidates in small chunks changes nothing
    assert torch.equal(refine_sr_codes(paint, start, candidates, lowres, sweeps=5,
                                       max_decode_batch=5), truth)
    # a code stays unless a candidate matches better: from the truth, nothing moves
    assert torch.equal(refine_sr_codes(paint, truth, wrong, lowres), truth)
    assert torch.equal(refine_sr_codes(paint, start, candidates, lowres, sweeps=0), start)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sweeps=-1), "sweeps=-1"), (dict(sweeps=True), "sweeps=True"),
    (dict(candidates=torch.zeros(2, 6, 5, 2, dtype=torch.long)), "expected"),
    (dict(lowres_pixels=torch.zeros(2, 3, 25, 24)), "multiples"),
])
def test_refinement_bad_arguments(kwargs, message):
    from cogview.generation.superres import refine_sr_codes

    args = dict(codes=torch.zeros(2, 6, 6, dtype=torch.long),
                candidates=torch.zeros(2, 6, 6, 2, dtype=torch.long),
                lowres_pixels=torch.zeros(2, 3, 24, 24), sweeps=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        refine_sr_codes(paint, **args)


def test_pipeline_refines_the_sampled_codes_against_the_input_pixels(pipes):
    """super_resolve = sliding windows, then the model's candidates, then the refinement
    against the input image; refine_sweeps=0 keeps the sampled codes."""
    from cogview.generation.superres import refine_sr_codes, sr_code_candidates
    from cogview.modules.vqvae import pil_to_tensor

    sr = pipes["sr"]
    image = noise_image(32, 5)
    texts = [sr.encode_prompt("红色")]
    lowres = sr.encode_images([image])
    sampled = sliding_window_sr(sr.model, sr.vocab, texts, lowres, sr.sr_window, [1],
                                max_text_len=sr.max_text_len, text_slots=sr.text_slots)
    candidates = sr_code_candidates(sr.model, sr.vocab, texts, lowres, sampled, sr.sr_window, 3,
                                    max_text_len=sr.max_text_len, text_slots=sr.text_slots)
    refined = refine_sr_codes(sr.image_tokenizer.decode, sampled, candidates,
                              pil_to_tensor(image)[None], sweeps=1)
    assert not torch.equal(refined, sampled)  # the refinement has something to do here
    for sweeps, codes in ((0, sampled), (1, refined)):
        (got,) = sr.super_resolve(image, "红色", seed=1, refine_sweeps=sweeps,
                                  refine_candidates=3, progress=False).images
        assert np.array_equal(np.asarray(got), np.asarray(sr.decode_codes(codes)[0]))
    (with_book,) = sr.super_resolve(image, "红色", seed=1, refine_sweeps=1, refine_candidates=3,
                                    refine_codebook=2, progress=False).images
    from cogview.generation.superres import codebook_candidates

    both = torch.cat([candidates, codebook_candidates(sr.image_tokenizer,
                                                      pil_to_tensor(image)[None], 2)], -1)
    expected = refine_sr_codes(sr.image_tokenizer.decode, sampled, both,
                               pil_to_tensor(image)[None], sweeps=1)
    assert not torch.equal(expected, refined)  # the codebook's choices are used
    assert np.array_equal(np.asarray(with_book), np.asarray(sr.decode_codes(expected)[0]))
    greedy = sliding_window_sr(sr.model, sr.vocab, texts, lowres, sr.sr_window, greedy=True,
                               max_text_len=sr.max_text_len, text_slots=sr.text_slots)
    (got,) = sr.super_resolve(image, "红色", greedy=True, refine_sweeps=0, progress=False).images
    assert np.array_equal(np.asarray(got), np.asarray(sr.decode_codes(greedy)[0]))
    for kwargs, message in ((dict(refine_sweeps=-1), "refine_sweeps=-1"),
                            (dict(refine_candidates=0), "refine_candidates=0"),
                            (dict(refine_codebook=-2), "refine_codebook=-2"),
                            (dict(refine_candidates=10 ** 6), "more than the 64 codebook")):
        with pytest.raises(ValueError, match=message):
            sr.super_resolve(image, "红色", progress=False, **kwargs)


def test_codebook_candidates_are_the_nearest_codes_of_the_bicubic_upsample(pipes):
    from cogview.generation.superres import codebook_candidates
    from cogview.modules.vqvae import pil_to_tensor

    vq = pipes["sr"].image_tokenizer
    pixels = torch.stack([pil_to_tensor(noise_image(32, s)) for s in (6, 7)])
    got = codebook_candidates(vq, pixels, 4)
    assert got.shape == (2, 8, 8, 4)
    upsampled = torch.nn.functional.interpolate(pixels, scale_factor=2, mode="bicubic",
                                                align_corners=False).clamp(0, 1)
    assert torch.equal(got[..., 0], vq.encode(upsampled))  # the nearest is the encoder's code
    latents = vq.encoder((upsampled - vq.pixel_mean) / vq.pixel_std).permute(0, 2, 3, 1)
    distance = lambda codes: (vq.codebook[codes] - latents).pow(2).sum(-1)  # noqa: E731
    for rank in range(3):  # nearest first
        assert (distance(got[..., rank]) <= distance(got[..., rank + 1]) + 1e-5).all()
    with pytest.raises(ValueError, match="count=0"):
        codebook_candidates(vq, pixels, 0)
