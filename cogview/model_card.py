"""The model card every export carries: ``README.md`` with Hub metadata (library, tags,
language, pipeline tag), the model's config, its vocabulary and layout, the training data's
fingerprints, and the shapes-zh scores once ``cogview infer task=eval`` has run on it.

The card is rendered from the export's own files (``config.json``, ``cogview.json`` and,
after an evaluation, ``eval_scores.json``), so whoever writes an export (training, the
converter, ``Pipeline.save_pretrained``) calls ``write_model_card(directory)`` last, and the
evaluation rewrites it with its scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from cogview.exports import EXPORT_CONFIG, MODEL_CONFIG, read_export_info

CARD_NAME = "README.md"
SCORES_NAME = "eval_scores.json"  # the shapes-zh benchmark's results for this export's task
PIPELINE_TAGS = {"t2i": "text-to-image", "caption": "image-to-text", "sr": "image-to-image"}
TASK_TITLES = {"t2i": "text-to-image", "caption": "captioning", "sr": "super-resolution"}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _numbers(result: dict, prefix: str = "") -> list[tuple[str, float]]:
    """The numbers in a benchmark result (nested dicts flattened to a.b names)."""
    found = []
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            found.append((name, float(value)))
        elif isinstance(value, dict):
            found += _numbers(value, name + ".")
    return found


def render_model_card(info: dict, config: dict, scores: dict | None = None) -> str:
    """The card's text from ``cogview.json`` (info), ``config.json`` and the eval scores."""
    task = info.get("task", "t2i")
    front = {"library_name": "cogview", "language": ["zh"],
             "pipeline_tag": PIPELINE_TAGS.get(task, "text-to-image"),
             "tags": ["cogview", task, "vq-vae", "autoregressive", "chinese"]}
    vocab = info.get("vocab", {})
    lines = ["---", yaml.safe_dump(front, allow_unicode=True, sort_keys=False).rstrip(), "---",
             "", f"# cogview {TASK_TITLES.get(task, task)} model", "",
             "A CogView-style decoder-only transformer over text ids and VQ-VAE image codes, "
             "trained with CogView's recipe (Sandwich-LN, PB-relax) by cogview.", "", "```python", "from cogview import Pipeline", "",
             'pipe = Pipeline.from_pretrained("<this directory or Hub repository>")']
    lines += {"t2i": ['images = pipe("左上角有一个大的红色圆形", num_images=4).images'],
              "caption": ['captions = pipe.caption(["image.png"])'],
              "sr": ['images = pipe.super_resolve(["image.png"], "一个红色的圆形").images']
              }.get(task, [])
    lines += ["```", "", "## Model", "",
              "| setting | value |", "| --- | --- |"]
    for key in ("num_layers", "hidden_size", "num_heads", "max_positions", "vocab_size",
                "sandwich_ln", "pb_relax", "pb_relax_alpha", "attention"):
        if key in config:
            lines.append(f"| {key} | {config[key]} |")
    lines += [f"| image codes | {vocab.get('num_image_codes')} |",
              f"| text ids | {vocab.get('text_vocab_size')} |",
              f"| image tokens per image | {info.get('image_tokens')} |",
              f"| max text length | {info.get('max_text_len')} |",
              f"| loss vocabulary | {info.get('loss_vocab', 'full')} |", ""]
    data = info.get("data")
    lines += ["## Training data", ""]
    if data:
        lines += [f"- shards: `{data.get('train_shards')}` ({data.get('num_samples')} samples)"]
        for name, value in sorted((data.get("fingerprints") or {}).items()):
            lines.append(f"- {name.replace('_', ' ')} fingerprint: `{value}`")
    elif info.get("converted_from"):
        lines.append(f"Converted from CogView's released checkpoint "
                     f"`{info['converted_from'].get('checkpoint')}`.")
    else:
        lines.append("Not recorded.")
    lines += ["", "## Evaluation", ""]
    if scores:
        lines += ["shapes-zh benchmark (`cogview infer task=eval`), per split:", "",
                  "| split | metric | value |", "| --- | --- | --- |"]
        for split, result in scores.items():
            for metric, value in _numbers(result):
                lines.append(f"| {split} | {metric} | {value:.4g} |")
    else:
        lines.append("Not evaluated yet: `cogview infer task=eval ckpt=<this directory>` runs "
                     "the shapes-zh benchmark and writes its scores here.")
    lines += ["", "## Configuration", "", "```json",
              json.dumps({MODEL_CONFIG: config, EXPORT_CONFIG: info}, indent=1,
                         ensure_ascii=False), "```", ""]
    return "\n".join(lines)


def write_model_card(directory: str | Path, scores: dict | None = None) -> Path:
    """(Re)writes ``<directory>/README.md``; ``scores`` (the benchmark's results for the
    export's task) are saved beside it first, and kept for later rewrites."""
    directory = Path(directory)
    if scores is not None:
        (directory / SCORES_NAME).write_text(json.dumps(scores, indent=1, ensure_ascii=False),
                                             encoding="utf-8")
    info = read_export_info(directory)
    config = _read_json(directory / MODEL_CONFIG)
    path = directory / CARD_NAME
    path.write_text(render_model_card(info, config, _read_json(directory / SCORES_NAME)),
                    encoding="utf-8")
    return path
