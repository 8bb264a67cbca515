"""Fuzzing the tar reader and the pretokenizer with randomly corrupted copies of a valid shard.

Each variant is one seeded corruption of a small img2dataset-style shard (png + txt samples,
one with a json member, a GNU long name and, in the pax copy, pax path headers): a truncation
at a random offset, a bit flip, an edited header field (size, name, type flag, mode, magic;
with its checksum recomputed or not, sizes up to a terabyte), a wrong checksum, a duplicated,
deleted or moved member, inserted zero or garbage blocks or a forged header, an edited pax
record, or any of these gzip-compressed, sometimes with the compressed bytes cut or flipped.
Every variant goes through `read_tar`; the first ones also through the pretokenizer (one run
per variant, the VQ-VAE included), each under a watchdog so that a hang fails the test.

What is asserted, per variant (a tar has no checksum over member data, so a corruption inside
a member, or a header edited consistently, cannot be detected by any reader: such members
are "touched" and only their accounting is checked):

reader
  R1  no exception escapes and the variant is read within the watchdog's time;
  R2  the items are TarRecords followed by at most one TarProblem (reason truncated_shard or
      unreadable_shard, with its "lost" counts);
  R3  every member delivered under the name of an untouched original member holds exactly
      that member's bytes (nothing partial, nothing shifted), and names that are not in the
      original come only from corruptions that can rename (header and pax edits, forged
      headers, compressed corruption);
  R4  every original sample that lies wholly before the first corrupted byte, together with
      the header that shows where it ends, is delivered whole;
  R5  for truncations, the exact outcome: every sample complete before the cut, plus the
      sample in flight when the member cut off is known to start another sample; and the
      problem's "lost" counts (bytes from the first member not delivered to the cut,
      members, samples).
pretokenizer
  P1  no exception escapes but NoUsableSamplesError (the documented error when nothing is
      usable; the manifest is written first);
  P2  accounting: every item the reader saw is one input position, and each is either a
      written sample or a counted skip: num_samples + sum(skipped) == num_inputs == number
      of reader items; the manifest's "lost" equals the reader's TarProblem.lost;
  P3  every sample the reader delivered whole with untouched members (image and caption)
      is written, and every written sample of an untouched original is byte-identical
      (caption, text ids, image codes) to the one written from the intact shard.
"""

import gzip
import io
import json
import random
import shutil
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hydra import compose, initialize_config_dir

from cogview.data.pretokenize import NoUsableSamplesError, Pretokenizer
from cogview.data.tar_reader import BLOCKSIZE, TarProblem, TarRecord, read_tar, split_member_name
from tests.helpers import CONF_DIR, make_vqvae
from tests.test_pretokenize import read_samples, shapes_png, tar_bytes
from tests.test_pretokenize_faults import deadline, with_checksum

SEED = 20240917
READER_VARIANTS = 2000  # default suite: every variant through read_tar ...
PRETOKENIZE_VARIANTS = 200  # ... and the first ones through the pretokenizer
SLOW_VARIANTS = 2400  # -m slow: every variant through both
VARIANT_DEADLINE_S = 20  # per variant; the pretokenizer run of one takes well under a second


# ------------------------------------------------------------------------------------------------
# the shard and its layout


@dataclass
class Member:
    """Where a member of the intact shard lies, and its data."""

    name: str
    start: int  # its first header (extension headers included)
    header: int  # its own header (after any extension headers)
    name_known: int  # offset from which a reader knows its name
    end: int  # end of its padded data
    data: bytes

    @property
    def key(self) -> str:
        return split_member_name(self.name)[0]


@dataclass
class Shard:
    """The intact shard: its bytes and the layout of its members."""

    data: bytes
    members: list[Member]
    archive_end: int  # end of the last member: the end-of-archive blocks start here

    @property
    def samples(self) -> list[list[int]]:
        """Member indices of each sample (consecutive members sharing a key), in order."""
        groups: list[list[int]] = []
        for index, member in enumerate(self.members):
            if groups and self.members[groups[-1][0]].key == member.key:
                groups[-1].append(index)
            else:
                groups.append([index])
        return groups

    def record(self, indices: list[int]) -> tuple[str, dict[str, bytes]]:
        return (self.members[indices[0]].key,
                {split_member_name(self.members[i].name)[1]: self.members[i].data
                 for i in indices})


def make_shard(pax: bool) -> Shard:
    """Five samples, one with a json member and one named by a GNU long-name header (pax=False)
    or a pax path header (pax=True)."""
    members = []
    for index in range(5):
        png, caption = shapes_png(index, 16)
        key = f"{index:03d}"
        if index == 3:
            key = "样本003" if pax else "d" * 110 + "/003"  # a pax path / a GNU long name
        members += [(f"{key}.png", png), (f"{key}.txt", caption.encode())]
        if index == 2:
            members.append((f"{key}.json", json.dumps({"url": "http://x/2"}).encode()))
    data = tar_bytes(members) if not pax else pax_tar(members)
    layout = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar.getmembers():
            header = info.offset_data - BLOCKSIZE
            extended = header > info.offset  # a pax path or GNU long name names it
            layout.append(Member(info.name, info.offset, header,
                                 header if extended else info.offset_data,
                                 info.offset_data + -(-info.size // BLOCKSIZE) * BLOCKSIZE,
                                 data[info.offset_data:info.offset_data + info.size]))
    return Shard(data, layout, layout[-1].end)


def pax_tar(members) -> bytes:
    """tar_bytes in pax format (a pax header for each name that is not ASCII or too long)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------
# corruptions


@dataclass
class Variant:
    """One corrupted copy of a shard, and what the corruption may have changed."""

    kind: str
    data: bytes
    damage: int | None  # first corrupted offset of the uncompressed tar (None: unknown)
    touched: set[int] = field(default_factory=set)  # original members whose bytes may differ
    may_rename: bool = False
    cut: int | None = None  # truncations: the cut
    all_touched: bool = False
    renamed_to: set[str] = field(default_factory=set)  # original names that may hold other data


def member_at(shard: Shard, offset: int) -> int | None:
    return next((i for i, m in enumerate(shard.members) if m.start <= offset < m.end), None)


def number_field(rng: random.Random, size: int) -> bytes:
    """A size field: plausible, off by a little or a block, zero, huge, negative or garbage."""
    choice = rng.randrange(8)
    if choice < 4:
        value = max(0, [0, size - 1, size + 1, size + BLOCKSIZE, size - BLOCKSIZE,
                        rng.randrange(1 << 16)][rng.randrange(6)])
        return b"%011o\0" % value
    if choice == 4:
        return bytes([0x80]) + (1 << 40).to_bytes(11, "big")  # a terabyte, GNU base-256
    if choice == 5:
        return b"77777777777\0"  # 8 GiB - 1 in octal
    if choice == 6:
        return bytes([0xff]) + rng.randbytes(11)  # negative base-256
    return rng.randbytes(12)


def edit_header(rng: random.Random, shard: Shard) -> Variant:
    index = rng.randrange(len(shard.members))
    member = shard.members[index]
    at = rng.choice([member.start, member.header])  # its first header or its own header
    header = bytearray(shard.data[at:at + BLOCKSIZE])
    field_name = rng.choice(["size", "size", "name", "type", "mode", "magic", "mtime"])
    renamed_to = set()
    if field_name == "size":
        header[124:136] = number_field(rng, len(member.data))
    elif field_name == "name":
        name = rng.choice([b"", rng.randbytes(rng.randrange(1, 20)), b"zz.png", b"000.png",
                           member.name.encode()[:-1] + b"\xff"])
        header[0:100] = name[:100].ljust(100, b"\0")
        renamed_to.add(name.decode("utf-8", "surrogateescape"))
    elif field_name == "type":
        header[156:157] = rng.choice([b"0", b"1", b"2", b"5", b"x", b"g", b"L", b"K", b"S",
                                      b"7", bytes([rng.randrange(256)])])
    elif field_name == "mode":
        header[100:108] = rng.randbytes(8)
    elif field_name == "magic":
        header[257:265] = rng.randbytes(8)
    else:
        header[136:148] = rng.randbytes(12)
    fixed = rng.random() < 0.8
    header = with_checksum(header) if fixed else bytes(header)
    return Variant(f"header:{field_name}:{'fixed' if fixed else 'bad'}",
                   shard.data[:at] + header + shard.data[at + BLOCKSIZE:], at, {index},
                   may_rename=True, renamed_to=renamed_to)


def splice(shard: Shard, rng: random.Random) -> Variant:
    """Members duplicated, deleted or moved, or blocks inserted, at member boundaries."""
    data, members = shard.data, shard.members
    boundaries = [m.start for m in members] + [shard.archive_end]
    kind = rng.choice(["duplicate", "delete", "move", "zero-block", "garbage", "forged"])
    if kind in ("duplicate", "delete", "move"):
        m = members[rng.randrange(len(members))]
        piece = data[m.start:m.end]
        without = data[:m.start] + data[m.end:] if kind != "duplicate" else data
        if kind == "delete":
            return Variant(kind, without, m.start)
        at = rng.choice(boundaries if kind == "duplicate" else  # boundaries of `without`
                        [b for b in boundaries if b <= m.start] +
                        [b - (m.end - m.start) for b in boundaries if b >= m.end])
        return Variant(kind, without[:at] + piece + without[at:], min(at, m.start))
    at = rng.choice(boundaries)
    if kind == "zero-block":
        block = bytes(BLOCKSIZE)
    elif kind == "garbage":
        block = rng.randbytes(BLOCKSIZE * rng.randrange(1, 3))
    else:  # a valid header for a member that claims a terabyte, or a forged small one
        info = tarfile.TarInfo(rng.choice(["999.png", "fake.txt", "000.png"]))
        renamed_to = {info.name}
        info.size = rng.choice([10, 600])
        header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
        if rng.random() < 0.5:
            header[124:136] = bytes([0x80]) + (1 << 40).to_bytes(11, "big")
            header = bytearray(with_checksum(header))
        block = bytes(header)
    return Variant(kind, data[:at] + block + data[at:], at, may_rename=kind == "forged",
                   renamed_to=renamed_to if kind == "forged" else set())


def edit_pax(rng: random.Random, shard: Shard) -> Variant | None:
    extended = [i for i, m in enumerate(shard.members) if m.name_known > m.start + BLOCKSIZE]
    if not extended:
        return None
    index = rng.choice(extended)
    member = shard.members[index]
    start, stop = member.start + BLOCKSIZE, member.name_known
    records = bytearray(shard.data[start:stop])  # pax records, or a GNU long name
    length_end = records.find(b" ")
    if length_end > 0:  # the first record's length: zero, negative, too long, not a number
        replacement = rng.choice([b"0", b"-5", b"1", b"99999", b"x", b"+3", rng.randbytes(2)])
        records[:length_end] = replacement[:length_end].rjust(length_end, b"0")
    if length_end <= 0 or rng.random() < 0.3:
        records[rng.randrange(len(records))] = rng.randrange(256)
    return Variant("pax", shard.data[:start] + bytes(records) + shard.data[stop:], start,
                   {index}, may_rename=True)


def corrupt(rng: random.Random, shard: Shard) -> Variant:
    data, roll = shard.data, rng.random()
    if roll < 0.25:
        limit = shard.archive_end + 2 * BLOCKSIZE if rng.random() < 0.8 else len(data)
        cut = rng.randrange(0, limit)
        variant = Variant("truncate", data[:cut], cut, cut=cut)
    elif roll < 0.45:
        at = rng.randrange(0, shard.archive_end + 2 * BLOCKSIZE)
        flipped = bytearray(data)
        flipped[at] ^= 1 << rng.randrange(8)
        index = member_at(shard, at)
        in_name = index is not None and shard.members[index].start + BLOCKSIZE <= at < \
            shard.members[index].name_known  # a pax path or long name: not checksummed
        variant = Variant("flip", bytes(flipped), at, {index} if index is not None else set(),
                          may_rename=in_name)
    elif roll < 0.65:
        variant = edit_header(rng, shard)
    elif roll < 0.72:
        index = rng.randrange(len(shard.members))
        at = shard.members[index].start
        header = bytearray(data[at:at + BLOCKSIZE])
        header[148:156] = rng.choice([rng.randbytes(8), b"%06o\0 " % rng.randrange(1 << 18)])
        variant = Variant("checksum", data[:at] + bytes(header) + data[at + BLOCKSIZE:], at,
                          {index})
    elif roll < 0.87:
        variant = splice(shard, rng)
    else:
        variant = edit_pax(rng, shard) or splice(shard, rng)
    if rng.random() < 0.1:  # compressed, and perhaps the compressed bytes damaged
        packed = gzip.compress(variant.data, mtime=0)
        variant.kind = f"gzip+{variant.kind}"
        damage = rng.random()
        if damage < 0.3:
            packed = packed[:rng.randrange(len(packed))]
            variant.all_touched = True
        elif damage < 0.6:
            flipped = bytearray(packed)
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            packed, variant.all_touched = bytes(flipped), True
        if variant.all_touched:
            variant.may_rename, variant.damage, variant.cut = True, None, None
        variant.data = packed
    return variant


# ------------------------------------------------------------------------------------------------
# expectations


def expected_truncation(shard: Shard, cut: int) -> tuple[list, dict | None]:
    """(records, lost) read_tar must give for the shard cut at `cut` (see R5)."""
    members = shard.members
    if cut >= shard.archive_end + BLOCKSIZE:  # the end-of-archive block is there
        return [shard.record(s) for s in shard.samples], None
    complete = sum(m.end <= cut for m in members)  # members[complete] is cut (if any)
    cut_name = None
    if complete < len(members) and cut >= members[complete].name_known:
        cut_name = members[complete].name
    first_lost = members[complete].start if complete < len(members) else shard.archive_end
    groups = Shard(shard.data, members[:complete], 0).samples
    records, lost_names = [shard.record(g) for g in groups[:-1]], []
    if groups:  # the sample in flight: delivered if the member cut starts another sample
        last = groups[-1]
        if cut_name is not None and split_member_name(cut_name)[0] != members[last[0]].key:
            records.append(shard.record(last))
        else:
            lost_names, first_lost = [members[i].name for i in last], members[last[0]].start
    if cut_name is not None:
        lost_names.append(cut_name)
    lost = {"shards": 1, "bytes": cut - first_lost, "members": len(lost_names),
            "samples": len({split_member_name(n)[0] for n in lost_names})}
    return records, lost


def check_reader(shard: Shard, variant: Variant, items: list) -> list[TarRecord]:
    """R2-R5; returns the records."""
    records = [i for i in items if isinstance(i, TarRecord)]
    problems = [i for i in items if isinstance(i, TarProblem)]
    assert items[:len(records)] == records and len(problems) <= 1, "R2: problem not last"
    for problem in problems:
        assert problem.reason in ("truncated_shard", "unreadable_shard"), problem
        assert problem.lost.get("shards") == 1 and all(v >= 0 for v in problem.lost.values())
    originals = {m.name: (i, m.data) for i, m in enumerate(shard.members)}
    for record in records:
        for ext, data in record.members.items():
            name = f"{record.key}.{ext}"
            if name not in originals:
                assert variant.may_rename, f"R3: member {name!r} is not in the shard"
            elif not variant.all_touched and originals[name][0] not in variant.touched and \
                    name not in variant.renamed_to:
                assert data == originals[name][1], f"R3: member {name} differs"
    if variant.damage is not None and not variant.all_touched:
        delivered = [(r.key, r.members) for r in records if r.problem is None]
        samples = shard.samples
        for number, sample in enumerate(samples):
            # where a reader learns that the sample ended: the next sample's name is read,
            # or the end-of-archive block and the block after it
            following = shard.members[samples[number + 1][0]].name_known \
                if number + 1 < len(samples) else shard.archive_end + 2 * BLOCKSIZE
            if following <= variant.damage:
                assert shard.record(sample) in delivered, f"R4: sample {sample} lost"
    if variant.cut is not None:
        expected, lost = expected_truncation(shard, variant.cut)
        assert [(r.key, r.members) for r in records] == expected, "R5: records"
        assert (problems[0].lost if problems else None) == lost, "R5: lost"
    return records


# ------------------------------------------------------------------------------------------------
# the pretokenizer, once per variant


class PretokenizeRunner:
    """One Pretokenizer over `shard.tar`; `run(data)` rewrites the input and the output."""

    def __init__(self, root, vqvae_dir) -> None:
        self.input, self.out = root / "shard.tar", root / "out"
        overrides = [f"vqvae_dir={vqvae_dir}", f"out={self.out}", "progress=false",
                     "num_workers=0", "source.kind=shards", f"source.shards.urls={self.input}",
                     "size=16", "shard_size=1000", "batch_size=16", "log_skipped=0"]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            self.cfg = compose(config_name="pretokenize", overrides=overrides)
        self.input.write_bytes(b"")
        self.pretokenizer = Pretokenizer(self.cfg)

    def run(self, data: bytes) -> tuple[dict, list[dict]]:
        self.input.write_bytes(data)
        shutil.rmtree(self.out, ignore_errors=True)
        try:
            self.pretokenizer.run()  # P1
        except NoUsableSamplesError:
            pass
        manifest = json.loads((self.out / "manifest.json").read_text(encoding="utf-8"))
        return manifest, read_samples(self.out)


def check_pretokenizer(shard: Shard, variant: Variant, items: list, records: list[TarRecord],
                       manifest: dict, written: list[dict], reference: dict) -> None:
    """P2-P3."""
    skipped = sum(manifest["skipped"].values())
    assert manifest["num_inputs"] == len(items), "P2: inputs != reader items"
    assert manifest["num_samples"] + skipped == len(items), "P2: kept + skipped != inputs"
    assert manifest["num_samples"] == len(written)
    problem = items[-1] if items and isinstance(items[-1], TarProblem) else None
    assert manifest["lost"] == ({problem.reason: problem.lost} if problem else {}), "P2: lost"
    originals = {m.name: i for i, m in enumerate(shard.members)}

    def untouched(key: str, exts) -> bool:
        indices = [originals.get(f"{key}.{ext}") for ext in exts]
        return not variant.all_touched and None not in indices and \
            not set(indices) & variant.touched

    keys = Counter()
    for sample in written:
        key = json.loads(sample["json"])["key"]
        keys[key] += 1
        if key in reference and untouched(key, ("png", "txt")):
            assert {k: sample[k] for k in reference[key]} == reference[key], \
                f"P3: sample {key} written differently"
    full = dict(shard.record(sample) for sample in shard.samples)
    whole = Counter(r.key for r in records if r.problem is None and r.key in full and
                    r.members == full[r.key] and untouched(r.key, r.members))
    assert not whole - keys, f"P3: intact samples {dict(whole - keys)} were not written"


# ------------------------------------------------------------------------------------------------
# the tests


@pytest.fixture(scope="module")
def fuzz_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    vqvae_dir = make_vqvae(root / "vqvae")
    runner = PretokenizeRunner(root, vqvae_dir)
    shards = [make_shard(pax=False), make_shard(pax=True)]
    reference = {}
    for shard in shards:
        _, samples = runner.run(shard.data)
        assert len(samples) == len(shard.samples)
        for sample in samples:
            reference[json.loads(sample["json"])["key"]] = {
                k: sample[k] for k in ("txt", "text_ids.npy", "image_codes.npy")}
    return root, runner, shards, reference


def fuzz(setup, variants: int, pretokenized: int, seed: int) -> Counter:
    root, runner, shards, reference = setup
    rng = random.Random(seed)
    path, kinds = root / "variant.tar", Counter()
    for number in range(variants):
        shard = shards[number % 2]
        variant = corrupt(rng, shard)
        kinds[variant.kind.split(":")[0]] += 1
        what = f"variant {number} (seed {seed}, {variant.kind})"
        try:
            with deadline(VARIANT_DEADLINE_S, what):
                path.write_bytes(variant.data)
                items = list(read_tar(str(path)))  # R1
                records = check_reader(shard, variant, items)
                if number < pretokenized:
                    manifest, written = runner.run(variant.data)
                    check_pretokenizer(shard, variant, items, records, manifest, written,
                                       reference)
        except Exception as error:
            raise AssertionError(f"{what}: {type(error).__name__}: {error}") from error
    return kinds


def report(record_property, variants: int, pretokenized: int, kinds: Counter, seconds: float):
    print(f"\nfuzzed {variants} corrupted shards through read_tar, {pretokenized} through the "
          f"pretokenizer, in {seconds:.1f} s: {dict(sorted(kinds.items()))}")
    record_property("fuzz_variants", variants)
    record_property("fuzz_pretokenized", pretokenized)


def test_corrupted_shards_are_read_and_pretokenized_or_counted(fuzz_setup, record_property):
    started = time.perf_counter()
    kinds = fuzz(fuzz_setup, READER_VARIANTS, PRETOKENIZE_VARIANTS, SEED)
    report(record_property, READER_VARIANTS, PRETOKENIZE_VARIANTS, kinds,
           time.perf_counter() - started)
    assert sum(kinds.values()) == READER_VARIANTS and len(kinds) >= 10


@pytest.mark.slow
def test_corrupted_shards_all_through_the_pretokenizer(fuzz_setup, record_property):
    started = time.perf_counter()
    kinds = fuzz(fuzz_setup, SLOW_VARIANTS, SLOW_VARIANTS, SEED + 1)
    report(record_property, SLOW_VARIANTS, SLOW_VARIANTS, kinds, time.perf_counter() - started)
    assert sum(kinds.values()) == SLOW_VARIANTS
