"""The shapes-zh oracle: read a scene back from pixels, and score it against the truth.

Used to score text-to-image generations, VQ-VAE reconstructions, captions and reranking
on shapes-zh (shared/specs/shapes-zh.md). Method, per image of side S:

1. Colour model. Every rendered pixel is a mix of the background and at most one palette
   colour C (anti-aliased edges), i.e. it lies on the segment BG -> C. For each palette
   colour we project the pixel on that line: coverage `alpha` (0 = background, 1 = pure C)
   and the distance to the line `residual`. A pixel belongs to colour C when alpha >= 0.5
   (the half-coverage contour is the true edge, also under blur) and C's line is the
   nearest one within RESIDUAL_MAX; pixels far from every line are unassigned.
2. Objects. 8-connected components per colour; components that are too small, too thin
   or too sparse (noise, mixed edges between objects) are dropped.
3. Attributes per component, from its alpha map (the coverage of its colour in a crop
   around it, other objects' pixels zeroed):
   - color: the component's palette colour;
   - shape: each candidate (circle, square, triangle, diamond) is drawn as an
     anti-aliased coverage template and compared with the alpha map by soft IoU; the
     best of all tries wins. Tries: two box sides (the half-coverage bounding box's, and
     sqrt(area / fill ratio), which stays right when blur erodes vertices), each under a
     few Gaussian blurs (BLUR_SIGMAS: generations and reconstructions are soft). The box
     is placed so the template's centroid sits on the alpha-weighted centroid (blur
     moves neither; a triangle's centroid is 2/3 down its box), or, where the canvas cut
     the object (large corner objects stick out by up to 0.025 S), on the uncut edge;
   - position: the grid cell of the fitted box's centre (the box centre, not the
     centroid, which lies low in a triangle);
   - size: from the covered area (sum of alpha, which blur and resampling conserve)
     and the fitted shape's fill ratio (circle pi/4, square 1, triangle and diamond 1/2):
     side = sqrt(area / fill), 大 if side > 0.25 S (midway between 0.20 S and 0.30 S).

Object matching in `score_scene`: each target object is first paired with a predicted
object of the same colour (preferring one in the same position); the remaining target
objects are then paired with remaining predicted objects in the same position. Unpaired
target objects count as wrong in every attribute; unpaired predicted objects are extras.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from cogview.data.shapes import (
    BACKGROUND,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    parse_caption,
)

ATTRIBUTES = ("color", "shape", "position", "size")

_COLOR_NAMES = tuple(COLORS)
_BG = np.array(BACKGROUND, dtype=np.float32)  # (3,)
_DIRS = np.array([COLORS[c] for c in _COLOR_NAMES], dtype=np.float32) - _BG  # (7, 3)
_DIR_NORM2 = (_DIRS**2).sum(1)  # (7,)

# Colour model. Distance from the BG->C line; the nearest two lines (orange, yellow) are
# ~58 apart at full coverage, pixel noise of sigma 8/channel stays under ~30.
RESIDUAL_MAX = 40.0
RESIDUAL_FIT_MAX = 100.0  # for the shape fit: other colours' pixels lie >= ~150 away
ALPHA_MIN, ALPHA_MAX = 0.5, 1.6  # >1 allows Lanczos overshoot inside edges
# Component filters, relative to S: the smallest object (small triangle) covers 0.02 S^2
# and has a bounding box of side 0.20 S.
MIN_AREA = 0.006  # of S^2
MIN_SIDE = 0.08  # of S, for both box sides (drops 1-px lines between two objects)
MIN_FILL = 0.25  # area / bbox area (drops thin diagonal lines)
SIZE_THRESHOLD = (SIZES["大"] + SIZES["小"]) / 2  # 0.25 S
FILL_RATIO = {"圆形": math.pi / 4, "正方形": 1.0, "三角形": 0.5, "菱形": 0.5}
# Template blurs tried by the shape fit, in pixels at S = 64 (scaled with S): sharp
# renders, and softer ones like generations, VQ-VAE reconstructions or a blur of radius 1.
BLUR_SIGMAS = (0.0, 0.6, 1.0, 1.5, 2.2)
_SUBSAMPLE = 4  # template anti-aliasing: 4x4 samples per pixel
# Centroid of each shape in box units (x, y): a triangle's mass sits 2/3 down its box.
_CENTROID = {"圆形": (0.5, 0.5), "正方形": (0.5, 0.5), "三角形": (0.5, 2 / 3), "菱形": (0.5, 0.5)}


# ----------------------------------------------------------------------------------------
# Input


def to_array(image) -> np.ndarray:
    """PIL RGB image, uint8 array [S, S, 3] (or float in [0, 1]) or tensor [3, S, S] in [0, 1]
    -> float32 array [S, S, 3] in 0..255. ValueError for anything else."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"oracle needs an RGB image, got PIL mode {image.mode!r}; "
                             "use image.convert('RGB')")
        array = np.asarray(image, dtype=np.float32)
    elif type(image).__module__.startswith("torch"):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"oracle needs a tensor of shape [3, S, S], got {tuple(image.shape)}"
                             "; pass a batch to evaluate() or index it")
        tensor = image.detach().cpu()
        if tensor.is_floating_point():
            array = tensor.float().permute(1, 2, 0).numpy() * 255.0
        else:
            array = tensor.permute(1, 2, 0).numpy().astype(np.float32)
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"oracle needs an array of shape [S, S, 3], got {image.shape}")
        if image.dtype == np.uint8:
            array = image.astype(np.float32)
        elif np.issubdtype(image.dtype, np.floating):
            if image.size and (image.max() > 1.5 or image.min() < -0.5):
                raise ValueError("float arrays must hold values in [0, 1]; got range "
                                 f"[{image.min():.3g}, {image.max():.3g}] (pass uint8 for 0..255)")
            array = image.astype(np.float32) * 255.0
        else:
            raise ValueError(f"oracle needs a uint8 or float array, got dtype {image.dtype}")
    else:
        raise ValueError("oracle needs a PIL RGB image, a uint8 array [S, S, 3] or a tensor "
                         f"[3, S, S]; got {type(image).__name__}")
    if array.shape[0] != array.shape[1] or array.shape[0] < 8:
        raise ValueError(f"oracle needs a square image of side >= 8, got {array.shape[1]}x"
                         f"{array.shape[0]} (width x height)")
    return np.clip(array, 0.0, 255.0)


# ----------------------------------------------------------------------------------------
# Pixels -> colour labels -> components


def colour_maps(array: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel and palette colour: alpha [S, S, 7], residual [S, S, 7], and the label
    [S, S] (index into COLORS, -1 = background or unassigned)."""
    delta = array - _BG  # (S, S, 3)
    alpha = np.einsum("hwc,kc->hwk", delta, _DIRS) / _DIR_NORM2  # (S, S, 7): BG -> C coverage
    norm2 = (delta**2).sum(-1, keepdims=True)  # (S, S, 1)
    residual = np.sqrt(np.maximum(norm2 - alpha**2 * _DIR_NORM2, 0.0))  # (S, S, 7)
    valid = (alpha >= ALPHA_MIN) & (alpha <= ALPHA_MAX) & (residual < RESIDUAL_MAX)
    best = np.where(valid, residual, np.inf).argmin(-1)  # (S, S)
    label = np.where(valid.any(-1), best, -1)
    return alpha, residual, label


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask [H, W] -> (labels [H, W] with -1 outside, n).

    Min-label propagation over the 3x3 neighbourhood with pointer jumping (each pixel's
    label is the flat index of a pixel of the same component), so it converges in a few
    numpy passes even for 128 x 128 images.
    """
    h, w = mask.shape
    inf = h * w
    labels = np.where(mask, np.arange(h * w).reshape(h, w), inf)
    while True:
        padded = np.pad(labels, 1, constant_values=inf)
        nearest = labels.copy()
        for dy in range(3):
            for dx in range(3):
                np.minimum(nearest, padded[dy:dy + h, dx:dx + w], out=nearest)
        nearest[~mask] = inf
        flat = nearest.ravel()
        inside = flat < inf
        flat[inside] = flat[flat[inside]]  # pointer jumping: follow the label's own label
        if np.array_equal(nearest, labels):
            break
        labels = nearest
    roots, labels_flat = np.unique(labels[mask], return_inverse=True)
    out = np.full((h, w), -1, dtype=np.int64)
    out[mask] = labels_flat
    return out, len(roots)


# ----------------------------------------------------------------------------------------
# Component -> attributes


def _box_placer(ys: np.ndarray, xs: np.ndarray, centroid: tuple[float, float], s: int):
    """From a component's pixels and its alpha-weighted centroid (x, y) in pixels: the
    bounding-box side and a function (shape, side) -> (x0, y0) placing the shape's square
    box so that the shape's centroid lands on the measured one (a blur-invariant anchor;
    a triangle's centroid is 2/3 down its box), or, along an axis where the canvas cut the
    object, anchored on the uncut edge."""
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    bbox_side = float(max(x1 - x0, y1 - y0))

    def place(lo: int, hi: int, mean: float, frac: float, side: float) -> float:
        cut_low, cut_high = lo == 0 and hi - lo < bbox_side, hi == s and hi - lo < bbox_side
        if cut_low and not cut_high:
            return hi - side
        if cut_high and not cut_low:
            return float(lo)
        return mean - frac * side

    def placer(shape: str, side: float) -> tuple[float, float]:
        fx, fy = _CENTROID[shape]
        return place(x0, x1, centroid[0], fx, side), place(y0, y1, centroid[1], fy, side)

    return bbox_side, placer


def _coverage(shape: str, x0: float, y0: float, side: float, h: int, w: int) -> np.ndarray:
    """Anti-aliased coverage [h, w] of `shape` in the box (x0, y0, side), pixel (0,0) at origin."""
    offsets = (np.arange(_SUBSAMPLE) + 0.5) / _SUBSAMPLE
    u = ((np.arange(w)[:, None] + offsets).ravel() - x0) / side  # (w * k,) in box units
    v = ((np.arange(h)[:, None] + offsets).ravel() - y0) / side  # (h * k,)
    u, v = u[None, :], v[:, None]
    inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if shape == "圆形":
        inside = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif shape == "三角形":  # apex at (0.5, 0), base along v = 1
        inside = inside & (np.abs(u - 0.5) <= v / 2)
    elif shape == "菱形":
        inside = np.abs(u - 0.5) + np.abs(v - 0.5) <= 0.5
    k = _SUBSAMPLE
    return inside.reshape(h, k, w, k).mean(axis=(1, 3))  # (h, w)


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """[n, n] matrix applying a 1-D Gaussian blur (zeros outside) along an axis of length n."""
    d = np.arange(n)[:, None] - np.arange(n)[None, :]  # (n, n)
    radius = int(math.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return np.exp(-0.5 * (d / sigma) ** 2) * (np.abs(d) <= radius) / kernel.sum()


def _blur(image: np.ndarray, blur_h: np.ndarray | None, blur_w: np.ndarray | None) -> np.ndarray:
    """Separable blur of [h, w] by [h, h] and [w, w] matrices (None: sharp). einsum, not
    matmul: BLAS threads stall for milliseconds on a busy machine at these small sizes."""
    if blur_h is None:
        return image
    rows = np.einsum("ij,jk->ik", blur_h, image)  # (h, w)
    return np.einsum("ik,lk->il", rows, blur_w)  # (h, w)


def _read_component(
    comp: np.ndarray, colour: int, alpha: np.ndarray, residual: np.ndarray,
    others: np.ndarray, s: int,
) -> dict:
    """Attributes of one component (mask `comp` [S, S] of palette colour `colour`; `others`
    [S, S] marks the pixels of every other object found)."""
    ys, xs = np.nonzero(comp)
    # crop: the bounding box plus a margin for blurred edges, within the canvas
    margin = max(2, round(s / 16))
    cx0, cy0 = max(0, int(xs.min()) - margin), max(0, int(ys.min()) - margin)
    cx1, cy1 = min(s, int(xs.max()) + 1 + margin), min(s, int(ys.max()) + 1 + margin)
    crop = (slice(cy0, cy1), slice(cx0, cx1))
    # this object's alpha: pixels near its colour line that belong to no other object
    # (looser than the labelling: lossy compression shifts the colour of edge pixels)
    own = (residual[crop + (colour,)] < RESIDUAL_FIT_MAX) & ~others[crop]
    a = np.where(own, np.clip(alpha[crop + (colour,)], -1.0, 1.5), 0.0)  # (h, w)
    a_fit = np.clip(a, 0.0, 1.0)
    area = max(float(a.sum()), 0.0)  # covered pixels, unbiased under noise (no clipping at 0)
    if area > 1.0:  # alpha-weighted centroid, conserved by symmetric blurs
        gy, gx = np.mgrid[cy0:cy1, cx0:cx1] + 0.5
        centroid = (float((a * gx).sum()) / area, float((a * gy).sum()) / area)
    else:
        centroid = ((xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2)
    bbox_side, place = _box_placer(ys, xs, centroid, s)

    # Each shape is tried at two box sides: the bounding box's (exact when sharp, and the
    # only one for objects cut by the canvas) and the side its fill ratio gives the area
    # (exact under blur, which erodes the vertices of diamonds and triangles); and under a
    # few Gaussian blurs, since generated and reconstructed images are often soft.
    h, w = a.shape
    blurs = [(None, None) if sigma == 0 else
             (_blur_matrix(h, sigma * s / 64), _blur_matrix(w, sigma * s / 64))
             for sigma in BLUR_SIGMAS]
    best = (-1.0, SHAPES[0], bbox_side)
    for shape in SHAPES:
        for side in (bbox_side, math.sqrt(area / FILL_RATIO[shape])):
            if side < 1.0:
                continue
            bx, by = place(shape, side)
            sharp = _coverage(shape, bx - cx0, by - cy0, side, h, w)  # (h, w)
            for blur_h, blur_w in blurs:
                t = _blur(sharp, blur_h, blur_w)  # (h, w)
                iou = np.minimum(t, a_fit).sum() / max(np.maximum(t, a_fit).sum(), 1e-6)
                best = max(best, (float(iou), shape, side))
    best_iou, best_shape, side = best
    size_est = math.sqrt(area / FILL_RATIO[best_shape]) / s
    bx, by = place(best_shape, side)
    cx, cy = (bx + side / 2) / s, (by + side / 2) / s
    col = min(max(int(cx * 3), 0), 2)
    row = min(max(int(cy * 3), 0), 2)
    return {
        "object": {
            "color": _COLOR_NAMES[colour],
            "shape": best_shape,
            "position": POSITIONS[3 * row + col],
            "size": "大" if size_est > SIZE_THRESHOLD else "小",
        },
        "center": [round(float(cx), 4), round(float(cy), 4)],
        "side": round(size_est, 4),
        "iou": round(float(best_iou), 4),
    }


def read_scene(image, details: bool = False) -> dict:
    """Read the objects of a shapes-zh image back from its pixels.

    image: PIL RGB, uint8 array [S, S, 3] or float tensor [3, S, S] in [0, 1], any S >= 8.
    Returns {"objects": [{"color", "shape", "position", "size"}, ...], "centers": [[x, y]]}
    (centres as fractions of S, objects in reading order: by cell, then colour). With
    details=True also "sides" (estimated box side / S) and "ious" (shape-template fit).
    """
    array = to_array(image)  # (S, S, 3)
    s = array.shape[0]
    alpha, residual, label = colour_maps(array)
    kept = []  # (colour, component mask)
    for colour in range(len(_COLOR_NAMES)):
        mask = label == colour
        if mask.sum() < MIN_AREA * s * s:
            continue
        components, n = connected_components(mask)
        areas = np.bincount(components[mask], minlength=n)  # (n,)
        for k in np.flatnonzero(areas >= MIN_AREA * s * s):  # skip specks before masking
            comp = components == k
            area = int(areas[k])
            ys, xs = np.nonzero(comp)
            bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
            if area < MIN_AREA * s * s or min(bw, bh) < MIN_SIDE * s or area < MIN_FILL * bw * bh:
                continue
            kept.append((colour, comp))
    claimed = np.zeros((s, s), dtype=np.int32)  # how many kept components hold each pixel
    for _, comp in kept:
        claimed += comp
    found = [_read_component(comp, colour, alpha, residual, (claimed - comp) > 0, s)
             for colour, comp in kept]
    found.sort(key=lambda f: (POSITIONS.index(f["object"]["position"]),
                              _COLOR_NAMES.index(f["object"]["color"])))
    scene = {"objects": [f["object"] for f in found], "centers": [f["center"] for f in found]}
    if details:
        scene["sides"] = [f["side"] for f in found]
        scene["ious"] = [f["iou"] for f in found]
    return scene


# ----------------------------------------------------------------------------------------
# Scoring


def _objects(scene, name: str) -> list[dict]:
    objects = scene.get("objects") if isinstance(scene, dict) else scene
    if not isinstance(objects, list):
        raise ValueError(f"{name} must be a scene dict {{'objects': [...]}} or a list of "
                         f"objects, got {type(scene).__name__}")
    for obj in objects:
        if not isinstance(obj, dict) or any(a not in obj for a in ATTRIBUTES):
            raise ValueError(f"{name} object {obj!r} must have the keys {ATTRIBUTES}")
    return objects


def match_objects(predicted: list[dict], target: list[dict]) -> list[int | None]:
    """For each target object, the index of its predicted object (or None): colour first
    (same position preferred), then position among the objects still unpaired."""
    free = set(range(len(predicted)))
    pairs: list[int | None] = [None] * len(target)
    for key, prefer in (("color", "position"), ("position", None)):
        for t, obj in enumerate(target):
            if pairs[t] is not None:
                continue
            candidates = [p for p in sorted(free) if predicted[p][key] == obj[key]]
            if prefer is not None:
                candidates.sort(key=lambda p: predicted[p][prefer] != obj[prefer])
            if candidates:
                pairs[t] = candidates[0]
                free.discard(candidates[0])
    return pairs


def score_scene(predicted, target) -> dict:
    """Per-attribute correctness of `predicted` against `target` (scene dicts or object lists).

    Returns {"color", "shape", "position", "size"}: fraction of target objects whose paired
    prediction has that attribute right; "full_match": every target object fully right and
    no extra predicted object; "n_target", "n_predicted".
    """
    pred_objects, target_objects = _objects(predicted, "predicted"), _objects(target, "target")
    if not target_objects:
        raise ValueError("target scene has no objects; shapes-zh scenes have 1 or 2")
    pairs = match_objects(pred_objects, target_objects)
    correct = {a: 0 for a in ATTRIBUTES}
    for obj, p in zip(target_objects, pairs):
        if p is not None:
            for a in ATTRIBUTES:
                correct[a] += pred_objects[p][a] == obj[a]
    n = len(target_objects)
    full = all(correct[a] == n for a in ATTRIBUTES) and len(pred_objects) == n
    return {**{a: correct[a] / n for a in ATTRIBUTES}, "full_match": full,
            "n_target": n, "n_predicted": len(pred_objects)}


@dataclass
class OracleScores:
    """Accumulates `score_scene` results: per-attribute accuracy over target objects and
    the full-match rate over images."""

    correct: dict = field(default_factory=lambda: {a: 0.0 for a in ATTRIBUTES})
    n_objects: int = 0
    n_images: int = 0
    n_full: int = 0

    def update(self, predicted, target) -> dict:
        """Score one image's predicted scene against its target; returns the per-image score."""
        score = score_scene(predicted, target)
        for a in ATTRIBUTES:
            self.correct[a] += score[a] * score["n_target"]
        self.n_objects += score["n_target"]
        self.n_images += 1
        self.n_full += bool(score["full_match"])
        return score

    def compute(self) -> dict:
        """{"color", "shape", "position", "size", "full_match", "n_images", "n_objects"}."""
        if self.n_images == 0:
            raise ValueError("no images were scored; call update() first")
        return {**{a: self.correct[a] / self.n_objects for a in ATTRIBUTES},
                "full_match": self.n_full / self.n_images,
                "n_images": self.n_images, "n_objects": self.n_objects}


def evaluate(images, scenes) -> dict:
    """Read every image with the oracle and score it against its scene (same order).

    images: a list of images (any form `read_scene` takes) or a tensor [B, 3, S, S].
    Returns OracleScores.compute(): per-attribute accuracy, full-match rate, counts.
    """
    if len(images) == 0:
        raise ValueError("evaluate() got no images")
    if len(images) != len(scenes):
        raise ValueError(f"evaluate() got {len(images)} images but {len(scenes)} scenes")
    scores = OracleScores()
    for image, scene in zip(images, scenes):
        scores.update(read_scene(image), scene)
    return scores.compute()


def _object_key(obj: dict) -> tuple:
    return tuple(obj[a] for a in ATTRIBUTES)


def score_caption(text: str, scene) -> bool:
    """Exact match of the attribute set read from a caption with the scene's (any clause order).
    An unparseable caption scores False."""
    objects = parse_caption(text)
    if objects is None:
        return False
    target = _objects(scene, "scene")
    return sorted(map(_object_key, objects)) == sorted(map(_object_key, target))


def evaluate_captions(texts: list[str], scenes: list) -> dict:
    """Caption exact-match rate and parse rate over a list: {"exact_match", "parsed", "n"}."""
    if len(texts) == 0:
        raise ValueError("evaluate_captions() got no captions")
    if len(texts) != len(scenes):
        raise ValueError(f"evaluate_captions() got {len(texts)} captions but {len(scenes)} scenes")
    exact = sum(score_caption(t, s) for t, s in zip(texts, scenes))
    parsed = sum(parse_caption(t) is not None for t in texts)
    return {"exact_match": exact / len(texts), "parsed": parsed / len(texts), "n": len(texts)}
