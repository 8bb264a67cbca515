"""Export any training checkpoint to a self-contained inference directory.

    python -m cogview.export ckpt=outputs/t2i/<time>/checkpoints/last.ckpt out=exports/t2i

    python -m cogview.export ckpt=<run>/checkpoints/last.ckpt/ out=... trust_pickle=true

The checkpoint is read weights-only (tensors, numbers, strings, containers): a file needing any
other pickled object is refused before anything in it runs; ``trust_pickle=true`` lifts that for
files from a source you trust. Weights holding NaN or inf are refused, naming the tensor.

A sharded checkpoint directory is consolidated first: FSDP's (``state_dict_type: sharded``,
torch.distributed.checkpoint's ``.metadata`` + ``*.distcp`` + Lightning's ``meta.pt``) and
DeepSpeed's (``latest`` + ``checkpoint/*_states.pt``, needs deepspeed installed). Both formats
keep their metadata as Python pickles, so they need ``trust_pickle=true``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from hydra.utils import get_class
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from cogview.safe_load import CheckpointError, check_finite, load_torch_file

CLI_KEYS = {"ckpt": None, "out": None, "trust_pickle": False}  # cogview export key=value
TASK_KEY = "cogview_task"  # the LightningModule class path, written into every checkpoint


def task_class_path(module) -> str:
    """``package.module.Class`` of a task, stored in its checkpoints under TASK_KEY."""
    return f"{type(module).__module__}.{type(module).__qualname__}"


def sharded_checkpoint_kind(directory: Path) -> str | None:
    """"fsdp" or "deepspeed" for a sharded checkpoint directory, else None."""
    if (directory / ".metadata").is_file():
        return "fsdp"
    if (directory / "latest").is_file() or any(directory.glob("*/*model_states.pt")):
        return "deepspeed"
    return None


def consolidate_checkpoint(directory: Path, out: Path, trust_pickle: bool = False) -> Path:
    """A sharded checkpoint directory (FSDP or DeepSpeed) -> one Lightning checkpoint file."""
    kind = sharded_checkpoint_kind(directory)
    if kind is None:
        raise ValueError(f"ckpt={directory} is a directory but not a sharded checkpoint (FSDP: "
                         "a .metadata file; DeepSpeed: a 'latest' file and checkpoint/*_states.pt)")
    if not trust_pickle:
        raise CheckpointError(
            f"ckpt={directory} is a {'FSDP' if kind == 'fsdp' else 'DeepSpeed'} sharded "
            "checkpoint, whose metadata is a Python pickle that cannot be read weights-only: "
            "pass trust_pickle=true if your own run wrote it")
    if kind == "deepspeed":
        try:  # deferred on purpose: it imports deepspeed, an optional install
            from lightning.pytorch.utilities.deepspeed import (
                convert_zero_checkpoint_to_fp32_state_dict,
            )

            convert_zero_checkpoint_to_fp32_state_dict(str(directory), str(out))
        except ImportError as error:
            raise CheckpointError(f"ckpt={directory} is a DeepSpeed checkpoint: consolidating it "
                                  f"needs deepspeed (pip install deepspeed): {error}") from None
        return out
    dcp_to_torch_save(directory, out)  # {"model": ..., "optimizer_0": ...}
    checkpoint = torch.load(out, map_location="cpu", weights_only=False)
    meta = directory / "meta.pt"  # everything else Lightning saved (hparams, task class, ...)
    if meta.is_file():
        checkpoint.update(torch.load(meta, map_location="cpu", weights_only=False))
    checkpoint["state_dict"] = checkpoint.pop("model")
    for key in [k for k in checkpoint if k.startswith("optimizer_")]:
        del checkpoint[key]  # optimiser shards are not needed for an export
    torch.save(checkpoint, out)
    return out


def export_checkpoint(ckpt: str | Path, out: str | Path, trust_pickle: bool = False) -> Path:
    """Loads the task saved in ``ckpt`` (a file, or a sharded checkpoint directory) and writes
    its export directory to ``out``."""
    ckpt = Path(ckpt)
    if ckpt.is_dir():
        with tempfile.TemporaryDirectory(prefix="cogview-consolidate-") as scratch:
            single = consolidate_checkpoint(ckpt, Path(scratch) / "consolidated.ckpt",
                                            trust_pickle)
            return export_checkpoint(single, out, trust_pickle)
    if not ckpt.is_file():
        raise FileNotFoundError(f"ckpt={ckpt}: no such checkpoint file or directory")
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
    unknown = sorted(set(args) - set(CLI_KEYS))
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
    from cogview.cli import run_command  # the same --help and exit codes as `cogview export`

    sys.exit(run_command("export", sys.argv[1:]))
