"""Behaviour of the VQ-VAE image tokenizer (cogview.modules.vqvae)."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from cogview.modules.vqvae import (
    VQVAE,
    VQVAEConfig,
    codebook_perplexity,
    codebook_usage,
    pil_to_tensor,
)

# A small model for fast tests; the "tiny" preset itself is exercised where it matters.
SMALL = dict(channels=(16, 32, 32), num_res_blocks=1, res_channels=16, code_dim=16, num_codes=64)


def small_model(**overrides) -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(VQVAEConfig(**{**SMALL, **overrides}))


def codebook_state(model: VQVAE) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.quantizer.state_dict().items()}


def squares(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Grey canvases, each with one flat square of a random colour: [n, 3, size, size]."""
    g = torch.Generator().manual_seed(seed)
    images = torch.full((n, 3, size, size), 0.5)
    colors = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.1, 0.2, 0.9], [0.95, 0.9, 0.1]])
    for i in range(n):
        side = int(torch.randint(8, 17, (1,), generator=g))
        y, x = torch.randint(0, size - side + 1, (2,), generator=g).tolist()
        color = colors[torch.randint(0, len(colors), (1,), generator=g)].view(3, 1, 1)
        images[i, :, y : y + side, x : x + side] = color
    return images


# ---- presets and shapes ----------------------------------------------------------------


def test_cogview_preset_matches_cogview_layout():
    with torch.device("meta"):
        model = VQVAE(VQVAEConfig.preset("cogview"))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # CogView's enc_b.blocks / dec.blocks shapes, under our names
    assert shapes["encoder.blocks.0.weight"] == (512, 3, 4, 4)
    assert shapes["encoder.blocks.2.weight"] == (512, 512, 4, 4)
    assert shapes["encoder.blocks.4.weight"] == (512, 512, 4, 4)
    assert shapes["encoder.blocks.6.weight"] == (256, 512, 1, 1)
    assert shapes["decoder.blocks.0.weight"] == (256, 512, 4, 4)  # ConvTranspose2d(256, 512)
    assert shapes["decoder.blocks.2.weight"] == (512, 512, 4, 4)
    assert shapes["decoder.blocks.4.weight"] == (512, 512, 4, 4)
    assert shapes["decoder.blocks.6.weight"] == (3, 512, 1, 1)
    assert model.num_codes == 8192 and model.downsample == 8
    assert tuple(model.codebook.shape) == (8192, 256)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 19_034_883
    assert model.config.mean == (0.79093, 0.76271, 0.75340)
    assert model.config.std == (0.30379, 0.32279, 0.32800)


def test_tiny_preset_forward_shapes():
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig.preset("tiny"))
    out = model(torch.rand(2, 3, 64, 64))
    assert out["recon"].shape == (2, 3, 64, 64)
    assert out["codes"].shape == (2, 8, 8) and out["codes"].dtype == torch.long
    for key in ("loss", "recon_loss", "commit_loss", "perplexity", "usage"):
        assert out[key].dim() == 0 and torch.isfinite(out[key])
    assert out["loss"].requires_grad
    expected = out["recon_loss"] + model.config.beta * out["commit_loss"]
    assert torch.allclose(out["loss"], expected)
    assert out["usage"].item() == pytest.approx(codebook_usage(out["codes"], model.num_codes))
    assert out["perplexity"].item() == pytest.approx(
        codebook_perplexity(out["codes"], model.num_codes)
    )


def test_preset_overrides_and_unknown_preset():
    config = VQVAEConfig.preset("tiny", num_codes=256)
    assert config.num_codes == 256 and VQVAE(config).num_codes == 256
    with pytest.raises(ValueError, match="unknown VQ-VAE preset 'huge'"):
        VQVAEConfig.preset("huge")
    with pytest.raises(ValueError, match="channels"):
        VQVAEConfig(channels=(32, 64))


@pytest.mark.parametrize("height,width", [(32, 32), (16, 40)])
def test_encode_decode_shapes_and_ranges(height, width):
    model = small_model().eval()
    images = torch.rand(3, 3, height, width)
    codes = model.encode(images)
    assert codes.shape == (3, height // 8, width // 8) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < model.num_codes
    decoded = model.decode(codes)
    assert decoded.shape == (3, 3, height, width) and decoded.dtype == torch.float32
    assert decoded.min() >= 0 and decoded.max() <= 1
    # a single [3, H, W] image is a batch of one; [h, w] codes likewise
    assert torch.equal(model.encode(images[0]), codes[:1])
    assert torch.allclose(model.decode(codes[0]), decoded[:1], atol=1e-5)


def test_uint8_tensors_are_scaled_like_floats():
    model = small_model().eval()
    pixels = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(model.encode(pixels), model.encode(pixels.float() / 255))


def test_bad_inputs_raise_clear_errors():
    model = small_model().eval()
    with pytest.raises(ValueError, match=r"30x32.*multiple of 8.*resize or crop"):
        model.encode(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"multiple of 8"):
        model.encode(Image.new("RGB", (20, 16)))
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        model.encode(torch.rand(1, 3, 16, 16) * 2 - 1)  # already normalised to [-1, 1]
    with pytest.raises(ValueError, match=r"share a size"):
        model.encode([Image.new("RGB", (16, 16)), Image.new("RGB", (24, 16))])
    with pytest.raises(ValueError, match=r"codes span \[0, 64\].*64 codes"):
        model.decode(torch.tensor([[[0, 64]]]))


# ---- PIL input ---------------------------------------------------------------------------


def test_pil_modes_convert_to_rgb_in_unit_range():
    gray = Image.fromarray(np.full((16, 24), 51, dtype=np.uint8), mode="L")
    assert torch.allclose(pil_to_tensor(gray), torch.full((3, 16, 24), 0.2))

    deep = Image.fromarray(np.array([[0, 65535], [32896, 257]], dtype=np.uint16))
    assert deep.mode.startswith("I;16")
    expected = torch.tensor([[0.0, 1.0], [128 / 255, 1 / 255]])
    assert torch.allclose(pil_to_tensor(deep), expected.expand(3, 2, 2), atol=1e-6)

    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent -> white
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    tensor = pil_to_tensor(rgba)
    assert torch.allclose(tensor[:, 1, 1], torch.ones(3))
    assert torch.allclose(tensor[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))

    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert torch.allclose(pil_to_tensor(palette)[:, 3, 3], torch.tensor([10, 20, 30]) / 255)

    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))  # no ink -> white
    assert torch.allclose(pil_to_tensor(cmyk), torch.ones(3, 8, 8))


def test_encode_accepts_pil_images_of_any_mode():
    model = small_model().eval()
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8))
    modes = [rgb.convert("L"), rgb.convert("RGBA"), rgb.convert("P"), rgb.convert("CMYK")]
    modes.append(Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))  # I;16
    for image in modes:
        codes = model.encode(image)
        assert codes.shape == (1, 2, 3), image.mode
    # RGBA with opaque alpha encodes like the RGB image; a list is a batch
    assert torch.equal(model.encode(rgb.convert("RGBA")), model.encode(rgb))
    batch = model.encode([rgb, rgb.convert("L")])
    assert batch.shape == (2, 2, 3)
    assert torch.equal(batch[0], model.encode(rgb)[0])
    # an I;16 image encodes like the 8-bit grayscale image it was made from
    assert torch.equal(model.encode(modes[-1]), model.encode(rgb.convert("L")))


# ---- codebook behaviour ------------------------------------------------------------------


def test_eval_is_deterministic_and_never_updates_the_codebook():
    model = small_model()
    images = torch.rand(4, 3, 32, 32)
    before = codebook_state(model)
    model.train()
    model.encode(images)  # encode never updates, even in train mode
    assert all(torch.equal(before[k], v) for k, v in codebook_state(model).items())
    model.eval()
    first = model.encode(images)
    with torch.no_grad():
        out = model(images)
    assert torch.equal(model.encode(images), first) and torch.equal(out["codes"], first)
    assert all(torch.equal(before[k], v) for k, v in codebook_state(model).items())
    model.train()
    model(images)  # a training forward does move the EMA statistics
    assert not torch.equal(before["_codebook.cluster_size"], model.quantizer._codebook.cluster_size)


def test_straight_through_gradients_reach_the_encoder():
    model = small_model().train()
    out = model(torch.rand(2, 3, 16, 16))
    out["recon_loss"].backward()  # no commitment term: only the straight-through path
    grad = model.encoder.blocks[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.quantizer._codebook.embed.grad is None  # the codebook learns by EMA only


def test_commit_loss_is_distance_to_chosen_codes():
    model = small_model().eval()
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        out = model(images)
        latents = model.encoder((images - model.pixel_mean) / model.pixel_std)
    expected = ((latents - model.lookup(out["codes"])) ** 2).mean()
    assert out["commit_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_dead_codes_are_reseeded_from_the_current_batch():
    model = small_model(dead_code_threshold=1.0)
    book = model.quantizer._codebook
    dead = torch.tensor([3, 10, 20, 40])
    with torch.no_grad():
        book.cluster_size.fill_(100.0)
        book.cluster_size[0, dead] = 0.0
        book.embed[0, dead] = 1e4  # far away: never chosen by any input
        book.embed_avg.copy_(book.embed * book.cluster_size[..., None])
    images = model.prepare_images(torch.rand(4, 3, 32, 32))
    with torch.no_grad():
        latents = model.encoder((images - model.pixel_mean) / model.pixel_std)
    batch_vectors = latents.permute(0, 2, 3, 1).reshape(-1, model.config.code_dim)  # [64, D]

    model.eval()
    with torch.no_grad():
        model(images)
    assert torch.all(book.embed[0, dead] == 1e4), "eval mode must not re-seed"

    model.train()
    with torch.no_grad():
        model(images)
    distance = torch.cdist(book.embed[0, dead], batch_vectors).min(dim=1).values
    assert torch.all(distance < 1e-3), "dead codes must become encoder outputs of this batch"
    assert torch.all(book.cluster_size[0, dead] == 1.0)  # reset to the threshold
    alive = torch.ones(model.num_codes, dtype=torch.bool)
    alive[dead] = False
    assert torch.all(book.cluster_size[0, alive] >= 99.0)  # live codes were only EMA-updated


def test_distances_stay_fp32_under_bf16_autocast():
    model = small_model().eval()
    with torch.no_grad():  # near-duplicate codes: bf16 distances could not tell them apart
        book = 3.0 + 1e-2 * torch.randn(model.num_codes, model.config.code_dim)
        model.quantizer._codebook.embed.copy_(book[None])
    latents = book.t().reshape(1, model.config.code_dim, 8, 8)  # code j at position j
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, codes, _ = model.quantize(latents)
    assert torch.equal(codes.flatten(), torch.arange(model.num_codes))


def test_codebook_usage_and_perplexity():
    codes = torch.tensor([[0, 1], [2, 3]]).repeat(5, 1, 1)  # 4 of 8 codes, uniformly
    assert codebook_usage(codes, 8) == 0.5
    assert codebook_perplexity(codes, 8) == pytest.approx(4.0)
    assert codebook_perplexity(torch.zeros(10, dtype=torch.long), 8) == pytest.approx(1.0)
    model = small_model()
    assert model.codebook_usage(torch.arange(16)) == 0.25


# ---- CogView compatibility -----------------------------------------------------------------


def test_cogview_quantizer_columns_become_codes():
    model = small_model().eval()
    dim, k = model.config.code_dim, model.num_codes
    embed = torch.randn(dim, k)
    cluster_size = torch.rand(k) * 10
    model.load_cogview_quantizer(embed, cluster_size, embed * cluster_size)
    assert torch.equal(model.codebook, embed.t())
    latents = embed.t().reshape(1, 8, 8, dim).permute(0, 3, 1, 2)  # column j at position j
    _, codes, _ = model.quantize(latents)
    assert torch.equal(codes.flatten(), torch.arange(k))
    assert torch.equal(model.quantizer._codebook.cluster_size[0], cluster_size)
    with pytest.raises(ValueError, match=r"quantize_t.embed has shape \(64, 16\)"):
        model.load_cogview_quantizer(embed.t(), cluster_size, embed)


def test_cogview_state_dict_loads_by_renaming():
    """A CogView-layout network (their key names, small widths) gives the same codes and pixels."""
    config = VQVAEConfig.preset("cogview", channels=(8, 8, 8), code_dim=4, num_codes=32)
    torch.manual_seed(1)
    enc_b = nn.Module()
    enc_b.blocks = nn.Sequential(
        nn.Conv2d(3, 8, 4, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 4, 2, 1), nn.ReLU(),
        nn.Conv2d(8, 8, 4, 2, 1), nn.ReLU(), nn.Conv2d(8, 4, 1),
    )
    dec = nn.Module()
    dec.blocks = nn.Sequential(
        nn.ConvTranspose2d(4, 8, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(8, 8, 4, 2, 1), nn.ReLU(),
        nn.ConvTranspose2d(8, 8, 4, 2, 1), nn.ReLU(), nn.Conv2d(8, 3, 1),
    )
    embed = torch.randn(4, 32)
    state = {f"module.enc_b.{k}": v for k, v in enc_b.state_dict().items()}
    state |= {f"module.dec.{k}": v for k, v in dec.state_dict().items()}
    state |= {"module.quantize_t.embed": embed, "module.quantize_t.embed_avg": embed,
              "module.quantize_t.cluster_size": torch.ones(32)}
    model = VQVAE(config).eval()
    model.load_cogview_state_dict(state)

    images = torch.rand(2, 3, 16, 16)
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    with torch.no_grad():
        z = enc_b.blocks((images - mean) / std).permute(0, 2, 3, 1)  # [B, h, w, D]
        dist = (z ** 2).sum(-1, keepdim=True) - 2 * z @ embed + (embed ** 2).sum(0)
        ref_codes = dist.argmin(-1)
        ref_pixels = dec.blocks(embed.t()[ref_codes].permute(0, 3, 1, 2)) * std + mean
    codes = model.encode(images)
    assert torch.equal(codes, ref_codes)
    assert torch.allclose(model.decode(codes), ref_pixels.clamp(0, 1), atol=1e-5)

    with pytest.raises(ValueError, match="decoder.blocks.6.weight"):
        state["module.dec.blocks.6.weight"] = torch.zeros(3, 9, 1, 1)
        model.load_cogview_state_dict(state)


# ---- save / load -----------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    model = small_model()
    model.train()
    model(torch.rand(4, 3, 32, 32))  # move the codebook away from its init
    model.eval()
    model.save_pretrained(tmp_path / "vq")
    config = json.loads((tmp_path / "vq" / "config.json").read_text())
    assert config["kind"] == "vqvae" and config["num_codes"] == 64
    loaded = VQVAE.from_pretrained(tmp_path / "vq")
    assert not loaded.training and loaded.config == model.config
    images = torch.rand(3, 3, 24, 32)
    codes = model.encode(images)
    assert torch.equal(loaded.encode(images), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))


def test_from_pretrained_errors_name_path_and_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        VQVAE.from_pretrained(tmp_path / "nowhere")
    small_model().save_pretrained(tmp_path / "vq")
    config_path = tmp_path / "vq" / "config.json"
    config = json.loads(config_path.read_text())

    config_path.write_text(json.dumps({**config, "kind": "t2i"}))
    with pytest.raises(ValueError, match=r"config\.json has kind='t2i', not 'vqvae'"):
        VQVAE.from_pretrained(tmp_path / "vq")

    config_path.write_text(json.dumps({**config, "num_codes": 128}))
    with pytest.raises(ValueError, match=r"(?s)model\.safetensors does not match.*_codebook\.embed"):
        VQVAE.from_pretrained(tmp_path / "vq")

    config_path.write_text(json.dumps({**config, "depth": 3}))
    with pytest.raises(ValueError, match=r"config\.json.*unknown VQVAEConfig fields \['depth'\]"):
        VQVAE.from_pretrained(tmp_path / "vq")


# ---- learning ------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Small convs gain nothing from more threads, and oversubscribed shared CPUs crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_reduces_reconstruction_loss(one_thread):
    """400 steps on flat squares must cut the reconstruction error at least four-fold."""
    model = small_model(num_codes=128)
    images = squares(256)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    model.eval()
    with torch.no_grad():
        initial = model(images[:64])["recon_loss"].item()
    model.train()
    for _ in range(400):
        batch = images[torch.randint(0, len(images), (32,), generator=generator)]
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        final = model(images[:64])
    assert final["recon_loss"].item() < 0.25 * initial
    assert final["usage"].item() > 0.3  # many codes in use, not a few collapsed ones
