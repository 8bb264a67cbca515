"""Input readers for the pretokenizer, and the tar reader shared with the token DataModule.

Three kinds of raw image-caption pairs, each read in one deterministic order (the pretokenizer's
resume logic relies on it: an output shard always covers the same N input positions):

- `ShapesSource`  shapes-zh rendered on the fly; position i is sample index i.
- `FolderSource`  a folder of images with a captions file (jsonl `{"path", "caption"}` or tsv
                  `path<TAB>caption`, in file order), or without one: the sorted recursive
                  listing of the images, each captioned by a `.txt` file of the same stem.
- `ShardSource`   img2dataset-style WebDataset shards (`.jpg`/`.jpeg`/`.png`/`.webp` image,
                  `.txt` caption, optional `.json`), local paths or any URL `webdataset.gopen`
                  opens (`pipe:` commands, http(s), ...), plain or gzip/bzip2/xz
                  compressed. Each input tar is a part of its own (`part_items(k)`): positions
                  count its samples from 0, so a rank (or a rerun) can start at any input tar
                  without reading the ones before it.

The tar reader itself (``read_tar``, used for token shards too) is cogview.data.tar_reader.

A source splits its work in two: `items(start, stop)` (`part_items(k)` for shards) runs in the
main process and yields cheap
`RawSample`s in input order (an index, a path, or a tar member's bytes); `load(raw)` runs in a
worker process and decodes one of them, raising `SkipSample(reason, message)` for bad input.
Input problems found while reading (a truncated or unreadable tar) come out of `items` as
`RawSample`s whose `error` is already set, so every problem has a position and is counted once.

Skip reasons (`SKIP_REASONS`) are the keys of the manifest's "skipped" counts. Limits keep
hostile input from deciding what is allocated: `max_member_bytes` for one tar member, and
`max_pixels` for one decoded image (checked from its header, see cogview.data.images).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from cogview.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image
from cogview.data.shapes import check_split, render_scene, sample_scene
from cogview.data.tar_reader import (
    DEFAULT_MAX_MEMBER_BYTES,
    TarProblem,
    TarRecord,
    expand_urls,
    read_tar,
)
from cogview.validate import check_int


log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # img2dataset member names, in priority order
SOURCE_KINDS = ("shapes", "folder", "shards")

SKIP_REASONS: dict[str, str] = {
    "undecodable_image": "image data PIL cannot decode (corrupt or truncated file), or an image "
                         "whose header claims more than max_pixels pixels (a decompression bomb)",
    "missing_image": "no image: no .jpg/.jpeg/.png/.webp member, or the file does not exist",
    "missing_caption": "no caption: no .txt member / sidecar file / captions-file entry",
    "empty_caption": "caption with no text tokens after normalisation",
    "unreadable_member": "a tar member or caption sidecar file that cannot be read: text that is "
                         "not UTF-8 (the expected encoding), invalid JSON, a member name repeated "
                         "within one sample, or a sample name that is not UTF-8",
    "oversized_member": "a tar member whose header claims more than max_member_bytes bytes; it "
                        "is skipped unread and the rest of its shard is read on",
    "bad_caption_row": "a captions-file line that is neither valid jsonl nor path<TAB>caption, "
                       "or is not UTF-8",
    "truncated_shard": "a tar that ends mid-member, without its end-of-archive marker, or at a "
                       "corrupt member header; the rest of that shard is lost (the manifest's "
                       "\"lost\" counts its bytes, members and samples)",
    "unreadable_shard": "a shard that cannot be opened (missing file, failing pipe: command, "
                        "not a tar archive)",
    "worker_crashed": "a sample whose worker process died every time it was tried alone (the "
                      "OOM killer on a huge image, a signal, a crash in a decoder); see "
                      "worker_retries",
}


class SkipSample(Exception):
    """Raised for one bad input sample; `reason` is a key of SKIP_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {sorted(SKIP_REASONS)}")
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class RawSample:
    """One input position: what a worker needs to load it, or the problem found while reading."""

    position: int  # index in the source's deterministic order
    key: str  # the source's own name for it (shapes index, relative path, tar key)
    payload: Any = None  # source-specific: a path, a caption, tar member bytes, ...
    error: tuple[str, str] | None = None  # (reason, message) when already known to be bad
    part: int | None = None  # ShardSource: the input tar's index (position counts within it)
    lost: dict[str, int] | None = None  # with a broken tar: what it cost (TarProblem.lost)


@dataclass
class LoadedSample:
    """A decoded input sample (worker side): the RGB image, its caption and metadata."""

    image: Image.Image
    caption: str | None
    meta: dict = field(default_factory=dict)  # goes into the output sample's json


# ------------------------------------------------------------------------------------------------
# sources


class ShapesSource:
    """shapes-zh samples 0..length-1 of a split, rendered in the worker at the output size."""

    kind = "shapes"

    def __init__(self, split: str = "train", length: int = 10_000, seed: int = 0,
                 size: int = 64) -> None:
        check_split(split)
        check_int("source.length", length, meaning="number of shapes-zh samples")
        self.split, self.length, self.seed, self.size = split, int(length), int(seed), int(size)

    def describe(self) -> dict:
        return {"kind": self.kind, "split": self.split, "length": self.length, "seed": self.seed}

    def num_items(self) -> int:
        return self.length

    def items(self, start: int = 0, stop: int | None = None) -> Iterator[RawSample]:
        for index in range(start, self.length if stop is None else min(stop, self.length)):
            yield RawSample(position=index, key=f"{index:09d}", payload=index)

    def load(self, raw: RawSample) -> LoadedSample:
        scene, caption = sample_scene(self.seed, self.split, raw.payload)
        meta = {"source": "shapes-zh", "split": self.split, "seed": self.seed,
                "index": raw.payload, "scene": scene}
        return LoadedSample(render_scene(scene, self.size), caption, meta)


def _caption_lines(path: Path) -> list[str | UnicodeDecodeError]:
    """The lines of a UTF-8 text file; a line that is not UTF-8 comes back as its error."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        pass
    lines: list[str | UnicodeDecodeError] = []
    for raw in data.splitlines():
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            lines.append(error)
    return lines


def _read_captions_file(path: Path) -> list[tuple[str | None, str | None, str | None]]:
    """Rows (relative image path, caption or None, problem or None) of a jsonl / tsv file."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".tsv", ".txt"):
        raise ValueError(
            f"captions file {path} has suffix {suffix!r}; use .jsonl (one "
            '{"path": ..., "caption": ...} per line) or .tsv (path<TAB>caption per line)'
        )
    rows = []
    for number, line in enumerate(_caption_lines(path), start=1):
        where = f"{path}:{number}"
        if isinstance(line, UnicodeDecodeError):
            rows.append((None, None, not_utf8_message(f"line {where}", line)))
            continue
        if not line.strip():
            continue
        if suffix in (".jsonl", ".json"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                rows.append((None, None, f"{where} is not valid JSON: {error}"))
                continue
            image = row.get("path", row.get("image", row.get("file"))) if isinstance(row, dict) \
                else None
            if not isinstance(image, str) or not image:
                rows.append((None, None, f"{where} has no \"path\" string: {line[:80]!r}"))
                continue
            caption = row.get("caption", row.get("text"))
            rows.append((image, caption if isinstance(caption, str) else None, None))
        else:
            image, tab, caption = line.partition("\t")
            if number == 1 and image.strip().lower() in ("path", "image", "file") and \
                    caption.strip().lower() in ("caption", "text"):
                continue  # header line
            if not image.strip():
                rows.append((None, None, f"{where} has no image path: {line[:80]!r}"))
                continue
            rows.append((image.strip(), caption if tab else None, None))
    return rows


class FolderSource:
    """Images under `root` with captions from a jsonl/tsv file, or from `.txt` sidecar files."""

    kind = "folder"

    def __init__(self, root: str | None = None, captions: str | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        if root is None and captions is None:
            raise ValueError("source.kind=folder needs source.root=DIR and/or "
                             "source.captions=FILE (.jsonl or .tsv)")
        self.captions = Path(captions).resolve() if captions else None
        if self.captions is not None and not self.captions.is_file():
            raise FileNotFoundError(f"source.captions={captions!r}: no such file")
        self.root = Path(root).resolve() if root else self.captions.parent
        self.max_pixels = max_pixels
        if not self.root.is_dir():
            raise FileNotFoundError(f"source.root={root!r}: no such directory")
        if self.captions is not None:
            self.rows = _read_captions_file(self.captions)
        else:  # sorted listing; the caption is read from the sidecar .txt in the worker
            images = sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*")
                            if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
            self.rows = [(image, None, None) for image in images]

    def describe(self) -> dict:
        return {"kind": self.kind, "root": str(self.root),
                "captions": str(self.captions) if self.captions else None,
                "num_rows": len(self.rows)}

    def num_items(self) -> int:
        return len(self.rows)

    def items(self, start: int = 0, stop: int | None = None) -> Iterator[RawSample]:
        for position in range(start, len(self.rows) if stop is None else min(stop, len(self.rows))):
            image, caption, problem = self.rows[position]
            error = ("bad_caption_row", problem) if problem else None
            yield RawSample(position, image or f"row-{position}", (image, caption), error)

    def load(self, raw: RawSample) -> LoadedSample:
        relative, caption = raw.payload
        path = self.root / relative
        if not path.is_file():
            raise SkipSample("missing_image", f"image file {path} does not exist")
        if self.captions is None:
            sidecar = path.with_suffix(".txt")
            if sidecar.is_file():
                try:
                    caption = sidecar.read_text(encoding="utf-8")
                except UnicodeDecodeError as error:
                    raise SkipSample("unreadable_member", not_utf8_message(
                        f"caption file {sidecar} of sample {raw.key}", error)) from None
        try:
            image = load_image(path, max_pixels=self.max_pixels)
        except ImageDecodeError as error:
            raise SkipSample("undecodable_image", str(error)) from None
        return LoadedSample(image, caption, {"source": str(path)})


class ShardSource:
    """img2dataset-style WebDataset shards, read in URL order then member order."""

    kind = "shards"

    def __init__(self, urls: str | list[str],
                 max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        if not urls:
            raise ValueError("source.kind=shards needs source.urls=PATTERN (e.g. "
                             "'data/{00000..00009}.tar', or 'pipe:curl -s URL')")
        self.urls = expand_urls(urls)
        self.max_member_bytes, self.max_pixels = int(max_member_bytes), max_pixels

    def describe(self) -> dict:
        return {"kind": self.kind, "urls": self.urls}

    def num_items(self) -> None:
        return None  # only known once read

    def num_parts(self) -> int:
        return len(self.urls)

    def part_items(self, part: int, wanted=None) -> Iterator[RawSample]:
        """The samples of input tar `part`, positions counted from 0 within it; positions for
        which `wanted(position)` is false are read past (a tar streams) but not yielded."""
        url = self.urls[part]
        for position, item in enumerate(read_tar(url, None, self.max_member_bytes)):
            if wanted is not None and not wanted(position):
                continue
            if isinstance(item, TarProblem):
                yield RawSample(position, f"{url}#{position}", None, (item.reason, item.message),
                                part, item.lost)
            else:
                yield RawSample(position, item.key, item, item.problem, part)

    def load(self, raw: RawSample) -> LoadedSample:
        record: TarRecord = raw.payload
        members = record.members
        meta: dict[str, Any] = {"source": record.url}
        if "json" in members:
            try:
                original = json.loads(members["json"].decode("utf-8"))
                json.dumps(original, ensure_ascii=False).encode("utf-8")  # lone surrogates
            except (ValueError, RecursionError) as error:  # UnicodeError, JSONDecodeError, ...
                raise SkipSample("unreadable_member",
                                 f"{record.key}.json in {record.url} is not valid UTF-8 JSON: "
                                 f"{error}") from None
            meta["json"] = original
            if isinstance(original, dict) and "objects" in original:  # a shapes-zh shard
                meta["scene"] = {k: original[k] for k in ("objects", "centers", "template")
                                 if k in original}
        ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        if ext is None:
            raise SkipSample("missing_image", f"sample {record.key} in {record.url} has no image "
                             f"member ({'/'.join(IMAGE_EXTENSIONS)}); it has "
                             f"{sorted(members) or 'no members'}")
        caption = None
        if "txt" in members:
            try:
                caption = members["txt"].decode("utf-8")
            except UnicodeDecodeError as error:
                raise SkipSample("unreadable_member", not_utf8_message(
                    f"caption {record.key}.txt of sample {record.key} in {record.url}", error)) \
                    from None
        try:
            image = load_image(members[ext], name=f"{record.key}.{ext} in {record.url}",
                               max_pixels=self.max_pixels)
        except ImageDecodeError as error:
            raise SkipSample("undecodable_image", str(error)) from None
        return LoadedSample(image, caption, meta)


def not_utf8_message(what: str, error: UnicodeError) -> str:
    """The message of a skip for text that is not UTF-8."""
    return (f"{what} is not UTF-8 text (the expected encoding): {error}; re-encode it as "
            "UTF-8")


def build_source(kind: str, size: int, options: dict | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES):
    """A source from the pretokenizer config: `kind` and the options of that kind.

    shapes: split, length, seed; folder: root, captions; shards: urls. Unknown options raise
    a ValueError naming them. `max_pixels` bounds the images folder and shards sources decode
    (None: no limit), `max_member_bytes` the tar members shards sources read.
    """
    builders = {
        "shapes": (ShapesSource, ("split", "length", "seed")),
        "folder": (FolderSource, ("root", "captions")),
        "shards": (ShardSource, ("urls",)),
    }
    if kind not in builders:
        raise ValueError(f"source.kind={kind!r} is unknown; choose one of {list(SOURCE_KINDS)}")
    cls, allowed = builders[kind]
    given = dict(options or {})
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"source.{kind} has unknown options {unknown}; it takes {list(allowed)}")
    if kind == "shapes":
        return cls(size=size, **given)
    if kind == "folder":
        return cls(**given, max_pixels=max_pixels)
    return cls(**given, max_pixels=max_pixels, max_member_bytes=max_member_bytes)
