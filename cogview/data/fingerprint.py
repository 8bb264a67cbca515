"""Tokenizer fingerprints: short hashes that tie pretokenized shards to the tokenizers behind them.

Shards hold token ids, not pixels or text, so they are only meaningful for the exact VQ-VAE and
text tokenizer that produced them. The pretokenizer records both fingerprints in the shards'
manifest; the DataModule compares them with the model's configured tokenizers before training.

- image tokenizer: sha256 over the VQ-VAE config (normalised through `VQVAEConfig`) and every
  tensor of its state dict (name, dtype, shape, bytes), in key order. A model in memory and the
  directory `save_pretrained` wrote for it give the same fingerprint.
- text tokenizer: the tokenizer's own `fingerprint()` (kind + vocabulary / model file bytes).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from cogview.exports import MODEL_WEIGHTS
from cogview.modules.vqvae import read_vqvae_config

FINGERPRINT_LENGTH = 16  # hex digits of sha256 kept: 64 bits, ample to tell tokenizers apart


class TokenizerMismatchError(ValueError):
    """Shards tokenized with other tokenizers than the ones the model is configured with."""


def _hash_state(config: dict[str, Any], state: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(config, sort_keys=True).encode("utf-8"))
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode("utf-8"))
        # raw bytes of the tensor (viewed as uint8 so that bf16 and friends hash too)
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:FINGERPRINT_LENGTH]


def image_tokenizer_fingerprint(vqvae: Any) -> str:
    """Fingerprint of a VQ-VAE: a `VQVAE` model or a directory written by `save_pretrained`
    (its config through the VQ-VAE's own reader, its weights without building the model)."""
    if isinstance(vqvae, torch.nn.Module):
        return _hash_state(vqvae.config.to_dict(), vqvae.state_dict())
    directory = Path(vqvae)
    config = read_vqvae_config(directory).to_dict()
    weights_path = directory / MODEL_WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"{weights_path} not found: the image tokenizer must be a directory written by "
            "VQVAE.save_pretrained (config.json + model.safetensors)")
    return _hash_state(config, load_file(str(weights_path)))


def text_tokenizer_fingerprint(tokenizer: Any) -> str:
    """Fingerprint of a text tokenizer (its own `fingerprint()`)."""
    return tokenizer.fingerprint()


def check_shard_set(shard_set, expected: Mapping[str, str | None],
                    expected_from: Mapping[str, str] | None = None) -> None:
    """``check_fingerprints`` on a ``ShardSet``'s manifest; a set without a manifest cannot be
    checked, which is an error when any fingerprint is expected."""
    where = shard_set.manifest_path or str(shard_set.urls[0])
    if shard_set.manifest is None:
        if any(expected.values()):
            raise ValueError(
                f"cannot check the tokenizer fingerprints of shards {where}: no manifest.json "
                "beside them; pass data.manifest=PATH, or set data.check_fingerprints=false to "
                "train without the check")
        return
    check_fingerprints(shard_set.manifest.get("fingerprints", {}), expected, where, expected_from)


def check_fingerprints(
    found: Mapping[str, str | None],
    expected: Mapping[str, str | None],
    where: str,
    expected_from: Mapping[str, str] | None = None,
) -> None:
    """Raise TokenizerMismatchError naming both fingerprints when shards and model disagree.

    `found`/`expected` map "image_tokenizer" / "text_tokenizer" to fingerprints; a None in
    `expected` is not checked. `where` names the shards (e.g. their manifest path) and
    `expected_from` says where each expected fingerprint came from (e.g. the vqvae directory).
    """
    expected_from = expected_from or {}
    problems = []
    for name in ("image_tokenizer", "text_tokenizer"):
        want = expected.get(name)
        if want is None:
            continue
        got = found.get(name)
        if got != want:
            source = f" ({expected_from[name]})" if name in expected_from else ""
            problems.append(
                f"{name.replace('_', ' ')}: shards have fingerprint {got}, the model's configured "
                f"tokenizer{source} has {want}"
            )
    if problems:
        raise TokenizerMismatchError(
            f"shards {where} were tokenized with other tokenizers than the model uses: "
            + "; ".join(problems)
            + ". Re-run `python -m cogview.data.pretokenize` with the model's tokenizers, or "
            "point the data config at the tokenizers these shards were made with."
        )
