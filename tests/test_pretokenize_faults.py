"""Faults in the pretokenizer: worker processes that die mid-run (SIGKILL, as the OOM killer
does), and hostile input tars: members claiming huge sizes, truncation inside the next sample,
captions that are not UTF-8, images above the pixel limit."""

import contextlib
import io
import json
import logging
import os
import signal
import tarfile
import tracemalloc
from collections import Counter

import pytest
from omegaconf import OmegaConf

from cogview.data import pretokenize as pretokenize_module
from cogview.data import sources
from cogview.data.images import DEFAULT_MAX_PIXELS
from cogview.data.tar_reader import DEFAULT_MAX_MEMBER_BYTES, TarRecord, read_tar
from tests.helpers import CONF_DIR, make_vqvae
from tests.test_pretokenize import read_samples, run, shapes_png, tar_bytes

WATCHDOG_S = 60  # a run that hangs (a dead worker's task waited for) fails instead


@contextlib.contextmanager
def deadline(seconds: float, what: str):
    """Raises TimeoutError in the main thread if the block runs longer than `seconds`."""
    def expire(signum, frame):
        raise TimeoutError(f"{what} did not finish within {seconds} s (hung?)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def vqvae_dir(tmp_path_factory):
    return make_vqvae(tmp_path_factory.mktemp("vqvae"))


def keys_of(out):
    return [int(s["__key__"]) for s in read_samples(out)]


# ------------------------------------------------------------------------------------------------
# dead workers


def kill_worker_on(monkeypatch, positions: set[int], log_file, times: int | None = None) -> None:
    """A worker process that prepares one of the input `positions` SIGKILLs itself (at most
    `times` times in all); each kill first appends "position pid" to `log_file`. Workers are
    forked after this patch, so they run it; the main process never kills itself."""
    main_pid, prepare = os.getpid(), pretokenize_module.prepare_sample

    def prepare_or_die(raw):
        if raw.position in positions and os.getpid() != main_pid:
            kills = log_file.read_text().splitlines() if log_file.exists() else []
            if times is None or len(kills) < times:
                with log_file.open("a") as handle:
                    handle.write(f"{raw.position} {os.getpid()}\n")
                os.kill(os.getpid(), signal.SIGKILL)
        return prepare(raw)

    monkeypatch.setattr(pretokenize_module, "prepare_sample", prepare_or_die)


def kills_of(log_file) -> Counter:
    """position -> how many workers it killed; asserts that no kill was in the main process."""
    kills = [line.split() for line in log_file.read_text().splitlines()]
    assert all(int(pid) != os.getpid() for _, pid in kills)
    return Counter(int(position) for position, _ in kills)


SHAPES = ("source.shapes.length=48", "size=16", "shard_size=16", "batch_size=8", "chunk_size=4",
          "num_workers=2")


def test_a_killed_worker_is_replaced_and_its_samples_redone_exactly_once(
        vqvae_dir, tmp_path, monkeypatch, caplog):
    out, kills = tmp_path / "out", tmp_path / "kills"
    kill_worker_on(monkeypatch, {21}, kills, times=1)
    with caplog.at_level(logging.WARNING, logger="cogview.pretokenize"), \
            deadline(WATCHDOG_S, "pretokenize with a killed worker"):
        manifest = run(vqvae_dir, out, *SHAPES)
    assert kills_of(kills) == {21: 1}, "no worker was killed"
    assert "worker process died" in caplog.text and "inputs 20-23" in caplog.text
    assert manifest["complete"] and manifest["num_samples"] == 48 and manifest["skipped"] == {}
    assert keys_of(out) == list(range(48))  # every input once, in order
    assert not list(out.glob("*.tmp"))
    with deadline(WATCHDOG_S, "the rerun"):
        again = run(vqvae_dir, out, *SHAPES)
    assert again == manifest and keys_of(out) == list(range(48))


def test_samples_that_kill_every_worker_are_counted_skips_naming_them(
        vqvae_dir, tmp_path, monkeypatch, caplog):
    """Two poisonous samples in chunks in flight together: each is given up after dying alone
    1 + worker_retries times, and no other sample is blamed for their crashes."""
    out, kills, poison = tmp_path / "out", tmp_path / "kills", {5, 9}
    kill_worker_on(monkeypatch, poison, kills)
    with caplog.at_level(logging.WARNING, logger="cogview.pretokenize"), \
            deadline(WATCHDOG_S, "pretokenize with samples that kill their worker"):
        manifest = run(vqvae_dir, out, *SHAPES, "worker_retries=1")
    # alone 1 + worker_retries times each, plus at most once in its chunk
    assert set(kills_of(kills)) == poison and set(kills_of(kills).values()) <= {2, 3}
    assert manifest["skipped"] == {"worker_crashed": 2} and manifest["num_samples"] == 46
    assert manifest["skip_reasons"]["worker_crashed"] == sources.SKIP_REASONS["worker_crashed"]
    assert keys_of(out) == [i for i in range(48) if i not in poison]
    for position in poison:
        assert f"input {position} ({position:09d}) killed its worker process each of the 2 " \
               "times" in caplog.text
    with deadline(WATCHDOG_S, "the rerun"):
        assert run(vqvae_dir, out, *SHAPES, "worker_retries=1") == manifest
    assert keys_of(out) == [i for i in range(48) if i not in poison]


def test_a_worker_that_cannot_start_is_a_clear_error_not_a_restart_loop(
        vqvae_dir, tmp_path, monkeypatch):
    main_pid, init = os.getpid(), pretokenize_module._init_worker

    def init_or_fail(*args):
        if os.getpid() != main_pid:
            raise OSError("tokenizer file vanished")
        return init(*args)

    monkeypatch.setattr(pretokenize_module, "_init_worker", init_or_fail)
    out = tmp_path / "out"
    with deadline(WATCHDOG_S, "pretokenize with failing workers"), \
            pytest.raises(RuntimeError, match="could not start: OSError: tokenizer file vanished"):
        run(vqvae_dir, out, *SHAPES)
    assert not list(out.glob("*.tar")) and not list(out.glob("*.tmp"))


def test_worker_pool_settings_are_checked(vqvae_dir, tmp_path):
    with pytest.raises(ValueError, match="worker_retries=-1 must be an int >= 0"):
        run(vqvae_dir, tmp_path / "a", "worker_retries=-1")
    with pytest.raises(ValueError, match="max_pixels=0 must be an int >= 1"):
        run(vqvae_dir, tmp_path / "b", "max_pixels=0")
    with pytest.raises(ValueError, match="max_member_bytes=0 must be an int >= 1"):
        run(vqvae_dir, tmp_path / "c", "max_member_bytes=0")


def test_config_limits_default_to_the_code_defaults():
    cfg = OmegaConf.load(CONF_DIR / "pretokenize.yaml")
    assert cfg.max_pixels == DEFAULT_MAX_PIXELS
    assert cfg.max_member_bytes == DEFAULT_MAX_MEMBER_BYTES
    assert cfg.worker_retries == pretokenize_module.DEFAULT_WORKER_RETRIES


# ------------------------------------------------------------------------------------------------
# hostile input tars


def shard_members(keys) -> list[tuple[str, bytes]]:
    """(name, bytes) members of img2dataset-style samples `keys` (16 px png + txt)."""
    members = []
    for key in keys:
        png, caption = shapes_png(int(key), 16)
        members += [(f"{key}.png", png), (f"{key}.txt", caption.encode())]
    return members


def offsets(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {info.name: info for info in tar.getmembers()}


def with_checksum(header: bytearray) -> bytes:
    """A tar header block with its checksum field recomputed."""
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def patch_header(data: bytes, name: str, offset: int, value: bytes) -> bytes:
    """`data` with bytes at `offset` of member `name`'s header set to `value`, checksum fixed."""
    at = offsets(data)[name].offset
    header = bytearray(data[at:at + 512])
    header[offset:offset + len(value)] = value
    return data[:at] + with_checksum(header) + data[at + 512:]


def with_size(data: bytes, name: str, size: int) -> bytes:
    """`data` with member `name`'s header claiming `size` bytes (GNU base-256)."""
    return patch_header(data, name, 124, bytes([0x80]) + size.to_bytes(11, "big"))


def describe(items):
    return [(i.key, sorted(i.members), i.problem and i.problem[0]) if isinstance(i, TarRecord)
            else (i.reason, i.lost) for i in items]


def test_a_member_claiming_a_terabyte_allocates_nothing_and_is_named(vqvae_dir, tmp_path):
    data = tar_bytes(shard_members(["000", "001", "002"]))
    path = tmp_path / "huge.tar"
    path.write_bytes(with_size(data, "001.png", 1 << 40))
    tracemalloc.start()
    try:
        items = list(read_tar(str(path)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"reading allocated {peak:,} bytes"
    *records, problem = items
    assert describe(records) == [("000", ["png", "txt"], None)]  # complete before 001.png
    assert problem.reason == "truncated_shard"
    assert "001.png (which claims 1,099,511,627,776 bytes, above max_member_bytes" in \
        problem.message and str(path) in problem.message
    lost = {"shards": 1, "members": 1, "samples": 1,
            "bytes": len(data) - offsets(data)["001.png"].offset}
    assert problem.lost == lost
    manifest = run(vqvae_dir, tmp_path / "out", "source.kind=shards",
                   f"source.shards.urls={path}", "size=16")
    assert manifest["num_samples"] == 1 and manifest["skipped"] == {"truncated_shard": 1}
    assert manifest["lost"] == {"truncated_shard": lost}


def test_an_oversized_member_is_skipped_and_the_rest_of_the_shard_read(vqvae_dir, tmp_path):
    big = b"x" * 5000  # fits the data actually present; above a 4096-byte limit
    members = shard_members(["000"]) + [("001.png", big), ("001.txt", b"big")] + \
        shard_members(["002", "003"])
    path = tmp_path / "in.tar"
    path.write_bytes(tar_bytes(members))
    items = list(read_tar(str(path), max_member_bytes=4096))
    assert describe(items) == [("000", ["png", "txt"], None), ("001", ["txt"], "oversized_member"),
                               ("002", ["png", "txt"], None), ("003", ["png", "txt"], None)]
    assert f"member 001.png of {path} claims 5,000 bytes, above max_member_bytes=4,096" in \
        items[1].problem[1]
    assert [r.members for r in items if r.key != "001"] == [
        {"png": m[0][1], "txt": m[1][1]} for m in (members[:2], members[4:6], members[6:8])]
    manifest = run(vqvae_dir, tmp_path / "out", "source.kind=shards",
                   f"source.shards.urls={path}", "size=16", "max_member_bytes=4096")
    assert manifest["skipped"] == {"oversized_member": 1} and manifest["num_samples"] == 3
    assert manifest["limits"] == {"max_member_bytes": 4096, "max_pixels": DEFAULT_MAX_PIXELS}
    assert [json.loads(s["json"])["key"] for s in read_samples(tmp_path / "out")] == \
        ["000", "002", "003"]


def test_truncation_inside_the_next_sample_keeps_the_sample_before_it(vqvae_dir, tmp_path):
    members = shard_members(["000", "001", "002", "003"])
    data, originals = tar_bytes(members), dict(members)
    at = offsets(data)
    path = tmp_path / "cut.tar"
    expected = {  # cut at -> (samples delivered, lost members)
        at["002.png"].offset_data + 10: (["000", "001"], ["002.png"]),  # 001 complete
        at["002.txt"].offset_data + 5: (["000", "001"], ["002.png", "002.txt"]),  # 002 incomplete
        at["002.png"].offset + 100: (["000"], ["001.png", "001.txt"]),  # next name unknown
    }
    for cut, (kept, lost) in expected.items():
        path.write_bytes(data[:cut])
        *records, problem = read_tar(str(path))
        assert [r.key for r in records] == kept, cut
        assert all(r.members == {"png": originals[f"{r.key}.png"],
                                 "txt": originals[f"{r.key}.txt"]} for r in records)
        first_lost = at[lost[0]].offset
        assert problem.lost == {"shards": 1, "members": len(lost), "samples": 1,
                                "bytes": cut - first_lost}, cut
        assert all(name in problem.message for name in lost)
    # the pretokenizer writes the kept samples and counts the loss in its manifest
    path.write_bytes(data[:at["002.png"].offset_data + 10])
    manifest = run(vqvae_dir, tmp_path / "out", "source.kind=shards",
                   f"source.shards.urls={path}", "size=16")
    assert manifest["num_samples"] == 2 and manifest["skipped"] == {"truncated_shard": 1}
    lost = {"shards": 1, "members": 1, "samples": 1, "bytes": 10 + 512}
    assert manifest["lost"] == {"truncated_shard": lost}
    assert manifest["shards"][0]["lost"] == {"truncated_shard": lost}


def run_logged(vqvae_dir, out, caplog, *overrides) -> tuple[dict, str]:
    """(manifest, the warnings it logged) of one pretokenize run."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cogview.pretokenize"):
        manifest = run(vqvae_dir, out, "size=16", *overrides)
    return manifest, caplog.text


def test_captions_that_are_not_utf8_are_skips_naming_the_sample_and_encoding(
        vqvae_dir, tmp_path, caplog):
    latin1 = "café au lait".encode("latin-1")
    shard = tmp_path / "in.tar"
    shard.write_bytes(tar_bytes(shard_members(["000"]) + [("001.png", shapes_png(1, 16)[0]),
                                                          ("001.txt", latin1)]))
    folder = tmp_path / "images"
    folder.mkdir()
    for index, name in enumerate(["a", "b"]):
        (folder / f"{name}.png").write_bytes(shapes_png(index, 16)[0])
    (folder / "a.txt").write_text("红色", encoding="utf-8")
    (folder / "b.txt").write_bytes(latin1)
    captions = folder / "captions.tsv"
    captions.write_bytes("a.png\t红色\n".encode() + b"b.png\t" + latin1 + b"\n")
    cases = [  # (input, skip reason, message)
        (("source.kind=shards", f"source.shards.urls={shard}"), "unreadable_member",
         f"caption 001.txt of sample 001 in {shard} is not UTF-8 text (the expected encoding)"),
        (("source.kind=folder", f"source.folder.root={folder}"), "unreadable_member",
         f"caption file {folder / 'b.txt'} of sample b.png is not UTF-8 text (the expected"),
        (("source.kind=folder", f"source.folder.captions={captions}"), "bad_caption_row",
         f"line {captions}:2 is not UTF-8 text (the expected encoding)"),
    ]
    for number, (overrides, reason, message) in enumerate(cases):
        manifest, logged = run_logged(vqvae_dir, tmp_path / f"out{number}", caplog, *overrides)
        assert manifest["skipped"] == {reason: 1} and manifest["num_samples"] == 1, overrides
        assert message in logged


def test_images_above_max_pixels_are_skips_naming_the_sample(vqvae_dir, tmp_path, caplog):
    small, _ = shapes_png(0, 16)  # 256 pixels
    large, _ = shapes_png(1, 24)  # 576 pixels
    path = tmp_path / "in.tar"
    path.write_bytes(tar_bytes([("000.png", small), ("000.txt", "小".encode()),
                                ("001.png", large), ("001.txt", "大".encode())]))
    folder = tmp_path / "images"
    folder.mkdir()
    for name, png in (("small", small), ("large", large)):
        (folder / f"{name}.png").write_bytes(png)
        (folder / f"{name}.txt").write_text(name, encoding="utf-8")
    for kind, option, skipped_key in (("shards", f"source.shards.urls={path}", "001.png in"),
                                      ("folder", f"source.folder.root={folder}", "large.png")):
        manifest, logged = run_logged(vqvae_dir, tmp_path / kind, caplog, f"source.kind={kind}",
                                      option, "max_pixels=300")
        assert manifest["skipped"] == {"undecodable_image": 1} and manifest["num_samples"] == 1
        assert skipped_key in logged and "above the limit of 300 (max_pixels)" in logged


def test_a_sample_name_that_is_not_utf8_is_a_skip_not_a_crash(vqvae_dir, tmp_path, caplog):
    data = tar_bytes(shard_members(["000"]) + [("0X1.png", shapes_png(1, 16)[0]),
                                               ("0X1.txt", "名".encode())])
    data = patch_header(patch_header(data, "0X1.png", 0, b"0\xff1.png"), "0X1.txt", 0,
                        b"0\xff1.txt")
    path = tmp_path / "in.tar"
    path.write_bytes(data)
    assert [r.key for r in read_tar(str(path))] == ["000", "0\udcff1"]
    manifest, logged = run_logged(vqvae_dir, tmp_path / "out", caplog, "source.kind=shards",
                                  f"source.shards.urls={path}")
    assert manifest["num_samples"] == 1 and manifest["skipped"] == {"unreadable_member": 1}
    assert "the name or metadata of sample '0\\udcff1' is not UTF-8 text" in logged
