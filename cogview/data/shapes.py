"""shapes-zh: the embedded benchmark data set (see shared/specs/shapes-zh.md).

Procedurally rendered scenes of one or two coloured shapes on a flat background, each
with a Chinese caption. Every number below is fixed by the spec: the oracle in
`cogview.eval.oracle` reads pixels back against the same constants.

Determinism: sample `index` of a split is drawn from its own numpy Generator seeded with
`(seed, split id, index)`, so it never depends on which other samples were drawn before.
A scene lives in canvas-relative units (centres as fractions of the side `S`), so the
same (seed, split, index) renders the same scene at 64 px and at 128 px (the SR target).

Scene metadata (JSON-serialisable, the Chinese names exactly as in the spec):
    {"objects": [{"color": "红色", "shape": "圆形", "position": "左上角", "size": "大"}, ...],
     "centers": [[x, y], ...],   # object centres as fractions of S, aligned with objects
     "template": 0}              # caption template index (0 = canonical)

CLI (WebDataset shards, img2dataset-style members .png/.txt/.json):
    python -m cogview.data.shapes out=DIR n=N size=64 split=train seed=0 shard_size=1000
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import sys
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw
from tqdm import tqdm

from cogview.validate import check_int


# ----------------------------------------------------------------------------------------
# The fixed vocabulary of the spec

BACKGROUND: tuple[int, int, int] = (240, 240, 240)
COLORS: dict[str, tuple[int, int, int]] = {
    "红色": (220, 50, 50),
    "橙色": (245, 150, 40),
    "黄色": (240, 220, 50),
    "绿色": (50, 170, 80),
    "蓝色": (50, 100, 220),
    "紫色": (150, 70, 200),
    "黑色": (30, 30, 30),
}
SHAPES: tuple[str, ...] = ("圆形", "正方形", "三角形", "菱形")
# 3x3 grid, row-major: POSITIONS[3 * row + col]
POSITIONS: tuple[str, ...] = (
    "左上角", "正上方", "右上角",
    "左边", "中间", "右边",
    "左下角", "正下方", "右下角",
)
SIZES: dict[str, float] = {"大": 0.30, "小": 0.20}  # bounding-box side as a fraction of S
JITTER = 1.0 / 24.0  # max offset of an object centre from its cell centre, per axis, in S
SUPERSAMPLE = 4  # render at 4x, then Lanczos-downsample (anti-aliased edges)
P_SINGLE_OBJECT = 0.6  # 1 object with p=0.6, 2 objects with p=0.4

# Colour-shape pairs never drawn in the train split (compositional generalisation test).
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("紫色", "三角形"), ("绿色", "圆形"), ("橙色", "菱形"),
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple(itertools.product(COLORS, SHAPES))
SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELDOUT_PAIRS)

SPLITS: dict[str, int] = {"train": 0, "heldout": 1}  # name -> id mixed into the sample seed
# Two objects' bounding boxes are kept at least this far apart (fraction of S) so no
# object occludes or touches another: two large objects in adjacent cells could
# otherwise overlap by up to 0.05 S. The jitter is redrawn (same bound) until they are
# apart; zero jitter always satisfies it (cell pitch 1/3 > 0.30 + MIN_GAP).
MIN_GAP = 0.02
_MAX_JITTER_TRIES = 100

# ----------------------------------------------------------------------------------------
# Captions

# Clause templates; index 0 is the canonical one used for evaluation prompts. None of
# them contains "，", which joins the clauses of a two-object caption. A two-object
# caption uses the same template for both clauses (one "template" index per sample),
# with the clause order drawn at random.
TEMPLATES: tuple[str, ...] = (
    "{position}有一个{size}的{color}{shape}",
    "在{position}有一个{color}的{size}{shape}",
    "一个{size}的{color}{shape}位于{position}",
    "图片的{position}画着一个{size}{color}{shape}",
    "{size}的{color}{shape}在{position}",
    "{position}可以看到一个{color}的{size}{shape}",
)
CANONICAL_TEMPLATE = 0
CLAUSE_SEPARATOR = "，"


def _alternation(words) -> str:
    # longest first so that no word is cut short by a prefix of another
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_FIELD_PATTERNS = {
    "position": _alternation(POSITIONS),
    "size": _alternation(SIZES),
    "color": _alternation(COLORS),
    "shape": _alternation(SHAPES),
}


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    pattern = "".join(
        re.escape(part) if i % 2 == 0 else f"(?P<{part}>{_FIELD_PATTERNS[part]})"
        for i, part in enumerate(parts)
    )
    return re.compile(pattern)


_TEMPLATE_REGEXES = tuple(_template_regex(t) for t in TEMPLATES)
_SPLIT_CLAUSES = re.compile(r"[，,；;]")
_STRIP = re.compile(r"\s+")
_TRAILING_PUNCT = "。.！!"


def format_clause(obj: dict, template: int = CANONICAL_TEMPLATE) -> str:
    """One object's clause, e.g. `左上角有一个大的红色圆形` for the canonical template."""
    return TEMPLATES[template].format(**obj)


def make_caption(scene: dict, template: int, order: list[int] | None = None) -> str:
    """The caption of `scene` in template `template`, clauses in `order` (default scene order)."""
    objects = scene["objects"]
    order = range(len(objects)) if order is None else order
    return CLAUSE_SEPARATOR.join(format_clause(objects[i], template) for i in order)


def canonical_caption(scene: dict) -> str:
    """The evaluation prompt of a scene: canonical template, clauses in scene order."""
    return make_caption(scene, CANONICAL_TEMPLATE)


def parse_clause(clause: str) -> dict | None:
    """Parse one clause in any template into an object dict, or None if no template fits."""
    for regex in _TEMPLATE_REGEXES:
        m = regex.fullmatch(clause)
        if m:
            return {k: m.group(k) for k in ("color", "shape", "position", "size")}
    return None


def parse_caption(text: str, strict: bool = False) -> list[dict] | None:
    """Invert the caption templates: text -> list of object dicts, in the caption's clause order.

    Whitespace (e.g. from a tokenizer's decode) and a trailing full stop are ignored; clauses
    may be separated by "，" "," "；" or ";". Returns None when any clause fits no template
    (or the text is empty); with strict=True raises ValueError naming the bad clause instead.
    """
    if not isinstance(text, str):
        raise ValueError(f"parse_caption expects a str, got {type(text).__name__}")
    cleaned = _STRIP.sub("", text).rstrip(_TRAILING_PUNCT)
    clauses = [c for c in _SPLIT_CLAUSES.split(cleaned) if c]
    if not clauses:
        if strict:
            raise ValueError(f"caption {text!r} is empty; expected clauses like {TEMPLATES[0]!r}")
        return None
    objects = []
    for clause in clauses:
        obj = parse_clause(clause)
        if obj is None:
            if strict:
                raise ValueError(
                    f"clause {clause!r} of caption {text!r} fits none of the shapes-zh "
                    f"templates {TEMPLATES}"
                )
            return None
        objects.append(obj)
    return objects


# ----------------------------------------------------------------------------------------
# Scenes


def check_split(split: str) -> int:
    """The id of a split name; ValueError naming the allowed names otherwise."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a shapes-zh split; choose one of {list(SPLITS)}")
    return SPLITS[split]


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The Generator of sample `index`: seeded from (seed, split, index) alone."""
    check_int("seed", seed, 0)
    check_int("index", index, 0)
    return np.random.default_rng([int(seed), check_split(split), int(index)])


def _boxes_apart(c1, s1: float, c2, s2: float) -> bool:
    reach = (s1 + s2) / 2 + MIN_GAP
    return abs(c1[0] - c2[0]) >= reach or abs(c1[1] - c2[1]) >= reach


def _place(rng: np.random.Generator, cells: list[int], sides: list[float]) -> list[list[float]]:
    """Object centres (fractions of S): cell centre + uniform jitter in [-S/24, S/24]^2."""
    base = [((cell % 3 + 0.5) / 3, (cell // 3 + 0.5) / 3) for cell in cells]
    for _ in range(_MAX_JITTER_TRIES):
        jitter = rng.uniform(-JITTER, JITTER, size=(len(cells), 2))
        centers = [[bx + jx, by + jy] for (bx, by), (jx, jy) in zip(base, jitter)]
        if len(cells) < 2 or _boxes_apart(centers[0], sides[0], centers[1], sides[1]):
            break
    else:  # practically unreachable (p < 0.4^100); zero jitter is always apart
        centers = [list(b) for b in base]
    return [[round(float(x), 5), round(float(y), 5)] for x, y in centers]


def _make_scene(
    rng: np.random.Generator,
    n_objects: int,
    first_pairs: tuple,
    other_pairs: tuple,
    template: int,
) -> dict:
    """Draw objects (distinct colours and cells) and their centres."""
    pairs = [first_pairs[rng.integers(len(first_pairs))]]
    if n_objects == 2:
        allowed = [p for p in other_pairs if p[0] != pairs[0][0]]
        pairs.append(allowed[rng.integers(len(allowed))])
    cells = [int(c) for c in rng.permutation(len(POSITIONS))[:n_objects]]
    sizes = [list(SIZES)[rng.integers(len(SIZES))] for _ in range(n_objects)]
    objects = [
        {"color": color, "shape": shape, "position": POSITIONS[cell], "size": size}
        for (color, shape), cell, size in zip(pairs, cells, sizes)
    ]
    centers = _place(rng, cells, [SIZES[s] for s in sizes])
    return {"objects": objects, "centers": centers, "template": int(template)}


def sample_scene(seed: int, split: str, index: int) -> tuple[dict, str]:
    """Scene and caption of sample `index` of `split` (deterministic in (seed, split, index)).

    train:   every object is a seen colour-shape pair (HELDOUT_PAIRS never appear).
    heldout: the first object is a held-out pair (uniform over HELDOUT_PAIRS); a second
             object, if any, is any pair (seen or held-out) with a different colour.
    Both: 1 object with p=0.6 else 2; distinct cells; sizes uniform; template uniform;
    two-object clause order uniform.
    """
    rng = sample_rng(seed, split, index)
    n_objects = 1 if rng.random() < P_SINGLE_OBJECT else 2
    template = int(rng.integers(len(TEMPLATES)))
    if split == "train":
        scene = _make_scene(rng, n_objects, SEEN_PAIRS, SEEN_PAIRS, template)
    else:
        scene = _make_scene(rng, n_objects, HELDOUT_PAIRS, ALL_PAIRS, template)
    order = [int(i) for i in rng.permutation(n_objects)]
    return scene, make_caption(scene, template, order)


EVAL_SETS = ("seen", "heldout", "two")


def eval_scenes(kind: str, n: int, seed: int = 0) -> list[dict]:
    """Deterministic evaluation scenes for the benchmark (prompt = canonical_caption(scene)).

    seen:    single objects over all 25 seen pairs x 9 positions x 2 sizes (450 combinations),
             in a seeded shuffled order, cycled when n > 450;
    heldout: single objects over the 3 held-out pairs x 9 x 2 (54 combinations), likewise;
    two:     two-object scenes of seen pairs (distinct colours and cells), drawn at random.
    Item i depends only on (kind, seed, i), so a longer set extends a shorter one.
    """
    if kind not in EVAL_SETS:
        raise ValueError(f"eval set kind={kind!r} is unknown; choose one of {EVAL_SETS}")
    check_int("n", n, 0)
    kind_id = 100 + EVAL_SETS.index(kind)  # disjoint from the split ids
    scenes = []
    if kind == "two":
        for i in range(n):
            rng = np.random.default_rng([int(seed), kind_id, i])
            scenes.append(_make_scene(rng, 2, SEEN_PAIRS, SEEN_PAIRS, CANONICAL_TEMPLATE))
        return scenes
    pairs = SEEN_PAIRS if kind == "seen" else HELDOUT_PAIRS
    combos = list(itertools.product(pairs, range(len(POSITIONS)), SIZES))
    perm = np.random.default_rng([int(seed), kind_id]).permutation(len(combos))
    for i in range(n):
        (color, shape), cell, size = combos[perm[i % len(combos)]]
        rng = np.random.default_rng([int(seed), kind_id, i])
        obj = {"color": color, "shape": shape, "position": POSITIONS[cell], "size": size}
        centers = _place(rng, [cell], [SIZES[size]])
        scenes.append({"objects": [obj], "centers": centers, "template": CANONICAL_TEMPLATE})
    return scenes


def eval_prompts(kind: str, n: int, seed: int = 0) -> list[dict]:
    """`eval_scenes` paired with their canonical prompts: [{"caption": str, "scene": dict}]."""
    return [{"caption": canonical_caption(s), "scene": s} for s in eval_scenes(kind, n, seed)]


# ----------------------------------------------------------------------------------------
# Rendering


def _check_scene(scene: dict) -> None:
    objects, centers = scene.get("objects"), scene.get("centers")
    if not objects or centers is None or len(centers) != len(objects):
        raise ValueError(
            "render_scene needs a scene with 'objects' and one [x, y] entry per object in "
            f"'centers' (fractions of the side); got {scene!r}"
        )
    for obj in objects:
        if obj.get("color") not in COLORS or obj.get("shape") not in SHAPES or (
            obj.get("size") not in SIZES
        ):
            raise ValueError(
                f"object {obj!r} has an unknown color/shape/size; allowed colors "
                f"{list(COLORS)}, shapes {list(SHAPES)}, sizes {list(SIZES)}"
            )


def render_scene(scene: dict, size: int = 64) -> Image.Image:
    """Render a scene on an S x S RGB canvas (S=size): draw at 4x, Lanczos-downsample."""
    size = check_int("size", size, 8, meaning="canvas side in pixels")
    _check_scene(scene)
    hi = SUPERSAMPLE * int(size)
    canvas = Image.new("RGB", (hi, hi), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj, (cx, cy) in zip(scene["objects"], scene["centers"]):
        side = SIZES[obj["size"]] * hi
        # the box covers pixels [x0, x1) x [y0, y1) of the 4x canvas
        x0, y0 = round(cx * hi - side / 2), round(cy * hi - side / 2)
        x1, y1 = round(cx * hi + side / 2), round(cy * hi + side / 2)
        color, shape = COLORS[obj["color"]], obj["shape"]
        xm, ym = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
        if shape == "圆形":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=color)
        elif shape == "正方形":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=color)
        elif shape == "三角形":  # apex top-centre, base on the box bottom
            draw.polygon([(xm, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=color)
        else:  # 菱形: vertices at the box's edge midpoints
            draw.polygon([(xm, y0), (x1 - 1, ym), (xm, y1 - 1), (x0, ym)], fill=color)
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float tensor [3, S, S] in [0, 1]."""
    array = np.asarray(image, dtype=np.uint8)  # (S, S, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


# ----------------------------------------------------------------------------------------
# Dataset


class ShapesZh(torch.utils.data.Dataset):
    """Map-style shapes-zh: item i = dict(image, caption, scene, index), rendered on demand.

    image is a PIL RGB image of side `size`, or a float tensor [3, S, S] in [0, 1] with
    as_tensor=True. scene = {"objects", "centers", "template"} (see module docstring).
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 64,
        length: int = 10_000,
        seed: int = 0,
        as_tensor: bool = False,
    ):
        check_split(split)
        check_int("length", length, 0)
        check_int("seed", seed, 0)
        check_int("size", size, 8, meaning="canvas side in pixels")
        self.split, self.size, self.length, self.seed = split, size, length, seed
        self.as_tensor = as_tensor

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for ShapesZh of length {self.length}")
        scene, caption = sample_scene(self.seed, self.split, index)
        image = render_scene(scene, self.size)
        if self.as_tensor:
            image = pil_to_tensor(image)
        return {"image": image, "caption": caption, "scene": scene, "index": int(index)}


# ----------------------------------------------------------------------------------------
# CLI: write WebDataset shards

CLI_DEFAULTS: dict[str, Any] = {
    "out": None, "n": 1000, "size": 64, "split": "train", "seed": 0, "shard_size": 1000,
}
CLI_USAGE = (
    "usage: python -m cogview.data.shapes out=DIR [n=1000] [size=64] "
    "[split=train|heldout] [seed=0] [shard_size=1000]"
)


def parse_cli_args(argv: list[str]) -> dict[str, Any]:
    """Parse Hydra-style key=value arguments; ValueError naming the bad key or value."""
    args = dict(CLI_DEFAULTS)
    for token in argv:
        key, sep, value = token.partition("=")
        if not sep:
            raise ValueError(f"argument {token!r} is not key=value. {CLI_USAGE}")
        if key not in CLI_DEFAULTS:
            raise ValueError(
                f"unknown option {key!r}; allowed options: {', '.join(CLI_DEFAULTS)}. {CLI_USAGE}"
            )
        if key == "out":
            if not value:
                raise ValueError("out= needs a directory path")
            args[key] = value
        elif key == "split":
            if value not in SPLITS:
                raise ValueError(f"split={value!r} is not valid; choose one of {list(SPLITS)}")
            args[key] = value
        else:
            minimum = {"n": 1, "size": 8, "seed": 0, "shard_size": 1}[key]
            try:
                value = int(value)
            except ValueError:
                pass  # check_int names the value
            args[key] = check_int(key, value, minimum)
    if args["out"] is None:
        raise ValueError(f"missing required option out=DIR. {CLI_USAGE}")
    return args


def sample_record(seed: int, split: str, index: int, size: int) -> dict[str, Any]:
    """One WebDataset record: key %09d, .png bytes, .txt caption, .json metadata."""
    scene, caption = sample_scene(seed, split, index)
    buffer = io.BytesIO()
    render_scene(scene, size).save(buffer, format="PNG")
    meta = dict(scene, split=split, seed=seed, index=index, size=size)
    return {
        "__key__": f"{index:09d}",
        "png": buffer.getvalue(),
        "txt": caption,
        "json": json.dumps(meta, ensure_ascii=False),
    }


def write_shards(
    out: str, n: int, size: int = 64, split: str = "train", seed: int = 0,
    shard_size: int = 1000, progress: bool = True,
) -> list[str]:
    """Write samples 0..n-1 as shards `shapes-zh-{split}-%06d.tar`; returns their paths.

    Each shard is written to a temporary name and renamed when complete, so a reader never
    sees a partial shard.
    """
    check_split(split)
    os.makedirs(out, exist_ok=True)
    paths = []
    bar = tqdm(total=n, desc=f"shapes-zh {split} {size}px", unit="img", disable=not progress)
    for shard, start in enumerate(range(0, n, shard_size)):
        path = os.path.join(out, f"shapes-zh-{split}-{shard:06d}.tar")
        tmp = path + ".tmp"
        with wds.TarWriter(tmp) as writer:
            for index in range(start, min(start + shard_size, n)):
                writer.write(sample_record(seed, split, index, size))
                bar.update(1)
        os.replace(tmp, path)
        paths.append(path)
    bar.close()
    return paths


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on a bad argument)."""
    try:
        args = parse_cli_args(sys.argv[1:] if argv is None else argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    paths = write_shards(**args)
    pattern = f"shapes-zh-{args['split']}-{{000000..{len(paths) - 1:06d}}}.tar"
    print(f"wrote {args['n']} samples in {len(paths)} shards: {os.path.join(args['out'], pattern)}")
    return 0


if __name__ == "__main__":
    from cogview.cli import run_command  # the same --help and exit codes as `cogview shapes`

    sys.exit(run_command("shapes", sys.argv[1:]))
