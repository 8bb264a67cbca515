"""Hostile inputs for inference, the web app and the VQ-VAE image shards: decompression bombs,
truncated files, out-of-memory decodes and prompt files that are not UTF-8 become error rows,
skips or clear messages; the app deletes old request folders and sets Gradio's cache cleanup."""

import io
import os
import struct
import tarfile
import time
import zlib

import pytest
from hydra import compose, initialize_config_dir
from PIL import Image, ImageFile

from tests.helpers import CONF_DIR, make_exports, make_sr_export
from tests.test_infer import infer_in_process as infer
from tests.test_infer import read_rows

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height black pixels: a few KB to ~50 KB of file, but
    width * height pixels (20000 x 20000: 1.2 GB as RGB) once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    rows_per_block = max(1, (1 << 22) // len(row))
    data = b"".join(packer.compress(row * min(rows_per_block, height - start))
                    for start in range(0, height, rows_per_block)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grey
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data)
            + chunk(b"IEND", b""))


def png_bytes(size=(64, 64), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """A 20000 x 20000 PNG (above PIL's own bomb limit) and a 9000 x 9000 one (81 MP: under
    PIL's limit, above the default max_pixels of 64 MP)."""
    folder = tmp_path_factory.mktemp("bombs")
    (folder / "bomb.png").write_bytes(bomb_png(20000, 20000))
    (folder / "bomb81.png").write_bytes(bomb_png(9000, 9000))
    return folder


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Tiny random t2i, caption and sr exports (no training)."""
    root = make_exports(tmp_path_factory.mktemp("hostile_exports"), 16, 6)
    make_sr_export(root, text_len=8, hr_tokens=64)
    return root


@pytest.fixture
def images(tmp_path, bomb):
    """A good image, two bombs, a truncated PNG and one whose decoding runs out of memory."""
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a_good.png").write_bytes(png_bytes((32, 32)))  # one sr window
    (folder / "b_bomb.png").write_bytes((bomb / "bomb.png").read_bytes())
    (folder / "c_bomb81.png").write_bytes((bomb / "bomb81.png").read_bytes())
    (folder / "d_cut.png").write_bytes(png_bytes((64, 64), (1, 2, 3))[:100])
    (folder / "e_oom.png").write_bytes(png_bytes())
    return folder


@pytest.fixture
def oom_on_e(monkeypatch):
    """Decoding any file named e_oom.png raises MemoryError (as a huge real image would)."""
    load = ImageFile.ImageFile.load

    def load_or_oom(self):
        if str(getattr(self, "filename", "")).endswith("e_oom.png"):
            raise MemoryError
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load_or_oom)


def check_bad_rows(rows, key):
    """rows[1:] of the images fixture: each an error naming its file and its cause."""
    bomb, bomb81, cut, oom = rows[1:]
    assert "b_bomb.png" in bomb["error"] and "too large" in bomb["error"]
    assert "c_bomb81.png" in bomb81["error"] and "9000x9000" in bomb81["error"]
    assert "max_pixels" in bomb81["error"]
    assert "d_cut.png" in cut["error"] and "cannot decode" in cut["error"]
    assert "e_oom.png" in oom["error"] and "out of memory" in oom["error"]
    assert all(key not in row for row in rows[1:])


# ------------------------------------------------------------------------------------------------
# infer.py: bad images are error rows, the good ones get their results


def test_caption_writes_the_good_result_and_an_error_row_per_bad_image(exports, images, oom_on_e,
                                                                       tmp_path):
    out = tmp_path / "out"
    infer("task=caption", f"ckpt={exports / 'caption'}", f"images=[{images}]",
          f"output_dir={out}")
    rows = read_rows(out / "results.jsonl")
    assert [row["path"].split("/")[-1] for row in rows] == [
        "a_good.png", "b_bomb.png", "c_bomb81.png", "d_cut.png", "e_oom.png"]
    assert "error" not in rows[0] and isinstance(rows[0]["caption"], str)
    check_bad_rows(rows, "caption")


def test_max_pixels_is_configurable(exports, tmp_path):
    folder = tmp_path / "small"
    folder.mkdir()
    (folder / "a_64.png").write_bytes(png_bytes((64, 64)))  # 4096 pixels
    (folder / "b_80.png").write_bytes(png_bytes((80, 80)))  # 6400 pixels
    out = tmp_path / "out"
    infer("task=caption", f"ckpt={exports / 'caption'}", f"images=[{folder}]", "max_pixels=5000",
          f"output_dir={out}")
    good, refused = read_rows(out / "results.jsonl")
    assert "caption" in good and "error" not in good
    assert "b_80.png" in refused["error"] and "above the limit of 5,000" in refused["error"]
    with initialize_config_dir(config_dir=str(CONF_DIR / "inference"), version_base=None):
        from cogview.data.images import DEFAULT_MAX_PIXELS

        assert compose(config_name="infer").max_pixels == DEFAULT_MAX_PIXELS


def test_sr_and_vqvae_go_on_past_bad_images(exports, images, oom_on_e, tmp_path):
    infer("task=sr", f"ckpt={exports / 'sr'}", f"images=[{images}]", "prompts=['红色']",
          "refine_sweeps=0", f"output_dir={tmp_path / 'sr'}")
    rows = read_rows(tmp_path / "sr" / "results.jsonl")
    assert rows[0]["size"] == [64, 64] and (tmp_path / "sr" / rows[0]["path"]).is_file()
    check_bad_rows(rows, "size")

    infer("task=vqvae", f"ckpt={exports / 'vq'}", f"images=[{images}]",
          f"output_dir={tmp_path / 'vq'}")
    rows = read_rows(tmp_path / "vq" / "results.jsonl")
    assert "psnr" in rows[0]
    check_bad_rows(rows, "psnr")


def test_complete_with_a_bomb_writes_an_error_row(exports, bomb, tmp_path):
    out = tmp_path / "out"
    infer("task=complete", f"ckpt={exports / 't2i'}", f"image={bomb / 'bomb81.png'}",
          "prompt='红色'", f"output_dir={out}")
    (row,) = read_rows(out / "results.jsonl")
    assert "bomb81.png" in row["error"] and "max_pixels" in row["error"]
    assert row["prompt"] == "红色" and not list(out.glob("*.png"))


# ------------------------------------------------------------------------------------------------
# prompts files in other encodings


def test_gbk_prompts_file_is_a_clear_error_and_reads_with_encoding_gbk(exports, tmp_path):
    prompts = tmp_path / "prompts_gbk.txt"
    prompts.write_bytes("红色的圆形\n绿色的三角形\n".encode("gbk"))
    common = ["task=t2i", f"ckpt={exports / 't2i'}", f"prompts_file={prompts}",
              "num_samples=1", "image_tokens=16", f"output_dir={tmp_path / 'out'}"]
    with pytest.raises(ValueError) as error:
        infer(*common)
    message = str(error.value)
    assert "prompts_gbk.txt" in message and "line 1" in message and "UTF-8" in message
    assert "encoding=gbk" in message
    assert not (tmp_path / "out").exists()  # refused before anything ran

    infer(*common, "encoding=gbk")
    rows = read_rows(tmp_path / "out" / "results.jsonl")
    assert [row["prompt"] for row in rows] == ["红色的圆形", "绿色的三角形"]


def test_encoding_errors_name_the_line_and_unknown_encodings_are_refused(tmp_path):
    from pathlib import Path

    from cogview.inference import read_text

    mixed = tmp_path / "mixed.jsonl"  # line 1 UTF-8, line 3 GBK
    mixed.write_bytes('{"prompt": "红色"}\n{"prompt": "蓝色"}\n'.encode()
                      + '{"prompt": "绿色"}\n'.encode("gbk"))
    with pytest.raises(ValueError, match=r"mixed.jsonl: line 3, column 13 is not valid UTF-8"):
        read_text(mixed, "utf-8", "prompts_file")
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeff红色\n".encode())
    assert read_text(bom, "utf-8", "prompts_file") == "红色\n"
    with pytest.raises(ValueError, match="encoding='klingon' .* is not a text encoding"):
        read_text(Path(bom), "klingon", "prompts_file")


# ------------------------------------------------------------------------------------------------
# VQ-VAE training shards


def test_image_shards_skip_bombs_truncated_and_oom_images(bomb, tmp_path, monkeypatch):
    from cogview.data import image_datamodule
    from cogview.data.image_datamodule import ImageDataModule, ShardImages

    shard = tmp_path / "images-000.tar"
    members = {"a.png": png_bytes(), "b.png": (bomb / "bomb.png").read_bytes(),
               "c.png": (bomb / "bomb81.png").read_bytes(), "d.png": png_bytes()[:100],
               "e.png": png_bytes((80, 80)), "f.png": png_bytes((64, 64), (7, 7, 7))}
    with tarfile.open(shard, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    resize = image_datamodule.resize_center_crop

    def resize_or_oom(image, size):  # f runs out of memory after decoding
        if image.getpixel((0, 0)) == (7, 7, 7):
            raise MemoryError
        return resize(image, size)

    monkeypatch.setattr(image_datamodule, "resize_center_crop", resize_or_oom)
    dataset = ShardImages(str(shard), size=32, shuffle=0)
    assert len(list(dataset)) == 2  # a and e
    assert dataset.skipped.undecodable == 4  # the bombs, the truncated one, f (out of memory)
    monkeypatch.setattr(image_datamodule, "resize_center_crop", resize)

    dataset = ShardImages(str(shard), size=32, shuffle=0, max_pixels=5000)
    assert len(list(dataset)) == 2 and dataset.skipped.undecodable == 4  # e: 6400 pixels

    module = ImageDataModule(source="shards", size=32, num_workers=0, train_shards=str(shard),
                             val_shards=str(shard), max_pixels=5000)
    assert module.val_dataloader().dataset.max_pixels == 5000
    assert module.train_dataloader().dataset.max_pixels == 5000
    with pytest.raises(ValueError, match="data.max_pixels=0"):
        ImageDataModule(source="shards", train_shards=str(shard), max_pixels=0)


# ------------------------------------------------------------------------------------------------
# the app: uploads, old request folders, Gradio's cache


def app_for(tmp_path, *overrides):
    from cogview.app import DemoApp, DemoModels, compose_config

    cfg = compose_config([f"output_dir={tmp_path / 'app_out'}", *overrides])
    return DemoApp(DemoModels(), cfg)


def make_folder(parent, name, age_hours):
    folder = parent / name
    folder.mkdir(parents=True)
    (folder / "00000_000.png").write_bytes(b"png")
    stamp = time.time() - age_hours * 3600
    os.utime(folder, (stamp, stamp))
    return folder


def test_app_deletes_old_request_folders_and_keeps_the_rest(tmp_path):
    out = tmp_path / "app_out"
    old = [make_folder(out, name, 30) for name in ("t2i-abc_1234", "sr-zzzzzzzz",
                                                   "completion-0a1b2c3d")]
    young = make_folder(out, "t2i-young123", 1)
    other = make_folder(out, "my-results", 100)  # not a request folder: never touched
    app = app_for(tmp_path)  # cleanup.max_age_hours: 24, swept at startup
    assert not any(folder.exists() for folder in old)
    assert young.exists() and other.exists()

    # each request sweeps, at most once per cleanup.interval_minutes
    stale = make_folder(out, "t2i-stale000", 30)
    image = Image.new("RGB", (8, 8))
    rows = [{"id": 0, "path": "00000_000.png"}]
    paths, archive = app._save("t2i", [image], rows, 0)
    assert stale.exists()  # swept 0 s ago
    app._last_sweep -= app.sweep_interval_s
    app._save("t2i", [image], rows, 1)
    assert not stale.exists() and young.exists()
    assert os.path.exists(paths[0]) and os.path.exists(archive)  # the first request's folder

    # a folder of a request in progress is never deleted, however old it looks
    busy = make_folder(out, "sr-busy0000", 30)
    app._saving.add(busy)
    assert app.sweep_outputs() == []
    app._saving.clear()
    assert app.sweep_outputs() == [busy]


def test_app_cleanup_config_reaches_gradio_and_bad_values_are_refused(tmp_path):
    from cogview.app import build_demo

    demo = build_demo(app_for(tmp_path))
    assert demo.delete_cache == (600, 24 * 3600)
    demo = build_demo(app_for(tmp_path, "cleanup.max_age_hours=2", "cleanup.interval_minutes=5"))
    assert demo.delete_cache == (300, 7200)
    kept = make_folder(tmp_path / "app_out", "t2i-ancient0", 1000)
    app = app_for(tmp_path, "cleanup.max_age_hours=null")
    assert build_demo(app).delete_cache is None and app.sweep_outputs() == [] and kept.exists()
    with pytest.raises(ValueError, match=r"cleanup.max_age_hours=-1 must be a positive number"):
        app_for(tmp_path, "cleanup.max_age_hours=-1")


def test_upload_bombs_are_refused_before_decoding(bomb, tmp_path):
    import gradio as gr

    from cogview.app import read_upload

    upload = {"path": str(bomb / "bomb81.png"), "orig_name": "photo.png"}
    with pytest.raises(gr.Error, match=r"photo.png is 9000x9000 = 81,000,000 pixels, above the "
                                       r"limit of 16,777,216 pixels \(upload.max_pixels\)"):
        read_upload(upload, 100_000, 16_777_216)
    with pytest.raises(gr.Error, match="photo.png is too large to decode safely"):
        read_upload({"path": str(bomb / "bomb.png"), "orig_name": "photo.png"}, 100_000, None)
    small = tmp_path / "wide.png"
    small.write_bytes(png_bytes((200, 100)))
    with pytest.raises(gr.Error, match="20,000 pixels, above the limit of 10,000"):
        read_upload(str(small), 4096, 10_000)
    assert read_upload(str(small), 4096, 20_000).size == (200, 100)
    app = app_for(tmp_path, "upload.max_pixels=10000")
    with pytest.raises(gr.Error, match="upload.max_pixels"):
        app._read_upload(str(small))
