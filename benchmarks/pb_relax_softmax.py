"""Benchmark: the fused PB-relax softmax kernel vs the same math in eager PyTorch vs torch.softmax.

    python benchmarks/pb_relax_softmax.py [--threads 2] [--out bench_results/pb_relax_softmax.json]

CPU, causal attention scores [batch*heads, L, L] at (64, 256) and (16, 1089), fp32 and bf16:
  fused      cogview.modules.pb_relax.pb_relax_softmax (the cogview._C kernel)
  eager      pb_relax_softmax_reference, the same math composed of eager ops
  softmax    torch.softmax(scores, -1) alone, unmasked: the floor a fused kernel aims at
each timed forward only and forward+backward (median of repeats after warm-up). Targets:
eager/fused (fwd+bwd) >= 2 and fused/softmax (fwd) <= 1.5. The fused kernel is also timed
under every CPU build this machine runs (default / avx2 / avx512). With a GPU, the CUDA
kernel's forward and backward are timed too (CUDA events around back-to-back launches) and
reported as achieved memory bandwidth (bytes the kernel must read and write / time) against
the device's peak.
Writes JSON (machine info included) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import interleaved_medians, machine_info  # noqa: E402
from cogview.modules import pb_relax  # noqa: E402
from cogview.modules.pb_relax import (  # noqa: E402
    has_kernel,
    pb_relax_softmax,
    pb_relax_softmax_reference,
)

ALPHA = 32.0  # CogView 2.4
SHAPES = ((64, 256), (16, 1089))  # (batch*heads, sequence length)
CPU_DTYPES = (torch.float32, torch.bfloat16)
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TARGET_EAGER_OVER_FUSED = 2.0
TARGET_FUSED_OVER_SOFTMAX = 1.5
# Peak DRAM bandwidth in bytes/s by device name (vendor data sheets); matched by substring.
PEAK_BANDWIDTH = (
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM
    ("A100-PCIE-40GB", 1.555e12),
    ("A100-SXM4-40GB", 1.555e12),
    ("A100", 2.039e12),  # 80 GB
    ("L40S", 0.864e12),
    ("A10", 0.6e12),
    ("RTX 4090", 1.008e12),
    ("RTX 3090", 0.936e12),
    ("V100", 0.9e12),
    ("T4", 0.32e12),
)




def methods(causal: bool):
    """name -> softmax over scores [..., L, L], all returning probs of the scores' dtype."""
    return {
        "fused": lambda s: pb_relax_softmax(s, ALPHA, causal),
        "eager": lambda s: pb_relax_softmax_reference(s, ALPHA, causal),
        "softmax": lambda s: torch.softmax(s, dim=-1),
    }


def timed_calls(softmax, scores: torch.Tensor, grad: torch.Tensor, before=lambda: None):
    """The forward-only and the forward+backward call of one softmax (`before` runs first)."""
    leaf = scores.detach().requires_grad_(True)

    def forward():
        before()
        with torch.no_grad():
            softmax(scores)

    def forward_backward():
        before()
        leaf.grad = None
        softmax(leaf).backward(grad)

    return forward, forward_backward


def bench_cpu(warmup: int, repeats: int) -> list[dict]:
    rows = []
    for batch_heads, length in SHAPES:
        for dtype in CPU_DTYPES:
            torch.manual_seed(0)
            scores = (torch.randn(batch_heads, length, length) / 8).to(dtype)  # already / alpha
            grad = torch.randn(batch_heads, length, length).to(dtype)
            result = {"batch_heads": batch_heads, "length": length,
                      "dtype": str(dtype).split(".")[-1], "causal": True}
            current = pb_relax._C.cpu_capability()  # the build the kernel picks on this CPU
            calls = {}
            for name, softmax in methods(causal=True).items():
                select = lambda: pb_relax._C.set_cpu_capability(current)  # noqa: E731
                calls[f"{name}_fwd_s"], calls[f"{name}_fwd_bwd_s"] = timed_calls(
                    softmax, scores, grad, before=select if name == "fused" else lambda: None)
            for build in pb_relax._C.cpu_capabilities():  # the fused kernel under each CPU build
                select = lambda build=build: pb_relax._C.set_cpu_capability(build)  # noqa: E731
                calls[f"fused@{build}_fwd_s"], calls[f"fused@{build}_fwd_bwd_s"] = timed_calls(
                    methods(causal=True)["fused"], scores, grad, before=select)
            try:
                times = interleaved_medians(calls, repeats=repeats, warmup=warmup)
            finally:
                pb_relax._C.set_cpu_capability(current)
            by_build = {}
            for name, seconds in times.items():
                if name.startswith("fused@"):
                    build, kind = name[len("fused@"):].split("_", 1)
                    by_build.setdefault(build, {})[kind] = seconds
                else:
                    result[name] = seconds
            result["fused_by_cpu_build"] = by_build
            for ratio, (top, bottom) in {
                "eager_over_fused_fwd_bwd": ("eager_fwd_bwd_s", "fused_fwd_bwd_s"),
                "eager_over_fused_fwd": ("eager_fwd_s", "fused_fwd_s"),
                "fused_over_softmax_fwd": ("fused_fwd_s", "softmax_fwd_s"),
                "fused_over_softmax_fwd_bwd": ("fused_fwd_bwd_s", "softmax_fwd_bwd_s"),
            }.items():
                result[ratio] = result[top] / result[bottom]
            result["meets_targets"] = (
                result["eager_over_fused_fwd_bwd"] >= TARGET_EAGER_OVER_FUSED
                and result["fused_over_softmax_fwd"] <= TARGET_FUSED_OVER_SOFTMAX
            )
            rows.append(result)
            print_cpu_row(result, flush=True)
    return rows


def peak_bandwidth(device: int) -> tuple[float | None, str]:
    """Peak DRAM bytes/s of a CUDA device and where the number came from."""
    props = torch.cuda.get_device_properties(device)
    for key, peak in PEAK_BANDWIDTH:
        if key.lower() in props.name.lower():
            return peak, f"table ({key})"
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:  # double data rate
        return 2 * clock_khz * 1e3 * bus_bits / 8, "device properties"
    return None, "unknown device"


def visible_keys(length: int) -> int:
    """Keys read by a causal square [L, L]: L (L + 1) / 2 of the L * L."""
    return length * (length + 1) // 2


def cuda_seconds(fn, warmup: int, repeats: int) -> float:
    """Mean device time of fn() from CUDA events around `repeats` back-to-back launches."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def bench_cuda(warmup: int, repeats: int) -> dict:
    device = torch.cuda.current_device()
    peak, peak_source = peak_bandwidth(device)
    kernel = pb_relax._C
    rows = []
    for batch_heads, length in SHAPES:
        for dtype in CUDA_DTYPES:
            torch.manual_seed(0)
            scores = (torch.randn(batch_heads, length, length, device="cuda") / 8).to(dtype)
            grad = torch.randn(batch_heads, length, length, device="cuda").to(dtype)
            probs = kernel.pb_relax_softmax_forward(scores, ALPHA, True, None)
            fwd = cuda_seconds(lambda: kernel.pb_relax_softmax_forward(scores, ALPHA, True, None),
                               warmup, repeats)
            bwd = cuda_seconds(lambda: kernel.pb_relax_softmax_backward(grad, probs, ALPHA, True),
                               warmup, repeats)
            softmax_fwd = cuda_seconds(lambda: torch.softmax(scores, -1), warmup, repeats)
            size = scores.element_size()
            full, visible = batch_heads * length * length, batch_heads * visible_keys(length)
            # The kernels read only the causal prefix of each row and write every element.
            fwd_bytes = (visible + full) * size
            bwd_bytes = (2 * visible + full) * size
            result = {"batch_heads": batch_heads, "length": length,
                      "dtype": str(dtype).split(".")[-1], "causal": True,
                      "fwd_s": fwd, "bwd_s": bwd, "torch_softmax_fwd_s": softmax_fwd,
                      "fwd_bytes": fwd_bytes, "bwd_bytes": bwd_bytes,
                      "fwd_bandwidth_Bps": fwd_bytes / fwd, "bwd_bandwidth_Bps": bwd_bytes / bwd}
            if peak:
                result["fwd_fraction_of_peak"] = result["fwd_bandwidth_Bps"] / peak
                result["bwd_fraction_of_peak"] = result["bwd_bandwidth_Bps"] / peak
            rows.append(result)
    return {"device": torch.cuda.get_device_name(device), "peak_bandwidth_Bps": peak,
            "peak_source": peak_source, "results": rows}


def print_cpu_row(r: dict, flush: bool = False) -> None:
    ms = lambda key: f"{r[key] * 1e3:8.2f}"  # noqa: E731
    builds = "  ".join(f"{name}:{t['fwd_s'] * 1e3:.1f}/{t['fwd_bwd_s'] * 1e3:.1f}"
                       for name, t in r["fused_by_cpu_build"].items())
    print(f"{r['batch_heads']:>4} x {r['length']:<5} {r['dtype']:<9}"
          f"{ms('fused_fwd_s')}{ms('eager_fwd_s')}{ms('softmax_fwd_s')} |"
          f"{ms('fused_fwd_bwd_s')}{ms('eager_fwd_bwd_s')}{ms('softmax_fwd_bwd_s')} |"
          f"{r['eager_over_fused_fwd_bwd']:9.2f}x{r['fused_over_softmax_fwd']:9.2f}x"
          f"   {'yes' if r['meets_targets'] else 'NO'}   [{builds}]", flush=flush)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_results/pb_relax_softmax.json"))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    if not has_kernel("cpu"):
        print("cogview._C is not built; run `make install` first", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)

    machine = {**machine_info(), "python": platform.python_version(),
               "kernel_dispatch": pb_relax._C.cpu_dispatch_info()}
    print(f"CPU: {machine['cpu']} ({machine['cpu_isa']}, native bf16: {machine['cpu_native_bf16']}), "
          f"{machine['threads']} torch threads, kernel build {machine['pb_relax_cpu_build']} "
          f"(times in ms, median of {args.repeats})")
    print(f"{'shape':<12}{'dtype':<9}{'fused':>8}{'eager':>8}{'softmax':>8} |"
          f"{'fused':>8}{'eager':>8}{'softmax':>8} |{'eager/fus':>10}{'fus/smax':>10}  targets"
          "   [fused fwd/fwd+bwd per CPU build]")
    print(f"{'':<21}{'---------- forward ----------':>24} |{'------ forward+backward ------':>24} |"
          f"{'fwd+bwd':>10}{'fwd':>10}")
    report = {
        "benchmark": "pb_relax_softmax",
        "alpha": ALPHA,
        "targets": {"eager_over_fused_fwd_bwd_min": TARGET_EAGER_OVER_FUSED,
                    "fused_over_softmax_fwd_max": TARGET_FUSED_OVER_SOFTMAX},
        "machine": machine,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "cpu": bench_cpu(args.warmup, args.repeats),
    }
    if torch.cuda.is_available() and has_kernel("cuda"):
        report["cuda"] = bench_cuda(args.warmup, max(args.repeats, 50))
        cuda = report["cuda"]
        print(f"\nCUDA: {cuda['device']} (peak {cuda['peak_bandwidth_Bps']} B/s, "
              f"{cuda['peak_source']})")
        for r in report["cuda"]["results"]:
            frac = lambda key: f"{r[key]:.0%}" if key in r else "n/a"  # noqa: E731
            print(f"{r['batch_heads']:>4} x {r['length']:<5} {r['dtype']:<9} "
                  f"fwd {r['fwd_s'] * 1e6:8.1f} us ({r['fwd_bandwidth_Bps'] / 1e9:7.1f} GB/s, "
                  f"{frac('fwd_fraction_of_peak')} of peak)  "
                  f"bwd {r['bwd_s'] * 1e6:8.1f} us ({r['bwd_bandwidth_Bps'] / 1e9:7.1f} GB/s, "
                  f"{frac('bwd_fraction_of_peak')})  "
                  f"torch.softmax fwd {r['torch_softmax_fwd_s'] * 1e6:8.1f} us")
    else:
        report["cuda"] = None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
