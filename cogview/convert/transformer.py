"""CogView transformer checkpoints (cogview-base, -caption, -sr) -> a cogview export directory.

Source layouts (weights under the checkpoint's "module" entry):

    Megatron/DeepSpeed (CogView)        SwissArmyTransformer            cogview
    word_embeddings.weight              transformer.word_embeddings.*   word_embeddings.weight
    transformer.position_embeddings.*   (same)                          position_embeddings.*
    transformer.layers.{i}.<part>       (same)                          layers.{i}.<part>
    transformer.final_layernorm.*       (same)                          final_layernorm.*

with <part> one of input_layernorm, attention.query_key_value (rows Q, K, V, each grouped by
head: exactly our layout), attention.dense, third_layernorm, post_attention_layernorm,
mlp.dense_h_to_4h, mlp.dense_4h_to_h, fourth_layernorm (.weight / .bias). The output head is
tied to word_embeddings in both. So converting is a rename: every tensor is written out as it
is (dtype kept, fp16 for the released models), straight from the memory-mapped checkpoint.

Dims come from the tensors' shapes (layers, hidden size, vocabulary, positions, MLP width);
the head count cannot be read from shapes and is a parameter (``heads``, CogView: 40). The
remaining settings (Sandwich-LN unless the checkpoint lacks third/fourth LayerNorms,
PB-relax, eps 1e-5, GELU tanh) come from the ``cogview-4b`` model preset.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from cogview.config import CONF_DIR
from cogview.convert.checkpoint import (
    CheckpointError,
    extract_state_dict,
    find_model_states,
    load_torch_file,
    write_safetensors,
)
from cogview.convert.vqvae import convert_vqvae
from cogview.exports import (
    IMAGE_TOKENIZER_DIR,
    MODEL_CONFIG,
    MODEL_WEIGHTS,
    TEXT_TOKENIZER_DIR,
    write_export_info,
)
from cogview.model_card import write_model_card
from cogview.modules.transformer import CONFIG_KIND, CogViewTransformer, TransformerConfig
from cogview.modules.vqvae import read_vqvae_config
from cogview.tokenization import SentencePieceTokenizer, load_text_tokenizer
from cogview.tokenization.layouts import TASKS
from cogview.tokenization.vocab import CogViewVocab
from cogview.validate import check_int, grid_side

log = logging.getLogger(__name__)

LAYER_KEY = re.compile(r"transformer\.layers\.(\d+)\.(.+)")
LAYER_PARTS = tuple(f"{module}.{param}" for module in (
    "input_layernorm", "attention.query_key_value", "attention.dense", "third_layernorm",
    "post_attention_layernorm", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "fourth_layernorm",
) for param in ("weight", "bias"))
# Tokens a layout adds around its text and image spans (t2i: [ROI1] [BASE] [BOI1] ... [EOI1];
# caption: [BASE] [BOI1] ... [EOI1] [ROI1]; sr: 9 command tokens around text, low-res, high-res).
LAYOUT_COMMANDS = {"t2i": 4, "caption": 4, "sr": 9}


def load_preset(name: str) -> dict:
    """cogview/conf/model/<name>.yaml as a dict (the settings shapes cannot tell)."""
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
        raise FileNotFoundError(f"preset={name!r}: {path} not found; known presets: {known}")
    return yaml.safe_load(path.read_text())


# ------------------------------------------------------------------------------------------------
# key names


def detect_word_embeddings_key(state: dict, source: str) -> str:
    """``word_embeddings.weight`` (Megatron/CogView) or ``transformer.word_embeddings.weight``
    (SwissArmyTransformer), whichever the checkpoint has."""
    for key in ("word_embeddings.weight", "transformer.word_embeddings.weight"):
        if key in state:
            return key
    raise CheckpointError(
        f"{source} has no word_embeddings.weight (Megatron/CogView layout) nor "
        "transformer.word_embeddings.weight (SwissArmyTransformer layout); is it a CogView "
        f"transformer checkpoint? First keys: {sorted(state)[:8]}")


def cogview_name(name: str, embeddings_key: str) -> str:
    """Our parameter name -> the checkpoint's (for the source layout of ``embeddings_key``)."""
    if name == "word_embeddings.weight":
        return embeddings_key
    return "transformer." + name


def our_name(key: str, embeddings_key: str) -> str | None:
    """The checkpoint's key -> our parameter name; None for a key we do not know."""
    if key == embeddings_key:
        return "word_embeddings.weight"
    if key in ("transformer.position_embeddings.weight", "transformer.final_layernorm.weight",
               "transformer.final_layernorm.bias"):
        return key.removeprefix("transformer.")
    match = LAYER_KEY.fullmatch(key)
    if match and match.group(2) in LAYER_PARTS:
        return f"layers.{match.group(1)}.{match.group(2)}"
    return None


def strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drops a "module." that DataParallel/DeepSpeed wrappers put before every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k.removeprefix("module."): v for k, v in state.items()}
    return state


# ------------------------------------------------------------------------------------------------
# config from shapes


def config_from_state(state: dict[str, torch.Tensor], heads: int, source: str,
                      preset: str = "cogview-4b") -> TransformerConfig:
    """A TransformerConfig whose dims are read from the checkpoint's shapes."""
    embeddings_key = detect_word_embeddings_key(state, source)
    vocab_size, hidden_size = state[embeddings_key].shape
    positions_key = "transformer.position_embeddings.weight"
    if positions_key not in state:
        raise CheckpointError(f"{source} lacks {positions_key} (learned positions)")
    layers = sorted({int(m.group(1)) for k in state if (m := LAYER_KEY.fullmatch(k))})
    if not layers:
        raise CheckpointError(f"{source} has no transformer.layers.<i>.* keys")
    if layers != list(range(len(layers))):
        gaps = sorted(set(range(layers[-1] + 1)) - set(layers))
        raise CheckpointError(f"{source}: transformer.layers.{gaps[0]}.* is missing (found "
                              f"layers {layers[0]}..{layers[-1]} with gaps {gaps})")
    inner_key = "transformer.layers.0.mlp.dense_h_to_4h.weight"
    if inner_key not in state:
        raise CheckpointError(f"{source} lacks {inner_key} (its rows give the MLP width)")
    inner = state[inner_key].shape[0]
    if inner % hidden_size:
        raise CheckpointError(f"{source}: {inner_key} has {inner} rows, not a multiple of the "
                              f"hidden size {hidden_size} read from {embeddings_key}")
    check_int("heads", heads, meaning="CogView: 40")
    if hidden_size % heads:
        raise ValueError(
            f"heads={heads} does not divide the hidden size {hidden_size} read from "
            f"{embeddings_key}; pass the head count the model was trained with (heads=<n>; "
            "CogView's 4B models: 40 heads of 64)")
    sandwich = [f"transformer.layers.{i}.third_layernorm.weight" in state for i in layers]
    if any(sandwich) and not all(sandwich):
        raise CheckpointError(f"{source}: some layers have third_layernorm and some do not "
                              f"(layers {[i for i, s in zip(layers, sandwich) if not s]} lack it)")
    settings = {k: v for k, v in load_preset(preset).items() if k != "name"}
    settings.update(num_layers=len(layers), hidden_size=int(hidden_size), num_heads=heads,
                    max_positions=int(state[positions_key].shape[0]),
                    vocab_size=int(vocab_size), mlp_ratio=inner // hidden_size,
                    sandwich_ln=all(sandwich))
    return TransformerConfig.from_dict(settings)


def match_state(state: dict[str, torch.Tensor], config: TransformerConfig,
                source: str) -> dict[str, torch.Tensor]:
    """Renames the checkpoint's tensors to our names, checking every key and shape.

    Raises CheckpointError listing unknown keys, missing keys and wrong shapes, each under
    the checkpoint's own name.
    """
    embeddings_key = detect_word_embeddings_key(state, source)
    with torch.device("meta"):  # shapes only, no memory
        expected = {k: tuple(v.shape) for k, v in CogViewTransformer(config).state_dict().items()}
    renamed, seen, unknown, wrong = {}, set(), [], []
    for key, tensor in state.items():
        name = our_name(key, embeddings_key)
        if name is None or name not in expected:
            unknown.append(key)
            continue
        seen.add(name)
        if tuple(tensor.shape) != expected[name]:
            wrong.append(f"{key}: shape {tuple(tensor.shape)}, expected {expected[name]}")
        else:
            renamed[name] = tensor
    missing = [cogview_name(name, embeddings_key) for name in expected if name not in seen]
    if unknown or missing or wrong:
        dims = (f"{config.num_layers} layers, hidden {config.hidden_size}, {config.num_heads} "
                f"heads, vocabulary {config.vocab_size}, {config.max_positions} positions, "
                f"sandwich_ln={config.sandwich_ln}")
        lines = [f"{source} does not match a CogView transformer ({dims}, read from its shapes):"]
        for title, items in (("unknown keys", unknown), ("missing keys", missing),
                             ("wrong shapes", wrong)):
            if items:
                more = f"; ... (+{len(items) - 8})" if len(items) > 8 else ""
                shown = "; ".join(items[:8]) + more
                lines.append(f"  {title} ({len(items)}): {shown}")
        raise CheckpointError("\n".join(lines))
    return {name: renamed[name] for name in expected}  # in our order


# ------------------------------------------------------------------------------------------------
# the export directory


def load_tokenizer(tokenizer: str | Path | None):
    """CogView's SentencePiece file (cog-pretrain.model) or a saved text_tokenizer/ directory."""
    if not tokenizer:
        raise ValueError("tokenizer= is required: the SentencePiece model the checkpoint was "
                         "trained with (CogView: cog-pretrain.model)")
    path = Path(tokenizer)
    if path.is_dir():
        return load_text_tokenizer(path)
    return SentencePieceTokenizer(path)


def prepare_vqvae(vqvae: str | Path | None, target: Path, trust_pickle: bool) -> Path:
    """The VQ-VAE export to ship with the model: a converted directory as it is, or CogView's
    .pt file converted into ``target``."""
    if not vqvae:
        raise ValueError("vqvae= is required: a converted VQ-VAE directory (python -m "
                         "cogview.convert kind=vqvae ...) or CogView's vqvae_hard_biggerset_011.pt")
    vqvae = Path(vqvae)
    if vqvae.is_file():
        return convert_vqvae(vqvae, target, trust_pickle=trust_pickle)
    try:
        read_vqvae_config(vqvae)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"vqvae={vqvae}: {err}; or give a VQ-VAE directory written by "
                                "python -m cogview.convert kind=vqvae") from None
    except ValueError as err:
        raise ValueError(f"vqvae={vqvae}: {err}") from None
    return vqvae


def copy_vqvae(vqvae_dir: Path, target: Path) -> None:
    """Copies a VQ-VAE directory to ``target`` (nothing to do when it is already there)."""
    if vqvae_dir.resolve() == target.resolve():
        return
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(vqvae_dir, target)


def default_max_text_len(task: str, max_positions: int, image_tokens: int) -> int | None:
    """The longest text that still fits the task's layout into the model's positions
    (CogView t2i: 1089 - 1024 - 4 = 61); None when it does not fit (pass max_text_len)."""
    lowres = image_tokens // 4 if task == "sr" else 0
    room = max_positions - image_tokens - lowres - LAYOUT_COMMANDS[task]
    return room if room > 0 else None


def convert_transformer(src: str | Path, out: str | Path, vqvae: str | Path | None = None,
                        tokenizer: str | Path | None = None, heads: int = 40, task: str = "t2i",
                        image_tokens: int = 1024, max_text_len: int | None = None,
                        caption_end_token: str | None = None, preset: str = "cogview-4b",
                        trust_pickle: bool = False) -> Path:
    """Converts a CogView transformer checkpoint into an export directory ``out`` that
    ``Pipeline.from_pretrained(out)`` loads (model.safetensors, config.json, text_tokenizer/,
    vqvae/, cogview.json).

    src: the checkpoint directory (with latest_checkpointed_iteration.txt or latest) or its
    mp_rank_00_model_states.pt. vqvae: a converted VQ-VAE directory or CogView's VQ-VAE .pt.
    tokenizer: cog-pretrain.model. task: t2i | caption | sr (which release it is).
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {list(TASKS)} (cogview-base: t2i, "
                         "cogview-caption: caption, cogview-sr: sr)")
    grid_side(image_tokens)
    out = Path(out)
    path = find_model_states(src)
    text_tokenizer = load_tokenizer(tokenizer)  # fail on bad arguments before the big load
    vqvae_dir = prepare_vqvae(vqvae, out / IMAGE_TOKENIZER_DIR, trust_pickle)
    num_codes = read_vqvae_config(vqvae_dir).num_codes
    vocab = CogViewVocab.for_tokenizer(text_tokenizer, num_codes)
    if caption_end_token is not None and caption_end_token not in vocab.commands:
        raise ValueError(f"caption_end_token={caption_end_token!r} is not a command token; "
                         f"use one of {list(vocab.commands)} (or null for [SEP])")

    state = strip_module_prefix(extract_state_dict(load_torch_file(path, trust_pickle), path))
    config = config_from_state(state, heads, str(path), preset)
    if vocab.size != config.vocab_size:
        raise CheckpointError(
            f"{path}: word_embeddings has {config.vocab_size} rows but the vocabulary of "
            f"vqvae={vqvae} ({num_codes} codes) and tokenizer={tokenizer} "
            f"({text_tokenizer.vocab_size} pieces) has {vocab.size} ids; give the VQ-VAE and "
            "SentencePiece model this checkpoint was trained with (CogView: 8192 codes, "
            "cog-pretrain.model with 50,000 pieces -> 58240)")
    weights = match_state(state, config, str(path))
    if max_text_len is None:
        max_text_len = default_max_text_len(task, config.max_positions, image_tokens)
        if max_text_len is None:
            log.warning("task=%s with image_tokens=%d does not fit %d positions; cogview.json "
                        "gets max_text_len=null (pass max_text_len=)", task, image_tokens,
                        config.max_positions)

    out.mkdir(parents=True, exist_ok=True)
    copy_vqvae(vqvae_dir, out / IMAGE_TOKENIZER_DIR)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in weights.values()})
    write_safetensors(weights, out / MODEL_WEIGHTS, metadata={"format": "pt"})
    model_config = {"kind": CONFIG_KIND, "name": preset if _matches_preset(config, preset)
                    else f"{preset} (dims read from the checkpoint)", **asdict(config)}
    (out / MODEL_CONFIG).write_text(json.dumps(model_config, indent=2, ensure_ascii=False))
    text_tokenizer.save(out / TEXT_TOKENIZER_DIR)
    info = {"task": task, "vocab": vocab.to_dict(), "max_text_len": max_text_len,
            "text_slots": None,  # CogView's sequential positions
            "image_tokens": image_tokens, "caption_end_token": caption_end_token,
            "loss_vocab": "full",  # CogView scored every target against the whole vocabulary
            "converted_from": {"checkpoint": str(Path(path).resolve()), "dtype": dtypes,
                               "heads": heads}}
    write_export_info(out, info)
    write_model_card(out)
    log.info("converted %s (%s, %d layers, hidden %d) to %s", path, "/".join(dtypes),
             config.num_layers, config.hidden_size, out)
    return out


def _matches_preset(config: TransformerConfig, preset: str) -> bool:
    values = load_preset(preset)
    return all(getattr(config, k) == values[k] for k in
               ("num_layers", "hidden_size", "num_heads", "max_positions", "vocab_size",
                "mlp_ratio", "sandwich_ln") if k in values)
