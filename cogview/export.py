"""Export any training checkpoint to a self-contained inference directory.

    python -m cogview.export ckpt=outputs/t2i/<time>/checkpoints/last.ckpt out=exports/t2i
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra.utils import get_class

TASK_KEY = "cogview_task"  # the LightningModule class path, written into every checkpoint


def task_class_path(module) -> str:
    """``package.module.Class`` of a task, stored in its checkpoints under TASK_KEY."""
    return f"{type(module).__module__}.{type(module).__qualname__}"


def export_checkpoint(ckpt: str | Path, out: str | Path) -> Path:
    """Loads the task saved in ``ckpt`` and writes its export directory to ``out``."""
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"ckpt={ckpt}: no such checkpoint file")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    target = checkpoint.get(TASK_KEY)
    if target is None:
        raise ValueError(f"ckpt={ckpt} was not written by a cogview task (no {TASK_KEY!r} entry)")
    task = get_class(target).load_from_checkpoint(ckpt, map_location="cpu")
    return task.export(out)


def main(argv: list[str] | None = None) -> int:
    args = dict(arg.split("=", 1) for arg in (argv if argv is not None else sys.argv[1:])
                if "=" in arg)
    unknown = sorted(set(args) - {"ckpt", "out"})
    if unknown or not {"ckpt", "out"} <= set(args):
        print("usage: python -m cogview.export ckpt=<checkpoint.ckpt> out=<directory>"
              + (f"\nunknown keys: {unknown}" if unknown else ""), file=sys.stderr)
        return 2
    out = export_checkpoint(args["ckpt"], args["out"])
    print(f"exported {args['ckpt']} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
