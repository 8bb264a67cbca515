"""Benchmark: peak memory and step time of a training step with and without activation
checkpointing (``model.activation_checkpointing``), side by side in one run.

    python benchmarks/activation_checkpointing.py [--preset small] [--batch 2] [--length 1088]

One training step = forward over ``--batch`` random sequences of ``--length`` tokens (1088:
CogView's [ROI1] text [BASE] [BOI1] + 32x32 image codes), the image-code part of the output
head, cross entropy, backward, AdamW. Peak memory is what the step adds on top of the model
and optimizer state, each mode in a fresh subprocess (``--point``) so one mode's allocations
cannot hide the other's: on CPU the VmHWM/VmRSS of /proc/self/status around the step (peak
reset with /proc/self/clear_refs), on CUDA ``max_memory_allocated``. Step times come from the
main process, the two modes interleaved on the same weights and batches. Writes JSON (default
bench_results/activation_checkpointing.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import common  # noqa: E402
from benchmarks.sampling import VOCAB, model_facts, preset_config  # noqa: E402
from cogview.modules.transformer import CogViewTransformer  # noqa: E402

MIB = 2**20
MODES = {"plain": False, "checkpointed": True}


def build(args, recompute: bool):
    """Model (same seed, so the same weights in both modes), optimizer and one batch."""
    config = dataclasses.replace(preset_config(args.preset), activation_checkpointing=recompute)
    torch.manual_seed(0)
    model = CogViewTransformer(config).to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    codes = VOCAB.image_range  # (lo, hi) of the image-code ids
    ids = torch.randint(*codes, (args.batch, args.length), generator=generator).to(args.device)

    def step() -> float:
        hidden = model(ids[:, :-1], return_hidden=True)
        logits = model.logits(hidden, codes)  # the image-code rows of the tied head
        loss = F.cross_entropy(logits.flatten(0, 1).float(), (ids[:, 1:] - codes[0]).flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return float(loss)

    return model, step


def measure_point(args) -> dict:
    """Peak memory of one step in mode ``args.point`` (after a first step built the AdamW
    state, so the peak is the step's activations and gradients)."""
    torch.set_num_threads(args.threads)
    _, step = build(args, MODES[args.point])
    step()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = step()
        peak = torch.cuda.max_memory_allocated() - before
        method = "torch.cuda.max_memory_allocated() - memory_allocated() before the step"
    else:
        method = common.reset_peak_rss()
        before = common.proc_status_bytes("VmRSS")
        loss = step()
        peak = common.proc_status_bytes("VmHWM") - before
    return {"mode": args.point, "peak_memory_mib": round(peak / MIB, 1), "loss": loss,
            "memory_method": method}


def run_point(args, mode: str) -> dict:
    command = [sys.executable, __file__, "--point", mode, "--preset", args.preset,
               "--batch", str(args.batch), "--length", str(args.length),
               "--threads", str(args.threads), "--device", args.device]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"mode {mode} failed (exit {done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="cogview/conf/model preset (random weights)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=1088, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per mode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--point", choices=sorted(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--out", help="JSON path (default bench_results/activation_checkpointing"
                                      ".json)")
    args = parser.parse_args()
    if args.point:
        print(json.dumps(measure_point(args)))
        return
    torch.set_num_threads(args.threads)
    memory = {mode: run_point(args, mode) for mode in MODES}
    steps = {}
    for mode, recompute in MODES.items():
        model, steps[mode] = build(args, recompute)
    seconds = common.interleaved_medians(steps, args.repeats, warmup=1)
    rows = {mode: {**memory[mode], "seconds_per_step": round(seconds[mode], 3),
                   "tokens_per_s": round(args.batch * args.length / seconds[mode], 1)}
            for mode in MODES}
    result = {
        "benchmark": "activation_checkpointing", "machine": common.machine_info(),
        "device": args.device, "model": model_facts(model, args.preset), "batch": args.batch,
        "length": args.length, "precision": "fp32", "modes": rows,
        "memory_ratio_checkpointed_over_plain": round(
            rows["checkpointed"]["peak_memory_mib"] / rows["plain"]["peak_memory_mib"], 3),
        "time_ratio_checkpointed_over_plain": round(
            rows["checkpointed"]["seconds_per_step"] / rows["plain"]["seconds_per_step"], 3),
    }
    common.write_json(result, args.out, "activation_checkpointing")
    for mode, row in rows.items():
        print(f"{mode:>13}: peak {row['peak_memory_mib']:8.1f} MiB, "
              f"{row['seconds_per_step']:.3f} s/step, {row['tokens_per_s']:.0f} tokens/s")
    print(f"checkpointed / plain: memory x{result['memory_ratio_checkpointed_over_plain']}, "
          f"time x{result['time_ratio_checkpointed_over_plain']} "
          f"({result['machine']['cpu']}, {result['machine']['cpu_isa']}, {args.device})")


if __name__ == "__main__":
    main()
