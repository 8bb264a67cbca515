"""t2i, caption and sr tasks composed by Hydra: fast_dev_run, init_from, caption dropout, export."""

import logging

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from cogview.modules.transformer import CogViewTransformer
from cogview.tasks.sequence import SequenceTask
from cogview.tasks.t2i import drop_text
from cogview.tokenization.layouts import collate_layouts, t2i_layout
from cogview.training import register_resolvers, train
from tests.helpers import CONF_DIR, TINY_MODEL, make_token_shards, make_vqvae


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    vqvae = make_vqvae(root / "vqvae")
    return {"vqvae": vqvae,
            "t2i": make_token_shards(vqvae, root / "shards64", n=48, size=64, shard_size=16),
            "sr": make_token_shards(vqvae, root / "shards128", n=24, size=128, sr=True,
                                    shard_size=8)}


def compose_train(overrides):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="train", overrides=overrides)


def task_overrides(assets, task, tmp_path, *extra):
    shards = assets["sr"] if task == "sr" else assets["t2i"]
    return [f"task={task}", f"vqvae_dir={assets['vqvae']}", f"data.train_shards={shards}",
            "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=8",
            f"output_dir={tmp_path}", "logger=csv", "task.sample_every_n_steps=0",
            *TINY_MODEL, *extra]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("task", ["t2i", "caption", "sr"])
def test_fast_dev_run_each_task_and_precision(assets, tmp_path, task, precision):
    cfg = compose_train(task_overrides(assets, task, tmp_path, f"precision={precision}",
                                       "trainer.fast_dev_run=true"))
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    # loss_vocab=span by default: the parts are named after it
    assert ("train/image_loss_span" in metrics) == (task != "caption")  # caption: text only
    assert ("train/text_loss_span" in metrics) == (task != "sr")  # sr: image tokens only
    model = CogViewTransformer.from_pretrained(tmp_path / "export")
    assert model.config.num_layers == 2
    assert (tmp_path / "export" / "vqvae" / "model.safetensors").is_file()
    assert (tmp_path / "export" / "text_tokenizer" / "tokenizer.json").is_file()


def test_caption_initialised_from_t2i_and_mismatch_error(assets, tmp_path, caplog):
    t2i = compose_train(task_overrides(assets, "t2i", tmp_path / "t2i", "trainer.max_steps=2",
                                       "trainer.val_check_interval=2"))
    train(t2i)
    source = tmp_path / "t2i" / "export"
    caption = compose_train(task_overrides(assets, "caption", tmp_path / "cap",
                                           f"task.init_from={source}", "trainer.fast_dev_run=true"))
    task = train_task_only(caption)
    reference = CogViewTransformer.from_pretrained(source)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(task.model.state_dict()[name], value)
    wider = compose_train(task_overrides(assets, "caption", tmp_path / "bad",
                                         f"task.init_from={source}", "model.hidden_size=32"))
    expected = r"shape mismatches \(36\): final_layernorm.bias: checkpoint \(64,\) vs model \(32,\)"
    with pytest.raises(ValueError, match=expected):
        train_task_only(wider)
    checkpoint = tmp_path / "t2i" / "checkpoints" / "last.ckpt"
    from_ckpt = compose_train(task_overrides(assets, "caption", tmp_path / "ck",
                                             f"task.init_from={checkpoint}"))
    assert train_task_only(from_ckpt).model.num_parameters() == reference.num_parameters()
    assert "text_slots" not in caplog.text  # same position scheme: no warning
    fixed = compose_train(task_overrides(assets, "caption", tmp_path / "fx",
                                         f"task.init_from={source}",
                                         "data.fixed_image_positions=true"))
    with caplog.at_level(logging.WARNING, logger="cogview.tasks.sequence"):
        train_task_only(fixed)
    assert "was trained with text_slots=None but this run uses 64" in caplog.text


def train_task_only(cfg):
    from cogview.training import build_task

    return build_task(cfg)


@pytest.mark.parametrize("fixed", [False, True])
def test_dropped_caption_equals_the_empty_caption_layout(assets, tmp_path, fixed):
    """Caption dropout in batch form gives exactly the empty-text sequence's image logits."""
    cfg = compose_train(["task=t2i", f"vqvae_dir={assets['vqvae']}", "data.train_shards=x",
                         f"output_dir={tmp_path}", f"data.fixed_image_positions={fixed}",
                         *TINY_MODEL])
    from cogview.training import build_task

    task: SequenceTask = build_task(cfg).eval()
    slots = task.text_slots
    assert slots == (cfg.data.max_text_len if fixed else None)
    assert task.export_info()["text_slots"] == slots
    vocab, text = task.vocab, task.text_tokenizer.encode("左上角有一个大的红色圆形")
    codes = torch.arange(16) % vocab.num_image_codes
    full = collate_layouts([t2i_layout(vocab, text, codes, text_slots=slots)], vocab.pad_id)
    empty = collate_layouts([t2i_layout(vocab, [], codes, allow_empty_text=True,
                                        text_slots=slots)], vocab.pad_id)
    task.hparams.caption_dropout = 1.0  # the task's own dropout path: every row dropped
    dropped = task.train().maybe_drop_condition(full)
    task.eval()
    assert torch.equal(dropped["position_ids"], drop_text(full, torch.tensor([True]),
                                                          keep_positions=fixed)["position_ids"])
    image_logits = {}
    for name, batch in (("dropped", dropped), ("empty", empty)):
        logits = task.model(batch["input_ids"], batch["position_ids"], batch["attention_mask"])
        image_logits[name] = logits[0, batch["attention_mask"][0]][-18:]
    torch.testing.assert_close(image_logits["dropped"], image_logits["empty"], atol=1e-5, rtol=0)
    assert dropped["loss_mask"][0].sum() == empty["loss_mask"][0].sum() - 1  # [BASE] after text
    # the in-memory Pipeline (and so an export) samples with the task's positions
    from cogview.generation import generate_images

    pipe = task.pipeline("32-true")
    assert pipe.text_slots == slots
    image = pipe("左上角有一个大的红色圆形", num_images=1, top_k=1, image_tokens=16,
                 progress=False).images[0]
    codes = generate_images(task.model, vocab, [text], 16, greedy=True, text_slots=slots)
    assert np.array_equal(np.asarray(image), np.asarray(pipe.decode_codes(codes.view(1, 4, 4))[0]))


@pytest.mark.parametrize("fixed", [False, True])
def test_dropped_image_equals_the_caption_layout_without_its_image(assets, tmp_path, fixed):
    """Image dropout (task=caption) gives exactly the text logits of the sequence with the
    image tokens taken out, i.e. of the unconditional caption prompt guided decoding runs."""
    from cogview.generation import unconditional_prompt
    from cogview.tokenization.layouts import caption_layout, caption_prompt
    from cogview.training import build_task

    cfg = compose_train(["task=caption", f"vqvae_dir={assets['vqvae']}", "data.train_shards=x",
                         f"output_dir={tmp_path}", f"data.fixed_image_positions={fixed}",
                         "task.image_dropout=0.5", *TINY_MODEL])
    task = build_task(cfg).eval()
    slots, vocab = task.text_slots, task.vocab
    text = task.text_tokenizer.encode("左上角有一个大的红色圆形")
    codes = torch.arange(16) % vocab.num_image_codes
    full = collate_layouts([caption_layout(vocab, text, codes, end_token="[SEP]",
                                           text_slots=slots)], vocab.pad_id)
    task.hparams.image_dropout = 0.999999  # the task's own dropout path: the row is dropped
    dropped = task.train().maybe_drop_condition(full)
    task.eval()
    keep = dropped["attention_mask"][0]
    assert int((~keep).sum()) == 16 and bool((full["input_ids"][0][~keep] < 16).all())
    assert torch.equal(dropped["loss_mask"], full["loss_mask"].bool())  # every text target stays
    uncond = unconditional_prompt(caption_prompt(vocab, codes, text_slots=slots))
    kept_ids = full["input_ids"][0][keep]
    assert torch.equal(kept_ids[:len(uncond)], uncond.input_ids)
    assert torch.equal(dropped["position_ids"][0][keep][:len(uncond)], uncond.position_ids)
    with torch.no_grad():
        logits = task.model(dropped["input_ids"], dropped["position_ids"],
                            dropped["attention_mask"])[0, keep]
        alone = task.model(kept_ids[None], dropped["position_ids"][0][keep][None])[0]
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="image_dropout=1.0 must be in"):
        compose_and_build = compose_train(["task=caption", f"vqvae_dir={assets['vqvae']}",
                                           "data.train_shards=x", f"output_dir={tmp_path}",
                                           "task.image_dropout=1.0", *TINY_MODEL])
        build_task(compose_and_build)


def test_data_and_task_must_agree_on_fixed_image_positions(assets, tmp_path):
    from types import SimpleNamespace

    from cogview.training import build_task

    cfg = compose_train(["task=t2i", f"vqvae_dir={assets['vqvae']}", "data.train_shards=x",
                         f"output_dir={tmp_path}", "task.fixed_image_positions=true",
                         *TINY_MODEL])
    task = build_task(cfg)
    data = SimpleNamespace(vocab=task.vocab, layout="t2i", text_slots=None)
    task._trainer = SimpleNamespace(datamodule=data)
    with pytest.raises(ValueError, match="same fixed_image_positions and max_text_len"):
        task.setup("fit")
    with pytest.raises(ValueError, match="task.max_text_len is null"):
        build_task(compose_train(["task=t2i", f"vqvae_dir={assets['vqvae']}",
                                  "data.train_shards=x", f"output_dir={tmp_path}",
                                  "task.fixed_image_positions=true", "task.max_text_len=null",
                                  *TINY_MODEL]))


def test_text_loss_scale_weights_text_targets(assets, tmp_path):
    cfg = compose_train(["task=caption", f"vqvae_dir={assets['vqvae']}", "data.train_shards=x",
                         f"output_dir={tmp_path}", *TINY_MODEL])
    from cogview.training import build_task

    task = build_task(cfg)
    vocab = task.vocab
    layout = t2i_layout(vocab, task.text_tokenizer.encode("中间有一个小的蓝色菱形"),
                        torch.arange(16) % vocab.num_image_codes)
    batch = collate_layouts([layout], vocab.pad_id)
    plain = task.losses(batch)
    task.hparams.txt_loss_scale = 5.0
    scaled = task.losses(batch)
    torch.testing.assert_close(scaled["text_loss"], plain["text_loss"])
    assert not torch.isclose(scaled["loss"], plain["loss"])


@pytest.mark.parametrize("task", ["t2i", "caption", "sr"])
def test_periodic_samples_are_saved_as_pictures(assets, tmp_path, task):
    cfg = compose_train(task_overrides(assets, task, tmp_path, "task.sample_every_n_steps=1",
                                       "trainer.max_steps=1", "trainer.val_check_interval=1",
                                       "task.sample_seed=0"))
    train(cfg)
    pictures = sorted((tmp_path / "samples").glob(f"{task}_step*.png"))
    assert pictures, f"no {task} sample picture"
    from PIL import Image

    picture = Image.open(pictures[0])
    assert picture.width >= 2 * (64 if task != "sr" else 128)
    if task == "caption":
        import json

        rows = json.loads(next((tmp_path / "samples").glob("caption_step*.json")).read_text())
        assert len(rows) == 4 and all("reference" in row for row in rows)


def test_model_settings_are_type_checked(assets, tmp_path):
    from omegaconf.errors import ValidationError

    cfg = compose_train(task_overrides(assets, "t2i", tmp_path, "model.num_layers=two"))
    with pytest.raises(ValidationError, match="num_layers"):
        train(cfg)


def test_experiment_recipe_overrides_groups(tmp_path):
    cfg = compose_train(["experiment=shapes_t2i", "vqvae_dir=v", "data.train_shards=s",
                         f"output_dir={tmp_path}"])
    assert cfg.task.name == "t2i" and cfg.model.num_layers == 6 and cfg.data.resampled
    assert cfg.trainer.max_steps == 10000
