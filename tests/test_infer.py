"""infer.py task=t2i and task=caption: prompts in, images + results.jsonl out (and back)."""

import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from tests.helpers import ROOT, make_exports



@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Tiny random t2i and caption exports (no training)."""
    return make_exports(tmp_path_factory.mktemp("infer_exports"), 16, 6)


def run_infer(*overrides):
    return subprocess.run([sys.executable, "infer.py", *map(str, overrides)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def infer_in_process(*overrides):
    from cogview.inference import infer

    with initialize_config_dir(config_dir=str(ROOT / "conf" / "inference"), version_base=None):
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
