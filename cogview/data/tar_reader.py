"""A tar reader for WebDataset shards (img2dataset input shards and pretokenized token shards
alike) that never lets a corrupt or hostile archive decide what happens: members are read in
pieces and capped (``max_member_bytes``), a cut or corrupt archive ends with a ``TarProblem``
that says what was lost, and every complete sample before it is delivered whole.

    for item in read_tar(url):          # local path or any URL webdataset's gopen opens
        TarRecord (a sample's members)  ... then at most one TarProblem
"""

from __future__ import annotations

import bz2
import gzip
import io
import logging
import lzma
import os
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Iterator

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls as wds_expand

log = logging.getLogger(__name__)

BLOCKSIZE = tarfile.BLOCKSIZE  # 512: tar headers and data are laid out in blocks of this size
_ZERO_BLOCK = bytes(BLOCKSIZE)
_REGULAR = (b"0", b"\0", b"7")  # regular file type flags (ustar, old tar, contiguous)
_EXTENSIONS = (b"x", b"g", b"L", b"K")  # pax / GNU headers that describe the next member
_READ_PIECE = 1 << 20  # members are read, and skipped, at most this many bytes at a time
# The largest tar member read into memory. A header may claim any size (8 GiB in octal, far
# more in GNU base-256), so a corrupt or hostile header must not decide what is allocated:
# a regular member above the limit is skipped unread and counted (oversized_member).
DEFAULT_MAX_MEMBER_BYTES = 256 * 1024 * 1024


@dataclass
class TarRecord:
    """The members of one sample of a tar: `members` maps extension (lower case) to bytes."""

    key: str
    members: dict[str, bytes]
    url: str
    problem: tuple[str, str] | None = None  # a member that could not be read, or too large


@dataclass
class TarProblem:
    """A problem with the tar itself (unreadable, truncated, corrupt); what follows it is lost.

    `lost` counts what the problem cost: "shards" (1) and, once the tar could be opened,
    "bytes" (from the first member not delivered to the end of what could be read; bytes of
    the decompressed tar for compressed shards), "members" (members not delivered: the
    complete members of a sample whose end was not reached, and the member cut off when its
    header was readable) and "samples" (the distinct sample keys among those members).
    """

    reason: str
    message: str
    url: str
    lost: dict[str, int] = field(default_factory=lambda: {"shards": 1})


@dataclass
class TarMember:
    """A regular file of a tar: `data` is None when its size is above the member limit."""

    name: str
    data: bytes | None
    size: int
    start: int  # offset of its first header (pax / GNU extension headers included)


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
    """Records 'LEN key=value\n' of a pax extended header; ValueError when malformed."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] not in (b"\0", b""):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if pos + length <= space + 1 or pos + length > len(data):  # would not move on
            raise ValueError(f"pax record at {pos} has length {length}")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _padded(size: int) -> int:
    return (size + BLOCKSIZE - 1) // BLOCKSIZE * BLOCKSIZE


class _TarReader:
    """The regular files of a tar stream (ustar, GNU and pax headers), in order.

    Python's tarfile parses headers in pure Python at ~40 us each and stops silently at a
    truncated or corrupt header; this reader is several times faster on the small members of
    token shards, raises _BrokenTar for a tar that breaks off, and never holds more than
    `max_member_bytes` of one member whatever its header claims (larger members are read past
    piece by piece). `offset` counts the bytes read; `cut_name` / `cut_start` are the name (once
    its header is read) and first header offset of the member being read, for the caller to
    say what a break cut off.
    """

    def __init__(self, stream, first_block: bytes, max_member_bytes: int) -> None:
        self.stream, self.head, self.max_member_bytes = stream, first_block, max_member_bytes
        self.offset = 0
        self.cut_name: str | None = None
        self.cut_start = 0

    def _take(self, size: int, keep: bool = True) -> bytes:
        """Up to `size` bytes (fewer only at the end of the stream), read piece by piece; with
        keep=False they are only counted (and b"" is returned)."""
        if keep and size <= _READ_PIECE and not self.head:  # the common case: one read
            data = self.stream.read(size)
            self.offset += len(data)
            if len(data) == size or not data:
                return data
            return data + self._take(size - len(data))  # a short read: read on
        parts, got = [], 0
        if self.head:
            first, self.head = self.head[:size], self.head[size:]
            got = len(first)
            parts.append(first)
        while got < size:
            part = self.stream.read(min(size - got, _READ_PIECE))
            if not part:
                break
            got += len(part)
            if keep:
                parts.append(part)
        self.offset += got
        if not keep:
            return b""
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _exact(self, size: int, what: str, keep: bool = True) -> bytes:
        before = self.offset
        data = self._take(size, keep)
        if self.offset - before != size:
            raise _BrokenTar("truncated_shard", f"ends at byte {self.offset} inside {what} "
                             "(truncated copy or download)")
        return data

    def drain(self) -> int:
        """The length of the rest of the stream (to count what a break lost): from the size of
        a local file, else by reading it (a pipe or a decompressed stream)."""
        before = self.offset
        try:
            if isinstance(self.stream, io.BufferedReader) and self.stream.seekable():
                rest = os.fstat(self.stream.fileno()).st_size - self.stream.tell()
                self.offset += max(rest, 0)
                return self.offset - before
            while True:
                mark = self.offset
                self._take(_READ_PIECE, keep=False)
                if self.offset == mark:
                    break
        except (OSError, EOFError, zlib.error, lzma.LZMAError):
            pass  # a compressed stream that breaks off: count what could be read
        return self.offset - before

    def _corrupt(self, at: int, what: str = "tar header") -> _BrokenTar:
        if at == 0:
            return _BrokenTar("unreadable_shard", f"has a corrupt {what} at byte 0 (not a tar "
                              "archive?)")
        return _BrokenTar("truncated_shard", f"has a corrupt {what} at byte {at}")

    def _header(self, block: bytes, at: int) -> tuple[str, bytes, int]:
        """(name, type flag, size) of a header block; _BrokenTar when its checksum is wrong."""
        unsigned = sum(block) - sum(block[148:156]) + 8 * 32  # checksum field counts as spaces
        try:
            stored = _header_number(block[148:156])
            size = _header_number(block[124:136])
        except ValueError:  # not octal digits
            stored = size = -1
        if stored != unsigned and stored != unsigned - 256 * sum(b > 127 for b in block) or \
                size < 0:
            raise self._corrupt(at)
        name = block[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if block[257:262] == b"ustar":
            prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if prefix:
                name = f"{prefix}/{name}"
        return name, block[156:157], size

    def members(self) -> Iterator[TarMember]:
        """The regular files in order; _BrokenTar where the tar breaks off or is corrupt."""
        long_name: str | None = None
        pax: dict[str, str] = {}
        start = None
        while True:
            at = self.offset
            if start is None:  # a new member begins (with its extension headers, if any)
                start = self.cut_start = at
                self.cut_name = None
            block = self._take(BLOCKSIZE)
            if len(block) < BLOCKSIZE:
                if at == 0:
                    raise _BrokenTar("unreadable_shard",
                                     f"is not a tar archive ({len(block)} bytes)")
                raise _BrokenTar("truncated_shard", f"ends at byte {self.offset} without the "
                                 "tar end-of-archive marker (truncated copy or download)")
            if block == _ZERO_BLOCK:
                if self._take(BLOCKSIZE).strip(b"\0"):
                    raise _BrokenTar("truncated_shard", f"has an end-of-archive block at byte "
                                     f"{at} followed by more data (a zeroed header, or tars "
                                     "concatenated)")
                return
            name, typeflag, size = self._header(block, at)
            if typeflag in _EXTENSIONS:
                if size > self.max_member_bytes:
                    raise self._corrupt(at, f"extended header ({size:,} bytes, above "
                                            f"max_member_bytes={self.max_member_bytes:,})")
                data = self._exact(_padded(size), f"the extended header of {name}")[:size]
                try:
                    if typeflag == b"x":
                        pax = _pax_records(data)
                        if "size" in pax and int(pax["size"]) < 0:
                            raise ValueError(f"size {pax['size']}")
                except ValueError:
                    raise self._corrupt(at, "pax header") from None
                if typeflag == b"L":
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                self.cut_name = pax.get("path", long_name)  # known before its own header
                continue
            if long_name is not None:
                name, long_name = long_name, None
            if pax:
                name, size = pax.get("path", name), int(pax.get("size", size))
                pax = {}
            self.cut_name = name
            regular, member_start, start = typeflag in _REGULAR, start, None
            if regular and size <= self.max_member_bytes:
                data = self._exact(_padded(size), f"member {name}")
                yield TarMember(name, data[:size] if len(data) != size else data, size,
                                member_start)
                continue
            what = f"member {name}"
            if regular:
                what += (f" (which claims {size:,} bytes, above max_member_bytes="
                         f"{self.max_member_bytes:,})")
            self._exact(_padded(size), what, keep=False)
            if regular:
                yield TarMember(name, None, size, member_start)


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
    openers = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f)), (b"BZh", bz2.BZ2File),
               (b"\xfd7zXZ\x00", lzma.LZMAFile))
    for magic, opener in openers:
        if first_block.startswith(magic):
            decompressed = opener(_Prepend(first_block, stream))
            return decompressed, decompressed.read(BLOCKSIZE)
    return stream, first_block


def _lost_summary(names: list[str]) -> str:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{len(names)} member{'s' * (len(names) != 1)} ({shown})" if names else "no member"


def _records(stream, url: str, select: set[str] | None,
             max_member_bytes: int) -> Iterator[TarRecord | TarProblem]:
    """read_tar's work on an open stream; yields the records, then the problem if any."""
    tar: _TarReader | None = None
    current: TarRecord | None = None
    names: list[str] = []  # the member names of `current`
    current_start = 0  # offset of its first member
    started = False
    try:
        tar = _TarReader(*_decompressed(stream, stream.read(BLOCKSIZE)), max_member_bytes)
        for member in tar.members():
            started = True
            key, ext = split_member_name(member.name)
            if key is None:
                log.debug("ignoring tar member %s of %s: not named key.extension", member.name,
                          url)
                continue
            ext = ext.lower()
            if current is not None and current.key != key:
                yield current
                current = None
            if current is None:
                current, names, current_start = TarRecord(key, {}, url), [], member.start
            names.append(member.name)
            if select is not None and ext not in select:
                continue
            if member.data is None:
                current.problem = current.problem or (
                    "oversized_member", f"member {member.name} of {url} claims "
                    f"{member.size:,} bytes, above max_member_bytes={max_member_bytes:,}: "
                    "skipped unread (raise max_member_bytes to read it)")
            elif ext in current.members:
                current.problem = current.problem or (
                    "unreadable_member", f"member {member.name} appears twice in {url}")
            else:
                current.members[ext] = member.data
        if current is not None:
            yield current
        return
    except _BrokenTar as broken:
        reason, message = broken.reason, f"shard {url} {broken}"
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as error:
        # a failing pipe: command, or compressed data that breaks off or is corrupt
        reason = "truncated_shard" if started else "unreadable_shard"
        message = f"shard {url} breaks off: {error}" if started else \
            f"cannot read shard {url}: {error}"
    if tar is None:
        yield TarProblem(reason, message, url)
        return
    # The sample in flight is complete when the member the tar broke in (header read) belongs
    # to another sample; otherwise its end was not reached and it is lost with the rest.
    lost_names, first_lost = [], tar.cut_start
    if current is not None:
        cut_key = split_member_name(tar.cut_name)[0] if tar.cut_name else None
        if cut_key is not None and cut_key != current.key:
            yield current
        else:
            lost_names, first_lost = list(names), current_start
    if tar.cut_name is not None:
        lost_names.append(tar.cut_name)
    end = tar.offset + tar.drain()
    lost = {"shards": 1, "bytes": end - first_lost, "members": len(lost_names),
            "samples": len({split_member_name(n)[0] for n in lost_names})}
    if reason == "truncated_shard":
        message += (f"; the rest of this shard is lost: {lost['bytes']:,} bytes from byte "
                    f"{first_lost}, {_lost_summary(lost_names)}")
    yield TarProblem(reason, message, url, lost)


def read_tar(url: str, select: set[str] | None = None,
             max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[TarRecord | TarProblem]:
    """Stream the samples of one tar (local path or any URL webdataset's gopen opens).

    Yields a TarRecord per sample (consecutive members sharing a key), and last a TarProblem
    when the tar cannot be opened ("unreadable_shard") or breaks off ("truncated_shard"). Every
    complete member before a break is delivered; the sample in flight at the break is delivered
    when the member cut off is known to start another sample, else it is counted as lost
    (TarProblem.lost). A regular member claiming more than `max_member_bytes` is skipped
    unread: its record carries an "oversized_member" problem naming it, and the rest of the
    tar is read on. `select` keeps only those extensions.
    """
    try:
        stream = gopen(url, "rb")
    except Exception as error:  # gopen raises whatever its backend raises
        yield TarProblem("unreadable_shard", f"cannot open shard {url}: {error}", url)
        return
    closed = False
    try:
        problem: TarProblem | None = None
        for item in _records(stream, url, select, max_member_bytes):
            if isinstance(item, TarProblem):
                problem = item
            else:
                yield item
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
    if isinstance(urls, str):
        return list(wds_expand(urls))
    return [str(u) for u in urls]
