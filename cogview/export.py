"""Export any training checkpoint to a self-contained inference directory.

    python -m cogview.export ckpt=outputs/t2i/<time>/checkpoints/last.ckpt out=exports/t2i

The checkpoint is read weights-only (tensors, numbers, strings, containers): a file needing any
other pickled object is refused before anything in it runs; ``trust_pickle=true`` lifts that for
files from a source you trust. Weights holding NaN or inf are refused, naming the tensor.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.utils import get_class

from cogview.safe_load import check_finite, load_torch_file

TASK_KEY = "cogview_task"  # the LightningModule class path, written into every checkpoint


def task_class_path(module) -> str:
    """``package.module.Class`` of a task, stored in its checkpoints under TASK_KEY."""
    return f"{type(module).__module__}.{type(module).__qualname__}"


def export_checkpoint(ckpt: str | Path, out: str | Path, trust_pickle: bool = False) -> Path:
    """Loads the task saved in ``ckpt`` and writes its export directory to ``out``."""
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"ckpt={ckpt}: no such checkpoint file")
    checkpoint = load_torch_file(ckpt, trust_pickle=trust_pickle)
    target = checkpoint.get(TASK_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(target, str):
        raise ValueError(f"ckpt={ckpt} was not written by a cogview task (no {TASK_KEY!r} entry)")
    if not target.startswith("cogview.tasks.") and not trust_pickle:
        raise ValueError(f"ckpt={ckpt} names the task class {target!r}, outside cogview.tasks; "
                         "importing it runs its module's code: pass trust_pickle=true if the "
                         "checkpoint comes from your own task class")
    check_finite(checkpoint.get("state_dict", {}), f"ckpt={ckpt}")
    # init_from=None: the weights come from ckpt, and the run's init_from source may be gone
    overrides = {"init_from": None} if "init_from" in (checkpoint.get("hyper_parameters") or {}) else {}
    del checkpoint
    task = get_class(target).load_from_checkpoint(ckpt, map_location="cpu",
                                                  weights_only=not trust_pickle, **overrides)
    return task.export(out)


def main(argv: list[str] | None = None) -> int:
    args = dict(arg.split("=", 1) for arg in (argv if argv is not None else sys.argv[1:])
                if "=" in arg)
    unknown = sorted(set(args) - {"ckpt", "out", "trust_pickle"})
    if unknown or not {"ckpt", "out"} <= set(args):
        print("usage: python -m cogview.export ckpt=<checkpoint.ckpt> out=<directory> "
              "[trust_pickle=false]" + (f"\nunknown keys: {unknown}" if unknown else ""),
              file=sys.stderr)
        return 2
    trust = args.get("trust_pickle", "false").lower()
    if trust not in ("true", "false"):
        print(f"trust_pickle={args['trust_pickle']}: expected true or false", file=sys.stderr)
        return 2
    try:
        out = export_checkpoint(args["ckpt"], args["out"], trust_pickle=trust == "true")
    except (FileNotFoundError, ValueError) as error:  # CheckpointError, NonFiniteWeightsError
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"exported {args['ckpt']} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
