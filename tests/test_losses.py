"""loss_vocab=span against a masked full-logits reference, full against CogView's loss, the
chunked linear cross entropy, peak memory, and span rules in caption scoring."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from cogview.modules.losses import check_loss_vocab, linear_cross_entropy
from cogview.tasks.caption import CaptionTask
from cogview.tasks.sr import SRTask
from cogview.tasks.t2i import T2ITask
from cogview.tokenization.layouts import caption_layout, collate_layouts, sr_layout, t2i_layout
from tests.helpers import ROOT, make_vqvae

MODEL = dict(num_layers=2, hidden_size=32, num_heads=2, max_positions=512)


@pytest.fixture(scope="module")
def vqvae(tmp_path_factory):
    return str(make_vqvae(tmp_path_factory.mktemp("losses") / "vq", num_codes=64))


def make_task(kind, vqvae, loss_vocab, txt_loss_scale=1.0):
    cls = {"t2i": T2ITask, "caption": CaptionTask, "sr": SRTask}[kind]
    torch.manual_seed(0)
    task = cls(model=MODEL, vqvae_dir=vqvae, loss_vocab=loss_vocab, txt_loss_scale=txt_loss_scale)
    if kind == "caption":  # the data appends [SEP]: the captioner's end id
        task._trainer = SimpleNamespace(datamodule=SimpleNamespace(caption_end_token="[SEP]"))
    return task


def make_batch(kind, task, rows=3):
    vocab, tok = task.vocab, task.text_tokenizer
    generator = torch.Generator().manual_seed(1)
    captions = ["左上有一个红色圆形", "中间有一个小的蓝色菱形", "绿色方形"]
    layouts = []
    for i in range(rows):
        text = tok.encode(captions[i % len(captions)])
        codes = torch.randint(0, vocab.num_image_codes, (16,), generator=generator)
        if kind == "t2i":
            layouts.append(t2i_layout(vocab, text, codes))
        elif kind == "caption":
            layouts.append(caption_layout(vocab, text, codes, end_token="[SEP]"))
        else:
            high = torch.randint(0, vocab.num_image_codes, (64,), generator=generator)
            layouts.append(sr_layout(vocab, text, codes, high))
    return collate_layouts(layouts, vocab.pad_id)


def reference_span_loss(task, batch):
    """The span loss from full logits: non-candidate ids at -inf, layout-fixed targets out."""
    vocab = task.vocab
    ids = batch["input_ids"]
    logits = task.model(ids[:, :-1], batch["position_ids"][:, :-1],
                        batch["attention_mask"][:, :-1]).float()  # (B, T, V)
    targets = ids[:, 1:]
    mask = batch["loss_mask"][:, 1:].bool()
    weights = torch.where(batch["text_mask"][:, :-1].bool(), task.hparams.txt_loss_scale, 1.0)
    allowed_image = vocab.id_mask("image")
    allowed_text = vocab.id_mask("text").clone()
    allowed_text[task.text_end_ids()] = True
    is_image = vocab.is_image(targets)
    is_text = vocab.is_text(targets) | torch.isin(targets, torch.tensor(task.text_end_ids(),
                                                                          dtype=torch.long))
    allowed = torch.where(is_image[..., None], allowed_image, allowed_text)  # (B, T, V)
    masked = logits.masked_fill(~allowed, float("-inf"))
    token_loss = F.cross_entropy(masked.flatten(0, 1), targets.flatten(),
                                 reduction="none").view_as(targets)
    scored = mask & (is_image | is_text)
    w = weights * scored
    token_loss = torch.where(scored, token_loss, 0.0)
    return (token_loss * w).sum() / w.sum()


def old_full_loss(task, batch):
    """The loss as the task computed it before loss_vocab existed (CogView's)."""
    ids = batch["input_ids"]
    logits = task.model(ids[:, :-1], batch["position_ids"][:, :-1], batch["attention_mask"][:, :-1])
    targets = ids[:, 1:]
    mask = batch["loss_mask"][:, 1:].bool()
    token_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                 reduction="none").view_as(targets)
    weights = torch.where(batch["text_mask"][:, :-1].bool(), task.hparams.txt_loss_scale,
                          1.0) * mask
    return (token_loss * weights).sum() / weights.sum().clamp_min(1.0)


def grads(task, loss):
    task.model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["t2i", "caption", "sr"])
def test_span_loss_and_grads_equal_masked_full_logits(vqvae, kind):
    task = make_task(kind, vqvae, "span", txt_loss_scale=3.0)
    batch = make_batch(kind, task)
    span = task.losses(batch)
    expected = reference_span_loss(task, batch)
    torch.testing.assert_close(span["loss"], expected, rtol=1e-5, atol=1e-6)
    got, want = grads(task, span["loss"]), grads(task, expected)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=name)
    assert ("image_loss" in span) == (kind != "caption")
    assert ("text_loss" in span) == (kind != "sr")


@pytest.mark.parametrize("kind", ["t2i", "caption", "sr"])
def test_full_loss_is_cogviews_loss_exactly(vqvae, kind):
    task = make_task(kind, vqvae, "full", txt_loss_scale=2.0)
    batch = make_batch(kind, task)
    assert torch.equal(task.losses(batch)["loss"], old_full_loss(task, batch))


def test_span_groups_of_each_layout(vqvae):
    """t2i: [BASE] is scored with the text ids, [BOI1]/[EOI1] are fixed by the layout and not
    scored; caption: [SEP] with the text; sr: the high-res codes only, [EOI2] not scored."""
    from cogview.modules.losses import span_groups

    for kind, scored_commands, fixed in (("t2i", ["[BASE]"], ["[BOI1]", "[EOI1]"]),
                                         ("caption", ["[SEP]"], []), ("sr", [], ["[EOI2]"])):
        task = make_task(kind, vqvae, "span")
        vocab = task.vocab
        batch = make_batch(kind, task)
        targets, mask = batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:].bool()
        groups = span_groups(vocab, targets, mask, task.text_end_ids())
        assert not (groups.image & groups.text).any()
        assert torch.equal(groups.image, mask & vocab.is_image(targets))
        text_targets = set(targets[groups.text].tolist())
        assert {vocab.command(c) for c in scored_commands} <= text_targets
        leftover = set(targets[mask & ~groups.image & ~groups.text].tolist())
        assert leftover == {vocab.command(c) for c in fixed}, kind
        assert groups.text_candidates[-len(scored_commands):].tolist() == \
            [vocab.command(c) for c in scored_commands] or not scored_commands


def test_chunked_linear_cross_entropy_matches_autograd():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    row_weights = torch.rand(37) + 0.5
    expected = (F.cross_entropy(hidden @ weight.t(), targets, reduction="none") * row_weights
                ).sum() / 7.0
    expected.backward()
    want = hidden.grad.clone(), weight.grad.clone()
    for chunk in (1, 5, 37, 1000):
        hidden.grad = weight.grad = None
        total, per_row = linear_cross_entropy(hidden, weight, targets, row_weights,
                                              scale=1 / 7.0, chunk_rows=chunk)
        (total * 2).backward()  # the incoming gradient is applied
        torch.testing.assert_close(total, expected)
        torch.testing.assert_close(hidden.grad, 2 * want[0])
        torch.testing.assert_close(weight.grad, 2 * want[1])
        assert per_row.shape == (37,) and not per_row.requires_grad


def test_linear_cross_entropy_under_bf16_autocast_and_without_grad():
    torch.manual_seed(0)
    hidden = torch.randn(20, 16, requires_grad=True)
    weight = torch.randn(30, 16, requires_grad=True)
    targets = torch.randint(0, 30, (20,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum")
        total, _ = linear_cross_entropy(hidden, weight, targets)
    torch.testing.assert_close(total, expected, rtol=2e-2, atol=1e-2)
    total.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    with torch.no_grad():
        again, _ = linear_cross_entropy(hidden, weight, targets)
    assert torch.isfinite(again)


def test_loss_vocab_is_checked(vqvae):
    with pytest.raises(ValueError, match="loss_vocab='spam'.*'span'.*'full'"):
        T2ITask(model=MODEL, vqvae_dir=vqvae, loss_vocab="spam")
    assert check_loss_vocab("full") == "full"


def test_logged_losses_name_their_vocabulary(vqvae):
    assert make_task("t2i", vqvae, "span").loss_part_names == ("image_loss_span", "text_loss_span")
    assert make_task("t2i", vqvae, "full").loss_part_names == ("image_loss", "text_loss")


PEAK_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
from cogview.tasks.t2i import T2ITask
from cogview.tokenization.layouts import collate_layouts, t2i_layout
from omegaconf import OmegaConf
demo = OmegaConf.load({root!r} + "/cogview/conf/budget/full.yaml").t2i.model
torch.manual_seed(0)
task = T2ITask(model=dict(OmegaConf.to_container(demo), max_positions=128), vqvae_dir={vq!r},
               loss_vocab={mode!r})
vocab = task.vocab
layouts = [t2i_layout(vocab, torch.randint(0, 200, (24,)).tolist(),
                      torch.randint(0, vocab.num_image_codes, (64,))) for _ in range(32)]
batch = collate_layouts(layouts, vocab.pad_id)
# the peak RSS from here on (a fresh process inherits its parent's high-water mark)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
task.losses(batch)["loss"].backward()
peak = next(int(line.split()[1]) for line in open("/proc/self/status")
            if line.startswith("VmHWM:"))
print(vocab.size, batch["input_ids"].shape[1] - 1, peak)
"""


def peak_rss_kib(vqvae_dir, mode):
    """Peak RSS (KiB) of a training step of the demo's t2i model at batch 32, in a fresh
    process, counted from just before the step."""
    script = PEAK_SCRIPT.format(root=str(ROOT), vq=vqvae_dir, mode=mode)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    vocab_size, length, peak = map(int, result.stdout.split())
    return vocab_size, length, peak


@pytest.mark.slow
def test_span_step_peak_memory_drops_by_the_logits(tmp_path):
    """Demo-size t2i (6 x 256, vocabulary of the demo's char tokenizer and a 1024-code VQ-VAE),
    batch 32: peak RSS of a loss + backward step with span is lower than with full by at least
    the [B, T, V] fp32 logits' size."""
    vq = str(make_vqvae(tmp_path / "vq", num_codes=1024))
    vocab_size, length, full_peak = peak_rss_kib(vq, "full")
    _, _, span_peak = peak_rss_kib(vq, "span")
    logits_kib = 32 * length * vocab_size * 4 / 1024
    assert full_peak - span_peak >= logits_kib, (full_peak, span_peak, logits_kib)


def test_rerank_scores_of_a_span_trained_captioner_are_finite_and_rank(vqvae):
    """A captioner trained with loss_vocab=span on two (image, caption) pairs scores each
    image's own caption above the other one, with log-probabilities over its span's ids."""
    from cogview.generation.scoring import caption_log_likelihood

    task = make_task("caption", vqvae, "span")
    vocab, tok = task.vocab, task.text_tokenizer
    images = [torch.arange(16) % 8, 40 + torch.arange(16) % 8]  # two distinct code grids
    captions = [tok.encode("左上有一个红色圆形"), tok.encode("右下有一个蓝色方形")]
    batch = collate_layouts([caption_layout(vocab, c, i, end_token="[SEP]")
                             for i, c in zip(images, captions)], vocab.pad_id)
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=3e-3)
    for _ in range(150):
        optimizer.zero_grad()
        task.losses(batch)["loss"].backward()
        optimizer.step()
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1)]
    codes = [images[i] for i, _ in pairs]
    texts = [captions[c] for _, c in pairs]
    span = caption_log_likelihood(task.model, vocab, codes, texts, loss_vocab="span",
                                  end_ids=[vocab.sep_id])
    full = caption_log_likelihood(task.model, vocab, codes, texts, loss_vocab="full")
    assert torch.isfinite(span).all()
    assert span[0] > span[1] and span[3] > span[2]  # each image prefers its own caption
    assert span[0] > -0.5 and span[3] > -0.5  # learned: its own caption is likely
    assert (span >= full - 1e-5).all()  # normalised over fewer ids than the whole vocabulary


@pytest.mark.parametrize("source, target", [("span", "full"), ("full", "span")])
def test_export_records_loss_vocab_and_init_from_crosses_modes(vqvae, tmp_path, source, target):
    t2i = make_task("t2i", vqvae, source)
    t2i.export(tmp_path / "t2i")
    assert json.loads((tmp_path / "t2i" / "cogview.json").read_text())["loss_vocab"] == source
    caption = CaptionTask(model=MODEL, vqvae_dir=vqvae, loss_vocab=target,
                          init_from=str(tmp_path / "t2i"))
    for name, value in t2i.model.state_dict().items():
        assert torch.equal(caption.model.state_dict()[name], value), name
    task = make_task("caption", vqvae, target)
    task.model.load_state_dict(caption.model.state_dict())
    assert torch.isfinite(task.losses(make_batch("caption", task))["loss"])


def test_zero_text_weight_skips_the_text_rows_exactly(vqvae):
    """txt_loss_scale=0: rows of weight 0 (targets predicted from text positions) are skipped,
    and the loss and its gradient still equal the reference."""
    task = make_task("t2i", vqvae, "span", txt_loss_scale=0.0)
    batch = make_batch("t2i", task)
    out = task.losses(batch)
    from cogview.modules.losses import span_groups

    targets, mask = batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:].bool()
    groups = span_groups(task.vocab, targets, mask, task.text_end_ids())
    weighted = groups.text & ~batch["text_mask"][:, :-1].bool()  # predicted from [ROI1] only
    assert int(weighted.sum()) == batch["input_ids"].shape[0] < int(groups.text.sum())
    expected = reference_span_loss(task, batch)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)
    got, want = grads(task, out["loss"]), grads(task, expected)
    for name in want:
        torch.testing.assert_close(got.get(name, torch.zeros_like(want[name])), want[name],
                                   rtol=1e-4, atol=1e-7, msg=name)
