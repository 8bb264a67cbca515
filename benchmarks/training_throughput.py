"""Benchmark: training throughput of the Lightning t2i task vs a plain PyTorch loop, and MFU.

    python benchmarks/training_throughput.py [--preset small] [--batch 16] [--steps 20]
        [--precision auto|bf16-mixed|32-true]

Both sides train the same CogViewTransformer on the same t2i-shaped batches (text, 64 or
256 image tokens) with the same AdamW, gradient clipping and precision (default ``auto``:
bf16 autocast on CPUs with native bf16, fp32 elsewhere; cogview.precision), in one run:
the plain loop is a hand-written ``forward / backward / clip / step``; the Lightning side is
``cogview.tasks.t2i.T2ITask`` under ``lightning.Trainer``. Reported: tokens/s of each, the
Lightning overhead (target <= 10 %), and model FLOPs utilisation: achieved FLOP/s of a
training step (6 x parameters x tokens + attention + output head) divided by the FLOP/s of
a large fp32 matmul measured in the same run (and beside it the bf16 matmul's).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import machine_info, median_time, write_json  # noqa: E402
from cogview.modules.vqvae import VQVAE, VQVAEConfig  # noqa: E402
from cogview.precision import resolve_precision  # noqa: E402
from cogview.tasks.t2i import T2ITask  # noqa: E402
from cogview.tokenization.layouts import collate_layouts, t2i_layout  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

PRESETS = ROOT / "conf" / "model"


def load_preset(name: str):
    """A model preset (conf/model/<name>.yaml); ``demo``: tiny with make demo's t2i overrides."""
    if name == "demo":
        demo = OmegaConf.load(ROOT / "conf" / "budget" / "full.yaml")
        return OmegaConf.merge(OmegaConf.load(PRESETS / "tiny.yaml"), demo.t2i.model,
                               {"name": "demo"})
    return OmegaConf.load(PRESETS / f"{name}.yaml")


def make_batches(task: T2ITask, batch: int, count: int, image_tokens: int, text_len: int):
    """Random t2i batches with the real layout (fixed shapes)."""
    vocab = task.vocab
    generator = torch.Generator().manual_seed(0)
    text_lo, text_hi = vocab.text_range
    batches = []
    for _ in range(count):
        layouts = [t2i_layout(vocab, torch.randint(0, text_hi - text_lo, (text_len,),
                                                   generator=generator).tolist(),
                              torch.randint(0, vocab.num_image_codes, (image_tokens,),
                                            generator=generator))
                   for _ in range(batch)]
        batches.append(collate_layouts(layouts, vocab.pad_id))
    return batches


def plain_loop(task: T2ITask, batches, steps: int, precision: str) -> float:
    """Seconds per step of a hand-written loop over the task's model and loss."""
    model = task.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    model.train()

    def step(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            ids = batch["input_ids"]
            logits = model(ids[:, :-1], batch["position_ids"][:, :-1], batch["attention_mask"][:, :-1])
            mask = batch["loss_mask"][:, 1:].float()
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(),
                                   reduction="none").view_as(mask)
            loss = (loss * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in batches[:3]:  # warm-up
        step(batch)
    start = time.perf_counter()
    for index in range(steps):
        step(batches[index % len(batches)])
    return (time.perf_counter() - start) / steps


class StepTimer:
    """Times Lightning training steps after a warm-up (a minimal callback)."""

    def __init__(self, warmup: int) -> None:
        import lightning as L

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
    import lightning as L

    timer = StepTimer(warmup=3)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=steps + 3,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=1.0, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[timer.callback])
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(task, train_dataloaders=loader)
    return (timer.end - timer.start) / steps if timer.start else float("nan")


def step_flops(task: T2ITask, batch: dict) -> float:
    """Training FLOPs of one step: 6 x (non-embedding params + head) x tokens + attention."""
    config = task.model.config
    tokens = batch["input_ids"][:, :-1].numel()
    length = batch["input_ids"].shape[1] - 1
    body = 12 * config.num_layers * config.hidden_size ** 2  # qkv, dense, two MLP matrices
    head = config.hidden_size * config.vocab_size
    attention = 2 * config.num_layers * length * config.hidden_size  # QK^T and PV per token
    return 6.0 * (body + head + attention) * tokens


def matmul_flops_per_s(dtype: torch.dtype, size: int = 2048) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size ** 3 / median_time(lambda: a @ b, repeats=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "demo"],
                        help="demo: tiny with make demo's t2i model (conf/budget/full.yaml)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--image-tokens", type=int, default=64)
    parser.add_argument("--text-len", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16-mixed", "32-true"],
                        help="auto: bf16-mixed on CPUs with native bf16, else 32-true")
    parser.add_argument("--out")
    args = parser.parse_args()
    precision = resolve_precision(args.precision, "cpu")

    preset = OmegaConf.to_container(load_preset(args.preset))
    with tempfile.TemporaryDirectory() as vqvae_dir:
        VQVAE(VQVAEConfig.preset("tiny")).save_pretrained(vqvae_dir)
        torch.manual_seed(0)
        task = T2ITask(model=preset, vqvae_dir=vqvae_dir, warmup_steps=0)
        initial = {k: v.clone() for k, v in task.model.state_dict().items()}
        batches = make_batches(task, args.batch, 8, args.image_tokens, args.text_len)
        plain_times, lightning_times = [], []
        for _ in range(args.rounds):  # alternate, keep each side's best: load comes and goes
            task.model.load_state_dict(initial)
            plain_times.append(plain_loop(task, batches, args.steps, precision))
            task.model.load_state_dict(initial)
            lightning_times.append(lightning_loop(task, batches, args.steps, precision))
        plain_s, lightning_s = min(plain_times), min(lightning_times)
    tokens = batches[0]["input_ids"][:, :-1].numel()
    flops = step_flops(task, batches[0])
    fp32_peak, bf16_peak = matmul_flops_per_s(torch.float32), matmul_flops_per_s(torch.bfloat16)
    result = {
        "machine": machine_info(), "precision": precision, "preset": args.preset,
        "batch": args.batch,
        "sequence_length": batches[0]["input_ids"].shape[1], "steps": args.steps,
        "parameters": task.model.num_parameters(),
        "plain_tokens_per_s": tokens / plain_s, "lightning_tokens_per_s": tokens / lightning_s,
        "lightning_overhead": lightning_s / plain_s - 1.0,
        "step_gflop": flops / 1e9,
        "matmul_fp32_gflops": fp32_peak / 1e9, "matmul_bf16_gflops": bf16_peak / 1e9,
        "mfu_vs_fp32_matmul": flops / lightning_s / fp32_peak,
        "mfu_vs_bf16_matmul": flops / lightning_s / bf16_peak,
        "targets": {"lightning_overhead_max": 0.10, "mfu_vs_fp32_matmul_min": 0.30},
    }
    print(f"{args.preset} ({precision}): plain {result['plain_tokens_per_s']:.0f} tok/s, Lightning "
          f"{result['lightning_tokens_per_s']:.0f} tok/s (overhead {result['lightning_overhead']:+.1%}); "
          f"MFU {result['mfu_vs_fp32_matmul']:.1%} of the fp32 matmul "
          f"({result['matmul_fp32_gflops']:.0f} GFLOP/s), {result['mfu_vs_bf16_matmul']:.1%} of bf16")
    write_json(result, args.out, f"training_throughput_{args.preset}")


if __name__ == "__main__":
    main()
