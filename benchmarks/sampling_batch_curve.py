"""Benchmark: t2i sampling throughput and peak memory vs batch size (1 to 64), with a plot.

    python benchmarks/sampling_batch_curve.py [--preset small] [--batch-sizes 1,2,4,8,16,32,64]

Each batch size runs in a fresh subprocess (``--point B``), so one point's allocations cannot
hide another's: it builds the ``--preset`` model with random weights, then samples
``image_tokens`` codes for B t2i prompts through ``generate_images`` (KV cache, top-k 200, one
seed per sample, as infer.py does; ``--greedy`` for argmax). Peak memory is what sampling adds
on top of the loaded model:

- CPU: the process's peak resident set (VmHWM in /proc/self/status, reset to the current RSS
  by writing 5 to /proc/self/clear_refs just before the first call) minus the RSS at that
  moment. torch allocates outside Python's heap, so tracemalloc would not see it.
- CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocation before the first call.

Beside each measurement stands the KV cache's own size (layers x 2 x B x heads x positions x
head_dim x bytes), the part of the peak that grows with batch and sequence length. The first
call gives the peak; the median of ``--repeats`` more gives tokens/s. Writes JSON (default
bench_results/sampling_batch_curve.json) and a PNG plot next to it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    interleaved_medians,
    machine_info,
    proc_status_bytes,
    reset_peak_rss,
    write_json,
)
from benchmarks.sampling import (  # noqa: E402
    DTYPES,
    TOP_K,
    VOCAB,
    build_model,
    model_facts,
    preset_config,
    prompt_text_ids,
)
from cogview.generation import generate_images  # noqa: E402

MIB = 2**20


# ------------------------------------------------------------------------------------------------
# one point (runs in its own process)


def kv_cache_bytes(config, batch: int, positions: int, dtype: torch.dtype) -> int:
    """Size of the preallocated KV cache for ``batch`` rows of ``positions`` positions."""
    element = torch.empty((), dtype=dtype).element_size()
    return config.num_layers * 2 * batch * config.num_heads * positions * config.head_dim * element


def measure_point(args) -> dict:
    """Tokens/s and peak memory of sampling one batch of ``args.point`` prompts."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    overrides = {"attention": args.attention} if args.attention else {}
    model = build_model(preset_config(args.preset, **overrides)).to(device=device, dtype=dtype)
    batch = args.point
    text_ids = prompt_text_ids(batch)
    seeds = list(range(batch))

    def sample():
        codes = generate_images(model, VOCAB, text_ids, args.image_tokens, seeds,
                                greedy=args.greedy, top_k=TOP_K)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return codes

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        sample()
        peak = torch.cuda.max_memory_allocated() - before
        method = "torch.cuda.max_memory_allocated() - memory_allocated() before the first call"
    else:
        old_peak = proc_status_bytes("VmHWM")
        method = reset_peak_rss()
        before = proc_status_bytes("VmRSS")
        sample()
        if method.startswith("VmHWM growth"):
            peak = proc_status_bytes("VmHWM") - old_peak
        else:
            peak = proc_status_bytes("VmHWM") - before
    seconds = interleaved_medians({"sample": sample}, args.repeats, warmup=0)["sample"]
    prompt_len = max(len(t) for t in text_ids) + 3  # [ROI1] text [BASE] [BOI1]
    positions = prompt_len + args.image_tokens - 1  # what generate_span allocates
    tokens = batch * args.image_tokens
    return {"batch": batch, "seconds": round(seconds, 4),
            "tokens_per_s": round(tokens / seconds, 1),
            "images_per_s": round(batch / seconds, 3),
            "peak_memory_mib": round(peak / MIB, 1),
            "kv_cache_mib": round(kv_cache_bytes(model.config, batch, positions, dtype) / MIB, 1),
            "model_rss_mib" if device.type == "cpu" else "model_allocated_mib":
                round(before / MIB, 1),
            "memory_method": method}


# ------------------------------------------------------------------------------------------------
# the curve


def run_point(args, batch: int) -> dict:
    """Runs ``--point batch`` in a fresh interpreter and returns its JSON line."""
    command = [sys.executable, __file__, "--point", str(batch), "--preset", args.preset,
               "--image-tokens", str(args.image_tokens), "--repeats", str(args.repeats),
               "--threads", str(args.threads), "--dtype", args.dtype, "--device", args.device]
    if args.greedy:
        command.append("--greedy")
    if args.attention:
        command += ["--attention", args.attention]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"batch size {batch} failed (exit {done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def plot_curve(result: dict, path: Path) -> None:
    """Two panels over batch size (log2 axis): tokens/s, and peak memory with the KV cache."""
    points = result["points"]
    batches = [p["batch"] for p in points]
    model = result["model"]
    fig = Figure(figsize=(10, 4))
    speed, memory = fig.subplots(1, 2)
    speed.plot(batches, [p["tokens_per_s"] for p in points], "o-", color="tab:blue")
    speed.set_ylabel("generated image tokens / s")
    speed.set_title("throughput")
    memory.plot(batches, [p["peak_memory_mib"] for p in points], "o-", color="tab:red",
                label="peak memory added by sampling")
    memory.plot(batches, [p["kv_cache_mib"] for p in points], "s--", color="tab:gray",
                label="of which KV cache (computed)")
    memory.set_ylabel("MiB")
    memory.set_title("memory")
    memory.legend()
    for axis in (speed, memory):
        axis.set_xscale("log", base=2)
        axis.set_xticks(batches, [str(b) for b in batches])
        axis.set_xlabel("batch size")
        axis.grid(alpha=0.3)
    fig.suptitle(f"t2i sampling, {model['preset']} ({model['layers']} x {model['hidden']}), "
                 f"{result['image_tokens']} image tokens, {result['dtype']}, "
                 f"{result['device']} ({result['machine']['threads']} threads)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="cogview/conf/model preset (random weights)")
    parser.add_argument("--image-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per batch size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attention", help="override the preset's attention (pb_relax|sdpa|eager)")
    parser.add_argument("--greedy", action="store_true", help="argmax instead of top-k sampling")
    parser.add_argument("--point", type=int, help=argparse.SUPPRESS)  # one batch size, internal
    parser.add_argument("--out", help="JSON path (default bench_results/sampling_batch_curve.json)")
    parser.add_argument("--plot", help="PNG path (default bench_results/sampling_batch_curve.png)")
    args = parser.parse_args()

    if args.point is not None:
        print(json.dumps(measure_point(args)))
        return
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        raise SystemExit(f"--batch-sizes={args.batch_sizes!r} must be comma-separated ints")
    if not batch_sizes or min(batch_sizes) < 1:
        raise SystemExit(f"--batch-sizes={args.batch_sizes!r} must be positive ints")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    config = preset_config(args.preset, **({"attention": args.attention} if args.attention else {}))
    result = {"machine": machine_info(), "command": " ".join(sys.argv[1:]),
              "model": model_facts(build_model(config), args.preset),
              "image_tokens": args.image_tokens, "dtype": args.dtype, "device": args.device,
              "decoding": "greedy" if args.greedy else f"top-k {TOP_K}, one seed per sample",
              "tokens_per_s": "generated image tokens / wall seconds of a generate_images call "
                              "(prefill included), median of the repeats after the first",
              "points": []}
    for batch in batch_sizes:
        point = run_point(args, batch)
        result["points"].append(point)
        print(f"  batch {batch:3d}: {point['tokens_per_s']:9.1f} tok/s, peak "
              f"+{point['peak_memory_mib']} MiB (KV cache {point['kv_cache_mib']} MiB)", flush=True)
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    write_json(result, args.out, "sampling_batch_curve")
    plot_curve(result, Path(args.plot) if args.plot else RESULTS_DIR / "sampling_batch_curve.png")


if __name__ == "__main__":
    main()
