"""The CogView transformer: attention implementations, KV cache, Sandwich-LN, presets."""

import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from cogview.modules.transformer import Block, CogViewTransformer, TransformerConfig
from tests.helpers import CONF_DIR

IMPLS = ("pb_relax", "sdpa", "eager")


def small_config(**overrides) -> TransformerConfig:
    values = dict(num_layers=3, hidden_size=64, num_heads=4, max_positions=64, vocab_size=300)
    values.update(overrides)
    return TransformerConfig(**values)


def model_pair(config: TransformerConfig, attention: str) -> CogViewTransformer:
    """A model with the same weights as ``CogViewTransformer(config)`` seeded with 0."""
    torch.manual_seed(0)
    model = CogViewTransformer(config)
    if attention != config.attention:
        other = CogViewTransformer(TransformerConfig(**{**config.__dict__, "attention": attention}))
        other.load_state_dict(model.state_dict())
        model = other
    return model.eval()


def random_batch(batch=2, length=24, vocab=300, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


def left_padding_mask(batch, length, pads):
    mask = torch.ones(batch, length, dtype=torch.bool)
    for row, pad in enumerate(pads):
        mask[row, :pad] = False
    return mask


@pytest.mark.parametrize("sandwich_ln", [True, False])
@pytest.mark.parametrize("pb_relax", [True, False])
def test_attention_implementations_agree_in_fp32(sandwich_ln, pb_relax):
    config = small_config(sandwich_ln=sandwich_ln, pb_relax=pb_relax)
    ids = random_batch()
    logits = {impl: model_pair(config, impl)(ids) for impl in IMPLS}
    for impl in ("sdpa", "eager"):
        torch.testing.assert_close(logits[impl], logits["pb_relax"], atol=1e-5, rtol=0)


def test_attention_implementations_agree_with_padding_mask():
    config = small_config()
    ids = random_batch()
    mask = left_padding_mask(2, ids.shape[1], pads=[0, 5])
    position_ids = (mask.long().cumsum(-1) - 1).clamp_min(0)
    logits = {impl: model_pair(config, impl)(ids, position_ids, mask) for impl in IMPLS}
    for impl in ("sdpa", "eager"):
        for row in range(2):
            real = mask[row]
            torch.testing.assert_close(logits[impl][row, real], logits["pb_relax"][row, real],
                                       atol=1e-5, rtol=0)
    assert all(torch.isfinite(value).all() for value in logits.values())


def test_padding_does_not_change_real_tokens():
    """A left-padded sequence gives the same logits as the unpadded one."""
    model = model_pair(small_config(), "pb_relax")
    ids = random_batch(batch=1, length=10)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = left_padding_mask(1, 14, pads=[4])
    positions = torch.cat([torch.zeros(4, dtype=torch.long), torch.arange(10)]).unsqueeze(0)
    torch.testing.assert_close(model(padded, positions, mask)[:, 4:], model(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_kv_cache_decoding_matches_full_forward(impl):
    model = model_pair(small_config(attention=impl), impl)
    ids = random_batch(length=20)
    full = model(ids)
    model.setup_kv_cache(batch_size=2, max_length=20)
    prefill = model(ids[:, :8], start_pos=0)  # batched prefill of the prompt
    steps = [model(ids[:, t:t + 1], start_pos=t) for t in range(8, 20)]  # one token at a time
    incremental = torch.cat([prefill, *steps], dim=1)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=0)
    model.clear_kv_cache()


@pytest.mark.parametrize("impl", IMPLS)
def test_kv_cache_with_left_padding(impl):
    model = model_pair(small_config(attention=impl), impl)
    ids = random_batch(length=16)
    mask = left_padding_mask(2, 16, pads=[3, 0])
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    full = model(ids, positions, mask)
    model.setup_kv_cache(batch_size=2, max_length=16)
    chunks = [model(ids[:, :6], positions[:, :6], mask[:, :6], start_pos=0)]
    for t in range(6, 16):
        chunks.append(model(ids[:, t:t + 1], positions[:, t:t + 1], mask[:, :t + 1], start_pos=t))
    incremental = torch.cat(chunks, dim=1)
    for row in range(2):
        torch.testing.assert_close(incremental[row, mask[row]], full[row, mask[row]],
                                   atol=1e-5, rtol=0)


def test_kv_cache_overflow_is_a_clear_error():
    model = model_pair(small_config(), "pb_relax")
    model.setup_kv_cache(batch_size=1, max_length=4)
    with pytest.raises(ValueError, match="KV cache holds 4 positions"):
        model(random_batch(batch=1, length=5), start_pos=0)
    with pytest.raises(ValueError, match="max_positions"):
        model.setup_kv_cache(batch_size=1, max_length=65)


def test_logits_range_is_a_slice_of_the_vocabulary():
    model = model_pair(small_config(), "pb_relax")
    ids = random_batch()
    torch.testing.assert_close(model(ids, logits_range=(10, 50)), model(ids)[..., 10:50])


def test_output_head_is_tied_and_block_is_cogviews():
    model = CogViewTransformer(small_config())
    torch.testing.assert_close(model.logits(torch.eye(64)), model.word_embeddings.weight.T)
    names = {name for name, _ in model.named_parameters()}
    for part in ("input_layernorm", "attention.query_key_value", "attention.dense",
                 "third_layernorm", "post_attention_layernorm", "mlp.dense_h_to_4h",
                 "mlp.dense_4h_to_h", "fourth_layernorm"):
        assert f"layers.0.{part}.weight" in names
    plain = CogViewTransformer(small_config(sandwich_ln=False))
    assert not any("third_layernorm" in name for name, _ in plain.named_parameters())


def test_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    model = CogViewTransformer(small_config(num_layers=8, hidden_size=256, num_heads=4))
    expected = 0.02 / math.sqrt(2 * 8)
    for layer in model.layers:
        assert abs(layer.mlp.dense_4h_to_h.weight.std().item() - expected) < 0.1 * expected
        assert abs(layer.attention.dense.weight.std().item() - expected) < 0.1 * expected
        assert abs(layer.mlp.dense_h_to_4h.weight.std().item() - 0.02) < 0.002


def test_pb_relax_layernorm_is_per_token():
    """Each token's output is independent of the others' magnitudes (cache exactness)."""
    model = model_pair(small_config(), "pb_relax")
    ids = random_batch(batch=2)
    alone = model(ids[:1])
    together = model(ids)
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=0)


def residual_rms_per_layer(model, ids):
    """Runs the model and returns (logits, [RMS of the residual stream after each layer])."""
    rms = []
    hooks = [layer.register_forward_hook(
        lambda _m, _i, out: rms.append(out.float().pow(2).mean().sqrt().item()))
        for layer in model.layers]
    logits = model(ids)
    for hook in hooks:
        hook.remove()
    return logits, rms


def test_sandwich_ln_bounds_every_branch_in_fp16():
    """A blown-up MLP (weights x 1e4) overflows pre-LN in fp16 but not Sandwich-LN."""
    layers = 12
    config = small_config(num_layers=layers, hidden_size=64, num_heads=4)
    torch.manual_seed(0)
    sandwich = CogViewTransformer(config)
    plain = CogViewTransformer(TransformerConfig(**{**config.__dict__, "sandwich_ln": False}))
    plain.load_state_dict(sandwich.state_dict(), strict=False)  # same weights, minus LN3/LN4
    for model in (sandwich, plain):
        with torch.no_grad():
            model.layers[5].mlp.dense_h_to_4h.weight.mul_(1e4)
            model.layers[5].mlp.dense_4h_to_h.weight.mul_(1e4)
        model.half().eval()
    ids = random_batch(length=32)

    with torch.no_grad():
        sandwich_logits, sandwich_rms = residual_rms_per_layer(sandwich, ids)
        plain_logits, _ = residual_rms_per_layer(plain, ids)
        embedding = sandwich.word_embeddings(ids) + sandwich.position_embeddings(torch.arange(32))
    assert not torch.isfinite(plain_logits).all(), "pre-LN should overflow in fp16"
    assert torch.isfinite(sandwich_logits).all()

    gains = [ln.weight.abs().max().item() + ln.bias.abs().max().item()
             for layer in sandwich.layers for ln in (layer.third_layernorm, layer.fourth_layernorm)]
    embedding_rms = embedding.float().pow(2).mean().sqrt().item()
    bound = math.sqrt(2 * layers + 1) * max(max(gains), embedding_rms)
    assert max(sandwich_rms) <= bound, (sandwich_rms, bound)


def test_cogview_4b_preset_has_exactly_cogviews_parameter_count():
    with initialize_config_dir(config_dir=str(CONF_DIR / "model"), version_base=None):
        preset = compose(config_name="cogview-4b")
    config = TransformerConfig.from_dict(dict(preset))
    with torch.device("meta"):
        model = CogViewTransformer(config)
    assert model.num_parameters() == 3_928_849_920
    assert (config.num_layers, config.hidden_size, config.num_heads) == (48, 2560, 40)
    assert (config.max_positions, config.vocab_size) == (1089, 58240)


@pytest.mark.parametrize("preset", ["tiny", "small", "cogview-4b"])
def test_every_model_preset_builds(preset):
    with initialize_config_dir(config_dir=str(CONF_DIR / "model"), version_base=None):
        values = dict(compose(config_name=preset))
    assert values["name"] == preset
    TransformerConfig.from_dict(values)


def test_save_and_load_pretrained(tmp_path):
    model = model_pair(small_config(), "pb_relax")
    model.save_pretrained(tmp_path / "export")
    loaded = CogViewTransformer.from_pretrained(tmp_path / "export").eval()
    ids = random_batch()
    torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)
    sdpa = CogViewTransformer.from_pretrained(tmp_path / "export", attention="sdpa").eval()
    torch.testing.assert_close(sdpa(ids), model(ids), atol=1e-5, rtol=0)
    # built on the meta device, filled from the file: nothing left on meta, the head still
    # tied, and dtype= loads half-precision weights without an fp32 copy
    half = CogViewTransformer.from_pretrained(tmp_path / "export", dtype=torch.float16)
    tensors = list(half.parameters()) + list(half.buffers())
    assert all(not t.is_meta for t in tensors)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    torch.testing.assert_close(half.float().eval()(ids), model(ids), atol=2e-2, rtol=0)


def test_from_pretrained_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        CogViewTransformer.from_pretrained(tmp_path)
    model_pair(small_config(), "pb_relax").save_pretrained(tmp_path / "a")
    CogViewTransformer(small_config(hidden_size=32)).save_pretrained(tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").replace(tmp_path / "b" / "model.safetensors")
    with pytest.raises(ValueError, match=r"(?s)does not match.*shape mismatches \(52\): "
                       r"final_layernorm\.bias: checkpoint \(64,\) vs model \(32,\)"):
        CogViewTransformer.from_pretrained(tmp_path / "b")


def test_config_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="model.attention='flash'"):
        small_config(attention="flash")
    with pytest.raises(ValueError, match="not divisible"):
        small_config(hidden_size=66)
    with pytest.raises(ValueError, match="unknown transformer config keys"):
        TransformerConfig.from_dict({"num_layer": 2})
    model = model_pair(small_config(), "pb_relax")
    with pytest.raises(ValueError, match="max_positions=64"):
        model(random_batch(length=65))


def test_layer_stats_report_attention_scores_and_activations():
    model = model_pair(small_config(), "pb_relax")
    model.track_stats(True)
    model(random_batch())
    stats = model.layer_stats()
    assert set(stats) == {f"layer{i}/{k}" for i in range(3)
                          for k in ("max_attention_score", "max_activation")}
    assert all(value > 0 and math.isfinite(value) for value in stats.values())


def test_backward_reaches_every_parameter():
    model = CogViewTransformer(small_config())
    ids = random_batch()
    loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing


# ------------------------------------------------------------------------------------------------
# activation checkpointing


@pytest.mark.parametrize("attention", ["pb_relax", "sdpa"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(attention, monkeypatch):
    """fp32, with dropout (the recomputed forward must draw the same masks) and padding."""
    config = small_config(attention=attention, dropout=0.1, attention_dropout=0.1)
    models = []
    for recompute in (False, True):
        torch.manual_seed(0)
        models.append(CogViewTransformer(TransformerConfig(
            **{**config.__dict__, "activation_checkpointing": recompute})).train())
    ids, mask = random_batch(), left_padding_mask(2, 24, [0, 5])
    losses, grads, calls = [], [], []
    forward = Block.forward
    monkeypatch.setattr(Block, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    for model in models:
        calls.clear()
        torch.manual_seed(7)
        logits = model(ids, attention_mask=mask)
        # no loss on or from padding, as in training
        targets = ids[:, 1:].masked_fill(~(mask[:, 1:] & mask[:, :-1]), -100)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 300),
                                                 targets.reshape(-1))
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
        # each layer runs once, and once more in the backward pass when recomputing
        assert len(calls) == len(model.layers) * (2 if model.config.activation_checkpointing
                                                  else 1)
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-6, atol=1e-7,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_activation_checkpointing_does_nothing_outside_training(monkeypatch):
    torch.manual_seed(0)
    model = CogViewTransformer(small_config(activation_checkpointing=True)).eval()
    calls, forward = [], Block.forward
    monkeypatch.setattr(Block, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    model(random_batch()).sum().backward()  # eval mode: no recomputation
    assert len(calls) == len(model.layers)
