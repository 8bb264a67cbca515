"""Input readers for the pretokenizer, and the tar reader shared with the token DataModule.

Three kinds of raw image-caption pairs, each read in one deterministic order (the pretokenizer's
resume logic relies on it: output shard i always covers input positions [i*N, (i+1)*N)):

- `ShapesSource`  shapes-zh rendered on the fly; position i is sample index i.
- `FolderSource`  a folder of images with a captions file (jsonl `{"path", "caption"}` or tsv
                  `path<TAB>caption`, in file order), or without one: the sorted recursive
                  listing of the images, each captioned by a `.txt` file of the same stem.
- `ShardSource`   img2dataset-style WebDataset shards (`.jpg`/`.jpeg`/`.png`/`.webp` image,
                  `.txt` caption, optional `.json`), local paths or any URL `webdataset.gopen`
                  opens (`pipe:` commands, http(s), ...), plain or gzip/bzip2/xz
                  compressed, in URL order then member order.

A source splits its work in two: `items(start)` runs in the main process and yields cheap
`RawSample`s in input order (an index, a path, or a tar member's bytes); `load(raw)` runs in a
worker process and decodes one of them, raising `SkipSample(reason, message)` for bad input.
Input problems found while reading (a truncated or unreadable tar) come out of `items` as
`RawSample`s whose `error` is already set, so every problem has a position and is counted once.

Skip reasons (`SKIP_REASONS`) are the keys of the manifest's "skipped" counts.
"""

from __future__ import annotations

import json
import logging
import lzma
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from cogview.data.images import ImageDecodeError, load_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # img2dataset member names, in priority order
SOURCE_KINDS = ("shapes", "folder", "shards")

SKIP_REASONS: dict[str, str] = {
    "undecodable_image": "image data PIL cannot decode (corrupt or truncated file)",
    "missing_image": "no image: no .jpg/.jpeg/.png/.webp member, or the file does not exist",
    "missing_caption": "no caption: no .txt member / sidecar file / captions-file entry",
    "empty_caption": "caption with no text tokens after normalisation",
    "unreadable_member": "a tar member that cannot be read: text that is not UTF-8, invalid "
                         "JSON, or a member name repeated within one sample",
    "bad_caption_row": "a captions-file line that is neither valid jsonl nor path<TAB>caption",
    "truncated_shard": "a tar that ends mid-member, without its end-of-archive marker, or at a "
                       "corrupt member header; the rest of that shard is lost",
    "unreadable_shard": "a shard that cannot be opened (missing file, failing pipe: command, "
                        "not a tar archive)",
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
    cursor: tuple[int, int] | None = None  # ShardSource: (url index, ordinal within that url)


@dataclass
class LoadedSample:
    """A decoded input sample (worker side): the RGB image, its caption and metadata."""

    image: Image.Image
    caption: str | None
    meta: dict = field(default_factory=dict)  # goes into the output sample's json


# ------------------------------------------------------------------------------------------------
# tar reading (img2dataset input shards and pretokenized token shards alike)

BLOCKSIZE = tarfile.BLOCKSIZE  # 512: tar headers and data are laid out in blocks of this size
_ZERO_BLOCK = bytes(BLOCKSIZE)
_REGULAR = (b"0", b"\0", b"7")  # regular file type flags (ustar, old tar, contiguous)


@dataclass
class TarRecord:
    """The members of one sample of a tar: `members` maps extension (lower case) to bytes."""

    key: str
    members: dict[str, bytes]
    url: str
    problem: tuple[str, str] | None = None  # a member that could not be read


@dataclass
class TarProblem:
    """A problem with the tar itself (truncated, unreadable); what follows it is lost."""

    reason: str
    message: str
    url: str


class _BrokenTar(Exception):
    """The tar cannot be read on from here: `reason` is a key of SKIP_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """WebDataset naming: 'dir/000123.text_ids.npy' -> ('dir/000123', 'text_ids.npy')."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return None, None
    return (f"{directory}/{stem}" if directory else stem), ext


def _header_number(field: bytes) -> int:
    """A numeric header field: NUL/space-terminated octal, or GNU base-256 (high bit set)."""
    if field and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] & 0x40 else value
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _pax_records(data: bytes) -> dict[str, str]:
    """Records 'LEN key=value\n' of a pax extended header."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] not in (b"\0", b""):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _read_exact(stream, size: int, offset: int, what: str) -> bytes:
    data = stream.read(size) if size else b""
    if len(data) != size:
        raise _BrokenTar("truncated_shard", f"ends at byte {offset + len(data)} inside {what} "
                         f"(truncated copy or download)")
    return data


def _iter_tar_members(stream, first_block: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of a tar stream (ustar, GNU and pax headers).

    Python's tarfile parses headers in pure Python at ~40 us each and stops silently at a
    truncated or corrupt header; this reader is several times faster on the small members of
    token shards and raises _BrokenTar for a tar that breaks off.
    """
    offset, block = 0, first_block
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        if block is None:
            block = stream.read(BLOCKSIZE)
        if len(block) < BLOCKSIZE:
            if offset == 0:
                raise _BrokenTar("unreadable_shard", f"is not a tar archive ({len(block)} bytes)")
            raise _BrokenTar("truncated_shard", f"ends at byte {offset + len(block)} without the "
                             "tar end-of-archive marker (truncated copy or download)")
        if block == _ZERO_BLOCK:
            return
        unsigned = sum(block) - sum(block[148:156]) + 8 * 32  # checksum field counts as spaces
        try:
            stored = _header_number(block[148:156])
            size = _header_number(block[124:136])
        except ValueError:  # not octal digits
            stored = size = -1
        if stored != unsigned and stored != unsigned - 256 * sum(b > 127 for b in block) or \
                size < 0:
            kind = "unreadable_shard" if offset == 0 else "truncated_shard"
            raise _BrokenTar(kind, f"has a corrupt tar header at byte {offset}" +
                             (" (not a tar archive?)" if offset == 0 else ""))
        typeflag = block[156:157]
        name = block[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if block[257:262] == b"ustar":
            prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if prefix:
                name = f"{prefix}/{name}"
        offset += BLOCKSIZE
        if typeflag in (b"x", b"g", b"L", b"K"):  # pax / GNU extension headers
            data = _read_exact(stream, (size + BLOCKSIZE - 1) // BLOCKSIZE * BLOCKSIZE, offset,
                               f"the extended header of {name}")[:size]
            offset += (size + BLOCKSIZE - 1) // BLOCKSIZE * BLOCKSIZE
            if typeflag == b"x":
                pax = _pax_records(data)
            elif typeflag == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            block = None
            continue
        if long_name is not None:
            name, long_name = long_name, None
        if pax:
            name = pax.get("path", name)
            size = int(pax.get("size", size))
            pax = {}
        padded = (size + BLOCKSIZE - 1) // BLOCKSIZE * BLOCKSIZE
        if typeflag in _REGULAR:
            data = _read_exact(stream, padded, offset, f"member {name}")
            yield name, data[:size] if padded != size else data
        elif padded:
            _read_exact(stream, padded, offset, f"member {name}")
        offset += padded
        block = None


class _Prepend:
    """A read()-able stream that first returns `head`, then the rest of `stream`."""

    def __init__(self, head: bytes, stream) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size is None or size < 0:
            head, self.head = self.head, b""
            return head + self.stream.read()
        head, self.head = self.head[:size], self.head[size:]
        return head + (self.stream.read(size - len(head)) if size > len(head) else b"")


def _decompressed(stream, first_block: bytes):
    """(stream, its first block): decompressing gzip / bzip2 / xz input, passing tar through."""
    import bz2
    import gzip
    import lzma

    openers = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f)), (b"BZh", bz2.BZ2File),
               (b"\xfd7zXZ\x00", lzma.LZMAFile))
    for magic, opener in openers:
        if first_block.startswith(magic):
            decompressed = opener(_Prepend(first_block, stream))
            return decompressed, decompressed.read(BLOCKSIZE)
    return stream, first_block


def read_tar(url: str, select: set[str] | None = None) -> Iterator[TarRecord | TarProblem]:
    """Stream the samples of one tar (local path or any URL webdataset's gopen opens).

    Yields a TarRecord per sample (consecutive members sharing a key), and a TarProblem when
    the tar cannot be opened ("unreadable_shard") or breaks off ("truncated_shard"); a sample
    in flight when the tar breaks off is dropped with it. `select` keeps only those extensions.
    """
    from webdataset.gopen import gopen

    try:
        stream = gopen(url, "rb")
    except Exception as error:  # gopen raises whatever its backend raises
        yield TarProblem("unreadable_shard", f"cannot open shard {url}: {error}", url)
        return
    problem: TarProblem | None = None
    closed = started = False
    try:
        try:
            members = _iter_tar_members(*_decompressed(stream, stream.read(BLOCKSIZE)))
            current: TarRecord | None = None
            for name, data in members:
                started = True
                key, ext = split_member_name(name)
                if key is None:
                    log.debug("ignoring tar member %s of %s: not named key.extension", name, url)
                    continue
                ext = ext.lower()
                if current is not None and current.key != key:
                    yield current
                    current = None
                if current is None:
                    current = TarRecord(key, {}, url)
                if select is not None and ext not in select:
                    continue
                if ext in current.members:
                    current.problem = ("unreadable_member", f"member {name} appears twice in {url}")
                else:
                    current.members[ext] = data
            if current is not None:
                yield current
        except _BrokenTar as broken:
            lost = "; the rest of this shard is lost" if broken.reason == "truncated_shard" else ""
            problem = TarProblem(broken.reason, f"shard {url} {broken}{lost}", url)
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as error:
            # a failing pipe: command, or compressed data that breaks off or is corrupt
            if started:
                problem = TarProblem("truncated_shard", f"shard {url} breaks off: {error}", url)
            else:
                problem = TarProblem("unreadable_shard", f"cannot read shard {url}: {error}", url)
        closed = True
        try:
            stream.close()
        except Exception as error:  # e.g. a pipe: command that exited with an error status
            if problem is None:
                problem = TarProblem("truncated_shard", f"shard {url}: {error}", url)
        if problem is not None:
            yield problem
    finally:
        if not closed:  # the consumer stopped early
            try:
                stream.close()
            except Exception:
                pass


def expand_urls(urls: str | list[str]) -> list[str]:
    """Brace patterns ('shard-{000..009}.tar'), '::'-joined lists or a list -> list of URLs."""
    from webdataset.shardlists import expand_urls as wds_expand

    if isinstance(urls, str):
        return list(wds_expand(urls))
    return [str(u) for u in urls]


# ------------------------------------------------------------------------------------------------
# sources


class ShapesSource:
    """shapes-zh samples 0..length-1 of a split, rendered in the worker at the output size."""

    kind = "shapes"

    def __init__(self, split: str = "train", length: int = 10_000, seed: int = 0,
                 size: int = 64) -> None:
        from cogview.data.shapes import check_split

        check_split(split)
        if length < 1:
            raise ValueError(f"source.length={length} must be >= 1 (number of shapes-zh samples)")
        self.split, self.length, self.seed, self.size = split, int(length), int(seed), int(size)

    def describe(self) -> dict:
        return {"kind": self.kind, "split": self.split, "length": self.length, "seed": self.seed}

    def num_items(self) -> int:
        return self.length

    def items(self, start: int = 0, resume: tuple[int, int] | None = None) -> Iterator[RawSample]:
        for index in range(start, self.length):
            yield RawSample(position=index, key=f"{index:09d}", payload=index)

    def load(self, raw: RawSample) -> LoadedSample:
        from cogview.data.shapes import render_scene, sample_scene

        scene, caption = sample_scene(self.seed, self.split, raw.payload)
        meta = {"source": "shapes-zh", "split": self.split, "seed": self.seed,
                "index": raw.payload, "scene": scene}
        return LoadedSample(render_scene(scene, self.size), caption, meta)


def _read_captions_file(path: Path) -> list[tuple[str | None, str | None, str | None]]:
    """Rows (relative image path, caption or None, problem or None) of a jsonl / tsv file."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".tsv", ".txt"):
        raise ValueError(
            f"captions file {path} has suffix {suffix!r}; use .jsonl (one "
            '{"path": ..., "caption": ...} per line) or .tsv (path<TAB>caption per line)'
        )
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
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

    def __init__(self, root: str | None = None, captions: str | None = None) -> None:
        if root is None and captions is None:
            raise ValueError("source.kind=folder needs source.root=DIR and/or "
                             "source.captions=FILE (.jsonl or .tsv)")
        self.captions = Path(captions).resolve() if captions else None
        if self.captions is not None and not self.captions.is_file():
            raise FileNotFoundError(f"source.captions={captions!r}: no such file")
        self.root = Path(root).resolve() if root else self.captions.parent
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

    def items(self, start: int = 0, resume: tuple[int, int] | None = None) -> Iterator[RawSample]:
        for position in range(start, len(self.rows)):
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
                    raise SkipSample("missing_caption", f"{sidecar} is not UTF-8: {error}") \
                        from None
        try:
            image = load_image(path)
        except ImageDecodeError as error:
            raise SkipSample("undecodable_image", str(error)) from None
        return LoadedSample(image, caption, {"source": str(path)})


class ShardSource:
    """img2dataset-style WebDataset shards, read in URL order then member order."""

    kind = "shards"

    def __init__(self, urls: str | list[str]) -> None:
        if not urls:
            raise ValueError("source.kind=shards needs source.urls=PATTERN (e.g. "
                             "'data/{00000..00009}.tar', or 'pipe:curl -s URL')")
        self.urls = expand_urls(urls)

    def describe(self) -> dict:
        return {"kind": self.kind, "urls": self.urls}

    def num_items(self) -> None:
        return None  # only known once read

    def items(self, start: int = 0, resume: tuple[int, int] | None = None) -> Iterator[RawSample]:
        """Samples from `start` on; `resume=(url index, ordinal)` is where position `start` lies,
        so earlier shards need not be read again."""
        first_url, skip = resume if resume is not None else (0, 0)
        position = start - skip if resume is not None else 0
        for url_index in range(first_url, len(self.urls)):
            url = self.urls[url_index]
            for ordinal, item in enumerate(read_tar(url)):
                if position >= start:
                    cursor = (url_index, ordinal)
                    if isinstance(item, TarProblem):
                        yield RawSample(position, f"{url}#{ordinal}", None,
                                        (item.reason, item.message), cursor)
                    else:
                        yield RawSample(position, item.key, item, item.problem, cursor)
                position += 1

    def load(self, raw: RawSample) -> LoadedSample:
        record: TarRecord = raw.payload
        members = record.members
        meta: dict[str, Any] = {"source": record.url}
        if "json" in members:
            try:
                original = json.loads(members["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise SkipSample("unreadable_member",
                                 f"{record.key}.json in {record.url} is not valid JSON: {error}") \
                    from None
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
                raise SkipSample("unreadable_member",
                                 f"{record.key}.txt in {record.url} is not UTF-8: {error}") \
                    from None
        try:
            image = load_image(members[ext], name=f"{record.key}.{ext} in {record.url}")
        except ImageDecodeError as error:
            raise SkipSample("undecodable_image", str(error)) from None
        return LoadedSample(image, caption, meta)


def build_source(kind: str, size: int, options: dict | None = None):
    """A source from the pretokenizer config: `kind` and the options of that kind.

    shapes: split, length, seed; folder: root, captions; shards: urls. Unknown options raise
    a ValueError naming them.
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
    return cls(**given)
