"""Import of CogView checkpoints (cogview.convert): synthetic checkpoints with CogView's exact key
names at tiny sizes convert, and the converted models compute what CogView's equations say."""

import json
import math
import subprocess
import sys
from argparse import Namespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from cogview.convert import (
    CheckpointError,
    UnsafeCheckpointError,
    convert_transformer,
    convert_vqvae,
    write_safetensors,
)
from cogview.convert.__main__ import main as convert_main
from cogview.modules.transformer import CogViewTransformer
from cogview.modules.vqvae import COGVIEW_MEAN, COGVIEW_STD, VQVAE
from tests.helpers import CONF_DIR, ROOT

LAYERS, HIDDEN, HEADS, POSITIONS = 2, 64, 4, 64
NUM_CODES, TEXT_PIECES = 8192, 120  # -> 8192 + 120 + 27 ids, padded to 8448 as CogView pads
VOCAB = 8448
VQ_CHANNELS, VQ_CODE_DIM = 8, 4
LAYER_PARTS = ("input_layernorm", "attention.query_key_value", "attention.dense",
               "third_layernorm", "post_attention_layernorm", "mlp.dense_h_to_4h",
               "mlp.dense_4h_to_h", "fourth_layernorm")


class Opaque:
    """Stands for an arbitrary pickled object (e.g. an optimizer class) in a checkpoint."""

    def __init__(self, value=0):
        self.value = value


# ------------------------------------------------------------------------------------------------
# synthetic CogView checkpoints


def transformer_state(layout: str = "megatron", seed: int = 0,
                      dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Random weights under CogView's key names. LayerNorm weights and all biases are random so
    that a swapped or misplaced tensor changes the output."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std, mean=0.0):
        return (mean + std * torch.randn(*shape, generator=gen)).to(dtype)

    h = HIDDEN
    embeddings = {"megatron": "word_embeddings.weight",
                  "swissarmy": "transformer.word_embeddings.weight"}[layout]
    state = {embeddings: randn(VOCAB, h, std=0.3),
             "transformer.position_embeddings.weight": randn(POSITIONS, h, std=0.3)}
    shapes = {"attention.query_key_value": (3 * h, h), "attention.dense": (h, h),
              "mlp.dense_h_to_4h": (4 * h, h), "mlp.dense_4h_to_h": (h, 4 * h)}
    for i in range(LAYERS):
        for part in LAYER_PARTS:
            key = f"transformer.layers.{i}.{part}"
            if part.endswith("layernorm"):
                state[key + ".weight"] = randn(h, std=0.2, mean=1.0)
                state[key + ".bias"] = randn(h, std=0.2)
            else:
                rows, cols = shapes[part]
                state[key + ".weight"] = randn(rows, cols, std=1.5 / math.sqrt(cols))
                state[key + ".bias"] = randn(rows, std=0.1)
    state["transformer.final_layernorm.weight"] = randn(h, std=0.2, mean=1.0)
    state["transformer.final_layernorm.bias"] = randn(h, std=0.2)
    return state


def save_checkpoint(root, state, layout: str = "megatron", iteration: int = 1000, **extra):
    """The release layout: an iteration file and <iter>/mp_rank_00_model_states.pt, weights
    under "module", plus what Megatron/DeepSpeed save beside them (args, RNG states)."""
    step = root / str(iteration)
    step.mkdir(parents=True)
    name = "latest_checkpointed_iteration.txt" if layout == "megatron" else "latest"
    (root / name).write_text(f"{iteration}\n")
    torch.save({"module": state, "iteration": iteration,
                "args": Namespace(num_layers=LAYERS, hidden_size=HIDDEN, fp16=True),
                "np_rng_state": np.random.RandomState(0).get_state(),
                "torch_rng_state": torch.get_rng_state(), **extra},
               step / "mp_rank_00_model_states.pt")
    return root


def vqvae_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """CogView's VQ-VAE keys ("module." prefix), tiny widths, 8192 codes."""
    gen = torch.Generator().manual_seed(seed)
    c, d = VQ_CHANNELS, VQ_CODE_DIM
    shapes = {"enc_b.blocks.0": (c, 3, 4, 4), "enc_b.blocks.2": (c, c, 4, 4),
              "enc_b.blocks.4": (c, c, 4, 4), "enc_b.blocks.6": (d, c, 1, 1),
              # transposed convs store [in, out, kh, kw]
              "dec.blocks.0": (d, c, 4, 4), "dec.blocks.2": (c, c, 4, 4),
              "dec.blocks.4": (c, c, 4, 4), "dec.blocks.6": (3, c, 1, 1)}
    state = {}
    for name, shape in shapes.items():
        fan_in = shape[1] * shape[2] * shape[3]
        state[f"module.{name}.weight"] = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        bias_size = shape[1] if name.startswith("dec.") and name != "dec.blocks.6" else shape[0]
        state[f"module.{name}.bias"] = 0.1 * torch.randn(bias_size, generator=gen)
    embed = torch.randn(d, NUM_CODES, generator=gen) * 0.5
    counts = torch.rand(NUM_CODES, generator=gen) + 0.5
    state |= {"module.quantize_t.embed": embed, "module.quantize_t.cluster_size": counts,
              "module.quantize_t.embed_avg": embed * counts}
    return state


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny SentencePiece model, a converted CogView VQ-VAE and a converted transformer."""
    from cogview.data.shapes import sample_scene
    from cogview.tokenization.train_sentencepiece import train_sentencepiece

    root = tmp_path_factory.mktemp("convert")
    corpus = root / "captions.txt"
    corpus.write_text("\n".join(sample_scene(0, "train", i)[1] for i in range(1000)) + "\n")
    train_sentencepiece(corpus, root / "spm", vocab_size=TEXT_PIECES, character_coverage=1.0,
                        num_threads=1)
    torch.save(vqvae_state(), root / "vqvae_hard_biggerset_011.pt")
    convert_vqvae(root / "vqvae_hard_biggerset_011.pt", root / "vqvae")
    save_checkpoint(root / "cogview-base", transformer_state())
    convert_transformer(root / "cogview-base", root / "export", vqvae=root / "vqvae",
                        tokenizer=root / "spm" / "spm.model", heads=HEADS, image_tokens=16)
    return root


def convert_args(assets, **overrides):
    args = dict(vqvae=assets / "vqvae", tokenizer=assets / "spm" / "spm.model", heads=HEADS,
                image_tokens=16)
    return args | overrides


# ------------------------------------------------------------------------------------------------
# CogView's forward, written from its equations


def cogview_layernorm(x, weight, bias, eps=1e-5, per_token=False):
    """PB-relax LayerNorm as CogView computed it: one max|x| over the whole tensor.

    per_token=True takes the max per token instead, as cogview's LayerNorm does. LN is
    scale-invariant except for eps: LN(x / c) = w (x - mean) / sqrt(var + eps c^2) + b, so the
    two differ only through eps c^2, most for tokens much smaller than the tensor's largest.
    """
    peak = x.abs().amax(-1, keepdim=True) if per_token else x.abs().max()
    x = x / (peak.detach() / 8)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def cogview_gelu(x):
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def cogview_logits(state, input_ids, heads, per_token_ln=False):
    """Megatron-era CogView: Sandwich-LN, scores (Q/sqrt(d)) K^T, -10000 mask, tied head."""
    s = {k.removeprefix("transformer.") if k.startswith("transformer.word") else k: v.float()
         for k, v in state.items()}
    batch, length = input_ids.shape
    hidden = s["word_embeddings.weight"].shape[1]
    head_dim = hidden // heads

    def linear(x, name):
        return x @ s[name + ".weight"].t() + s[name + ".bias"]

    def norm(x, name):
        return cogview_layernorm(x, s[name + ".weight"], s[name + ".bias"], per_token=per_token_ln)

    positions = s["transformer.position_embeddings.weight"][:length]
    x = s["word_embeddings.weight"][input_ids] + positions  # (B, T, C)
    ltor = torch.tril(torch.ones(length, length))  # 1 where a query may see a key
    for i in range(LAYERS):
        p = f"transformer.layers.{i}."
        qkv = linear(norm(x, p + "input_layernorm"), p + "attention.query_key_value")  # (B, T, 3C)
        q, k, v = (t.view(batch, length, heads, head_dim).transpose(1, 2)
                   for t in qkv.split(hidden, dim=-1))  # each (B, nh, T, hd)
        scores = (q / math.sqrt(head_dim)) @ k.transpose(-1, -2)  # (B, nh, T, T)
        scores = scores * ltor - 10000.0 * (1.0 - ltor)
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, hidden)
        x = x + norm(linear(context, p + "attention.dense"), p + "third_layernorm")
        inner = linear(norm(x, p + "post_attention_layernorm"), p + "mlp.dense_h_to_4h")
        inner = cogview_gelu(inner)  # (B, T, 4C)
        x = x + norm(linear(inner, p + "mlp.dense_4h_to_h"), p + "fourth_layernorm")
    x = norm(x, "transformer.final_layernorm")
    return x @ s["word_embeddings.weight"].t()  # (B, T, V)


# ------------------------------------------------------------------------------------------------
# transformer


@pytest.mark.parametrize("layout", ["megatron", "swissarmy"])
def test_converted_transformer_matches_cogview_equations(assets, tmp_path, layout):
    state = transformer_state(layout, seed=1)
    save_checkpoint(tmp_path / "ckpt", state, layout)
    out = convert_transformer(tmp_path / "ckpt", tmp_path / "out", **convert_args(assets))
    input_ids = torch.randint(0, VOCAB, (2, 40))
    reference = cogview_logits(state, input_ids, HEADS)
    # What is left once the LN max is taken per token, as ours does: fp32 rounding only.
    per_token_reference = cogview_logits(state, input_ids, HEADS, per_token_ln=True)
    for attention in ("pb_relax", "sdpa", "eager"):
        model = CogViewTransformer.from_pretrained(out, attention=attention).eval()
        assert model.word_embeddings.weight.dtype == torch.float32
        with torch.no_grad():
            logits = model(input_ids)
        assert logits.abs().max() > 1.0  # the comparison is not between near-zero numbers
        assert (logits - reference).abs().max() < 1e-4, attention
        assert (logits - per_token_reference).abs().max() < 2e-5, attention


def test_dims_are_read_from_shapes_and_weights_stay_fp16(assets):
    config = json.loads((assets / "export" / "config.json").read_text())
    assert {k: config[k] for k in ("num_layers", "hidden_size", "num_heads", "max_positions",
                                   "vocab_size", "mlp_ratio", "sandwich_ln", "pb_relax")} == {
        "num_layers": LAYERS, "hidden_size": HIDDEN, "num_heads": HEADS,
        "max_positions": POSITIONS, "vocab_size": VOCAB, "mlp_ratio": 4, "sandwich_ln": True,
        "pb_relax": True}
    with safe_open(assets / "export" / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
        qkv = weights.get_tensor("layers.1.attention.query_key_value.weight")
    assert qkv.dtype == torch.float16
    assert names == set(CogViewTransformer.from_pretrained(assets / "export").state_dict())
    info = json.loads((assets / "export" / "cogview.json").read_text())
    assert info["task"] == "t2i" and info["image_tokens"] == 16
    assert info["max_text_len"] == POSITIONS - 16 - 4  # [ROI1] text [BASE] [BOI1] image [EOI1]
    assert info["vocab"]["num_image_codes"] == NUM_CODES
    assert info["vocab"]["text_vocab_size"] == TEXT_PIECES and info["vocab"]["size"] == VOCAB


def test_converted_model_samples_through_pipeline_and_infer(assets, tmp_path):
    from hydra import compose, initialize_config_dir

    from cogview import Pipeline
    from cogview.inference import infer

    pipe = Pipeline.from_pretrained(assets / "export")
    first = pipe("左上角有一个大的红色圆形", num_images=2, seed=3, progress=False).images
    again = pipe("左上角有一个大的红色圆形", num_images=2, seed=3, progress=False).images
    assert [image.size for image in first] == [(32, 32), (32, 32)]  # 4x4 codes, 8x upsampling
    assert [image.tobytes() for image in first] == [image.tobytes() for image in again]

    with initialize_config_dir(config_dir=str(CONF_DIR / "inference"), version_base=None):
        cfg = compose(config_name="infer", overrides=[
            "task=t2i", f"ckpt={assets / 'export'}", "prompts=['中间有一个小的蓝色菱形']",
            "num_samples=2", "seed=3", f"output_dir={tmp_path / 'infer'}"])
    infer(cfg)
    rows = [json.loads(line) for line in (tmp_path / "infer" / "results.jsonl").read_text(
        encoding="utf-8").splitlines()]
    assert [(row["sample"], row["seed"]) for row in rows] == [(0, 3), (1, 3 + 1)]
    assert all((tmp_path / "infer" / row["path"]).is_file() for row in rows)


def test_task_and_text_length_are_recorded(assets, tmp_path):
    save_checkpoint(tmp_path / "ckpt", transformer_state())
    out = convert_transformer(tmp_path / "ckpt", tmp_path / "out", **convert_args(
        assets, task="caption", max_text_len=20, caption_end_token="[SEP]"))
    info = json.loads((out / "cogview.json").read_text())
    assert (info["task"], info["max_text_len"], info["caption_end_token"]) == ("caption", 20, "[SEP]")
    for bad, pattern in ((dict(task="poem"), "task='poem'"),
                         (dict(image_tokens=10), "image_tokens=10 must be a positive square"),
                         (dict(caption_end_token="[EOS]"), r"caption_end_token='\[EOS\]'")):
        with pytest.raises(ValueError, match=pattern):
            convert_transformer(tmp_path / "ckpt", tmp_path / "bad", **convert_args(assets, **bad))


# ------------------------------------------------------------------------------------------------
# errors


def test_directory_without_iteration_file_is_refused(assets, tmp_path):
    save_checkpoint(tmp_path / "ckpt", transformer_state())
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").unlink()
    with pytest.raises(CheckpointError, match=r"latest_checkpointed_iteration\.txt or latest"):
        convert_transformer(tmp_path / "ckpt", tmp_path / "out", **convert_args(assets))
    (tmp_path / "ckpt" / "latest").write_text("2000")
    with pytest.raises(FileNotFoundError, match=r"2000/mp_rank_00_model_states\.pt"):
        convert_transformer(tmp_path / "ckpt", tmp_path / "out", **convert_args(assets))
    assert not (tmp_path / "out").exists()  # nothing written on failure


@pytest.mark.parametrize("problem, pattern", [
    ("unknown", r"unknown keys \(1\): transformer\.layers\.0\.attention\.rotary_emb\.inv_freq"),
    ("missing", r"missing keys \(1\): transformer\.layers\.1\.fourth_layernorm\.bias"),
    ("shape", r"wrong shapes \(1\): transformer\.layers\.1\.attention\.query_key_value\.weight: "
              r"shape \(190, 64\), expected \(192, 64\)"),
])
def test_bad_keys_and_shapes_are_named(assets, tmp_path, problem, pattern):
    state = transformer_state()
    if problem == "unknown":
        state["transformer.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(8)
    elif problem == "missing":
        del state["transformer.layers.1.fourth_layernorm.bias"]
    else:
        state["transformer.layers.1.attention.query_key_value.weight"] = torch.zeros(190, HIDDEN)
    save_checkpoint(tmp_path / "ckpt", state)
    with pytest.raises(CheckpointError, match=pattern):
        convert_transformer(tmp_path / "ckpt", tmp_path / "out", **convert_args(assets))


def test_head_count_and_vocabulary_must_fit(assets, tmp_path):
    save_checkpoint(tmp_path / "ckpt", transformer_state())
    with pytest.raises(ValueError, match="heads=5 does not divide the hidden size 64"):
        convert_transformer(tmp_path / "ckpt", tmp_path / "out", **convert_args(assets, heads=5))
    state = transformer_state()
    state["word_embeddings.weight"] = torch.zeros(VOCAB + 128, HIDDEN, dtype=torch.float16)
    save_checkpoint(tmp_path / "wide", state)
    with pytest.raises(CheckpointError, match=f"{VOCAB + 128} rows .* has {VOCAB} ids"):
        convert_transformer(tmp_path / "wide", tmp_path / "out", **convert_args(assets))


def test_arbitrary_pickled_objects_need_trust_pickle(assets, tmp_path):
    save_checkpoint(tmp_path / "ckpt", transformer_state(), optimizer_class=Opaque(3))
    with pytest.raises(UnsafeCheckpointError, match=r"test_convert\.Opaque.*trust_pickle=true"):
        convert_transformer(tmp_path / "ckpt", tmp_path / "out", **convert_args(assets))
    out = convert_transformer(tmp_path / "ckpt", tmp_path / "out",
                              **convert_args(assets, trust_pickle=True))
    assert CogViewTransformer.from_pretrained(out).config.num_layers == LAYERS


# ------------------------------------------------------------------------------------------------
# VQ-VAE


def test_converted_vqvae_matches_cogview_equations(assets):
    state = {k.removeprefix("module."): v for k, v in vqvae_state().items()}
    model = VQVAE.from_pretrained(assets / "vqvae")
    assert (model.config.channels, model.config.code_dim, model.num_codes) == (
        (VQ_CHANNELS,) * 3, VQ_CODE_DIM, NUM_CODES)
    images = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(COGVIEW_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(COGVIEW_STD).view(1, 3, 1, 1)

    def conv(x, name, transposed=False, stride=2):
        op = F.conv_transpose2d if transposed else F.conv2d
        padding = 1 if stride == 2 else 0
        return op(x, state[name + ".weight"], state[name + ".bias"], stride=stride, padding=padding)

    z = (images - mean) / std
    for i in (0, 2, 4):
        z = F.relu(conv(z, f"enc_b.blocks.{i}"))
    z = conv(z, "enc_b.blocks.6", stride=1).permute(0, 2, 3, 1)  # (B, h, w, D)
    embed = state["quantize_t.embed"]  # (D, K)
    dist = z.pow(2).sum(-1, keepdim=True) - 2 * z @ embed + embed.pow(2).sum(0)  # (B, h, w, K)
    reference_codes = (-dist).max(-1).indices
    x = embed.t()[reference_codes].permute(0, 3, 1, 2)  # (B, D, h, w)
    for i in (0, 2, 4):
        x = F.relu(conv(x, f"dec.blocks.{i}", transposed=True))
    reference_pixels = (conv(x, "dec.blocks.6", stride=1) * std + mean).clamp(0, 1)

    codes = model.encode(images)
    assert codes.shape == (2, 4, 4) and torch.equal(codes, reference_codes)
    assert (model.decode(codes) - reference_pixels).abs().max() < 1e-5
    book = model.quantizer._codebook
    assert torch.equal(book.cluster_size[0], state["quantize_t.cluster_size"])


def test_vqvae_errors_name_the_key(tmp_path):
    state = vqvae_state()
    del state["module.quantize_t.embed_avg"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): quantize_t\.embed_avg"):
        convert_vqvae(tmp_path / "missing.pt", tmp_path / "out")
    state = vqvae_state()
    state["module.dec.blocks.6.weight"] = torch.zeros(3, 9, 1, 1)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"dec\.blocks\.6\.weight: shape \(3, 9, 1, 1\), "
                                              r"expected \(3, 8, 1, 1\)"):
        convert_vqvae(tmp_path / "shape.pt", tmp_path / "out")


# ------------------------------------------------------------------------------------------------
# CLI and the streaming writer


def test_cli_converts_and_reports_errors(assets, tmp_path, capsys):
    save_checkpoint(tmp_path / "ckpt", transformer_state())
    common = [f"vqvae={assets / 'vqvae'}", f"tokenizer={assets / 'spm' / 'spm.model'}",
              "image_tokens=16"]
    assert convert_main(["kind=transformer", f"src={tmp_path / 'ckpt'}",
                         f"out={tmp_path / 'out'}", "heads=4", *common]) == 0
    assert CogViewTransformer.from_pretrained(tmp_path / "out").config.num_heads == 4
    assert convert_main(["kind=transformer", f"src={tmp_path / 'ckpt'}",
                         f"out={tmp_path / 'out2'}", "heads=3", *common]) == 1
    assert "heads=3 does not divide" in capsys.readouterr().err
    assert convert_main(["kind=transformer", f"src={tmp_path}", "out=x", "head=4"]) == 2
    assert "unknown key 'head'" in capsys.readouterr().err

    result = subprocess.run(
        [sys.executable, "-m", "cogview.convert", "kind=vqvae",
         f"src={assets / 'vqvae_hard_biggerset_011.pt'}", f"out={tmp_path / 'vq'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert VQVAE.from_pretrained(tmp_path / "vq").num_codes == NUM_CODES


def test_streaming_writer_round_trips_every_dtype(tmp_path):
    tensors = {"half": torch.randn(5, 3).half(), "bf16": torch.randn(7).bfloat16(),
               "transposed": torch.randn(4, 6).t(), "scalar": torch.tensor(3.5),
               "ids": torch.arange(10), "mask": torch.rand(3) > 0.5, "empty": torch.zeros(0, 4)}
    path = write_safetensors(tensors, tmp_path / "w.safetensors", metadata={"format": "pt"})
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert not (tmp_path / "w.safetensors.tmp").exists()


def test_conversion_memory_stays_near_the_checkpoint_size(tmp_path):
    """Peak RSS above the imports, in a fresh process, for a ~90 MB fp16 checkpoint (a copy
    of the weights anywhere would put it at 2x or more)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.convert_memory import run_benchmark

    result = run_benchmark(layers=12, hidden=512, workdir=tmp_path, naive=False)
    assert result["checkpoint_bytes"] > 80e6
    assert result["streaming"]["added_over_checkpoint"] <= 1.3
