"""The Python inference API (cogview.Pipeline) and OOM backoff in run_in_batches."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import make_exports, make_vqvae

PROMPTS = ["左上角红色圆形", "蓝色"]


def pixels(image: Image.Image) -> bytes:
    return np.asarray(image).tobytes()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Tiny random t2i and caption exports (no training)."""
    return make_exports(tmp_path_factory.mktemp("exports"), 8, 8)


@pytest.fixture(scope="module")
def pipe(exports):
    from cogview import Pipeline

    return Pipeline.from_pretrained(exports / "t2i", precision="32-true")


def test_import_cogview_stays_cheap_and_exports_pipeline():
    import subprocess
    import sys

    code = "import sys, cogview; assert 'torch' not in sys.modules; from cogview import Pipeline"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_pipeline_loads_the_export_parts(pipe):
    from cogview.modules.transformer import CogViewTransformer
    from cogview.modules.vqvae import VQVAE

    assert isinstance(pipe.model, CogViewTransformer) and isinstance(pipe.image_tokenizer, VQVAE)
    assert pipe.task == "t2i"
    assert pipe.vocab.num_image_codes == 64 and pipe.model.config.vocab_size == pipe.vocab.size
    assert pipe.image_tokens == 64  # not recorded in cogview.json -> 8x8


def test_images_have_the_grid_size_and_depend_only_on_seed_prompt_and_index(pipe):
    small = dict(image_tokens=16, progress=False)  # 4x4 codes: 16 sampling steps, 32x32 pixels
    one_by_one = pipe(PROMPTS, num_images=3, seed=5, max_inference_batch_size=1,
                      **small).per_prompt
    output = pipe(PROMPTS, num_images=3, seed=5, max_inference_batch_size=12, **small)
    assert output.prompts == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3 and output.scores is None
    assert output.samples == [0, 1, 2] * 2 and output.seeds == [5, 6, 7] * 2
    batched = output.per_prompt
    assert len(batched) == 2 and all(len(samples) == 3 for samples in batched)
    assert all(image.size == (32, 32) for samples in batched for image in samples)
    assert [[pixels(i) for i in s] for s in one_by_one] == [[pixels(i) for i in s] for s in batched]
    # sample i has seed 5 + i: prompt 1 alone with seed 6 gives its sample 1 as sample 0
    alone = pipe(PROMPTS[1], num_images=2, seed=6, **small).images  # one type for one prompt too
    assert isinstance(alone, list) and isinstance(alone[0], Image.Image)
    assert pixels(alone[0]) == pixels(batched[1][1])
    assert len({pixels(i) for s in batched for i in s}) == 6  # different seeds, different images


def test_image_tokens_sets_the_image_size(pipe):
    assert pipe("红色", num_images=1, progress=False).images[0].size == (64, 64)  # default 8x8
    images = pipe("红色", num_images=1, image_tokens=4, progress=False).images
    assert images[0].size == (16, 16)
    with pytest.raises(ValueError, match="image_tokens=15"):
        pipe("红色", num_images=1, image_tokens=15, progress=False)


def test_empty_and_overlong_prompts(pipe):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pipe(["红色", "   "], num_images=1, progress=False)
    with pytest.warns(UserWarning, match="cut 4 tokens"):
        images = pipe("一二三四五六七八九十十二", num_images=1, image_tokens=4,
                      progress=False).images  # 12 tokens > max_text_len=8
    short = pipe("一二三四五六七八", num_images=1, image_tokens=4, progress=False).images
    assert pixels(images[0]) == pixels(short[0])  # truncated to the same 8 tokens


def test_pipeline_backs_off_on_out_of_memory_and_keeps_order(pipe, monkeypatch):
    import cogview.pipeline as sampling  # where Pipeline looks generate_images up

    real = sampling.generate_images
    sizes = []

    def limited(model, vocab, text_ids_list, *args, **kwargs):
        sizes.append(len(text_ids_list))
        if len(text_ids_list) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, vocab, text_ids_list, *args, **kwargs)

    small = dict(num_images=3, seed=1, image_tokens=16, progress=False)
    reference = pipe(PROMPTS, max_inference_batch_size=1, **small).per_prompt
    monkeypatch.setattr(sampling, "generate_images", limited)
    images = pipe(PROMPTS, max_inference_batch_size=6, **small).per_prompt
    assert sizes == [6, 3, 1, 1, 1, 1, 1, 1]  # 6 -> 3 -> 1, then 1 for the rest
    assert pipe.batch_sizer.size == 1 and pipe.batch_sizer.backoffs == 2
    assert [[pixels(i) for i in s] for s in images] == [[pixels(i) for i in s] for s in reference]


def test_run_in_batches_halves_on_oom_and_remembers_the_size():
    from cogview.generation.batching import BatchSizer, run_in_batches

    calls = []

    def square(chunk):
        calls.append(list(chunk))
        if len(chunk) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return [x * x for x in chunk]

    sizer = BatchSizer(12)
    results = run_in_batches(range(20), square, sizer=sizer, progress=False)
    assert results == [x * x for x in range(20)]
    assert sizer.size == 3
    assert [len(c) for c in calls] == [12, 6, 3, 3, 3, 3, 3, 3, 2]
    done = [x for c in calls if len(c) <= 3 for x in c]
    assert done == list(range(20))  # every item once, in order


def test_run_in_batches_cpu_oom_message_errors_and_limits():
    from cogview.generation.batching import run_in_batches

    def cpu_oom(chunk):
        if len(chunk) > 1:
            raise RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 9 bytes")
        return chunk

    assert run_in_batches("abc", cpu_oom, max_batch_size=4, progress=False) == ["a", "b", "c"]

    def never_fits(chunk):
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(MemoryError, match="item 'b' even at batch size 1"):
        run_in_batches(["b"], never_fits, progress=False)

    def broken(chunk):
        raise RuntimeError("shape mismatch")  # not an OOM: raised as is, no retry

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_in_batches([1, 2], broken, progress=False)
    with pytest.raises(ValueError, match="max_batch_size=0"):
        run_in_batches([1], lambda c: c, max_batch_size=0)


def test_caption_returns_one_string_per_image_and_stops_at_sep(exports, tmp_path):
    from cogview import Pipeline

    pipe = Pipeline.from_pretrained(exports / "caption", precision="32-true")
    assert pipe.task == "caption" and pipe.caption_stop_id == pipe.vocab.sep_id
    assert pipe.loss_vocab == "span" and pipe.caption_end_ids == [pipe.vocab.sep_id]
    for loss_vocab, stop in (("span", None), ("full", pipe.vocab.sep_id), (None, pipe.vocab.sep_id)):
        # no end token recorded: span models never scored a stop id; older exports are full
        other = Pipeline(pipe.model, pipe.text_tokenizer, pipe.image_tokenizer, pipe.vocab,
                         {**pipe.info, "caption_end_token": None, "loss_vocab": loss_vocab})
        assert other.caption_stop_id == stop and other.caption_end_ids == []
    Image.new("RGB", (80, 64), (220, 20, 20)).save(tmp_path / "red.png")
    images = [tmp_path / "red.png", Image.new("L", (64, 64), 100)]
    captions = pipe.caption(images, max_len=5, progress=False)
    assert len(captions) == 2 and all(isinstance(c, str) and 0 < len(c) <= 5 for c in captions)
    assert pipe.caption(images, max_len=5, progress=False, max_inference_batch_size=1) == captions
    # make [SEP] the likeliest token from the 3rd step on: captions end after 2 tokens
    real_logits, sep, steps = pipe.model.logits, pipe.vocab.sep_id, []

    def sep_from_step_3(hidden, logits_range=None):
        logits = real_logits(hidden, logits_range)
        if logits_range == (sep, sep + 1):
            steps.append(1)
            if len(steps) >= 3:
                logits = logits + 1e4
        return logits

    pipe.model.logits = sep_from_step_3
    try:
        stopped = pipe.caption(images, max_len=5, progress=False)
    finally:
        del pipe.model.logits
    assert stopped == [caption[:2] for caption in captions]


def test_caption_with_beams_is_the_beam_search_of_the_encoded_image(exports):
    from cogview import Pipeline
    from cogview.generation import generate_captions

    pipe = Pipeline.from_pretrained(exports / "caption", precision="32-true")
    images = [Image.new("RGB", (64, 64), color) for color in ((220, 20, 20), (20, 20, 220))]
    captions = pipe.caption(images, max_len=6, progress=False, num_beams=3)
    codes = list(pipe.encode_images(images).flatten(1))
    ids = generate_captions(pipe.model, pipe.vocab, codes, 6, stop_id=pipe.caption_stop_id,
                            num_beams=3)
    assert captions == [pipe.text_tokenizer.decode(row) for row in ids]
    with pytest.raises(ValueError, match="pass greedy=True"):
        pipe.caption(images, greedy=False, num_beams=3, progress=False)


def test_captions_reranked_by_a_t2i_export_keep_the_candidate_it_scores_best(exports):
    from cogview import Pipeline

    captioner = Pipeline.from_pretrained(exports / "caption", precision="32-true")
    t2i = Pipeline.from_pretrained(exports / "t2i", precision="32-true")
    images = [Image.new("RGB", (64, 64), color) for color in ((220, 20, 20), (20, 20, 220))]
    common = dict(max_len=6, progress=False, num_beams=2)
    decoded = captioner.caption(images, **common)
    out = captioner.caption(images, reranker=t2i, num_candidates=4, details=True, **common)
    # candidate k of image i is the caption sampled with seed (k + 1) * N + i
    sampled = [captioner.caption(images, greedy=False, max_len=6, progress=False,
                                 seed=(k + 1) * len(images)) for k in range(4)]
    for i, (result, image) in enumerate(zip(out, images)):
        expected = [c for c in dict.fromkeys([decoded[i]] + [s[i] for s in sampled]) if c.strip()]
        assert result["decoded"] == decoded[i] and result["candidates"] == expected
        scores = t2i.image_scores([image] * len(expected), expected, progress=False)
        assert result["scores"] == pytest.approx(scores, abs=1e-5)
        assert result["caption"] == expected[int(np.argmax(scores))]
    assert any(len(r["candidates"]) > 1 for r in out)  # the random captioner's samples differ
    plain = captioner.caption(images, reranker=t2i, num_candidates=4, max_inference_batch_size=1,
                              **common)
    assert plain == [r["caption"] for r in out]  # strs without details, whatever the batch size

    class Scores:  # a reranker whose image score is the caption's length (ties: the first)
        task, image_tokenizer_fingerprint = "t2i", None

        def __init__(self, score):
            self.score = score

        def image_scores(self, images, prompts, **kwargs):
            return [self.score(p) for p in prompts]

    longest = captioner.caption(images, reranker=Scores(len), num_candidates=4, details=True,
                                **common)
    for result in longest:
        lengths = [len(c) for c in result["candidates"]]
        assert result["caption"] == result["candidates"][lengths.index(max(lengths))]
    assert captioner.caption(images, reranker=Scores(lambda p: 0.0), num_candidates=4,
                             **common) == decoded  # a tie keeps the decoded caption

    with pytest.raises(ValueError, match="num_candidates needs a reranker"):
        captioner.caption(images, num_candidates=4, progress=False)
    with pytest.raises(ValueError, match="num_candidates=0 must be"):
        captioner.caption(images, reranker=t2i, num_candidates=0, progress=False)
    with pytest.raises(ValueError, match="task='caption' export; pass a t2i export"):
        captioner.caption(images, reranker=captioner, progress=False)
    grids = list(captioner.encode_images(images))  # code grids need the reranker's VQ-VAE
    with pytest.raises(ValueError, match="cannot be scored by a t2i export with VQ-VAE"):
        captioner.caption(grids, reranker=t2i, progress=False)


def test_image_scores_of_pictures_and_their_code_grids_agree(pipe):
    images = [Image.new("RGB", (64, 64), (220, 20, 20)), Image.new("RGB", (64, 64), (20, 20, 220))]
    scores = pipe.image_scores(images, PROMPTS, progress=False)
    grids = list(pipe.encode_images(images))
    assert pipe.image_scores(grids, PROMPTS, progress=False) == pytest.approx(scores, abs=1e-6)
    assert pipe.image_scores(images[0], PROMPTS[0], progress=False) == pytest.approx(
        scores[:1], abs=1e-6)
    assert all(s < 0 for s in scores)  # mean log-probabilities
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pipe.image_scores(images, [PROMPTS[0], " "], progress=False)
    with pytest.raises(ValueError, match="got 2 images and 3 prompts"):
        pipe.image_scores(images, PROMPTS + ["x"], progress=False)


def test_load_time_mismatch_names_both_values(exports, tmp_path):
    from cogview import Pipeline

    broken = tmp_path / "export"
    shutil.copytree(exports / "t2i", broken)
    shutil.rmtree(broken / "vqvae")
    make_vqvae(broken / "vqvae", num_codes=32)
    expected = "num_codes is 32 but num_image_codes in cogview.json is 64"
    with pytest.raises(ValueError, match=expected):
        Pipeline.from_pretrained(broken)
    info = json.loads((exports / "t2i" / "cogview.json").read_text())
    info["vocab"]["text_vocab_size"] += 128  # a different text tokenizer's vocabulary
    info["vocab"].pop("size")
    shutil.rmtree(broken)
    shutil.copytree(exports / "t2i", broken)
    (broken / "cogview.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="vocab_size is 7296 but the vocabulary size"):
        Pipeline.from_pretrained(broken)
    (broken / "cogview.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a cogview export directory"):
        Pipeline.from_pretrained(broken)


@pytest.mark.parametrize("native_bf16", [True, False], ids=["native-bf16", "no-native-bf16"])
def test_sampling_autocast_follows_the_cpu_by_default(exports, monkeypatch, native_bf16):
    import cogview.pipeline as sampling  # where Pipeline looks generate_images up
    from cogview import Pipeline, cpu

    seen = []
    real = sampling.generate_images

    def spy(*args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "generate_images", spy)
    monkeypatch.setattr(cpu, "native_bf16", lambda flags=None: native_bf16)
    default = Pipeline.from_pretrained(exports / "t2i")  # precision="auto"
    assert default.precision == ("bf16-mixed" if native_bf16 else "32-true")
    default("红色", num_images=1, image_tokens=16, progress=False)
    Pipeline.from_pretrained(exports / "t2i", precision="32-true")(
        "红色", num_images=1, image_tokens=16, progress=False)
    assert seen[0] == ((True, torch.bfloat16) if native_bf16 else (False, seen[0][1]))
    assert seen[1] == (False, seen[1][1])
    with pytest.raises(ValueError, match="precision='fp8'"):
        Pipeline.from_pretrained(exports / "t2i", precision="fp8")
