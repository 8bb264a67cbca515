"""The Lightning DataModule over the token stream: ``TokenDataModule`` resolves the shards
(cogview.data.shards), checks the tokenizers' fingerprints against the model's, splits off
validation, and hands ``TokenShardStream`` (cogview.data.stream) the trainer's rank, world
size and resume point. See cogview.data.stream for how samples are split and resumed.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from cogview.data.fingerprint import (
    TokenizerMismatchError,
    check_shard_set,
    image_tokenizer_fingerprint,
)
from cogview.data.pretokenize import build_text_tokenizer_from_config
from cogview.data.shards import (
    ShardSet,
    decode_sample,
    load_manifest,
    load_npy,
    manifest_vocab_sizes,
    resolve_shards,
    split_off_validation,
)
from cogview.data.stream import (
    SPLIT_MODES,
    LayoutBatcher,
    TokenShardStream,
    log_split_plan,
    plan_split,
)
from cogview.modules.vqvae import read_vqvae_config
from cogview.tokenization import CogViewVocab, text_slots_for
from cogview.tokenization.layouts import TASKS
from cogview.validate import check_int

log = logging.getLogger(__name__)

__all__ = ["TokenDataModule", "TokenShardStream", "LayoutBatcher", "ShardSet", "resolve_shards",
           "load_manifest", "plan_split", "load_npy", "decode_sample", "TokenizerMismatchError"]


# ------------------------------------------------------------------------------------------------
# the DataModule


def resume_point(trainer) -> tuple[int, int]:
    """(epoch, batches of it already trained on) of a trainer: (0, 0) for a fresh run, the
    checkpoint's position after ``ckpt_path`` restored it (Lightning restores the loops
    before it asks for the train DataLoader)."""
    fit_loop = getattr(trainer, "fit_loop", None)
    if fit_loop is None:  # no trainer (or a stand-in without loops)
        return 0, 0
    # epochs: ready > processed while one is in progress (a checkpoint from its last batch
    # has it processed, its end hooks not yet completed); batches: of that epoch, the batch
    # of a checkpoint written in on_train_batch_end counts as processed, not yet completed
    epochs = fit_loop.epoch_progress.current
    batches = fit_loop.epoch_loop.batch_progress.current
    in_progress = epochs.ready > epochs.processed
    return int(epochs.processed), int(batches.processed) if in_progress else 0


def _rank_and_world(trainer) -> tuple[int, int]:
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class TokenDataModule(L.LightningDataModule):
    """Pretokenized shards -> task batches for t2i / caption / sr training (cogview/conf/data/shards.yaml).

    train_shards: a directory written by the pretokenizer, a brace pattern or a URL list.
    Validation: `val_shards` (same forms), or the last `num_val_shards` shards of train_shards.
    Tokenizers: `vqvae_dir` and `text_tokenizer` ({kind, model_file} or {dir}) of the model, or
    their fingerprints directly; setup() checks them against the manifest and builds `vocab`.
    rank / world_size: taken from the Trainer or torch.distributed unless given (tests).
    """

    def __init__(
        self,
        train_shards: str | Sequence[str],
        val_shards: str | Sequence[str] | None = None,
        num_val_shards: int = 1,
        manifest: str | None = None,
        layout: str = "t2i",
        batch_size: int = 32,
        num_workers: int = 1,
        pad_to: int | None = None,
        max_text_len: int | None = 64,
        fixed_image_positions: bool = False,
        caption_end_token: str | None = None,
        sr_window: int = 0,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        split_by: str = "auto",
        drop_last: bool = False,
        seed: int = 0,
        vqvae_dir: str | None = None,
        text_tokenizer: Mapping[str, Any] | str | None = None,
        image_fingerprint: str | None = None,
        text_fingerprint: str | None = None,
        check_fingerprints: bool = True,
        return_captions: bool = True,
        pin_memory: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if layout not in TASKS:
            raise ValueError(f"data.layout={layout!r}; choose one of {list(TASKS)}")
        if not train_shards:
            raise ValueError("data.train_shards is required: the pretokenizer's out= directory, "
                             "a brace pattern such as 'tokens/tokens-{000000..000009}.tar', or "
                             "a list of URLs")
        check_int("data.num_val_shards", num_val_shards, 0)
        if split_by not in SPLIT_MODES:
            raise ValueError(f"data.split_by={split_by!r}; choose one of {list(SPLIT_MODES)}")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        self.train_shards, self.val_shards = train_shards, val_shards
        self.num_val_shards, self.manifest = num_val_shards, manifest
        self.layout, self.batch_size, self.num_workers = layout, batch_size, num_workers
        self.pad_to, self.max_text_len = pad_to, max_text_len
        self.text_slots = text_slots_for(fixed_image_positions, max_text_len, "data")
        self.caption_end_token, self.sr_window = caption_end_token, sr_window
        self.shuffle_shards, self.shuffle_buffer = shuffle_shards, shuffle_buffer
        self.resampled, self.split_by, self.drop_last, self.seed = (resampled, split_by,
                                                                    drop_last, seed)
        self.vqvae_dir = vqvae_dir
        self.text_tokenizer_cfg = text_tokenizer
        self.image_fingerprint, self.text_fingerprint = image_fingerprint, text_fingerprint
        self.check_fingerprints = check_fingerprints
        self.return_captions, self.pin_memory = return_captions, pin_memory
        self.rank, self.world_size = rank, world_size
        self.vocab: CogViewVocab | None = None
        self.batcher: LayoutBatcher | None = None
        self.train_set: ShardSet | None = None
        self.val_set: ShardSet | None = None

    # -- setup -----------------------------------------------------------------------------
    def _text_tokenizer(self):
        cfg = self.text_tokenizer_cfg
        if cfg is None:
            return None
        if isinstance(cfg, str):
            cfg = {"dir": cfg}
        return build_text_tokenizer_from_config(dict(cfg))

    def expected_fingerprints(self) -> tuple[dict[str, str | None], dict[str, str]]:
        """The model's tokenizer fingerprints and where each came from."""
        expected: dict[str, str | None] = {"image_tokenizer": self.image_fingerprint,
                                           "text_tokenizer": self.text_fingerprint}
        origin = {}
        if self.image_fingerprint:
            origin["image_tokenizer"] = "data.image_fingerprint"
        elif self.vqvae_dir:
            expected["image_tokenizer"] = image_tokenizer_fingerprint(self.vqvae_dir)
            origin["image_tokenizer"] = f"vqvae_dir={self.vqvae_dir}"
        if self.text_fingerprint:
            origin["text_tokenizer"] = "data.text_fingerprint"
        else:
            tokenizer = self._text_tokenizer()
            if tokenizer is not None:
                expected["text_tokenizer"] = tokenizer.fingerprint()
                origin["text_tokenizer"] = f"text_tokenizer={dict(self._tokenizer_cfg_dict())}"
        return expected, origin

    def _tokenizer_cfg_dict(self) -> dict:
        cfg = self.text_tokenizer_cfg
        return {"dir": cfg} if isinstance(cfg, str) else {k: v for k, v in dict(cfg).items()
                                                          if v is not None}

    def _build_vocab(self, manifest: dict | None) -> CogViewVocab:
        num_codes = text_size = None
        if manifest is not None:
            num_codes, text_size = manifest_vocab_sizes(manifest)
        if self.vqvae_dir:
            num_codes = read_vqvae_config(self.vqvae_dir).num_codes
        tokenizer = self._text_tokenizer()
        if tokenizer is not None:
            text_size = tokenizer.vocab_size
        if num_codes is None or text_size is None:
            raise ValueError("cannot build the vocabulary: the shards have no manifest.json and "
                             "data.vqvae_dir / data.text_tokenizer are not set")
        return CogViewVocab(num_codes, text_size)

    def setup(self, stage: str | None = None) -> None:
        """Resolve shards, check tokenizer fingerprints, split off validation, build the vocab."""
        if self.train_set is not None:
            return
        train = resolve_shards(self.train_shards, self.manifest)
        if self.val_shards:
            val = resolve_shards(self.val_shards)
        else:
            train, val = split_off_validation(train, self.num_val_shards, str(self.train_shards))
        if self.check_fingerprints:
            expected, origin = self.expected_fingerprints()
            for shard_set in (train, val):
                if shard_set is not None:
                    check_shard_set(shard_set, expected, origin)
        manifest = train.manifest
        if self.layout == "sr" and manifest is not None and not manifest.get("sr"):
            raise ValueError(f"data.layout=sr needs low-res codes, but the shards "
                             f"{train.manifest_path} were pretokenized without sr=true")
        if train.num_samples == 0:
            raise ValueError(f"the training shards {self.train_shards} hold no samples")
        self.vocab = self._build_vocab(manifest)
        self.batcher = LayoutBatcher(self.vocab, self.layout, max_text_len=self.max_text_len,
                                     pad_to=self.pad_to, caption_end_token=self.caption_end_token,
                                     sr_window=self.sr_window, text_slots=self.text_slots)
        self.train_set, self.val_set = train, val

    # -- info ------------------------------------------------------------------------------
    def max_sequence_length(self) -> int | None:
        """Longest layout the shards can give (needs a manifest and max_text_len), else None."""
        manifest = self.train_set.manifest if self.train_set else None
        if manifest is None or self.max_text_len is None or self.batcher is None:
            return None
        h, w = manifest["code_shape"]
        lowres = int(np.prod(manifest["lowres_code_shape"])) if self.layout == "sr" else 0
        return self.batcher.sequence_length(self.max_text_len, h * w, lowres)

    # -- loaders ---------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        if self.rank is not None:
            return self.rank, self.world_size
        return _rank_and_world(self.trainer)

    def _stream(self, shard_set: ShardSet, train: bool) -> TokenShardStream:
        rank, world = self._rank_world()
        workers = max(1, self.num_workers)
        mode, groups, members = plan_split(len(shard_set.urls), world, workers, self.split_by)
        resampled = self.resampled and train
        if not resampled:
            log_split_plan("train" if train else "val", shard_set.counts, world, workers, mode,
                           groups, train)
        return TokenShardStream(
            shard_set.urls, self.batcher, self.batch_size,
            shuffle_shards=self.shuffle_shards and train,
            shuffle_buffer=self.shuffle_buffer if train else 0,
            resampled=resampled, split_by=self.split_by, seed=self.seed, rank=rank,
            world_size=world, drop_last=self.drop_last and train,
            return_captions=self.return_captions)

    def _loader(self, dataset: TokenShardStream) -> DataLoader:
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=self.pin_memory)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        stream = self._stream(self.train_set, train=True)
        epoch, done = resume_point(self.trainer)
        if epoch or done:
            log.info("train stream resumes at epoch %d after %d batches of it (%s)", epoch, done,
                     "fresh draws: resampled" if stream.resampled else "the rest of the epoch")
        stream.set_epoch(epoch, done)
        return self._loader(stream)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        if self.val_set is None:
            return []
        return self._loader(self._stream(self.val_set, train=False))
