"""Images for training the VQ-VAE: shapes-zh rendered on the fly, or image shards."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset

from cogview.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image, resize_center_crop
from cogview.data.shapes import ShapesZh
from cogview.validate import check_int

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


def image_to_tensor(image) -> torch.Tensor:
    """PIL RGB -> float [3, H, W] in [0, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class ShapesImages(Dataset):
    """shapes-zh images as tensors [3, S, S] in [0, 1]."""

    def __init__(self, split: str, size: int, length: int, seed: int) -> None:
        self.shapes = ShapesZh(split=split, size=size, length=length, seed=seed, as_tensor=True)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.shapes[index]["image"]


@dataclass
class SkipCounter:
    """Samples dropped by reason (per process; each worker logs its own)."""

    undecodable: int = 0
    no_image: int = 0


class ShardImages(IterableDataset):
    """Images from WebDataset shards (img2dataset layout), resized and centre-cropped.

    Undecodable or missing images are skipped and counted, never fatal: unreadable or truncated
    bytes, images whose header claims more than ``max_pixels`` pixels (decompression bombs,
    refused before decoding; None: no limit) and images that run out of memory while decoding.
    """

    def __init__(self, urls: str | list[str], size: int, shuffle: int = 1000,
                 resampled: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.urls, self.size, self.shuffle, self.resampled = urls, size, shuffle, resampled
        self.max_pixels = max_pixels
        self.skipped = SkipCounter()

    def __iter__(self):
        pipeline = wds.WebDataset(
            self.urls, shardshuffle=100 if self.shuffle else False, resampled=self.resampled,
            nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker,
            handler=wds.warn_and_continue, empty_check=False,
        )
        if self.shuffle:
            pipeline = pipeline.shuffle(self.shuffle)
        for sample in pipeline:
            image = self._decode(sample)
            if image is not None:
                yield image

    def _decode(self, sample: dict) -> torch.Tensor | None:
        key = sample.get("__key__", "?")
        data = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if data is None:
            self.skipped.no_image += 1
            log.warning("skipped sample %s: no image member (%s)", key, "/".join(IMAGE_EXTENSIONS))
            return None
        try:
            image = load_image(data, name=key, max_pixels=self.max_pixels)
            return image_to_tensor(resize_center_crop(image, self.size))
        except (ImageDecodeError, MemoryError) as error:  # MemoryError: resizing a large one
            self.skipped.undecodable += 1
            log.warning("skipped sample: %s (%d undecodable so far)",
                        str(error) or f"image {key}: out of memory", self.skipped.undecodable)
            return None


class ImageDataModule(L.LightningDataModule):
    """Training and validation images for task=vqvae.

    source=shapes renders shapes-zh (train split for training, the held-out split for
    validation); source=shards reads ``train_shards`` / ``val_shards`` (brace patterns
    or lists of local paths / URLs WebDataset can open); shard images above ``max_pixels``
    pixels (None: no limit) are skipped and counted like undecodable ones.
    """

    def __init__(self, source: str = "shapes", size: int = 64, batch_size: int = 64,
                 num_workers: int = 1, train_length: int = 100_000, val_length: int = 256,
                 seed: int = 0, train_shards: str | list[str] | None = None,
                 val_shards: str | list[str] | None = None, shuffle_buffer: int = 1000,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        super().__init__()
        if source not in ("shapes", "shards"):
            raise ValueError(f"data.source={source!r}: use 'shapes' or 'shards'")
        if source == "shards" and not train_shards:
            raise ValueError("data.source=shards needs data.train_shards=<path or pattern>")
        if size % 8:
            raise ValueError(f"data.size={size} must be a multiple of 8")
        if max_pixels is not None:
            check_int("data.max_pixels", max_pixels,
                      meaning="pixels of the largest image to decode; null: no limit")
        self.source, self.size, self.batch_size = source, size, batch_size
        self.num_workers, self.seed = num_workers, seed
        self.train_length, self.val_length = train_length, val_length
        self.train_shards, self.val_shards = train_shards, val_shards
        self.shuffle_buffer, self.max_pixels = shuffle_buffer, max_pixels

    def train_dataloader(self) -> DataLoader:
        if self.source == "shapes":
            dataset = ShapesImages("train", self.size, self.train_length, self.seed)
            generator = torch.Generator().manual_seed(self.seed)
            return self._loader(dataset, shuffle=True, generator=generator, drop_last=True)
        dataset = ShardImages(self.train_shards, self.size, self.shuffle_buffer, resampled=True,
                              max_pixels=self.max_pixels)
        return self._loader(dataset)

    def val_dataloader(self) -> DataLoader:
        if self.source == "shapes":
            return self._loader(ShapesImages("heldout", self.size, self.val_length, self.seed + 1))
        if not self.val_shards:
            return []
        return self._loader(ShardImages(self.val_shards, self.size, shuffle=0,
                                        max_pixels=self.max_pixels))

    def _loader(self, dataset, **kwargs) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, **kwargs)
