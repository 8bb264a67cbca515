"""The token-shard DataModule: exactly-once splitting, layouts, fingerprints, bad shards."""

import logging
import shutil
from collections import Counter
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from cogview.data.datamodule import (
    LayoutBatcher,
    TokenDataModule,
    TokenShardStream,
    decode_sample,
    plan_split,
)
from cogview.data.fingerprint import TokenizerMismatchError, image_tokenizer_fingerprint
from cogview.data.pretokenize import pretokenize
from cogview.data.tar_reader import read_tar
from cogview.modules.vqvae import VQVAE, VQVAEConfig
from cogview.tokenization import build_text_tokenizer, collate_layouts
from cogview.training import register_resolvers
from tests.helpers import CONF_DIR

NUM_SAMPLES, SHARD_SIZE = 96, 12  # 8 shards


def tiny_vqvae(seed):
    torch.manual_seed(seed)
    return VQVAE(VQVAEConfig.preset("tiny", channels=(16, 32, 32), res_channels=16, code_dim=16,
                                    num_codes=64, num_res_blocks=1))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8 pretokenized shapes-zh shards of 12 samples (32 px, with low-res codes)."""
    root = tmp_path_factory.mktemp("tokens")
    tiny_vqvae(0).save_pretrained(root / "vqvae")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="pretokenize", overrides=[
            f"vqvae_dir={root / 'vqvae'}", f"out={root / 'out'}", "progress=false",
            "num_workers=0", f"source.shapes.length={NUM_SAMPLES}", f"shard_size={SHARD_SIZE}",
            "size=32", "sr=true"])
    manifest = pretokenize(cfg)
    return SimpleNamespace(dir=root / "out", vqvae=root / "vqvae", manifest=manifest,
                           urls=[str(root / "out" / s["name"]) for s in manifest["shards"]])


def module(shards, train_shards=None, **kwargs):
    options = dict(num_val_shards=0, batch_size=5, num_workers=0, shuffle_buffer=10,
                   vqvae_dir=str(shards.vqvae), text_tokenizer={"kind": "char"})
    options.update(kwargs)
    dm = TokenDataModule(train_shards or str(shards.dir), **options)
    dm.setup("fit")
    return dm


def keys_of(loader):
    return [key for batch in loader for key in batch["key"]]


def all_keys(urls):
    return [r.key for url in urls for r in read_tar(url)]


# ------------------------------------------------------------------------------------------------
# splitting


@pytest.mark.parametrize("num_shards, mode", [(8, "shard"), (6, "rank-shard/worker-sample"),
                                              (5, "sample")])
def test_one_epoch_over_2_ranks_x_2_workers_yields_every_sample_once(shards, num_shards, mode):
    urls = shards.urls[:num_shards]
    assert plan_split(num_shards, 2, 2)[0] == mode
    seen = []
    for rank in range(2):
        dm = module(shards, urls, rank=rank, world_size=2, num_workers=2)
        seen += keys_of(dm.train_dataloader())
    expected = all_keys(urls)
    assert len(expected) == num_shards * SHARD_SIZE
    assert Counter(seen) == Counter(expected)  # none lost, none duplicated


def test_shard_mode_reads_each_shard_in_exactly_one_consumer(shards):
    consumers = []
    for rank in range(2):
        stream = module(shards, rank=rank, world_size=2).train_dataloader().dataset
        for worker in range(2):
            consumers.append({r.url for r in stream._records(worker, 2, epoch=0)})
    assert all(len(c) == 2 for c in consumers)
    assert set().union(*consumers) == set(shards.urls) and sum(map(len, consumers)) == 8


def test_each_epoch_is_complete_and_reshuffled(shards):
    loader = module(shards, num_workers=2).train_dataloader()
    first, second = keys_of(loader), keys_of(loader)
    assert sorted(first) == sorted(second) == sorted(all_keys(shards.urls))
    assert first != second


def test_resampled_mode_keeps_going_past_one_epoch(shards):
    loader = module(shards, resampled=True, batch_size=16).train_dataloader()
    batches = iter(loader)
    keys = [k for _ in range(2 * NUM_SAMPLES // 16) for k in next(batches)["key"]]
    assert len(keys) == 2 * NUM_SAMPLES and set(keys) <= set(all_keys(shards.urls))
    assert max(Counter(keys).values()) > 1


def test_rank_and_world_size_come_from_the_trainer(shards):
    dm = TokenDataModule(str(shards.dir), num_val_shards=0, num_workers=0)
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2)
    stream = dm.train_dataloader().dataset
    assert (stream.rank, stream.world_size) == (1, 2)


def test_validation_holds_out_the_last_shards(shards):
    dm = module(shards, num_val_shards=2)
    val, train = keys_of(dm.val_dataloader()), keys_of(dm.train_dataloader())
    assert sorted(val) == all_keys(shards.urls[-2:]) and not set(val) & set(train)
    assert len(train) == 6 * SHARD_SIZE
    with pytest.raises(ValueError, match="num_val_shards=8 would leave no training shard"):
        module(shards, num_val_shards=8)


# ------------------------------------------------------------------------------------------------
# layouts and padding


def decoded_samples(shards, n):
    return [decode_sample(r.members, r.key, need_lowres=True)
            for r in list(read_tar(shards.urls[0]))[:n]]


@pytest.mark.parametrize("task", ["t2i", "caption", "sr"])
@pytest.mark.parametrize("pad_to, max_text_len, text_slots",
                         [(None, None, None), (None, 6, None), (200, 64, None), (None, 64, 64)])
def test_batches_equal_collate_layouts_of_the_task_layouts(shards, task, pad_to, max_text_len,
                                                           text_slots):
    vocab = module(shards).vocab
    batcher = LayoutBatcher(vocab, task, max_text_len=max_text_len, pad_to=pad_to,
                            caption_end_token="[SEP]" if task == "caption" else None,
                            text_slots=text_slots)
    samples = decoded_samples(shards, 7)
    batch = batcher.collate(samples)
    layouts = [batcher.layout(s.text_ids, s.image_codes, s.lowres_codes) for s in samples]
    expected = collate_layouts(layouts, vocab.pad_id, pad_to=pad_to)
    for name, tensor in expected.items():
        assert torch.equal(batch[name], tensor), name
    lengths = {len(layout) for layout in layouts}
    assert batch["input_ids"].shape[1] == (pad_to or max(lengths))
    if max_text_len == 6:  # every caption is longer: all cut to 6 tokens
        assert len(lengths) == 1 and batch["text_truncated"].min() > 0
    else:  # captions differ in length, so padding was exercised
        assert len(lengths) > 1 and batch["text_truncated"].sum() == 0
    if text_slots is not None:  # image codes at the same positions in every row
        image = (batch["input_ids"] < vocab.num_image_codes) & batch["attention_mask"]
        per_row = {tuple(pos[img].tolist()) for pos, img in zip(batch["position_ids"], image)}
        assert len(per_row) == 1


def test_loader_batches_carry_task_layouts_with_loss_masks(shards):
    dm = module(shards, layout="sr", pad_to=dm_len(shards), shuffle_buffer=0,
                shuffle_shards=False)
    batch = next(iter(dm.train_dataloader()))
    vocab = dm.vocab
    assert batch["input_ids"].shape == (5, dm.max_sequence_length())
    ids, loss = batch["input_ids"][0], batch["loss_mask"][0]
    assert ids[0] == vocab.roi1_id and (ids == vocab.boi2_id).sum() == 1
    boi2 = int((ids == vocab.boi2_id).nonzero())
    # sr: only the high-res codes (16 for 32 px) and [EOI2] are targets
    assert loss.nonzero().flatten().tolist() == list(range(boi2 + 1, boi2 + 18))
    assert batch["caption"][0] and isinstance(batch["key"][0], str)


def dm_len(shards):
    return module(shards, layout="sr").max_sequence_length()


# ------------------------------------------------------------------------------------------------
# tokenizer fingerprints


def test_shards_of_another_image_tokenizer_are_refused_naming_both(shards, tmp_path):
    other = tmp_path / "other-vqvae"
    tiny_vqvae(1).save_pretrained(other)
    ours, theirs = image_tokenizer_fingerprint(shards.vqvae), image_tokenizer_fingerprint(other)
    assert ours != theirs
    with pytest.raises(TokenizerMismatchError) as error:
        module(shards, vqvae_dir=str(other))
    assert ours in str(error.value) and theirs in str(error.value)
    assert "image tokenizer" in str(error.value) and "manifest.json" in str(error.value)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`")
def test_text_tokenizer_mismatch_is_refused_before_training_starts(shards):
    steps = []

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            steps.append(batch_idx)
            return self.layer(torch.ones(1, 1)).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = TokenDataModule(str(shards.dir), num_val_shards=0, num_workers=0,
                         text_fingerprint="0123456789abcdef")
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(TokenizerMismatchError) as error:
        trainer.fit(Model(), datamodule=dm)
    assert "0123456789abcdef" in str(error.value)
    assert build_text_tokenizer("char").fingerprint() in str(error.value)
    assert steps == []


def test_matching_fingerprints_given_directly_pass(shards):
    fingerprints = shards.manifest["fingerprints"]
    dm = module(shards, vqvae_dir=None, text_tokenizer=None,
                image_fingerprint=fingerprints["image_tokenizer"],
                text_fingerprint=fingerprints["text_tokenizer"])
    assert dm.vocab.num_image_codes == 64
    assert dm.vocab.text_vocab_size == build_text_tokenizer("char").vocab_size


def test_sr_layout_needs_shards_with_lowres_codes(shards, tmp_path):
    copy = tmp_path / "no-sr"
    shutil.copytree(shards.dir, copy)
    manifest = (copy / "manifest.json").read_text().replace('"sr": true', '"sr": false')
    (copy / "manifest.json").write_text(manifest)
    with pytest.raises(ValueError, match="sr=true"):
        module(shards, str(copy), layout="sr")


# ------------------------------------------------------------------------------------------------
# bad shards


def test_truncated_and_missing_token_shards_are_skipped_and_counted(shards, tmp_path, caplog):
    copy = tmp_path / "tokens"
    shutil.copytree(shards.dir, copy)
    damaged = copy / shards.manifest["shards"][3]["name"]
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    (copy / shards.manifest["shards"][5]["name"]).unlink()
    dm = module(shards, str(copy), shuffle_buffer=0)
    loader = dm.train_dataloader()
    with caplog.at_level(logging.WARNING, logger="cogview.data.datamodule"):
        keys = keys_of(loader)
    intact = all_keys([u for i, u in enumerate(shards.urls) if i not in (3, 5)])
    prefix = [k for k in keys if k in set(all_keys([shards.urls[3]]))]
    assert set(intact) <= set(keys) and len(keys) == len(set(keys))
    assert 0 < len(prefix) < SHARD_SIZE
    assert loader.dataset.skipped == Counter({"truncated_shard": 1, "unreadable_shard": 1})
    assert "truncated_shard" in caplog.text and "unreadable_shard" in caplog.text


def test_codes_outside_the_vocabulary_are_skipped_not_fatal(shards):
    vocab = module(shards).vocab
    batcher = LayoutBatcher(vocab, "t2i")
    samples = decoded_samples(shards, 3)
    samples[1].image_codes = np.full_like(samples[1].image_codes, 64)  # K = 64
    stream = TokenShardStream(["unused"], batcher, batch_size=8, shuffle_buffer=0)
    rows = list(stream._rows(iter(samples)))
    assert [r.key for r in rows] == [samples[0].key, samples[2].key]
    assert stream.skipped == Counter({"bad_sample": 1})


# ------------------------------------------------------------------------------------------------
# config


def test_shards_config_composes_into_train_and_instantiates(shards):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="train", overrides=[
            "data=shards", f"data.train_shards={shards.dir}", "data.layout=caption",
            "data.num_workers=0", f"data.vqvae_dir={shards.vqvae}"])
    dm = instantiate(cfg.data)
    assert isinstance(dm, TokenDataModule) and dm.layout == "caption" and dm.seed == cfg.seed
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == cfg.data.batch_size
