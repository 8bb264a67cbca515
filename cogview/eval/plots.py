"""Report plots as PNG files: loss curves from Lightning CSVLogger runs, accuracy bars.

Matplotlib's object API with the Agg canvas (no pyplot, no global backend change), so it
runs on headless machines and inside other programs' figures untouched.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import Formatter, PercentFormatter

_RUN_DIR_NOISE = re.compile(r"^(logs|csv|lightning_logs|version_\d+)$")
SPLIT_STYLES = {"train": dict(linestyle="-"), "val": dict(linestyle="--", marker="o", markersize=3)}


def run_name(csv_path: str | Path) -> str:
    """A readable run name for a metrics.csv: the nearest folder above it that is not a
    logger folder (logs, csv, lightning_logs, version_N), e.g. runs/t2i/logs -> "t2i"."""
    for parent in Path(csv_path).resolve().parents:
        if not _RUN_DIR_NOISE.match(parent.name):
            return parent.name or str(csv_path)
    return str(csv_path)


def read_metrics_csv(csv_path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """A Lightning CSVLogger metrics.csv -> {column: [(step, value), ...]} for every column
    but step and epoch, skipping the empty cells (each row holds only what was logged then)."""
    path = Path(csv_path)
    if not path.is_file():
        raise ValueError(f"metrics file {str(path)!r} does not exist; train with logger=csv and "
                         "pass <output_dir>/logs/metrics.csv")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "step" not in reader.fieldnames:
            raise ValueError(f"{path} has no 'step' column (columns: {reader.fieldnames}); "
                             "is it a Lightning CSVLogger metrics.csv?")
        series: dict[str, list[tuple[float, float]]] = {
            name: [] for name in reader.fieldnames if name not in ("step", "epoch")}
        for row in reader:
            if not row.get("step"):
                continue
            step = float(row["step"])
            for name in series:
                cell = row.get(name)
                if cell:
                    series[name].append((step, float(cell)))
    return {name: points for name, points in series.items() if points}


class _PlainLogTicks(Formatter):
    """Log-axis tick labels as plain numbers (0.2, 3, 10 rather than 2x10^-1); minor ticks
    2, 3 and 5 (x 10^k) are labelled only when the axis spans less than MINOR_LABEL_SPAN."""

    MINOR_LABEL_SPAN = 30.0
    MINOR_LABELS = (2, 3, 5)

    def __init__(self, minor: bool):
        self.minor = minor

    def __call__(self, x, pos=None) -> str:
        if self.minor:
            lo, hi = self.axis.get_view_interval()
            if lo <= 0 or hi / lo > self.MINOR_LABEL_SPAN or x <= 0:
                return ""
            if round(x / 10 ** math.floor(math.log10(x)), 6) not in self.MINOR_LABELS:
                return ""
        return f"{x:g}"


def _ema(values: list[float], smooth: float) -> list[float]:
    out, level = [], values[0]
    for v in values:
        level = smooth * level + (1 - smooth) * v
        out.append(level)
    return out


def _as_runs(runs) -> dict[str, Path]:
    if isinstance(runs, (str, Path)):
        runs = [runs]
    if isinstance(runs, Mapping):
        named = {str(k): Path(v) for k, v in runs.items()}
    elif isinstance(runs, Sequence):
        named = {}
        for path in runs:
            name = run_name(path)
            while name in named:  # two runs with one folder name
                name += "'"
            named[name] = Path(path)
    else:
        raise ValueError("runs must be a metrics.csv path, a list of paths or a dict name -> "
                         f"path, got {type(runs).__name__}")
    if not named:
        raise ValueError("plot_loss_curves got no runs; pass at least one metrics.csv")
    return named


def plot_loss_curves(runs, out_png: str | Path, metrics: Sequence[str] | None = None,
                     log_y: bool = True, smooth: float = 0.0) -> Path:
    """Loss against step for one or more Lightning CSVLogger runs, saved as a PNG.

    runs: a metrics.csv path, a list of them (named by their run folder) or {name: path}.
    metrics: the columns to plot (default: every column whose name holds "loss", e.g.
    train/loss, val/loss, train/image_loss_span). One panel per loss name (the part after
    "split/"): train as solid lines, val dashed with markers, one colour per run. smooth in
    [0, 1): an exponential moving average applied to train curves (0 = raw). Returns out_png.
    """
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smooth={smooth} must be in [0, 1) (0 = no smoothing, 0.9 = heavy)")
    data = {name: read_metrics_csv(path) for name, path in _as_runs(runs).items()}
    available = sorted({column for series in data.values() for column in series})
    wanted = list(metrics) if metrics is not None else [
        c for c in available if "loss" in c.rsplit("/", 1)[-1]]
    missing = [m for m in wanted if m not in available]
    if missing or not wanted:
        raise ValueError(f"no logged values for {missing or 'any loss column'}; the runs log "
                         f"{available}")
    panels: dict[str, list[str]] = {}
    for column in sorted(wanted, key=lambda c: c.split("/", 1)[-1] != "loss"):  # total loss first
        panels.setdefault(column.split("/", 1)[-1], []).append(column)

    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colours = {name: f"C{i}" for i, name in enumerate(data)}
    for ax, (panel, columns) in zip(axes, panels.items()):
        for run, series in data.items():
            for column in columns:
                points = series.get(column)
                if not points:
                    continue
                steps, values = zip(*points)
                split = column.split("/", 1)[0] if "/" in column else "train"
                style = SPLIT_STYLES.get(split, dict(linestyle=":"))
                if split == "train" and smooth > 0:
                    ax.plot(steps, values, color=colours[run], alpha=0.25, linewidth=0.8)
                    values = _ema(list(values), smooth)
                label = f"{run} {split}" if len(data) > 1 else split
                ax.plot(steps, values, color=colours[run], label=label, linewidth=1.4, **style)
        ax.set_title(panel)
        ax.set_xlabel("step")
        if log_y:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(_PlainLogTicks(minor=False))
            ax.yaxis.set_minor_formatter(_PlainLogTicks(minor=True))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def plot_accuracy_bars(results: Mapping[str, Mapping[str, float]], out_png: str | Path,
                       attributes: Sequence[str] | None = None,
                       targets: Mapping[str, float] | None = None,
                       title: str = "shapes-zh oracle accuracy") -> Path:
    """Grouped bars of accuracies in [0, 1]: one group per attribute, one bar per split.

    results: {split: {attribute: accuracy}}, e.g. {"seen": evaluate(...), ...}; count keys
    ("n_images", "n_objects") are skipped. attributes: which keys to show and in what order
    (default: those of the first split). targets: optional {split: full-match target},
    drawn as a dashed line over that split's full_match bar. Returns out_png.
    """
    if not results:
        raise ValueError("plot_accuracy_bars got no results; pass {split: {attribute: accuracy}}")
    splits = list(results)
    first = results[splits[0]]
    attributes = list(attributes) if attributes is not None else [
        a for a in first if not a.startswith("n_")]
    if not attributes:
        raise ValueError(f"no attributes to plot in {sorted(first)}")
    for split in splits:
        for a in attributes:
            value = results[split].get(a)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"results[{split!r}][{a!r}] = {value!r}; accuracies must be "
                                 "numbers in [0, 1]")
    fig = Figure(figsize=(1.2 + 1.1 * len(attributes) * max(1, len(splits) / 2), 3.8),
                 layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(splits)
    target_label = "reference"  # legend entry for the first reference line only
    for i, split in enumerate(splits):
        xs = [j + (i - (len(splits) - 1) / 2) * width for j in range(len(attributes))]
        values = [results[split][a] for a in attributes]
        bars = ax.bar(xs, values, width * 0.95, label=split, color=f"C{i}")
        ax.bar_label(bars, labels=[f"{v:.0%}" for v in values], fontsize=7, padding=1)
        if targets and split in targets and "full_match" in attributes:
            x = xs[attributes.index("full_match")]
            ax.hlines(targets[split], x - width / 2, x + width / 2, colors="black",
                      linestyles="--", linewidth=1.2, label=target_label)
            target_label = None
    ax.set_xticks(range(len(attributes)), [a.replace("_", " ") for a in attributes])
    ax.set_ylim(0, 1.08)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", fontsize=8, ncols=len(splits) + 1)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


CURVE_PANELS = {  # task -> (metric suffix in ShapesOracleEval points, y label, target)
    "t2i": ("full_match", "t2i full match", None),
    "caption": ("exact_match", "caption exact match", 0.9),
    "sr": ("psnr", "sr PSNR (dB)", None),
}


def plot_quality_curves(curves: Mapping[str, Sequence[Mapping[str, float]]], out_png: str | Path,
                        targets: Mapping[str, Mapping[str, float]] | None = None) -> Path:
    """Quality against training time, one panel per task: the ``oracle_curve.json`` points
    ``ShapesOracleEval`` writes ({"step", "train_seconds", "<split>_<metric>": value}).

    t2i: full match per split; caption: exact match per split (dashed line: 90 %);
    sr: PSNR per split (dashed: the sampled codes before the consistency refinement, when
    logged), with the split's bicubic PSNR as a dotted line of the same colour.
    targets: optional {task: {split: value}}, dashed lines in the split's colour.
    Returns out_png.
    """
    panels = [task for task in CURVE_PANELS if curves.get(task)]
    unknown = sorted(set(curves) - set(CURVE_PANELS))
    if unknown:
        raise ValueError(f"no curve panel for {unknown}; tasks: {sorted(CURVE_PANELS)}")
    if not panels:
        raise ValueError("plot_quality_curves got no points; pass {task: oracle_curve.json points}")
    fig = Figure(figsize=(4.2 * len(panels), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, task in zip(axes, panels):
        metric, label, default_target = CURVE_PANELS[task]
        points = curves[task]
        for point in points:
            if "train_seconds" not in point:
                raise ValueError(f"a {task} curve point has no train_seconds: {dict(point)}")
        minutes = [point["train_seconds"] / 60 for point in points]
        splits = [key[: -len(metric) - 1] for key in points[0]
                  if key.endswith(f"_{metric}") and not key.endswith(f"bicubic_{metric}")
                  and not key.endswith(f"unrefined_{metric}")]
        for i, split in enumerate(splits):
            ax.plot(minutes, [point.get(f"{split}_{metric}", math.nan) for point in points],
                    marker="o", markersize=3, color=f"C{i}", label=split)
            if any(f"{split}_unrefined_{metric}" in point for point in points):  # sr, refined
                ax.plot(minutes, [point.get(f"{split}_unrefined_{metric}", math.nan)
                                  for point in points], marker="x", markersize=3, linestyle="--",
                        color=f"C{i}", alpha=0.6, label=f"{split} sampled codes")
            bicubic = [point.get(f"{split}_bicubic_{metric}") for point in points]
            if all(value is not None for value in bicubic):  # the same images at every point
                ax.axhline(sum(bicubic) / len(bicubic), linestyle=":", color=f"C{i}",
                           label=f"{split} bicubic")
            target = (targets or {}).get(task, {}).get(split)
            if target is not None:
                ax.axhline(target, color=f"C{i}", linestyle="--", linewidth=0.8, alpha=0.7,
                           label=f"{split} reference")
        if metric != "psnr":
            ax.set_ylim(0, 1.02)
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
            if default_target is not None:
                ax.axhline(default_target, color="black", linestyle="--", linewidth=1,
                           label=f"reference {default_target:.0%}")
        ax.set_xlabel("training minutes (evaluation excluded)")
        ax.set_ylabel(label)
        ax.set_title(f"{task} (reference: bicubic + 1 dB)" if metric == "psnr" else task)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
