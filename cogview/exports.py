"""The export format, in one place. An export directory holds

    config.json, model.safetensors   the transformer (CogViewTransformer.save_pretrained)
    text_tokenizer/                  the text tokenizer (its save(); load_text_tokenizer reads it)
    vqvae/                           the image tokenizer (VQVAE.save_pretrained)
    cogview.json                     task, vocabulary, layout settings, training data
    README.md                        the model card (cogview.model_card)

Training (SequenceTask.export), the converter and Pipeline.save_pretrained write exports with
``write_export_info``; Pipeline.from_pretrained, init_from and the model card read them with
``read_export_info``; ``find_exports`` finds one or the ``make demo`` folder of three.
"""

from __future__ import annotations

import json
from pathlib import Path

from cogview.tokenization.layouts import TASKS

EXPORT_CONFIG = "cogview.json"
MODEL_CONFIG = "config.json"  # a model's architecture (transformer or VQ-VAE)
MODEL_WEIGHTS = "model.safetensors"
TEXT_TOKENIZER_DIR = "text_tokenizer"
IMAGE_TOKENIZER_DIR = "vqvae"


def is_export(directory: str | Path) -> bool:
    return (Path(directory) / EXPORT_CONFIG).is_file()


def read_export_info(directory: str | Path) -> dict:
    """An export's ``cogview.json``; FileNotFoundError naming the directory when it has none."""
    path = Path(directory) / EXPORT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a cogview export directory "
            "(cogview train task=t2i|caption|sr writes one to <run>/export)")
    return json.loads(path.read_text(encoding="utf-8"))


def write_export_info(directory: str | Path, info: dict) -> Path:
    """Writes ``cogview.json`` (the tokenizer folder names filled in when missing)."""
    info = {"text_tokenizer": TEXT_TOKENIZER_DIR, "image_tokenizer": IMAGE_TOKENIZER_DIR, **info}
    path = Path(directory) / EXPORT_CONFIG
    path.write_text(json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def find_exports(path: str | Path) -> dict[str, Path]:
    """``path`` -> {task: export dir}: one export directory (its cogview.json names the task) or
    a folder holding t2i/, caption/ and sr/ exports (the ``make demo`` artifacts/demo layout)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{path} is not a directory: pass an export directory "
                                "(<run>/export) or a folder with t2i/, caption/, sr/ exports "
                                "(`make demo` writes artifacts/demo)")
    candidates = [root] if (root / EXPORT_CONFIG).is_file() else [root / t for t in TASKS]
    found: dict[str, Path] = {}
    for directory in candidates:
        if not (directory / EXPORT_CONFIG).is_file():
            continue
        task = read_export_info(directory).get("task")
        if task not in TASKS:
            raise ValueError(f"{directory / EXPORT_CONFIG} says task={task!r}; expected one of "
                             f"{TASKS}")
        if directory != root and task != directory.name:
            raise ValueError(f"{directory} holds a {task} export; move it to {root / task}")
        found[task] = directory
    if not found:
        raise FileNotFoundError(
            f"{path} holds no cogview export (looked for {EXPORT_CONFIG} in it and in its "
            f"{', '.join(t + '/' for t in TASKS)} folders); train one with "
            "`python train.py task=t2i` (it exports to <run>/export) or run `make demo`")
    return found
