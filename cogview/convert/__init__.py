"""Import of CogView's released checkpoints into cogview's formats.

    python -m cogview.convert kind=vqvae src=vqvae_hard_biggerset_011.pt out=converted/vqvae
    python -m cogview.convert kind=transformer src=cogview-base out=converted/cogview-base \
        vqvae=converted/vqvae tokenizer=cog-pretrain.model [task=t2i] [heads=40]

The transformer becomes an export directory (``Pipeline.from_pretrained(out)``, ``infer.py
ckpt=out``); the VQ-VAE a directory ``VQVAE.from_pretrained`` loads. Loading is memory-mapped
and weights-only (``trust_pickle=true`` to lift the latter); see cogview/conf/convert.yaml.
"""

from cogview.convert.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    find_model_states,
    load_torch_file,
    write_safetensors,
)
from cogview.convert.transformer import config_from_state, convert_transformer
from cogview.convert.vqvae import convert_vqvae

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "find_model_states",
    "load_torch_file",
    "write_safetensors",
    "config_from_state",
    "convert_transformer",
    "convert_vqvae",
]
