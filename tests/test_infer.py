"""infer.py task=t2i and task=caption: prompts in, images + results.jsonl out (and back)."""

import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from tests.helpers import CONF_DIR, ROOT, make_exports



@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Tiny random t2i and caption exports (no training)."""
    return make_exports(tmp_path_factory.mktemp("infer_exports"), 16, 6)


def run_infer(*overrides):
    return subprocess.run([sys.executable, "infer.py", *map(str, overrides)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def infer_in_process(*overrides):
    from cogview.inference import infer

    with initialize_config_dir(config_dir=str(CONF_DIR / "inference"), version_base=None):
        cfg = compose(config_name="infer", overrides=list(overrides))
    return infer(cfg)


def read_rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_infer_py_t2i_writes_images_grids_and_results(exports, tmp_path):
    out = tmp_path / "out"
    result = run_infer("task=t2i", f"ckpt={exports / 't2i'}",
                       "prompts=['左上角有一个大的红色圆形','蓝色的正方形']", "num_samples=3",
                       "image_tokens=16", "seed=7", "max_inference_batch_size=4", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sampling" in result.stderr and "6/6" in result.stderr  # the progress bar over samples
    rows = read_rows(out / "results.jsonl")
    assert [(r["id"], r["sample"], r["seed"]) for r in rows] == [
        (p, s, 7 + s) for p in range(2) for s in range(3)]
    assert rows[0]["prompt"] == "左上角有一个大的红色圆形" and rows[3]["prompt"] == "蓝色的正方形"
    for row in rows:
        assert set(row) >= {"id", "prompt", "sample", "seed", "path"}
        assert not row["path"].startswith("/")
        assert Image.open(out / row["path"]).size == (32, 32)
    grids = sorted({row["grid"] for row in rows})
    assert len(grids) == 2
    assert Image.open(out / grids[0]).size == (3 * 32 + 2 * 2, 32)  # 3 samples in a row


def test_prompts_file_txt_and_jsonl_match_inline_prompts(exports, tmp_path):
    common = [f"ckpt={exports / 't2i'}", "task=t2i", "num_samples=2", "seed=3", "image_tokens=16"]
    txt = tmp_path / "prompts.txt"
    txt.write_text("红色的圆形\n绿色的三角形\n\n", encoding="utf-8")  # trailing blank lines ignored
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"id": "a1", "prompt": "红色的圆形"}\n{"id": "b2", "prompt": "绿色的三角形"}\n',
                     encoding="utf-8")
    infer_in_process(*common, f"prompts_file={txt}", f"output_dir={tmp_path / 'txt'}")
    infer_in_process(*common, f"prompts_file={jsonl}", f"output_dir={tmp_path / 'jsonl'}")
    from_txt = read_rows(tmp_path / "txt" / "results.jsonl")
    from_jsonl = read_rows(tmp_path / "jsonl" / "results.jsonl")
    assert [r["id"] for r in from_txt] == [0, 0, 1, 1]
    assert [r["id"] for r in from_jsonl] == ["a1", "a1", "b2", "b2"]
    assert [r["prompt"] for r in from_txt] == [r["prompt"] for r in from_jsonl]
    for a, b in zip(from_txt, from_jsonl):  # same prompt and seed -> same image
        assert (Image.open(tmp_path / "txt" / a["path"]).tobytes()
                == Image.open(tmp_path / "jsonl" / b["path"]).tobytes())


def test_empty_prompt_is_an_error_naming_its_line_or_id(exports, tmp_path):
    common = [f"ckpt={exports / 't2i'}", "task=t2i", f"output_dir={tmp_path / 'out'}"]
    txt = tmp_path / "prompts.txt"
    txt.write_text("红色的圆形\n   \n绿色\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty prompt at .*prompts.txt:2"):
        infer_in_process(*common, f"prompts_file={txt}")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"id": "ok", "prompt": "红色"}\n{"id": "blank", "prompt": ""}\n',
                     encoding="utf-8")
    with pytest.raises(ValueError, match=r"prompts.jsonl:2 \(id 'blank'\)"):
        infer_in_process(*common, f"prompts_file={jsonl}")
    with pytest.raises(ValueError, match=r"empty prompt at prompts\[1\]"):
        infer_in_process(*common, "prompts=['红色',' ']")
    assert not (tmp_path / "out").exists()  # nothing was generated or written


def test_infer_py_caption_reports_a_corrupt_image_and_captions_the_rest(exports, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (80, 64), (220, 20, 20)).save(folder / "a_red.png")
    (folder / "b_broken.png").write_bytes(b"\x89PNG truncated")
    Image.new("L", (64, 64), 90).save(folder / "c_grey.png")
    out = tmp_path / "out"
    result = run_infer("task=caption", f"ckpt={exports / 'caption'}",
                       f"images=[{folder},{tmp_path / 'missing.png'}]", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(out / "results.jsonl")
    assert [row["id"] for row in rows] == [0, 1, 2, 3]
    assert [row["path"].split("/")[-1] for row in rows] == [
        "a_red.png", "b_broken.png", "c_grey.png", "missing.png"]
    assert "cannot decode" in rows[1]["error"] and "caption" not in rows[1]
    assert "missing.png" in rows[3]["error"]
    for row in (rows[0], rows[2]):
        assert "error" not in row and isinstance(row["caption"], str)
        assert 0 < len(row["caption"]) <= 6  # max_len defaults to the export's max_text_len


def caption_two_images(exports, tmp_path, *overrides) -> tuple[list, list[dict]]:
    """infer.py task=caption on a red and a blue 64 px image -> (the images, its rows)."""
    images = [Image.new("RGB", (64, 64), color) for color in ((220, 50, 50), (50, 100, 220))]
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    out = tmp_path / "out"
    infer_in_process("task=caption", f"ckpt={exports / 'caption'}",
                     f"images=[{tmp_path / '0.png'},{tmp_path / '1.png'}]", *overrides,
                     f"output_dir={out}")
    return images, read_rows(out / "results.jsonl")


def test_infer_caption_with_guidance_gives_the_pipelines_guided_captions(exports, tmp_path):
    from cogview.pipeline import Pipeline

    images, rows = caption_two_images(exports, tmp_path, "cfg_scale=2.0")
    pipe = Pipeline.from_pretrained(exports / "caption")
    expected = pipe.caption(images, num_beams=4, cfg_scale=2.0, progress=False)
    assert [row["caption"] for row in rows] == expected


def test_infer_caption_reranked_by_a_t2i_export_gives_the_pipelines_captions(exports, tmp_path):
    from cogview.pipeline import Pipeline

    images, rows = caption_two_images(exports, tmp_path, f"rerank.ckpt={exports / 't2i'}",
                                      "num_candidates=3")
    pipe = Pipeline.from_pretrained(exports / "caption")
    expected = pipe.caption(images, num_beams=4, reranker=Pipeline.from_pretrained(exports / "t2i"),
                            num_candidates=3, details=True, progress=False)
    assert [row["caption"] for row in rows] == [e["caption"] for e in expected]
    for row, e in zip(rows, expected):
        assert row["decoded"] == e["decoded"] and row["num_candidates"] == len(e["candidates"])
        assert row["image_score"] == pytest.approx(max(e["scores"]), abs=1e-4)


# ------------------------------------------------------------------------------ rerank, sr, complete


@pytest.fixture(scope="module")
def sr_export(exports):
    from tests.helpers import make_sr_export

    return make_sr_export(exports, text_len=8, hr_tokens=64)


def test_t2i_with_rerank_keeps_the_best_candidates_with_their_scores(exports, tmp_path):
    out = tmp_path / "ranked"
    infer_in_process("task=t2i", f"ckpt={exports / 't2i'}", "prompts=['红色的圆形','蓝色']",
                     f"rerank.ckpt={exports / 'caption'}", "num_candidates=4", "keep=2",
                     "precision=32-true",
                     "image_tokens=16", "seed=5", f"output_dir={out}")
    rows = read_rows(out / "results.jsonl")
    assert [(r["id"], r["rank"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for prompt_rows in (rows[:2], rows[2:]):
        scores = [r["caption_score"] for r in prompt_rows]
        assert scores == sorted(scores, reverse=True)
        assert all(0 <= r["sample"] < 4 and r["seed"] == 5 + r["sample"] for r in prompt_rows)
        assert all(r["num_candidates"] == 4 for r in prompt_rows)
    # the scores are the caption scores of the saved images (task=rerank recomputes them)
    ranked = tmp_path / "rescored"
    infer_in_process("task=rerank", f"ckpt={exports / 'caption'}", "prompt='红色的圆形'",
                     "precision=32-true",
                     f"images=[{out / rows[1]['path']},{out / rows[0]['path']}]",
                     f"output_dir={ranked}")
    rescored = read_rows(ranked / "results.jsonl")
    assert [r["rank"] for r in rescored] == [0, 1]
    assert [r["caption_score"] for r in rescored] == pytest.approx(
        [rows[0]["caption_score"], rows[1]["caption_score"]], abs=1e-4)
    assert (ranked / "ranked.png").is_file()


def test_rerank_needs_a_prompt_and_reports_bad_images(exports, tmp_path):
    with pytest.raises(ValueError, match="needs the prompt"):
        infer_in_process("task=rerank", f"ckpt={exports / 'caption'}", "images=[x.png]")
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(good)
    infer_in_process("task=rerank", f"ckpt={exports / 'caption'}", "prompt='红色'",
                     f"images=[{good},{tmp_path / 'missing.png'}]", f"output_dir={tmp_path / 'o'}")
    rows = read_rows(tmp_path / "o" / "results.jsonl")
    assert rows[0]["rank"] == 0 and "missing.png" in rows[1]["error"]


def test_infer_sr_one_window_sliding_windows_and_from_results(exports, sr_export, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(images / "a_small.png")  # one 4x4 window
    Image.new("RGB", (64, 64), (30, 30, 200)).save(images / "b_large.png")  # 8x8: 3x3 windows
    (images / "c_broken.png").write_bytes(b"not a png")
    out = tmp_path / "sr"
    infer_in_process("task=sr", f"ckpt={sr_export}", f"images=[{images}]", "prompts=['红色']",
                     f"output_dir={out}")
    rows = read_rows(out / "results.jsonl")
    assert [r.get("size") for r in rows] == [[64, 64], [128, 128], None]
    assert [r.get("refine_sweeps") for r in rows[:2]] == [2, 2]  # the consistency refinement
    assert "error" in rows[2]
    for row in rows[:2]:
        assert Image.open(out / row["path"]).size == tuple(row["size"])
        assert Image.open(out / row["pair"]).width == 2 * row["size"][0] + 2  # bicubic | sr
    # generated images in, with their prompts
    t2i_out = tmp_path / "t2i"
    infer_in_process("task=t2i", f"ckpt={exports / 't2i'}", "prompts=['绿色']", "num_samples=1",
                     "image_tokens=16", f"output_dir={t2i_out}")
    infer_in_process("task=sr", f"ckpt={sr_export}", f"from_results={t2i_out}",
                     f"output_dir={tmp_path / 'sr2'}")
    (row,) = read_rows(tmp_path / "sr2" / "results.jsonl")
    assert row["prompt"] == "绿色" and row["size"] == [64, 64]
    with pytest.raises(ValueError, match="caption of every image"):
        infer_in_process("task=sr", f"ckpt={sr_export}", f"images=[{images}]",
                         f"output_dir={tmp_path / 'sr3'}")
    with pytest.raises(ValueError, match="refine_candidates=99999 is more than"):  # once, not per image
        infer_in_process("task=sr", f"ckpt={sr_export}", f"images=[{images}]", "prompts=['红色']",
                         "refine_candidates=99999", f"output_dir={tmp_path / 'sr5'}")
    with pytest.raises(ValueError, match="refine_sweeps=-1 must be an int >= 0"):
        infer_in_process("task=sr", f"ckpt={sr_export}", f"images=[{images}]", "prompts=['红色']",
                         "refine_sweeps=-1", f"output_dir={tmp_path / 'sr4'}")


def test_infer_complete_writes_samples_and_a_picture_with_the_region(exports, tmp_path):
    source = tmp_path / "src.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(source)
    out = tmp_path / "done"
    infer_in_process("task=complete", f"ckpt={exports / 't2i'}", f"image={source}",
                     "prompt='红色'", "region=[0,32,64,64]", "num_samples=2", f"output_dir={out}")
    rows = read_rows(out / "results.jsonl")
    assert [(r["sample"], r["seed"]) for r in rows] == [(0, 0), (1, 1)]
    assert Image.open(out / "grid.png").size == (4 * 64 + 3 * 2, 64)  # original | region | 2
    with pytest.raises(ValueError, match="needs a prompt"):
        infer_in_process("task=complete", f"ckpt={exports / 't2i'}", f"image={source}")


# ------------------------------------------------------------------------------ torchrun


@pytest.mark.distributed
def test_torchrun_two_processes_shard_prompts_and_merge_results(exports, tmp_path):
    prompts = "prompts=['红色的圆形','蓝色的正方形','绿色','黄色的三角形','紫色']"
    common = ["task=t2i", f"ckpt={exports / 't2i'}", prompts, "num_samples=2", "image_tokens=16",
              "seed=11", "precision=32-true"]  # fp32: exact across batch compositions
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_port=29533", "infer.py", *common, f"output_dir={tmp_path / 'two'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "from 2 process(es)" in result.stdout + result.stderr
    infer_in_process(*common, f"output_dir={tmp_path / 'one'}")
    two = read_rows(tmp_path / "two" / "results.jsonl")
    one = read_rows(tmp_path / "one" / "results.jsonl")
    assert two == one  # same rows, same order, each prompt once
    for row in one:  # and the same images: sharding does not change a sample
        assert (Image.open(tmp_path / "two" / row["path"]).tobytes()
                == Image.open(tmp_path / "one" / row["path"]).tobytes())


def test_infer_eval_runs_the_shapes_benchmark_on_an_export_folder(exports, sr_export, tmp_path):
    out = tmp_path / "eval"
    run = tmp_path / "t2i_run"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "metrics.csv").write_text(
        "epoch,step,train/loss,val/loss\n0,9,5.0,\n0,9,,5.5\n0,19,3.0,\n0,19,,3.5\n")
    infer_in_process("task=eval", f"ckpt={exports}", "prompts_per_split=2", "num_candidates=2",
                     "caption_images=2", "sr_images=2", "caption_cfg_scale=1.5",
                     "caption_candidates=2", f"runs=[{run}]",
                     f"output_dir={out}")
    results = json.loads((out / "eval.json").read_text())
    assert set(results) == {"t2i", "caption", "sr"}
    assert set(results["t2i"]) == {"seen", "heldout", "two"}
    two = results["t2i"]["two"]
    assert two["n_prompts"] == 2 and 0 <= two["one_sample"]["full_match"] <= 1
    assert two["rerank"]["n_candidates"] == 4  # 2 prompts x 2 candidates, caption-scored
    captions = results["caption"]["two"]
    assert captions["num_beams"] == 4 and 0 <= captions["greedy_exact_match"] <= 1
    assert captions["cfg_scale"] == 1.5
    assert captions["num_candidates"] == 2 and 0 <= captions["decoded_exact_match"] <= 1
    report = (out / "report.md").read_text()
    assert "most likely caption of 4 beams" in report
    assert "classifier-free guidance 1.5 against the caption without its image" in report
    assert "the beam caption and 2 sampled captions per image" in report
    for picture in ("t2i_accuracy.png", "t2i_two.png", "t2i_two_reranked.png", "caption_two.png",
                    "sr_seen.png", "loss_curves.png"):
        assert picture in report and (out / picture).is_file()
    # each export's model card now holds its task's scores
    t2i_card = (exports / "t2i" / "README.md").read_text(encoding="utf-8")
    full_match = results["t2i"]["two"]["one_sample"]["full_match"]
    assert f"| two | one_sample.full_match | {full_match:.4g} |" in t2i_card
    assert "greedy_exact_match" in (exports / "caption" / "README.md").read_text(encoding="utf-8")


def test_caption_reranking_in_the_benchmark_needs_a_t2i_export():
    from cogview.eval.shapes_bench import caption_reranking

    assert caption_reranking(None, 0) == {}
    t2i = object()
    assert caption_reranking(t2i, 4) == {"reranker": t2i, "num_candidates": 4}
    with pytest.raises(ValueError, match="caption_candidates=4 reranks captions with a t2i export"):
        caption_reranking(None, 4)
    with pytest.raises(ValueError, match="caption_candidates=-1 must be an int >= 0"):
        caption_reranking(t2i, -1)


def test_infer_caption_reads_codes_from_pretokenized_shards(exports, tmp_path):
    from tests.helpers import make_token_shards

    shards = make_token_shards(exports / "vq", tmp_path / "shards", n=6, size=64, shard_size=3)
    out = tmp_path / "out"
    infer_in_process("task=caption", f"ckpt={exports / 'caption'}", f"shards={shards}", "limit=4",
                     "precision=32-true", f"output_dir={out}")
    rows = read_rows(out / "results.jsonl")
    assert [row["id"] for row in rows] == [0, 1, 2, 3]
    assert all(row["truth"] and isinstance(row["caption"], str) for row in rows)
    assert rows[3]["shard"].endswith("000001.tar")  # the second shard
    # the codes in the shard are the image's codes: captioning the decoded image agrees
    from cogview import Pipeline
    from cogview.data.shards import decode_sample
    from cogview.data.tar_reader import read_tar

    record = next(read_tar(rows[0]["shard"]))
    codes = torch.from_numpy(decode_sample(record.members, record.key, False).image_codes.astype("int64"))
    pipe = Pipeline.from_pretrained(exports / "caption", precision="32-true")
    assert pipe.caption([codes], progress=False, num_beams=4) == [rows[0]["caption"]]  # task default
    with pytest.raises(ValueError, match="not both"):
        infer_in_process("task=caption", f"ckpt={exports / 'caption'}", f"shards={shards}",
                         "images=[a.png]")


def test_t2i_benchmark_draws_the_rerank_pool_at_its_own_temperature(exports):
    from cogview import Pipeline
    from cogview.data.shapes import eval_prompts
    from cogview.eval.oracle import evaluate
    from cogview.eval.shapes_bench import t2i_benchmark

    t2i = Pipeline.from_pretrained(exports / "t2i", precision="32-true")
    caption = Pipeline.from_pretrained(exports / "caption", precision="32-true")
    settings = dict(splits=["two"], prompts_per_split=3, num_candidates=2, seed=5, top_k=50,
                    progress=False)
    result = t2i_benchmark(t2i, reranker=caption, temperature=0.3, rerank_temperature=1.0,
                           **settings)["two"]
    assert (result["temperature"], result["rerank_temperature"]) == (0.3, 1.0)
    prompts = eval_prompts("two", 3, seed=5)
    captions, scenes = [p["caption"] for p in prompts], [p["scene"] for p in prompts]
    sharp = t2i(captions, num_images=1, seed=5, top_k=50, temperature=0.3,
                progress=False).images
    assert result["one_sample"] == evaluate(sharp, scenes)  # 1-sample: the sharp draw
    pool = t2i_benchmark(t2i, reranker=caption, temperature=1.0, **settings)["two"]
    assert pool["rerank"] == result["rerank"]  # the pool: the same draws as at temperature 1.0
    assert pool["random_pick_full_match"] == result["random_pick_full_match"]


def test_t2i_benchmark_guides_every_draw_at_its_cfg_scale(exports):
    from cogview import Pipeline
    from cogview.eval.shapes_bench import t2i_benchmark

    t2i = Pipeline.from_pretrained(exports / "t2i", precision="32-true")
    scales = []

    class Recording:  # the pipeline, noting the guidance scale of every t2i call
        def __call__(self, *args, **kwargs):
            scales.append(kwargs["cfg_scale"])
            return t2i(*args, **kwargs)

    result = t2i_benchmark(Recording(), splits=["two"], prompts_per_split=2, num_candidates=2,
                           temperature=0.3, rerank_temperature=1.0, cfg_scale=2.5,
                           progress=False)["two"]
    assert scales == [2.5, 2.5] and result["cfg_scale"] == 2.5  # the pool and the 1-sample draw
    guided = t2i(["左边有一个大的红色圆形"], num_images=1, seed=0, cfg_scale=2.5, progress=False)
    plain = t2i(["左边有一个大的红色圆形"], num_images=1, seed=0, progress=False)
    assert guided.images[0].tobytes() != plain.images[0].tobytes()  # guidance changes the draw
