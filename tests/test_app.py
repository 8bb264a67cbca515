"""The web demo (cogview.app): the page in headless Chromium, the API under 16 concurrent
gradio_client requests, and the handlers behind both.

One app server per module, on tiny random t2i / caption / sr exports (images are noise, but
real 64x64 PNGs that must equal a direct Pipeline call with the same seed).
"""

import io
import json
import os
import re
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import urlopen

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT, make_exports, make_sr_export

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio")

PROMPT = "左上角有一个大的红色圆形"
CHROMIUM = os.environ.get("COGVIEW_CHROMIUM", "/usr/bin/chromium")
# No network: nothing that phones home (Chromium's own services, QUIC probes, updates).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
ARTIFACTS = ROOT / "test-artifacts"  # screenshots (git-ignored)
CJK = re.compile(r"[\u4e00-\u9fff]")


def pixels(image: Image.Image) -> bytes:
    return np.asarray(image.convert("RGB")).tobytes()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Tiny random t2i, caption and sr exports in the artifacts/demo layout."""
    root = make_exports(tmp_path_factory.mktemp("app_exports"), 16, 16)
    make_sr_export(root, text_len=16)
    return root


@pytest.fixture(scope="module")
def server(exports, tmp_path_factory):
    """The app on a free port of 127.0.0.1 (the configured default host) -> (url, DemoApp cfg)."""
    from cogview.app import compose_config, launch

    cfg = compose_config([f"ckpt={exports}", "port=0",
                          f"output_dir={tmp_path_factory.mktemp('app_out')}"])
    demo, url = launch(cfg, block=False)
    yield url, cfg
    demo.close()


@pytest.fixture(scope="module")
def reference(exports):
    """Pipelines of the same exports, loaded apart from the server's, for direct calls."""
    from cogview import Pipeline

    return {task: Pipeline.from_pretrained(exports / task) for task in ("t2i", "caption")}


@pytest.fixture
def handlers(exports):
    """A DemoApp without a server (handlers called directly)."""
    from cogview.app import DemoApp, DemoModels, compose_config

    cfg = compose_config([f"ckpt={exports}"])
    return DemoApp(DemoModels.load(exports), cfg)


class ProgressRecorder:
    """Stands in for gr.Progress: records (done, total) per call."""

    def __init__(self):
        self.calls = []

    def __call__(self, progress, desc=None, total=None, unit="steps"):
        self.calls.append(tuple(progress))


# ------------------------------------------------------------------------------------------------
# the page in a real browser


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium "
                    "(or set COGVIEW_CHROMIUM to its path)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def fetch(url: str) -> bytes:
    with urlopen(url, timeout=30) as response:
        return response.read()


def gallery_images(page, selector: str, count: int) -> list[Image.Image]:
    """Waits for ``count`` images in the gallery and downloads each one the page shows."""
    page.wait_for_function(
        f"document.querySelectorAll('{selector} img').length === {count}", timeout=30_000)
    sources = [img.get_attribute("src") for img in page.query_selector_all(f"{selector} img")]
    return [Image.open(io.BytesIO(fetch(src))) for src in sources]


def check_t2i_results(page, reference, prompt: str, seed: int) -> list[Image.Image]:
    """Waits for the results of seed ``seed``; the gallery's images and the zip's PNGs must be
    the images a direct Pipeline call draws for their seeds -> the gallery's images."""
    page.wait_for_selector(f"#t2i-download a[download='cogview_t2i_seed{seed}.zip']",
                           timeout=30_000)
    shown = gallery_images(page, "#t2i-gallery", 4)
    href = page.get_attribute("#t2i-download a[download]", "href")
    bundle = zipfile.ZipFile(io.BytesIO(fetch(href)))
    rows = [json.loads(line) for line in bundle.read("results.jsonl").decode().splitlines()]
    assert [row["path"] for row in rows] == [f"00000_{row['sample']:03d}.png" for row in rows]
    # rerank is on (a caption model is loaded): the best 4 of 16 candidates, seeds seed..seed+15
    assert all(row["prompt"] == prompt and seed <= row["seed"] < seed + 16 for row in rows)
    scores = [row["caption_score"] for row in rows]
    assert scores == sorted(scores, reverse=True)
    for image, row in zip(shown, rows):
        assert image.format == "PNG" and image.size == (64, 64)
        direct = reference["t2i"](prompt, num_images=1, seed=row["seed"],
                                  progress=False).images[0]
        assert pixels(image) == pixels(direct)
        assert pixels(Image.open(bundle.open(row["path"]))) == pixels(direct)
    assert page.get_by_text(f"seed {rows[0]['seed']} · caption score").first.is_visible()
    return shown


@pytest.mark.browser
def test_browser_generate_caption_and_error_then_recovery(server, browser, reference, tmp_path):
    url, _ = server
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(url)

    # text to image: type a Chinese prompt, generate, the gallery shows the seeds' images
    page.fill("#t2i-prompt textarea", PROMPT)
    page.fill("#t2i-seed input", "5")
    page.click("#t2i-generate")
    shown = check_t2i_results(page, reference, PROMPT, 5)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app_t2i.png"), full_page=True)

    # an empty prompt: a readable message in the page, then the next request still works
    page.fill("#t2i-prompt textarea", "   ")
    page.click("#t2i-generate")
    page.get_by_text("The prompt is empty").wait_for(timeout=30_000)  # visible
    assert "Traceback" not in page.inner_text("body")
    page.screenshot(path=str(ARTIFACTS / "app_empty_prompt.png"))
    page.fill("#t2i-prompt textarea", "蓝色的正方形")
    page.fill("#t2i-seed input", "40")
    page.click("#t2i-generate")
    check_t2i_results(page, reference, "蓝色的正方形", 40)

    # captioning: upload an image, a Chinese caption appears (the caption model's own, its
    # beam caption and 16 samples reranked by the t2i model: app.yaml caption.rerank_candidates)
    upload = tmp_path / "upload.png"
    shown[0].save(upload)
    page.get_by_role("tab", name="图像描述 Captioning").click()
    page.set_input_files("#caption-image input[type=file]", str(upload))
    page.wait_for_selector("#caption-image img", timeout=30_000)
    page.click("#caption-button")
    page.wait_for_function(
        "document.querySelector('#caption-output textarea').value.length > 0", timeout=30_000)
    caption = page.input_value("#caption-output textarea")
    assert CJK.search(caption), caption
    assert caption == reference["caption"].caption([shown[0]], progress=False, num_beams=4,
                                                   reranker=reference["t2i"],
                                                   num_candidates=16)[0]
    page.screenshot(path=str(ARTIFACTS / "app_caption.png"))

    # every request the page made stayed on the app's own host (the page renders offline)
    hosts = {urlparse(u).hostname for u in requested if urlparse(u).scheme in ("http", "https")}
    assert hosts == {"127.0.0.1"}, sorted(hosts)
    page.close()


# ------------------------------------------------------------------------------------------------
# the API under load


def test_16_concurrent_client_requests_each_get_their_seeds_images(server, reference):
    from gradio_client import Client

    url, _ = server
    client = Client(url, verbose=False)
    seeds = [100 + 3 * i for i in range(16)]

    def request(seed):
        return client.predict(PROMPT, 2, seed, 1.0, 200, 1.0, False, 2, api_name="/generate")

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(request, seeds))
    assert len(results) == 16
    everything = set()
    for seed, (gallery, archive, rows_text) in zip(seeds, results):
        rows = [json.loads(line) for line in rows_text.splitlines()]
        assert [row["seed"] for row in rows] == [seed, seed + 1]
        assert [item["caption"].split(" · ")[0] for item in gallery] == [f"seed {seed}",
                                                                        f"seed {seed + 1}"]
        expected = reference["t2i"](PROMPT, num_images=2, seed=seed, progress=False).images
        got = [Image.open(item["image"]) for item in gallery]
        assert [pixels(image) for image in got] == [pixels(image) for image in expected]
        assert zipfile.ZipFile(archive).namelist() == ["00000_000.png", "00000_001.png",
                                                       "results.jsonl"]
        everything.update(pixels(image) for image in got)
    assert len(everything) == 32  # 16 requests x 2 seeds each: none lost, none repeated


def test_api_errors_are_messages_and_the_app_keeps_serving(server, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    url, _ = server
    client = Client(url, verbose=False)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(AppError, match="cannot read broken.png"):
        client.predict(handle_file(str(broken)), True, 0, api_name="/caption")
    huge = tmp_path / "huge.png"
    Image.new("RGB", (5000, 8)).save(huge)
    with pytest.raises(AppError, match=r"5000x8 pixels, above the limit of 4096"):
        client.predict(handle_file(str(huge)), True, 0, api_name="/caption")
    with pytest.raises(AppError, match="prompt is empty"):
        client.predict("", 1, 0, 1.0, 200, 1.0, False, 1, api_name="/generate")
    with pytest.raises(AppError, match="99 is greater than maximum value 16"):  # the slider's
        client.predict(PROMPT, 99, 0, 1.0, 200, 1.0, False, 1, api_name="/generate")
    good = tmp_path / "good.png"
    Image.new("RGB", (80, 64), (50, 100, 220)).save(good)
    assert CJK.search(client.predict(handle_file(str(good)), True, 0, api_name="/caption"))


def test_api_super_resolution_and_completion(server, reference, tmp_path):
    from gradio_client import Client, handle_file

    url, _ = server
    client = Client(url, verbose=False)
    source = tmp_path / "source.png"
    reference["t2i"](PROMPT, num_images=1, seed=0, progress=False).images[0].save(source)

    (before, after), archive = client.predict(handle_file(str(source)), PROMPT, 3,
                                              api_name="/super_resolve")
    # the sr export's window is 32 px: the upload is resized to 32 px and comes back at 64
    assert Image.open(before).size == Image.open(after).size == (64, 64)
    rows = [json.loads(zipfile.ZipFile(archive).read("results.jsonl"))]
    assert rows == [{"id": 0, "prompt": PROMPT, "sample": 0, "seed": 3, "path": "00000_000.png"}]

    gallery, archive, rows_text = client.predict(handle_file(str(source)), PROMPT, "bottom",
                                                 0, 0, 0, 0, 2, 9, api_name="/complete")
    completed = [np.asarray(Image.open(item["image"]).convert("RGB")) for item in gallery]
    assert [json.loads(line)["seed"] for line in rows_text.splitlines()] == [9, 10]
    assert all(image.shape == (64, 64, 3) for image in completed)
    assert not np.array_equal(completed[0][32:], completed[1][32:])  # two seeds, two bottoms
    # the top half keeps the upload's codes (rows next to the redrawn half may differ by the
    # decoder's reach)
    np.testing.assert_array_equal(completed[0][:16], completed[1][:16])


# ------------------------------------------------------------------------------------------------
# handlers, loading and configuration (no server)


def test_progress_follows_the_generated_tokens(handlers):
    progress = ProgressRecorder()
    handlers.generate(PROMPT, num_images=2, seed=0, rerank=False, progress=progress)
    done = [d for d, _ in progress.calls]
    assert {t for _, t in progress.calls} == {2 * 64}  # 2 images x 64 image tokens
    assert done == sorted(done) and done[-1] == 128 and len(done) >= 64

    progress = ProgressRecorder()
    gallery, _, rows_text = handlers.generate(PROMPT, num_images=2, seed=0, rerank=True,
                                              num_candidates=3, progress=progress)
    assert progress.calls[-1] == (3 * 64, 3 * 64)  # every candidate is drawn
    assert len(gallery) == 2 and all("caption score" in label for _, label in gallery)


def test_upload_checks(handlers, tmp_path):
    from cogview.app import read_upload

    with pytest.raises(gr.Error, match="No image"):
        handlers.caption(None)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(gr.Error, match="cannot read notes.txt"):
        read_upload({"path": str(text), "orig_name": "notes.txt"}, 4096)
    truncated = tmp_path / "cut.png"
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="PNG")
    truncated.write_bytes(buffer.getvalue()[:60])  # the header survives, the pixels do not
    with pytest.raises(gr.Error, match="cut.png"):
        read_upload(str(truncated), 4096)
    with pytest.raises(gr.Error, match="65x64 pixels, above the limit of 64"):
        image = tmp_path / "wide.png"
        Image.new("RGB", (65, 64)).save(image)
        read_upload(str(image), 64)
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (40, 30), (0, 0, 0, 0)).save(rgba)
    assert read_upload({"path": str(rgba)}, 64).mode == "RGB"


def test_find_exports_layouts_and_errors(exports, tmp_path):
    from cogview.exports import find_exports

    assert find_exports(exports) == {task: exports / task for task in ("t2i", "caption", "sr")}
    assert find_exports(exports / "caption") == {"caption": exports / "caption"}
    with pytest.raises(FileNotFoundError, match="make demo"):
        find_exports(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        find_exports(tmp_path / "missing")
    misplaced = tmp_path / "misplaced"
    shutil.copytree(exports / "caption", misplaced / "t2i")
    with pytest.raises(ValueError, match="holds a caption export; move it to"):
        find_exports(misplaced)


def test_missing_models_disable_their_tabs_with_a_note(exports):
    from cogview.app import DemoApp, DemoModels, build_demo, compose_config

    only_t2i = DemoModels.load(exports / "t2i")
    assert only_t2i.caption is None and only_t2i.sr is None
    app = DemoApp(only_t2i, compose_config([f"ckpt={exports / 't2i'}"]))
    with pytest.raises(gr.Error, match="no caption model is loaded"):
        app.caption({"path": str(exports / "missing.png")})
    config = build_demo(app).get_config_file()
    props = [c.get("props", {}) for c in config["components"]]
    notes = [p["value"] for p in props if "no sr model is loaded" in str(p.get("value", ""))]
    assert len(notes) == 1 and "train.py task=sr" in notes[0]
    buttons = {p.get("elem_id"): p.get("interactive") for p in props if p.get("elem_id")}
    assert buttons["t2i-generate"] is not False
    assert buttons["caption-button"] is False and buttons["sr-button"] is False
    rerank = [p for p in props if str(p.get("label", "")).startswith("Rerank")]
    assert rerank[0]["value"] is False and rerank[0]["interactive"] is False


def test_command_line_defaults_and_bad_ckpt(tmp_path, capsys):
    from cogview.app import compose_config, main

    cfg = compose_config([])
    assert cfg.host == "127.0.0.1" and cfg.ckpt == "artifacts/demo"
    assert cfg.queue.concurrency_limit >= 1 and cfg.queue.max_size >= 16
    assert main([f"ckpt={tmp_path / 'nothing'}"]) == 2
