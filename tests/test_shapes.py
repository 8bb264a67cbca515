"""shapes-zh renderer, captions, splits, dataset and shard CLI against the spec's numbers."""

import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from itertools import product

import numpy as np
import pytest
import torch
from PIL import Image

from cogview.data import shapes
from cogview.data.shapes import (
    BACKGROUND,
    COLORS,
    HELDOUT_PAIRS,
    JITTER,
    POSITIONS,
    SEEN_PAIRS,
    SHAPES,
    SIZES,
    TEMPLATES,
    ShapesZh,
    canonical_caption,
    eval_prompts,
    eval_scenes,
    make_caption,
    parse_caption,
    render_scene,
    sample_scene,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one(color="红色", shape="正方形", size="大", center=(0.5, 0.5), position="中间"):
    obj = {"color": color, "shape": shape, "position": position, "size": size}
    return {"objects": [obj], "centers": [list(center)], "template": 0}


def coverage(image, color):
    """Fraction of `color` per pixel (0 = background, 1 = pure colour), [S, S]."""
    a = np.asarray(image, dtype=np.float64) - BACKGROUND
    d = np.array(COLORS[color], dtype=np.float64) - BACKGROUND
    return a @ d / (d @ d)


def half_box(image, color):
    """Bounding box (x0, y0, x1, y1) of the pixels at least half covered by `color`."""
    ys, xs = np.nonzero(coverage(image, color) >= 0.5)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@pytest.fixture(scope="module")
def train_scenes():
    return [sample_scene(0, "train", i) for i in range(5000)]


# ---------------------------------------------------------------------------- rendering


def test_palette_and_background_colours():
    for name, rgb in COLORS.items():
        image = render_scene(one(color=name), 64)
        assert image.mode == "RGB" and image.size == (64, 64)
        pixels = np.asarray(image).astype(int)
        assert np.abs(pixels[32, 32] - rgb).max() <= 1, name  # flat object interior
        for y, x in [(0, 0), (0, 63), (63, 0), (63, 63)]:
            assert tuple(pixels[y, x]) == BACKGROUND


@pytest.mark.parametrize("size", [64, 128, 96])
@pytest.mark.parametrize("shape", SHAPES)
def test_bounding_box_sides_match_spec(shape, size):
    for size_name, frac in SIZES.items():
        x0, y0, x1, y1 = half_box(render_scene(one(shape=shape, size=size_name), size), "红色")
        # integer pixel extents of a fractional side: +-1.5 px; sharp vertices lose up to 1 px more
        tolerance = 2.0 if shape in ("三角形", "菱形") else 1.5
        assert abs((x1 - x0) - frac * size) <= tolerance, (shape, size_name, x1 - x0)
        assert abs((y1 - y0) - frac * size) <= tolerance, (shape, size_name, y1 - y0)
        assert abs((x0 + x1) / 2 - size / 2) <= 1.0 and abs((y0 + y1) / 2 - size / 2) <= 1.0


def test_shape_geometry():
    s, side = 128, 0.30 * 128
    fills = {"圆形": np.pi / 4, "正方形": 1.0, "三角形": 0.5, "菱形": 0.5}
    for shape in SHAPES:
        cov = coverage(render_scene(one(shape=shape), s), "红色")
        assert abs(cov.sum() / side**2 - fills[shape]) < 0.02, shape
        mask = cov >= 0.5
        rows = mask.sum(1)[mask.any(1)]  # object width per row, top to bottom
        if shape == "三角形":  # apex on top, widest at the base, mass in the lower half
            assert rows[0] <= 3 and rows[-1] >= side - 2
            assert np.all(np.diff(rows) >= -1)
        if shape == "菱形":  # widest in the middle, points at top and bottom
            assert rows[0] <= 3 and rows[-1] <= 3 and rows.max() >= side - 2
        if shape == "正方形":
            assert rows.min() >= side - 1
    # the triangle's centroid is side/6 below its box centre (apex top-centre, base at bottom)
    cov = coverage(render_scene(one(shape="三角形"), s), "红色")
    centroid_y = (cov * (np.arange(s)[:, None] + 0.5)).sum() / cov.sum()
    assert abs(centroid_y - (s / 2 + side / 6)) < 0.7


def test_render_is_antialiased_and_size_independent_of_scene():
    scene, _ = sample_scene(0, "train", 3)
    small, large = render_scene(scene, 64), render_scene(scene, 128)
    values = {tuple(p) for p in np.asarray(small).reshape(-1, 3)}
    assert len(values) > len(scene["objects"]) + 1  # edge pixels are blends (anti-aliased)
    # the 128 px render is the same scene: downsampled, it is close to the 64 px render
    down = np.asarray(large.resize((64, 64), Image.Resampling.LANCZOS)).astype(int)
    assert np.abs(down - np.asarray(small).astype(int)).mean() < 3.0


def test_render_rejects_bad_scene():
    with pytest.raises(ValueError, match="color/shape/size"):
        render_scene(one(color="粉色"), 64)
    with pytest.raises(ValueError, match="centers"):
        render_scene({"objects": one()["objects"]}, 64)
    with pytest.raises(ValueError, match="size"):
        render_scene(one(), 4)


# ---------------------------------------------------------------------------- sampling


def test_positions_cells_and_jitter_bound(train_scenes):
    offsets = []
    for scene, _ in train_scenes[:2000]:
        for obj, (x, y) in zip(scene["objects"], scene["centers"]):
            cell = POSITIONS.index(obj["position"])
            cx, cy = (cell % 3 + 0.5) / 3, (cell // 3 + 0.5) / 3
            offsets += [x - cx, y - cy]
    offsets = np.abs(offsets)
    assert offsets.max() <= JITTER + 1e-5  # S/24 at most, per axis
    assert offsets.max() > 0.95 * JITTER  # and the full range is used
    assert 0.4 * JITTER < offsets.mean() < 0.6 * JITTER  # uniform: mean |j| = bound / 2


def test_one_or_two_objects_60_40(train_scenes):
    counts = Counter(len(scene["objects"]) for scene, _ in train_scenes[:2000])
    assert set(counts) == {1, 2}
    # binomial sd for p = 0.6, n = 2000 is 0.011: 0.04 is > 3.5 sd
    assert abs(counts[1] / 2000 - 0.6) < 0.04


def test_two_objects_differ_in_colour_and_cell_and_do_not_touch(train_scenes):
    pairs = [scene for scene, _ in train_scenes if len(scene["objects"]) == 2]
    assert len(pairs) > 1500
    for scene in pairs:
        a, b = scene["objects"]
        assert a["color"] != b["color"] and a["position"] != b["position"]
        (xa, ya), (xb, yb) = scene["centers"]
        reach = (SIZES[a["size"]] + SIZES[b["size"]]) / 2 + shapes.MIN_GAP - 1e-4
        assert abs(xa - xb) >= reach or abs(ya - yb) >= reach


def test_heldout_pairs_never_in_train(train_scenes):
    seen = Counter()
    for scene, _ in train_scenes:
        for obj in scene["objects"]:
            pair = (obj["color"], obj["shape"])
            assert pair not in HELDOUT_PAIRS, pair
            seen[pair] += 1
    assert set(seen) == set(SEEN_PAIRS)  # every seen pair is drawn
    assert {o["size"] for s, _ in train_scenes for o in s["objects"]} == set(SIZES)
    assert {o["position"] for s, _ in train_scenes for o in s["objects"]} == set(POSITIONS)


def test_heldout_split_always_contains_a_heldout_pair():
    drawn = Counter()
    for i in range(2000):
        scene, _ = sample_scene(0, "heldout", i)
        pairs = [(o["color"], o["shape"]) for o in scene["objects"]]
        assert pairs[0] in HELDOUT_PAIRS  # the documented rule: the first object is held out
        drawn.update(p for p in pairs if p in HELDOUT_PAIRS)
    assert set(drawn) == set(HELDOUT_PAIRS)


def test_deterministic_per_seed_and_index_and_independent_of_order():
    forward = [sample_scene(7, "train", i) for i in range(50)]
    backward = [sample_scene(7, "train", i) for i in reversed(range(50))][::-1]
    assert forward == backward
    assert sample_scene(7, "train", 10) != sample_scene(8, "train", 10)
    assert sample_scene(7, "train", 10) != sample_scene(7, "heldout", 10)
    ds = ShapesZh(split="train", size=64, length=100, seed=7)
    first = np.asarray(ds[42]["image"])
    _ = [ds[i] for i in range(40, 45)]  # touching other items changes nothing
    again = ds[42]
    assert np.array_equal(first, np.asarray(again["image"]))
    assert (again["scene"], again["caption"]) == forward[42]
    # the same index is the same scene at any canvas size (SR targets)
    assert ShapesZh(size=128, length=100, seed=7)[42]["scene"] == again["scene"]
    with pytest.raises(ValueError, match="split"):
        sample_scene(0, "val", 0)


# ---------------------------------------------------------------------------- captions


def test_canonical_caption_matches_spec_examples():
    assert TEMPLATES[0] == "{position}有一个{size}的{color}{shape}"
    red_circle = one("红色", "圆形", "大", (0.2, 0.2), "左上角")
    assert canonical_caption(red_circle) == "左上角有一个大的红色圆形"
    two = {"objects": [
        {"color": "蓝色", "shape": "菱形", "position": "中间", "size": "小"},
        {"color": "黑色", "shape": "正方形", "position": "右下角", "size": "大"},
    ]}
    assert canonical_caption(two) == "中间有一个小的蓝色菱形，右下角有一个大的黑色正方形"


def test_every_template_round_trips_in_both_orders():
    assert len(TEMPLATES) >= 5 and all("，" not in t for t in TEMPLATES)
    objects = [{"color": c, "shape": sh, "position": p, "size": sz}
               for c, sh, p, sz in product(COLORS, SHAPES, POSITIONS, SIZES)]
    rng = np.random.default_rng(0)
    for t in range(len(TEMPLATES)):
        captions = set()
        for obj in objects:  # every attribute combination, one clause
            caption = make_caption({"objects": [obj]}, t)
            captions.add(caption)
            assert parse_caption(caption) == [obj], caption
        assert len(captions) == len(objects)  # the template distinguishes every object
        for _ in range(100):  # two clauses, both orders
            a, b = (objects[i] for i in rng.choice(len(objects), 2, replace=False))
            scene = {"objects": [a, b]}
            assert parse_caption(make_caption(scene, t, [0, 1])) == [a, b]
            assert parse_caption(make_caption(scene, t, [1, 0])) == [b, a]


def test_parse_caption_is_tolerant_of_spacing_and_punctuation_and_rejects_junk():
    obj = {"color": "紫色", "shape": "三角形", "position": "右边", "size": "小"}
    other = {"color": "黄色", "shape": "圆形", "position": "左下角", "size": "大"}
    assert parse_caption(" 右边 有一个 小的 紫色三角形 。") == [obj]
    assert parse_caption("右边有一个小的紫色三角形,左下角有一个大的黄色圆形") == [obj, other]
    for junk in ["", "一只猫", "右边有一个小的紫色三角形，一只猫", "右边有一个中的紫色三角形"]:
        assert parse_caption(junk) is None, junk
    with pytest.raises(ValueError, match="一只猫"):
        parse_caption("右边有一个小的紫色三角形，一只猫", strict=True)
    with pytest.raises(ValueError, match="str"):
        parse_caption(None)


def test_sample_captions_use_all_templates_and_describe_the_scene(train_scenes):
    used = Counter()
    orders = Counter()
    for scene, caption in train_scenes[:1000]:
        used[scene["template"]] += 1
        parsed = parse_caption(caption, strict=True)
        assert sorted(map(str, parsed)) == sorted(map(str, scene["objects"]))
        clauses = caption.split("，")
        assert all(shapes._TEMPLATE_REGEXES[scene["template"]].fullmatch(c) for c in clauses)
        if len(parsed) == 2:
            orders[parsed[0] == scene["objects"][0]] += 1
    assert set(used) == set(range(len(TEMPLATES)))
    assert orders[True] > 100 and orders[False] > 100  # clause order is random


# ---------------------------------------------------------------------------- eval sets


def test_eval_scenes():
    seen, held, two = eval_scenes("seen", 450), eval_scenes("heldout", 54), eval_scenes("two", 50)
    key = lambda s: tuple(s["objects"][0].values())  # noqa: E731
    assert len({key(s) for s in seen}) == 450  # every seen combination exactly once
    assert len({key(s) for s in held}) == 54
    assert all((s["objects"][0]["color"], s["objects"][0]["shape"]) in HELDOUT_PAIRS for s in held)
    assert all((s["objects"][0]["color"], s["objects"][0]["shape"]) in SEEN_PAIRS for s in seen)
    for s in two:
        a, b = s["objects"]
        assert a["color"] != b["color"] and a["position"] != b["position"]
        assert (a["color"], a["shape"]) in SEEN_PAIRS and (b["color"], b["shape"]) in SEEN_PAIRS
    assert eval_scenes("two", 20, seed=0) == two[:20]  # deterministic, prefix-stable
    assert eval_scenes("seen", 20, seed=1) != seen[:20]
    prompts = eval_prompts("heldout", 3)
    assert prompts[0]["caption"] == canonical_caption(prompts[0]["scene"])
    render_scene(prompts[0]["scene"], 64)  # renderable reference
    with pytest.raises(ValueError, match="seen"):
        eval_scenes("unseen", 3)


# ---------------------------------------------------------------------------- dataset


def test_dataset_items():
    ds = ShapesZh(split="heldout", size=64, length=10, seed=3)
    item = ds[4]
    assert len(ds) == 10 and set(item) == {"image", "caption", "scene", "index"}
    assert isinstance(item["image"], Image.Image) and item["image"].size == (64, 64)
    assert item["index"] == 4 and isinstance(item["caption"], str)
    json.dumps(item["scene"])  # JSON-serialisable metadata
    tensor = ShapesZh(split="heldout", size=64, length=10, seed=3, as_tensor=True)[4]["image"]
    assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0
    pixels = torch.from_numpy(np.array(item["image"])).permute(2, 0, 1).float()  # (3, S, S)
    assert torch.allclose(tensor * 255, pixels)
    with pytest.raises(IndexError):
        ds[10]
    with pytest.raises(ValueError, match="train"):
        ShapesZh(split="test")


# ---------------------------------------------------------------------------- CLI


def test_cli_writes_readable_shards(tmp_path, capsys):
    import webdataset as wds

    out = tmp_path / "shards"
    assert shapes.main([f"out={out}", "n=25", "size=32", "split=heldout", "seed=5",
                        "shard_size=10"]) == 0
    names = sorted(os.listdir(out))
    assert names == [f"shapes-zh-heldout-{i:06d}.tar" for i in range(3)]  # no temp files left
    with tarfile.open(out / names[0]) as tar:
        members = tar.getnames()
    expected = [f"{i:09d}.{ext}" for i in range(10) for ext in ("png", "txt", "json")]
    assert sorted(members) == sorted(expected)
    samples = list(wds.WebDataset([str(out / n) for n in names], shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(25)]
    for s in samples[:12]:
        assert {"png", "txt", "json"} <= set(s)
        meta = json.loads(s["json"])
        index = int(s["__key__"])
        scene, caption = sample_scene(5, "heldout", index)
        assert meta == dict(scene, split="heldout", seed=5, index=index, size=32)
        assert s["txt"].decode() == caption
        image = Image.open(io.BytesIO(s["png"]))
        assert image.mode == "RGB" and image.size == (32, 32)
        assert np.array_equal(np.asarray(image), np.asarray(render_scene(scene, 32)))
    assert "shapes-zh-heldout-{000000..000002}.tar" in capsys.readouterr().out


@pytest.mark.parametrize("args, words", [
    (["n=3"], ["out=DIR"]),
    (["out=x", "splt=train"], ["'splt'", "split", "shard_size"]),
    (["out=x", "split=val"], ["'val'", "train", "heldout"]),
    (["out=x", "n=zero"], ["n=", "'zero'", "an int >= 1"]),
    (["out=x", "size=0"], ["size", ">= 8"]),
    (["out=x", "verbose"], ["'verbose'", "key=value"]),
])
def test_cli_bad_arguments_name_the_problem(args, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shapes.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:")
    for word in words:
        assert word in err, (word, err)
    assert not os.listdir(tmp_path)  # nothing written


def test_cli_module_entry_point(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ok = subprocess.run([sys.executable, "-m", "cogview.data.shapes", f"out={tmp_path}", "n=3"],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert os.listdir(tmp_path) == ["shapes-zh-train-000000.tar"]
    bad = subprocess.run(
        [sys.executable, "-m", "cogview.data.shapes", f"out={tmp_path}", "split=x"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )
    assert bad.returncode == 2 and "split='x'" in bad.stderr
