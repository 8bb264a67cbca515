"""Pretokenized shard sets without Lightning: where the shards are (a directory and its
manifest, a brace pattern, URLs, or a ``{name}`` template), their manifest, and the decoding of
one sample's token arrays. Used by the training stream (cogview.data.stream) and by inference
(``cogview infer task=caption|sr`` over shards).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from webdataset.gopen import gopen

from cogview.data.tar_reader import expand_urls

MANIFEST_NAME = "manifest.json"  # one per shard directory (written by cogview.data.pretokenize)


# ------------------------------------------------------------------------------------------------
# shards and manifests


@dataclass
class ShardSet:
    """Shard URLs, their sample counts (when a manifest lists them) and the manifest."""

    urls: list[str]
    counts: list[int | None]
    manifest: dict | None = None
    manifest_path: str | None = None

    @property
    def num_samples(self) -> int | None:
        return None if any(c is None for c in self.counts) else sum(self.counts)

    def subset(self, indices: Sequence[int]) -> "ShardSet":
        return ShardSet([self.urls[i] for i in indices], [self.counts[i] for i in indices],
                        self.manifest, self.manifest_path)


def load_manifest(path: str) -> dict:
    """Read a manifest.json from a local path or any URL webdataset's gopen opens."""
    if not str(path).startswith(("pipe:", "http:", "https:")) and not Path(path).is_file():
        raise FileNotFoundError(f"manifest {path} not found: pretokenize writes manifest.json "
                                "beside the shards; pass data.manifest=PATH if it lives elsewhere")
    with gopen(str(path), "rb") as stream:
        manifest = json.loads(stream.read().decode("utf-8"))
    if manifest.get("format") != "cogview-tokens":
        raise ValueError(f"{path} is not a cogview pretokenized-shard manifest "
                         f"(format={manifest.get('format')!r})")
    if not manifest.get("complete"):
        raise ValueError(f"{path} belongs to an unfinished pretokenize run: rerun the same "
                         "`python -m cogview.data.pretokenize ...` command to complete it")
    return manifest


def _shard_file_name(url: str) -> str:
    """The .tar file name in a shard URL, a pipe: command included ('pipe:aws s3 cp
    s3://b/tokens-000001.tar -' -> 'tokens-000001.tar')."""
    names = re.findall(r"[^/\s'\"]+\.tar\b", url)
    return names[-1] if names else url.rsplit("/", 1)[-1]


def resolve_shards(spec: str | Sequence[str], manifest: str | None = None) -> ShardSet:
    """Shards from a directory (its manifest.json lists them), a brace pattern, a URL list, or
    a URL template with `{name}` filled in with every shard name `manifest` lists (shards
    that pretokenize sent elsewhere with shard_url, e.g. 'pipe:aws s3 cp s3://b/t/{name} -').

    For a pattern or list of local files the manifest is looked up beside the first shard,
    unless `manifest` names it.
    """
    if isinstance(spec, (list, tuple)) or not isinstance(spec, str):
        spec = [str(s) for s in spec]
    if isinstance(spec, str) and "{name}" in spec:  # one URL per shard the manifest lists
        if manifest is None:
            raise ValueError(f"shard spec {spec!r} has a {{name}} placeholder: give the "
                             "manifest that lists the shard names (data.manifest=PATH)")
        data = load_manifest(manifest)
        return ShardSet([spec.replace("{name}", s["name"]) for s in data["shards"]],
                        [int(s["samples"]) for s in data["shards"]], data, manifest)
    if isinstance(spec, str) and Path(spec).is_dir():
        directory = Path(spec)
        manifest_path = manifest or str(directory / MANIFEST_NAME)
        if manifest is None and not Path(manifest_path).is_file():
            urls = sorted(str(p) for p in directory.glob("*.tar"))
            if not urls:
                raise FileNotFoundError(f"shard directory {directory} holds no manifest.json and "
                                        "no .tar shards")
            return ShardSet(urls, [None] * len(urls))
        data = load_manifest(manifest_path)
        urls = [str(directory / s["name"]) for s in data["shards"]]
        return ShardSet(urls, [int(s["samples"]) for s in data["shards"]], data, manifest_path)
    urls = expand_urls(spec)
    if not urls:
        raise ValueError(f"shard spec {spec!r} expands to no shards")
    if manifest is None:
        first = Path(urls[0])
        if not urls[0].startswith(("pipe:", "http:", "https:")) and \
                (first.parent / MANIFEST_NAME).is_file():
            manifest = str(first.parent / MANIFEST_NAME)
    if manifest is None:
        return ShardSet(urls, [None] * len(urls))
    data = load_manifest(manifest)
    by_name = {s["name"]: int(s["samples"]) for s in data["shards"]}
    counts = [by_name.get(_shard_file_name(url)) for url in urls]
    return ShardSet(urls, counts, data, manifest)


# ------------------------------------------------------------------------------------------------
# decoding samples

_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}


def split_off_validation(train: ShardSet, num_val_shards: int, described: str
                         ) -> tuple[ShardSet, ShardSet | None]:
    """The last ``num_val_shards`` shards of ``train`` as a validation set (0: none); an error
    naming ``described`` (the training shards' spec) when no training shard would be left."""
    if not num_val_shards:
        return train, None
    if len(train.urls) <= num_val_shards:
        raise ValueError(
            f"data.num_val_shards={num_val_shards} would leave no training shard: {described} "
            f"has {len(train.urls)} shard(s). Set data.num_val_shards=0 (no validation), give "
            "data.val_shards=..., or pretokenize with a smaller shard_size")
    cut = len(train.urls) - num_val_shards
    return train.subset(range(cut)), train.subset(range(cut, len(train.urls)))


def manifest_vocab_sizes(manifest: Mapping) -> tuple[int, int]:
    """(VQ-VAE codebook size, text vocabulary size) the shards were tokenized with."""
    return (int(manifest["image_tokenizer"]["num_codes"]),
            int(manifest["text_tokenizer"]["vocab_size"]))


def load_npy(data: bytes) -> np.ndarray:
    """Decode .npy bytes; the header of each distinct (dtype, shape) is parsed once."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy file (bad magic)")
    header_len = int.from_bytes(data[8:10], "little") + 10 if data[6] == 1 else \
        int.from_bytes(data[8:12], "little") + 12
    header = data[:header_len]
    cached = _NPY_HEADERS.get(header)
    if cached is None:
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if array.dtype.hasobject or (array.ndim > 1 and not array.flags.c_contiguous):
            return array
        if len(_NPY_HEADERS) < 4096:
            _NPY_HEADERS[header] = (array.dtype, array.shape)
        return array
    dtype, shape = cached
    return np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)


@dataclass
class TokenSample:
    """One decoded shard sample."""

    key: str
    text_ids: np.ndarray  # (n,) tokenizer ids
    image_codes: np.ndarray  # (h, w) or (h*w,)
    lowres_codes: np.ndarray | None
    caption: str | None


class BadSample(ValueError):
    """A shard sample that cannot be used (missing member, corrupt array, ids out of range)."""


def decode_sample(members: Mapping[str, bytes], key: str, need_lowres: bool) -> TokenSample:
    """TarRecord members -> TokenSample; BadSample names what is wrong."""
    try:
        text_ids = load_npy(members["text_ids.npy"])
        image_codes = load_npy(members["image_codes.npy"])
        lowres = load_npy(members["lowres_codes.npy"]) if need_lowres else None
    except KeyError as error:
        hint = " (pretokenize with sr=true for the sr task)" if "lowres" in str(error) else ""
        raise BadSample(f"sample {key} has no {error.args[0]} member{hint}") from None
    except ValueError as error:
        raise BadSample(f"sample {key}: corrupt .npy member: {error}") from None
    caption = members["txt"].decode("utf-8", errors="replace") if "txt" in members else None
    return TokenSample(key, text_ids, image_codes, lowres, caption)
