"""CogView's VQ-VAE checkpoint (vqvae_hard_biggerset_011.pt) -> a VQ-VAE export directory.

    module.enc_b.blocks.{0,2,4,6}.{weight,bias}    encoder convs (3 stride-2 4x4, then 1x1)
    module.quantize_t.embed        [D, K]          codebook, one code per column
    module.quantize_t.cluster_size [K]             EMA counts
    module.quantize_t.embed_avg    [D, K]          EMA sums
    module.dec.blocks.{0,2,4,6}.{weight,bias}      decoder (3 stride-2 transposed convs, 1x1)

The widths (512), code dimension (256) and codebook size (8192) are read from the shapes into
the ``cogview`` VQ-VAE preset (CogView's input normalisation, no residual blocks);
``VQVAE.load_cogview_state_dict`` does the renaming. ``VQVAE.from_pretrained(out)`` loads the
result; ``encode(images in [0, 1]) -> codes`` and ``decode(codes) -> images in [0, 1]``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cogview.convert.checkpoint import CheckpointError, extract_state_dict, load_torch_file
from cogview.modules.vqvae import VQVAE, VQVAEConfig
from cogview.safe_load import check_state_dict

log = logging.getLogger(__name__)

# Where a VQ-VAE checkpoint may keep its weights: CogView saved the state dict itself (keys
# "module.*" from DataParallel); training scripts often nest it.
STATE_ENTRIES = ("module", "model", "state_dict")
ENCODER_CONVS = ("enc_b.blocks.0", "enc_b.blocks.2", "enc_b.blocks.4", "enc_b.blocks.6")
DECODER_CONVS = ("dec.blocks.0", "dec.blocks.2", "dec.blocks.4", "dec.blocks.6")
QUANTIZER_BUFFERS = ("quantize_t.embed", "quantize_t.cluster_size", "quantize_t.embed_avg")


def cogview_vqvae_keys() -> list[str]:
    """Every key of CogView's VQ-VAE state dict (without the "module." prefix)."""
    convs = [f"{conv}.{param}" for conv in ENCODER_CONVS + DECODER_CONVS
             for param in ("weight", "bias")]
    return convs + list(QUANTIZER_BUFFERS)


def vqvae_config_from_state(state: dict[str, torch.Tensor], source: str) -> VQVAEConfig:
    """The ``cogview`` preset with widths, code dim and codebook size read from the shapes."""
    check_state_dict(dict.fromkeys(cogview_vqvae_keys()), state,  # keys only: shapes vary
                     f"{source} is not CogView's VQ-VAE layout (enc_b.blocks.{{0,2,4,6}}, "
                     f"quantize_t.{{embed,cluster_size,embed_avg}}, dec.blocks.{{0,2,4,6}}):",
                     error=CheckpointError)
    embed = state["quantize_t.embed"]
    if embed.dim() != 2:
        raise CheckpointError(f"{source}: quantize_t.embed has shape {tuple(embed.shape)}, "
                              "expected [code_dim, num_codes]")
    code_dim, num_codes = embed.shape
    channels = tuple(int(state[f"{conv}.weight"].shape[0]) for conv in ENCODER_CONVS[:3])
    return VQVAEConfig.preset("cogview", channels=channels, code_dim=int(code_dim),
                              num_codes=int(num_codes))


def check_shapes(state: dict[str, torch.Tensor], model: VQVAE, source: str) -> None:
    """Raises CheckpointError naming each of CogView's keys whose shape does not fit ``model``."""
    ours = model.state_dict()
    dim, codes = model.config.code_dim, model.num_codes
    expected = {"quantize_t.embed": (dim, codes), "quantize_t.cluster_size": (codes,),
                "quantize_t.embed_avg": (dim, codes)}
    for key in cogview_vqvae_keys():
        if key.startswith("enc_b."):
            expected[key] = tuple(ours["encoder." + key.removeprefix("enc_b.")].shape)
        elif key.startswith("dec."):
            expected[key] = tuple(ours["decoder." + key.removeprefix("dec.")].shape)
    wrong = [f"{key}: shape {tuple(state[key].shape)}, expected {shape}"
             for key, shape in expected.items() if tuple(state[key].shape) != shape]
    if wrong:
        raise CheckpointError(
            f"{source} has wrong shapes for a CogView VQ-VAE with widths {model.config.channels}, "
            f"{codes} codes of dim {dim} (read from enc_b.blocks.{{0,2,4}} and quantize_t.embed): "
            + "; ".join(wrong))


def convert_vqvae(src: str | Path, out: str | Path, trust_pickle: bool = False) -> Path:
    """Converts CogView's VQ-VAE .pt file into a directory ``VQVAE.from_pretrained`` loads
    (weights stored in float32, as VQVAE.save_pretrained writes them)."""
    src, out = Path(src), Path(out)
    if src.is_dir():
        raise CheckpointError(f"src={src} is a directory; kind=vqvae takes CogView's VQ-VAE "
                              "file (vqvae_hard_biggerset_011.pt)")
    state = extract_state_dict(load_torch_file(src, trust_pickle), src, STATE_ENTRIES)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    config = vqvae_config_from_state(state, str(src))
    model = VQVAE(config)
    check_shapes(state, model, str(src))
    model.load_cogview_state_dict({k: v.float() for k, v in state.items()})
    model.save_pretrained(out)
    log.info("converted %s (%d codes of dim %d) to %s", src, config.num_codes, config.code_dim, out)
    return out
