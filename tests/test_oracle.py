"""The shapes-zh oracle: reads scenes back from pixels, scores scenes and captions."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from cogview.data.shapes import (
    COLORS,
    POSITIONS,
    SHAPES,
    make_caption,
    render_scene,
    sample_scene,
)
from cogview.eval.oracle import (
    OracleScores,
    connected_components,
    evaluate,
    evaluate_captions,
    read_scene,
    score_caption,
    score_scene,
)


def obj(color, shape, position, size):
    return {"color": color, "shape": shape, "position": position, "size": size}


def scene_set(n_per_split, seed=11):
    return [sample_scene(seed, split, i)[0] for split in ("train", "heldout")
            for i in range(n_per_split)]


def add_noise(image, sigma, seed):
    rng = np.random.default_rng(seed)
    pixels = np.asarray(image, dtype=np.float64) + rng.normal(0.0, sigma, (*image.size[::-1], 3))
    return np.clip(pixels, 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def scenes64():
    return scene_set(130)


@pytest.fixture(scope="module")
def images64(scenes64):
    return [render_scene(s, 64) for s in scenes64]


# ---------------------------------------------------------------------------- accuracy


def test_clean_renders_read_back_exactly(scenes64, images64):
    scenes128 = scene_set(40, seed=12)
    images = images64 + [render_scene(s, 128) for s in scenes128]
    scenes = scenes64 + scenes128
    counts = {len(s["objects"]) for s in scenes}
    assert len(scenes) >= 300 and counts == {1, 2}
    result = evaluate(images, scenes)
    assert result["n_images"] == len(scenes)
    assert result["full_match"] >= 0.99, result
    for attribute in ("color", "shape", "position", "size"):
        assert result[attribute] >= 0.99, result


def test_robust_to_blur_and_noise(scenes64, images64):
    scenes, images = scenes64[:200], images64[:200]
    blurred = [im.filter(ImageFilter.GaussianBlur(1)) for im in images]
    noisy = [add_noise(im, 8.0, i) for i, im in enumerate(images)]
    both = [add_noise(im, 8.0, i) for i, im in enumerate(blurred)]
    for name, degraded in [("blur", blurred), ("noise", noisy), ("blur+noise", both)]:
        result = evaluate(degraded, scenes)
        assert result["full_match"] >= 0.95, (name, result)


def test_objects_cut_by_the_canvas_edge():
    # large objects pushed outward by the full jitter stick out of the canvas by 0.025 S
    for shape in SHAPES:
        for (x, y), position in [((0.125, 0.125), "左上角"), ((0.875, 0.5), "右边"),
                                 ((0.5, 0.875), "正下方")]:
            scene = {"objects": [obj("黑色", shape, position, "大")], "centers": [[x, y]]}
            for size in (64, 128):
                assert score_scene(read_scene(render_scene(scene, size)), scene)["full_match"], (
                    shape, position, size)


def test_wrong_scene_is_detected(scenes64, images64):
    for i in range(100):
        j = (i + 1) % 100
        target, other = scenes64[i], scenes64[j]
        if sorted(map(str, target["objects"])) == sorted(map(str, other["objects"])):
            continue
        assert not score_scene(read_scene(images64[j]), target)["full_match"]


@pytest.mark.parametrize("attribute, new", [
    ("color", "蓝色"), ("shape", "三角形"), ("position", "右下角"), ("size", "小")])
def test_each_wrong_attribute_is_scored_wrong(attribute, new):
    truth = {"objects": [obj("红色", "正方形", "中间", "大")], "centers": [[0.5, 0.5]]}
    read = read_scene(render_scene(truth, 64))
    claimed = {"objects": [dict(truth["objects"][0], **{attribute: new})]}
    score = score_scene(read, claimed)
    assert not score["full_match"] and score[attribute] == 0.0
    assert all(score[a] == 1.0 for a in ("color", "shape", "position", "size") if a != attribute)


def test_blank_canvas_has_no_objects():
    blank = Image.new("RGB", (64, 64), (240, 240, 240))
    assert read_scene(blank)["objects"] == []
    score = score_scene(read_scene(blank), {"objects": [obj("红色", "圆形", "中间", "大")]})
    assert not score["full_match"] and score["color"] == 0.0


# ---------------------------------------------------------------------------- inputs


def test_input_forms_and_sizes_agree():
    scene, _ = sample_scene(3, "train", 1)
    image = render_scene(scene, 64)
    array = np.asarray(image)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255
    expected = read_scene(image)
    assert score_scene(expected, scene)["full_match"]
    assert read_scene(array) == expected
    assert read_scene(array.astype(np.float32) / 255) == expected
    assert read_scene(tensor) == expected
    assert read_scene((tensor * 255).to(torch.uint8)) == expected
    assert evaluate(tensor[None].repeat(2, 1, 1, 1), [scene, scene])["full_match"] == 1.0
    for size in (48, 96):  # any S
        assert score_scene(read_scene(render_scene(scene, size)), scene)["full_match"]


@pytest.mark.parametrize("bad, words", [
    (np.zeros((64, 64), np.uint8), ["[S, S, 3]"]),
    (np.zeros((64, 32, 3), np.uint8), ["square"]),
    (Image.new("L", (64, 64)), ["'L'", "convert"]),
    (Image.new("RGBA", (64, 64)), ["'RGBA'"]),
    (torch.zeros(1, 3, 64, 64), ["[3, S, S]", "(1, 3, 64, 64)"]),
    (np.full((64, 64, 3), 200.0), ["[0, 1]"]),
    ("image.png", ["PIL RGB"]),
])
def test_bad_input_raises_clear_error(bad, words):
    with pytest.raises(ValueError) as err:
        read_scene(bad)
    for word in words:
        assert word in str(err.value)


def test_evaluate_rejects_empty_or_mismatched_lists():
    with pytest.raises(ValueError, match="no images"):
        evaluate([], [])
    image = render_scene(sample_scene(0, "train", 0)[0], 64)
    with pytest.raises(ValueError, match="1 images but 2 scenes"):
        evaluate([image], [sample_scene(0, "train", 0)[0]] * 2)
    with pytest.raises(ValueError, match="update"):
        OracleScores().compute()
    with pytest.raises(ValueError, match="keys"):
        score_scene({"objects": [{"color": "红色"}]}, [obj("红色", "圆形", "中间", "大")])


# ---------------------------------------------------------------------------- scoring


def test_score_scene_matching_rules():
    red = obj("红色", "圆形", "左上角", "大")
    blue = obj("蓝色", "菱形", "右下角", "小")
    target = {"objects": [red, blue]}
    assert score_scene({"objects": [blue, red]}, target)["full_match"]  # order-free
    extra = score_scene([red, blue, obj("黑色", "正方形", "中间", "小")], target)
    assert not extra["full_match"] and extra["shape"] == 1.0 and extra["n_predicted"] == 3
    missing = score_scene([red], target)
    assert not missing["full_match"] and missing["color"] == 0.5 and missing["size"] == 0.5
    # colour first: the red prediction pairs with the red target although it sits elsewhere
    moved = score_scene([dict(red, position="中间"), blue], target)
    assert moved["color"] == 1.0 and moved["position"] == 0.5 and moved["shape"] == 1.0
    # then position: a wrongly coloured object in the right cell still scores its shape
    recolored = score_scene([red, dict(blue, color="黄色")], target)
    assert recolored["color"] == 0.5 and recolored["shape"] == 1.0 and recolored["position"] == 1.0
    # two predictions of one colour: the one in the target's cell is chosen
    twin = score_scene([dict(red, position="中间"), red], {"objects": [red]})
    assert twin["position"] == 1.0 and not twin["full_match"]


def test_oracle_scores_aggregate_over_objects_and_images():
    red = obj("红色", "圆形", "左上角", "大")
    blue = obj("蓝色", "菱形", "右下角", "小")
    scores = OracleScores()
    scores.update([red, blue], [red, blue])
    scores.update([dict(red, shape="正方形")], [red])
    result = scores.compute()
    assert result["n_images"] == 2 and result["n_objects"] == 3
    assert result["full_match"] == 0.5
    assert result["shape"] == pytest.approx(2 / 3) and result["color"] == 1.0


def test_score_caption():
    red = obj("红色", "圆形", "左上角", "大")
    blue = obj("蓝色", "菱形", "右下角", "小")
    scene = {"objects": [red, blue]}
    for template in range(6):
        assert score_caption(make_caption(scene, template, [1, 0]), scene)
        assert score_caption(make_caption(scene, template, [0, 1]), scene)
    assert not score_caption(make_caption({"objects": [red]}, 0), scene)  # missing object
    assert not score_caption(make_caption({"objects": [red, dict(blue, size="大")]}, 2), scene)
    assert not score_caption("两个圆形", scene)
    result = evaluate_captions(["左上角有一个大的红色圆形", "胡言乱语"], [{"objects": [red]}] * 2)
    assert result == {"exact_match": 0.5, "parsed": 0.5, "n": 2}


# ---------------------------------------------------------------------------- labelling


def reference_components(mask):
    """Plain BFS, 8-connectivity: the number of components."""
    seen = np.zeros_like(mask)
    n = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        n += 1
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] \
                            and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
    return n


def test_connected_components():
    mask = np.zeros((8, 8), bool)
    mask[0:2, 0:2] = True
    mask[2, 2] = True  # touches diagonally: same component (8-connectivity)
    mask[5:8, 5] = True
    labels, n = connected_components(mask)
    assert n == 2 and labels[0, 0] == labels[2, 2] != labels[6, 5] and labels[4, 4] == -1
    rng = np.random.default_rng(0)
    for density in (0.2, 0.4, 0.6):
        mask = rng.random((40, 40)) < density
        labels, n = connected_components(mask)
        assert n == reference_components(mask)
        assert (labels >= 0).sum() == mask.sum() and set(np.unique(labels[mask])) == set(range(n))


def test_palette_covered():
    # every colour and shape is read back at both sizes in the cell centres
    for color in COLORS:
        for shape in SHAPES:
            cell = (list(COLORS).index(color) + SHAPES.index(shape)) % 9
            x, y = (cell % 3 + 0.5) / 3, (cell // 3 + 0.5) / 3
            for size in ("大", "小"):
                scene = {"objects": [obj(color, shape, POSITIONS[cell], size)], "centers": [[x, y]]}
                assert score_scene(read_scene(render_scene(scene, 64)), scene)["full_match"]
