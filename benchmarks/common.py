"""Helpers shared by the benchmark scripts: machine facts, timing, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from cogview.cpu import cpu_summary
from cogview.modules import pb_relax
from cogview.modules.pb_relax import has_kernel
from cogview.precision import auto_precision

RESULTS_DIR = Path(__file__).resolve().parents[1] / "bench_results"


def machine_info() -> dict:
    """CPU model, ISA level and native-bf16 flag, the precision ``auto`` picks, the kernel
    build in use, torch version and threads: numbers are only meaningful beside these."""
    info = {**cpu_summary(), "precision_auto": auto_precision("cpu")[0],
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if has_kernel("cpu"):
        info["pb_relax_cpu_build"] = pb_relax._C.cpu_capability()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} not found in /proc/self/status; peak RSS needs Linux procfs")


def reset_peak_rss() -> str:
    """Resets VmHWM to the current RSS; returns how the peak will be measured."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "VmHWM after clear_refs=5, minus VmRSS before the first call"
    except OSError:
        # Cannot reset: the peak then also covers model loading, so we subtract the old peak.
        return "VmHWM growth over the first call (clear_refs not writable)"


def median_time(fn, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each fn, running them in turn within every repeat so that load
    from other processes on a shared machine falls on all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def write_json(result: dict, out: str | Path | None, name: str) -> Path:
    """Writes ``result`` to ``out`` (default bench_results/<name>.json) and returns the path."""
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {path}")
    return path


def parse_exports(parser, items: list[str], example: str) -> list[tuple[int, str]]:
    """``--export STEPS=EXPORT_DIR ...`` -> [(steps, dir)] sorted by steps; a malformed item is
    a usage error naming it and ``example``."""
    exports = []
    for item in items:
        steps, sep, path = item.partition("=")
        if not sep or not steps.isdigit():
            parser.error(f"--export {item!r}: expected STEPS=EXPORT_DIR, e.g. {example}")
        exports.append((int(steps), path))
    return sorted(exports)


def split_axes(count: int, height: float = 3.2):
    """A matplotlib figure with ``count`` panels side by side sharing y -> (fig, axes)."""
    fig = Figure(figsize=(4 * count, height))
    return fig, fig.subplots(1, count, sharey=True)


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
