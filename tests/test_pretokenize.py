"""The pretokenizer: round trip, every input kind, bad input, atomic shards and resume."""

import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from cogview.data import sources
from cogview.data.fingerprint import image_tokenizer_fingerprint
from cogview.data.images import resize_center_crop
from cogview.data.pretokenize import (
    NoUsableSamplesError,
    ShardWriter,
    index_dtype,
    pretokenize,
)
from cogview.data.shapes import render_scene, sample_scene
from cogview.data.tar_reader import read_tar
from cogview.modules.vqvae import VQVAE, VQVAEConfig
from cogview.tokenization import build_text_tokenizer
from tests.helpers import CONF_DIR, ROOT

CONF_GROUPS = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}


@pytest.fixture(scope="module")
def vqvae_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = VQVAEConfig.preset("tiny", channels=(16, 32, 32), res_channels=16, code_dim=16,
                                num_codes=64, num_res_blocks=1)
    directory = tmp_path_factory.mktemp("vqvae")
    VQVAE(config).save_pretrained(directory)
    return directory


def compose_pretokenize(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="pretokenize", overrides=overrides)


def run(vqvae_dir, out, *overrides):
    cfg = compose_pretokenize([f"vqvae_dir={vqvae_dir}", f"out={out}", "progress=false",
                               "num_workers=0", *overrides])
    return pretokenize(cfg)


def read_samples(out):
    """All samples of the final-named shards of `out`: list of dicts (member ext -> bytes)."""
    samples = []
    for shard in sorted(out.glob("*.tar")):
        for record in read_tar(str(shard)):
            assert isinstance(record, sources.TarRecord), record
            samples.append({"__key__": record.key, **record.members})
    return samples


def npy(data):
    return np.load(io.BytesIO(data))


def png_bytes(image, fmt="PNG"):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def tar_bytes(members):
    """An uncompressed tar of (name, bytes) members, in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            data = data.encode("utf-8") if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def shapes_png(index, size=40):
    scene, caption = sample_scene(7, "train", index)
    return png_bytes(render_scene(scene, size)), caption


# ------------------------------------------------------------------------------------------------
# config


def test_config_composes_without_clashing_with_config_groups():
    cfg = compose_pretokenize(["vqvae_dir=v", "out=o"])
    assert cfg.source.kind == "shapes" and cfg.size % 8 == 0
    clashes = set(cfg.keys()) & CONF_GROUPS
    assert not clashes, f"top-level keys {clashes} shadow Hydra config groups"


def test_index_dtype_is_int16_below_32768_codes():
    assert index_dtype(64) == np.int16 and index_dtype(32768) == np.int16
    assert index_dtype(32769) == np.int32 and index_dtype(58240) == np.int32


# ------------------------------------------------------------------------------------------------
# the tar reader


@pytest.mark.parametrize("writer", ["webdataset", "gnu", "gzip"])
def test_tar_reader_reads_whole_tars_and_reports_every_cut(tmp_path, writer):
    import gzip

    import webdataset as wds

    samples = [{"__key__": f"s{i}", "png": shapes_png(i, 16)[0], "txt": f"第{i}个".encode()}
               for i in range(4)]
    path = tmp_path / "whole.tar"
    if writer == "webdataset":  # pax headers (float mtime), as img2dataset writes them
        with wds.TarWriter(str(path), encoder=False) as sink:
            for sample in samples:
                sink.write(sample)
    else:
        path.write_bytes(tar_bytes([(f"{s['__key__']}.{ext}", s[ext]) for s in samples
                                    for ext in ("png", "txt")]))
    if writer == "gzip":
        path.write_bytes(gzip.compress(path.read_bytes()))
    records = list(read_tar(str(path)))
    assert [(r.key, r.members) for r in records] == [
        (s["__key__"], {"png": s["png"], "txt": s["txt"]}) for s in samples]
    data, cut_path = path.read_bytes(), tmp_path / "cut.tar"
    payload_end = len(data) if writer == "gzip" else len(data.rstrip(b"\0")) + 1
    for cut in range(0, payload_end, 97):
        cut_path.write_bytes(data[:cut])
        items = list(read_tar(str(cut_path)))
        *good, last = items or [None]
        assert isinstance(last, sources.TarProblem), f"cut at byte {cut} went unnoticed"
        assert last.reason in ("truncated_shard", "unreadable_shard")
        assert [(r.key, r.members) for r in good] == [(r.key, r.members) for r in records[:len(good)]]
    (tmp_path / "noise.tar").write_bytes(np.random.default_rng(0).bytes(3000))
    assert [p.reason for p in read_tar(str(tmp_path / "noise.tar"))] == ["unreadable_shard"]


# ------------------------------------------------------------------------------------------------
# round trip


def test_shapes_round_trip_codes_text_and_lowres(vqvae_dir, tmp_path):
    out = tmp_path / "tokens"
    manifest = run(vqvae_dir, out, "source.shapes.length=20", "source.shapes.seed=3", "size=32",
                   "sr=true", "shard_size=8", "batch_size=6")
    model = VQVAE.from_pretrained(vqvae_dir)
    tokenizer = build_text_tokenizer("char")
    assert manifest["complete"] and manifest["num_samples"] == 20
    assert [s["samples"] for s in manifest["shards"]] == [8, 8, 4]
    assert manifest["fingerprints"] == {"image_tokenizer": image_tokenizer_fingerprint(model),
                                        "text_tokenizer": tokenizer.fingerprint()}
    assert manifest["code_shape"] == [4, 4] and manifest["lowres_code_shape"] == [2, 2]
    assert json.loads((out / "manifest.json").read_text()) == manifest

    samples = read_samples(out)
    assert [int(s["__key__"]) for s in samples] == list(range(20))
    images, lowres_images = [], []
    for index, sample in enumerate(samples):
        scene, caption = sample_scene(3, "train", index)
        image = render_scene(scene, 32)
        images.append(image)
        lowres_images.append(image.resize((16, 16), Image.Resampling.LANCZOS))
        assert sample["txt"].decode() == caption
        text_ids = npy(sample["text_ids.npy"])
        assert tokenizer.decode(text_ids.tolist()) == tokenizer.normalize(caption)
        meta = json.loads(sample["json"])
        assert meta["scene"] == scene and meta["key"] == f"{index:09d}" and meta["size"] == 32
    codes = np.stack([npy(s["image_codes.npy"]) for s in samples])
    lowres = np.stack([npy(s["lowres_codes.npy"]) for s in samples])
    assert codes.dtype == np.int16 and codes.shape == (20, 4, 4) and lowres.shape == (20, 2, 2)
    expected = model.encode(images)
    assert torch.equal(torch.from_numpy(codes).long(), expected)
    assert torch.equal(torch.from_numpy(lowres).long(), model.encode(lowres_images))
    # decoding the stored codes reconstructs the image exactly as well as the tokenizer does
    pixels = model.prepare_images(images)
    recon = model.decode(torch.from_numpy(codes).long())
    assert torch.equal(recon, model.decode(expected))
    error = torch.mean((recon - pixels) ** 2).item()
    assert error == pytest.approx(torch.mean((model.decode(model.encode(pixels)) - pixels) ** 2)
                                  .item())


def test_fingerprint_is_the_same_for_model_and_directory_and_tracks_weights(vqvae_dir):
    model = VQVAE.from_pretrained(vqvae_dir)
    fingerprint = image_tokenizer_fingerprint(vqvae_dir)
    assert fingerprint == image_tokenizer_fingerprint(model) and len(fingerprint) == 16
    with torch.no_grad():
        model.decoder.blocks[0].weight[0].add_(1e-3)
    assert image_tokenizer_fingerprint(model) != fingerprint


# ------------------------------------------------------------------------------------------------
# input kinds and bad input


@pytest.fixture
def image_folder(tmp_path):
    """A folder of good, corrupt and truncated images of various sizes and modes."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (50, 30), (200, 10, 10)).save(root / "wide.png")
    Image.new("RGBA", (24, 40), (10, 200, 10, 128)).save(root / "sub" / "tall.png")
    Image.new("RGB", (32, 32), (10, 10, 200)).save(root / "blue.jpg", quality=95)
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff this is not a jpeg")
    good = png_bytes(Image.effect_noise((64, 64), 40).convert("RGB"))
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    return root


def test_folder_with_jsonl_captions_counts_every_bad_row(vqvae_dir, tmp_path, image_folder,
                                                         caplog):
    rows = [
        {"path": "wide.png", "caption": "红色的长方形"},
        {"path": "sub/tall.png", "caption": "绿色"},
        {"path": "corrupt.jpg", "caption": "坏的"},
        {"path": "truncated.png", "caption": "截断的"},
        {"path": "missing.png", "caption": "不存在"},
        {"path": "blue.jpg", "caption": "   "},
        {"path": "blue.jpg"},
        {"path": "blue.jpg", "caption": "蓝色的正方形"},
    ]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines.insert(3, "{not json")
    captions = image_folder / "captions.jsonl"
    captions.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="cogview.pretokenize"):
        manifest = run(vqvae_dir, tmp_path / "out", "source.kind=folder",
                       f"source.folder.captions={captions}", "size=16", "shard_size=4")
    assert manifest["skipped"] == {"bad_caption_row": 1, "empty_caption": 1, "missing_caption": 1,
                                   "missing_image": 1, "undecodable_image": 2}
    assert manifest["num_samples"] == 3 and manifest["num_inputs"] == 9
    samples = read_samples(tmp_path / "out")
    metas = [json.loads(s["json"]) for s in samples]
    assert [m["key"] for m in metas] == ["wide.png", "sub/tall.png", "blue.jpg"]
    assert [s["txt"].decode() for s in samples] == ["红色的长方形", "绿色", "蓝色的正方形"]
    assert metas[0]["original_size"] == [50, 30] and metas[1]["original_size"] == [24, 40]
    assert all(npy(s["image_codes.npy"]).shape == (2, 2) for s in samples)
    # the stored codes are those of the resized, centre-cropped image
    model = VQVAE.from_pretrained(vqvae_dir)
    wide = resize_center_crop(Image.open(image_folder / "wide.png").convert("RGB"), 16)
    assert torch.equal(torch.from_numpy(npy(samples[0]["image_codes.npy"])).long(),
                       model.encode(wide)[0])
    logged = caplog.text
    for reason in manifest["skipped"]:
        assert f"[{reason}]" in logged
    assert "corrupt.jpg" in logged and "missing.png" in logged


def test_folder_with_tsv_captions_and_with_sidecar_txt_files(vqvae_dir, tmp_path, image_folder):
    tsv = image_folder / "captions.tsv"
    tsv.write_text("path\tcaption\nwide.png\t宽的图\nblue.jpg\nsub/tall.png\t高的图\n",
                   encoding="utf-8")
    manifest = run(vqvae_dir, tmp_path / "tsv", "source.kind=folder",
                   f"source.folder.captions={tsv}", "size=16")
    assert manifest["num_samples"] == 2 and manifest["skipped"] == {"missing_caption": 1}
    assert [s["txt"].decode() for s in read_samples(tmp_path / "tsv")] == ["宽的图", "高的图"]

    (image_folder / "blue.txt").write_text("蓝色", encoding="utf-8")
    (image_folder / "sub" / "tall.txt").write_text("高的", encoding="utf-8")
    manifest = run(vqvae_dir, tmp_path / "sidecar", "source.kind=folder",
                   f"source.folder.root={image_folder}", "size=16")
    # sorted listing: blue.jpg, corrupt.jpg, sub/tall.png, truncated.png, wide.png
    assert manifest["num_inputs"] == 5 and manifest["num_samples"] == 2
    assert manifest["skipped"] == {"missing_caption": 1, "undecodable_image": 2}
    keys = [json.loads(s["json"])["key"] for s in read_samples(tmp_path / "sidecar")]
    assert keys == ["blue.jpg", "sub/tall.png"]


def planted_shard():
    """An img2dataset-style shard: 3 good samples around every kind of bad member."""
    good = [shapes_png(i) for i in range(3)]
    truncated = good[0][0][: len(good[0][0]) // 2]
    members = [
        ("000.png", good[0][0]), ("000.txt", good[0][1].encode()),
        ("000.json", json.dumps({"url": "http://x/0", "width": 40}).encode()),
        ("001.jpg", b"\xff\xd8\xff garbage"), ("001.txt", "坏图".encode()),  # corrupt image
        ("002.png", truncated), ("002.txt", "截断".encode()),  # truncated image
        ("003.png", good[1][0]),  # no caption
        ("004.png", good[1][0]), ("004.txt", b" \n "),  # empty caption
        ("005.png", good[1][0]), ("005.txt", b"\xff\xfe\xfa"),  # caption not UTF-8
        ("006.png", good[1][0]), ("006.txt", "好".encode()), ("006.json", b"{broken"),
        ("007.txt", "没有图片".encode()),  # no image
        ("008.png", good[1][0]), ("008.png", good[1][0]), ("008.txt", "重复".encode()),
        ("009.webp", png_bytes(render_scene(sample_scene(7, "train", 1)[0], 40), "WEBP")),
        ("009.txt", good[1][1].encode()),
        ("010.jpg", png_bytes(render_scene(sample_scene(7, "train", 2)[0], 40), "JPEG")),
        ("010.txt", good[2][1].encode()),
    ]
    return tar_bytes(members)


def test_img2dataset_shards_with_planted_corrupt_members(vqvae_dir, tmp_path, caplog):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.tar").write_bytes(planted_shard())
    second = tar_bytes([(f"1{i:02d}.{ext}", data) for i in range(6)
                        for ext, data in zip(("png", "txt"), shapes_png(10 + i))])
    (inputs / "b.tar").write_bytes(second[: int(len(second) * 0.6)])  # cut mid-member
    boundary = tar_bytes([(f"2{i:02d}.{ext}", data) for i in range(2)
                          for ext, data in zip(("png", "txt"), shapes_png(20 + i))])
    with tarfile.open(fileobj=io.BytesIO(boundary)) as tar:
        last = tar.getmembers()[-1]
    member_end = last.offset_data + (last.size + 511) // 512 * 512
    (inputs / "c.tar").write_bytes(boundary[:member_end])  # cut exactly after a member
    urls = [str(inputs / "a.tar"), str(inputs / "b.tar"), f"pipe:cat {inputs / 'c.tar'}",
            str(inputs / "missing.tar")]
    with caplog.at_level(logging.WARNING, logger="cogview.pretokenize"):
        manifest = run(vqvae_dir, tmp_path / "out", "source.kind=shards",
                       f"source.shards.urls=[{','.join(repr(u) for u in urls)}]", "size=32",
                       "shard_size=5")
    assert manifest["skipped"] == {"empty_caption": 1, "missing_caption": 1, "missing_image": 1,
                                   "truncated_shard": 2, "undecodable_image": 2,
                                   "unreadable_member": 3, "unreadable_shard": 1}
    samples = read_samples(tmp_path / "out")
    metas = [json.loads(s["json"]) for s in samples]
    keys = [m["key"] for m in metas]
    good_b = [k for k in keys if k.startswith("1")]
    # a: 000, 009 (webp), 010 (jpeg); b: the samples before the cut; c: all but the one in flight
    assert keys[:3] == ["000", "009", "010"] and len(keys) == len(set(keys))
    assert good_b == [f"1{i:02d}" for i in range(len(good_b))] and 1 <= len(good_b) < 6
    assert [k for k in keys if k.startswith("2")] == ["200"]
    assert metas[0]["json"] == {"url": "http://x/0", "width": 40}
    assert manifest["num_samples"] == len(samples) == 3 + len(good_b) + 1
    assert sum(s["samples"] for s in manifest["shards"]) == len(samples)
    assert "missing.tar" in caplog.text and "truncated_shard" in caplog.text


def test_input_with_no_usable_sample_is_a_clear_error(vqvae_dir, tmp_path):
    bad = tar_bytes([("a.jpg", b"not an image"), ("a.txt", b"x"), ("b.png", b"")])
    (tmp_path / "bad.tar").write_bytes(bad)
    with pytest.raises(NoUsableSamplesError, match="undecodable_image.*|missing_caption"):
        run(vqvae_dir, tmp_path / "out", "source.kind=shards",
            f"source.shards.urls={tmp_path / 'bad.tar'}")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["num_samples"] == 0 and sum(manifest["skipped"].values()) == 2
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(NoUsableSamplesError, match="no input samples"):
        run(vqvae_dir, tmp_path / "out2", "source.kind=folder",
            f"source.folder.captions={tmp_path / 'empty.jsonl'}")


def test_bad_size_and_unknown_source_options_are_clear_errors(vqvae_dir, tmp_path):
    with pytest.raises(ValueError, match="multiple of 8"):
        run(vqvae_dir, tmp_path / "a", "size=30")
    with pytest.raises(ValueError, match="multiple of 16"):
        run(vqvae_dir, tmp_path / "b", "size=40", "sr=true")
    with pytest.raises(ValueError, match="unknown options"):
        run(vqvae_dir, tmp_path / "c", "+source.shapes.colour=red")


# ------------------------------------------------------------------------------------------------
# atomic shards and resume


def test_rerun_skips_done_shards_and_refuses_a_different_config(vqvae_dir, tmp_path):
    out = tmp_path / "out"
    run(vqvae_dir, out, "source.shapes.length=12", "size=16", "shard_size=5")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    manifest = run(vqvae_dir, out, "source.shapes.length=12", "size=16", "shard_size=5")
    assert manifest["num_samples"] == 12
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    (out / "tokens-000001.tar").unlink()  # a lost shard is written again, the rest kept
    manifest = run(vqvae_dir, out, "source.shapes.length=12", "size=16", "shard_size=5")
    assert sorted(int(s["__key__"]) for s in read_samples(out)) == list(range(12))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")
            if p.name != "tokens-000001.tar"} == {k: v for k, v in before.items()
                                                   if k != "tokens-000001.tar"}
    with pytest.raises(ValueError, match="different configuration"):
        run(vqvae_dir, out, "source.shapes.length=12", "size=16", "shard_size=4")


def test_interrupted_shard_run_resumes_without_rereading_finished_inputs(
        vqvae_dir, tmp_path, monkeypatch):
    """Input tars have their own output shards (5 samples, shard_size=3: two shards each); a
    kill after three shards leaves tar 0 done (not opened again), tar 1 half done (its first
    shard kept, the tar read again for the second)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    urls = []
    for s in range(4):
        members = [(f"{s}{i:02d}.{ext}", data) for i in range(5)
                   for ext, data in zip(("png", "txt"), shapes_png(5 * s + i, 16))]
        (inputs / f"{s}.tar").write_bytes(tar_bytes(members))
        urls.append(str(inputs / f"{s}.tar"))
    args = ("source.kind=shards", f"source.shards.urls='{inputs}/{{0..3}}.tar'", "size=16",
            "shard_size=3", "batch_size=2")
    out = tmp_path / "out"
    finish, finished = ShardWriter.finish, []

    def finish_then_die(self):
        if len(finished) == 3:
            raise KeyboardInterrupt("simulated kill")
        finished.append(self.name)
        return finish(self)

    monkeypatch.setattr(ShardWriter, "finish", finish_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(vqvae_dir, out, *args)
    first = ["tokens-000000-000000.tar", "tokens-000000-000001.tar", "tokens-000001-000000.tar"]
    assert sorted(p.name for p in out.glob("*.tar")) == first
    assert [p.name for p in out.glob("*.part.json")] == ["tokens-000000.part.json"]
    assert not list(out.glob("*.tmp")), "a partial shard was left behind"
    kept = {name: (out / name).stat().st_ino for name in first}
    monkeypatch.setattr(ShardWriter, "finish", finish)
    opened = []
    original_read_tar = sources.read_tar
    monkeypatch.setattr(sources, "read_tar", lambda url, *a: opened.append(url) or
                        original_read_tar(url, *a))
    manifest = run(vqvae_dir, out, *args)
    assert opened == urls[1:], "a finished input tar was read again"
    assert {name: (out / name).stat().st_ino for name in first} == kept
    keys = [json.loads(s["json"])["key"] for s in read_samples(out)]
    assert keys == [f"{s}{i:02d}" for s in range(4) for i in range(5)]
    assert manifest["num_samples"] == 20 and len(manifest["shards"]) == 8
    assert [s["__key__"] for s in read_samples(out)][:6] == [
        f"{0:06d}-{i:09d}" for i in range(5)] + [f"{1:06d}-{0:09d}"]


def test_sigkill_mid_run_then_rerun_gives_every_sample_exactly_once(vqvae_dir, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "cogview.data.pretokenize", f"vqvae_dir={vqvae_dir}",
               f"out={out}", "source.shapes.length=900", "shard_size=50", "size=16",
               "batch_size=10", "num_workers=1", "progress=false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 60
        while not list(out.glob("tokens-*.tar")) and time.time() < deadline:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the worker, should it outlive its parent
        except ProcessLookupError:
            pass
    first = sorted(out.glob("tokens-*.tar"))
    assert 1 <= len(first) < 18, "the run was not interrupted mid-way"
    for shard in first:  # every final-named shard is complete
        assert [type(r) for r in read_tar(str(shard))] == [sources.TarRecord] * 50
    kept = {p.name: p.stat().st_ino for p in first}

    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(out.glob("*.tmp"))
    keys = [int(s["__key__"]) for s in read_samples(out)]
    assert sorted(keys) == list(range(900))
    assert {p.name: p.stat().st_ino for p in out.glob("*.tar") if p.name in kept} == kept
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_samples"] == 900
    assert "resuming: %d completed shards kept" % len(kept) in result.stdout + result.stderr
