"""Benchmark: training throughput of the span-restricted loss against the full-vocabulary loss
and HF transformers' GPT-2, the Lightning overhead, and model FLOPs utilisation.

    python benchmarks/training_throughput.py [--presets demo,small] [--precisions auto]
        [--vocab cogview|demo] [--steps 4] [--rounds 2]

For each model preset and precision (``auto``: fp32, and bf16 autocast beside it on CPUs
with native bf16), one run times on the same t2i batches ([ROI1], a shapes-zh caption,
[BASE] [BOI1], 64 image codes, [EOI1]: about 87 tokens), each with AdamW and clipping:

- ``span``: the CogViewTransformer with ``task.loss_vocab=span`` (each target scored against
  its span's ids, chunked, ``cogview.modules.losses``), in a hand-written loop;
- ``full``: the same model and batches with ``loss_vocab=full`` (CogView's loss over every id);
- ``hf_gpt2``: ``transformers.GPT2LMHeadModel`` with the same layers, width, heads,
  sequence length, batch and vocabulary, trained on the same targets (full vocabulary);
- ``lightning_span``: ``cogview.tasks.t2i.T2ITask`` under ``lightning.Trainer`` (overhead
  against the hand-written ``span`` loop);
- ``span_pb_relax_on`` / ``span_pb_relax_off``: ``span`` with the preset's ``pb_relax``
  flipped (the ``demo`` preset trains without PB-relax, the others with it), the same weights.

Reported per row: seconds per step, tokens/s, and for ``span`` its MFU: the FLOPs of a step
(6 x (non-embedding params + the output-head rows it computes) x tokens + attention) per
second, over a large matmul's FLOP/s in the same precision measured in the same run.
``--vocab cogview`` (default) uses CogView's vocabulary, 8,192 codes + 50,000 text ids =
58,240 ids (only the id ranges matter for timing); ``--vocab demo`` the demo's (1,024 codes
+ the character tokenizer's 7,200 ids = 8,320).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import machine_info, median_time, write_json  # noqa: E402
from cogview.config import CONF_DIR  # noqa: E402
from cogview.data.shapes import sample_scene  # noqa: E402
from cogview.modules.losses import span_groups  # noqa: E402
from cogview.modules.transformer import CogViewTransformer  # noqa: E402
from cogview.modules.vqvae import VQVAE, VQVAEConfig  # noqa: E402
from cogview.precision import resolve_precision  # noqa: E402
from cogview.tasks.t2i import T2ITask  # noqa: E402
from cogview.tokenization import build_text_tokenizer  # noqa: E402
from cogview.tokenization.layouts import collate_layouts, t2i_layout  # noqa: E402
from cogview.tokenization.vocab import CogViewVocab  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

PRESETS = CONF_DIR / "model"
COGVIEW_TEXT_IDS = 50_000


def load_preset(name: str):
    """A model preset (cogview/conf/model/<name>.yaml); ``demo``: tiny with make demo's t2i overrides."""
    if name == "demo":
        demo = OmegaConf.load(CONF_DIR / "budget" / "full.yaml")
        return OmegaConf.merge(OmegaConf.load(PRESETS / "tiny.yaml"), demo.t2i.model,
                               {"name": "demo"})
    return OmegaConf.load(PRESETS / f"{name}.yaml")


def make_batches(task: T2ITask, batch: int, count: int, image_tokens: int,
                 text_len: int | None):
    """t2i batches with the real layout: shapes-zh training captions (char tokenizer ids,
    valid in either vocabulary; 9-33 characters, 19 on average, so about 87 tokens; batches
    padded to their longest) or, with ``text_len``, random text of that length; random codes."""
    vocab = task.vocab
    generator = torch.Generator().manual_seed(0)
    text_lo, text_hi = vocab.text_range
    tokenizer = build_text_tokenizer("char")
    batches, index = [], 0
    for _ in range(count):
        layouts = []
        for _ in range(batch):
            if text_len:
                text = torch.randint(0, text_hi - text_lo, (text_len,), generator=generator)
            else:
                text = tokenizer.encode(sample_scene(0, "train", index)[1])
            index += 1
            codes = torch.randint(0, vocab.num_image_codes, (image_tokens,), generator=generator)
            layouts.append(t2i_layout(vocab, text, codes))
        batches.append(collate_layouts(layouts, vocab.pad_id, padding_side="right"))
    return batches


def build_task(preset: dict, vqvae_dir: str, vocab_kind: str, loss_vocab: str) -> T2ITask:
    """A t2i task on ``preset``; ``cogview``: its vocabulary and model resized to CogView's."""
    torch.manual_seed(0)
    task = T2ITask(model=preset, vqvae_dir=vqvae_dir, warmup_steps=0, loss_vocab=loss_vocab)
    if vocab_kind == "cogview":  # 50,000 text ids, as CogView's SentencePiece model
        task.vocab = CogViewVocab(task.vocab.num_image_codes, COGVIEW_TEXT_IDS)
        config = dataclasses.replace(task.model.config, vocab_size=task.vocab.size)
        torch.manual_seed(0)
        task.model = CogViewTransformer(config)
    return task


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


def timed_loop(model, loss_fn, batches, steps: int, precision: str, warmup: int = 2) -> float:
    """Seconds per step of ``forward + loss / backward / clip / AdamW step``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    model.train()

    def step(batch):
        with autocast(precision):
            loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in batches[:warmup]:
        step(batch)
    start = time.perf_counter()
    for index in range(steps):
        step(batches[index % len(batches)])
    return (time.perf_counter() - start) / steps


def hf_gpt2(task: T2ITask, length: int):
    """HF GPT-2 with the task model's layers, width, heads, vocabulary; no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel  # deferred on purpose: a dev-only install

    config = task.model.config
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=config.vocab_size, n_positions=length, n_embd=config.hidden_size,
        n_layer=config.num_layers, n_head=config.num_heads, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=config.vocab_size - 1, eos_token_id=config.vocab_size - 1))


def hf_loss(model):
    def loss(batch):
        ids = batch["input_ids"]
        labels = ids.masked_fill(~batch["loss_mask"].bool(), -100)  # HF shifts the labels
        return model(input_ids=ids, attention_mask=batch["attention_mask"].long(),
                     labels=labels).loss
    return loss


class StepTimer:
    """Times Lightning training steps after a warm-up (a minimal callback)."""

    def __init__(self, warmup: int) -> None:
        timer = self

        class _Callback(L.Callback):
            def on_train_batch_start(self, trainer, *args):
                if trainer.global_step == warmup:
                    timer.start = time.perf_counter()

            def on_train_end(self, trainer, *args):
                timer.end = time.perf_counter()

        self.callback, self.start, self.end, self.warmup = _Callback(), None, None, warmup


def lightning_loop(task: T2ITask, batches, steps: int, precision: str) -> float:
    """Seconds per step of the t2i LightningModule under lightning.Trainer."""
    timer = StepTimer(warmup=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=steps + 2,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=1.0, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[timer.callback])
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(task, train_dataloaders=loader)
    return (timer.end - timer.start) / steps if timer.start else float("nan")


def head_rows(task: T2ITask, batch: dict, loss_vocab: str) -> float:
    """Output-head FLOP rows per token: V for full, each target's candidate count for span."""
    vocab = task.vocab
    tokens = batch["input_ids"][:, :-1].numel()
    if loss_vocab == "full":
        return float(vocab.size)
    groups = span_groups(vocab, batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:].bool(),
                         task.text_end_ids())
    rows = (int(groups.image.sum()) * vocab.num_image_codes
            + int(groups.text.sum()) * groups.text_candidates.numel())
    return rows / tokens


def step_flops(task: T2ITask, batch: dict, loss_vocab: str) -> float:
    """Training FLOPs of one step: 6 x (non-embedding params + head rows) x tokens + attention."""
    config = task.model.config
    tokens = batch["input_ids"][:, :-1].numel()
    length = batch["input_ids"].shape[1] - 1
    body = 12 * config.num_layers * config.hidden_size ** 2  # qkv, dense, two MLP matrices
    head = config.hidden_size * head_rows(task, batch, loss_vocab)
    attention = 2 * config.num_layers * length * config.hidden_size  # QK^T and PV per token
    return 6.0 * (body + head + attention) * tokens


def matmul_flops_per_s(dtype: torch.dtype, size: int = 2048) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size ** 3 / median_time(lambda: a @ b, repeats=5)


def precisions_for(names: str) -> list[str]:
    """``auto``: fp32, plus bf16-mixed where the CPU has native bf16; else the listed ones."""
    if names == "auto":
        return ["32-true"] + (["bf16-mixed"] if resolve_precision("auto", "cpu") == "bf16-mixed"
                              else [])
    return [resolve_precision(name, "cpu") for name in names.split(",")]


def measure(preset_name: str, precision: str, args, vqvae_dir: str) -> dict:
    preset = OmegaConf.to_container(load_preset(preset_name))
    batch_size = args.batch or (32 if preset_name == "demo" else 8)
    span = build_task(preset, vqvae_dir, args.vocab, "span")
    full = build_task(preset, vqvae_dir, args.vocab, "full")
    full.model.load_state_dict(span.model.state_dict())
    pb_relax = bool(span.model.config.pb_relax)
    other_relax = build_task({**preset, "pb_relax": not pb_relax}, vqvae_dir, args.vocab, "span")
    other_relax.model.load_state_dict(span.model.state_dict())
    other_name = f"span_pb_relax_{'off' if pb_relax else 'on'}"
    batches = make_batches(span, batch_size, 4, args.image_tokens, args.text_len)
    length = max(b["input_ids"].shape[1] for b in batches)
    gpt2 = hf_gpt2(span, length)
    initial = {k: v.clone() for k, v in span.model.state_dict().items()}
    sides = {
        "span": lambda: timed_loop(span.model, lambda b: span.losses(b)["loss"], batches,
                                   args.steps, precision),
        "full": lambda: timed_loop(full.model, lambda b: full.losses(b)["loss"], batches,
                                   args.steps, precision),
        "hf_gpt2": lambda: timed_loop(gpt2, hf_loss(gpt2), batches, args.steps, precision),
        "lightning_span": lambda: lightning_loop(span, batches, args.steps, precision),
        other_name: lambda: timed_loop(other_relax.model, lambda b: other_relax.losses(b)["loss"],
                                       batches, args.steps, precision),
    }
    times = {name: [] for name in sides}
    for round_index in range(args.rounds):  # alternate, keep each side's best
        for name, run in sides.items():
            span.model.load_state_dict(initial)
            print(f"  {preset_name} {precision} round {round_index + 1}/{args.rounds}: {name}",
                  flush=True)
            times[name].append(run())
    seconds = {name: min(values) for name, values in times.items()}
    tokens = sum(int(b["attention_mask"][:, 1:].sum()) for b in batches) / len(batches)
    peak = matmul_flops_per_s(torch.bfloat16 if precision == "bf16-mixed" else torch.float32)
    span_flops = sum(step_flops(span, b, "span") for b in batches) / len(batches)
    row = {
        "preset": preset_name, "precision": precision, "batch": batch_size,
        "sequence_length": length, "tokens_per_step": tokens, "vocab_size": span.vocab.size,
        "parameters": span.model.num_parameters(),
        "seconds_per_step": seconds,
        "tokens_per_s": {name: tokens / s for name, s in seconds.items()},
        "span_speedup_over_full": seconds["full"] / seconds["span"],
        "span_speedup_over_hf_gpt2": seconds["hf_gpt2"] / seconds["span"],
        "lightning_overhead": seconds["lightning_span"] / seconds["span"] - 1.0,
        "pb_relax": pb_relax,
        "span_speedup_over_other_pb_relax": seconds[other_name] / seconds["span"],
        "span_step_gflop": span_flops / 1e9,
        "full_step_gflop": sum(step_flops(span, b, "full") for b in batches) / len(batches) / 1e9,
        "matmul_gflops": peak / 1e9,
        "span_mfu": span_flops / seconds["span"] / peak,
    }
    print(f"{preset_name} ({precision}, batch {batch_size}, {tokens / batch_size:.0f} tokens, vocabulary "
          f"{row['vocab_size']:,}): span {row['tokens_per_s']['span']:.0f} tok/s "
          f"({seconds['span']:.2f} s/step), full {row['tokens_per_s']['full']:.0f} "
          f"({seconds['full']:.2f} s), HF GPT-2 {row['tokens_per_s']['hf_gpt2']:.0f} "
          f"({seconds['hf_gpt2']:.2f} s): span x{row['span_speedup_over_full']:.2f} over full, "
          f"x{row['span_speedup_over_hf_gpt2']:.2f} over GPT-2; Lightning overhead "
          f"{row['lightning_overhead']:+.1%}; PB-relax {'on' if pb_relax else 'off'}: "
          f"x{row['span_speedup_over_other_pb_relax']:.2f} over {other_name}; span MFU {row['span_mfu']:.1%} of a "
          f"{row['matmul_gflops']:.0f} GFLOP/s matmul", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="demo,small",
                        help="comma-separated: tiny, small, demo (make demo's 6 x 256 t2i model)")
    parser.add_argument("--precisions", default="auto",
                        help="auto (fp32, + bf16-mixed on CPUs with native bf16) or a list")
    parser.add_argument("--vocab", default="cogview", choices=["cogview", "demo"])
    parser.add_argument("--batch", type=int, help="default: 32 for demo, 8 otherwise")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--image-tokens", type=int, default=64)
    parser.add_argument("--text-len", type=int, default=None,
                        help="random text of this length (default: shapes-zh captions)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as vqvae_dir:
        codes = 8192 if args.vocab == "cogview" else 1024
        VQVAE(VQVAEConfig.preset("tiny", num_codes=codes)).save_pretrained(vqvae_dir)
        for preset in args.presets.split(","):
            for precision in precisions_for(args.precisions):
                rows.append(measure(preset, precision, args, vqvae_dir))
    write_json({"machine": machine_info(), "vocab": args.vocab, "steps": args.steps,
                "rounds": args.rounds, "rows": rows}, args.out, "training_throughput")


if __name__ == "__main__":
    main()
