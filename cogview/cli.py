"""The ``cogview`` command: one entry point with a subcommand per job.

    cogview train task=t2i data.train_shards=DIR vqvae_dir=DIR      (= python train.py ...)
    cogview infer task=t2i ckpt=EXPORT "prompts=['红色的圆形']"      (= python infer.py ...)
    cogview pretokenize | export | convert | app | demo | shapes | sentencepiece  key=value ...
    cogview <command> --help                                        its config groups and keys

``python -m cogview ...`` is the same. Every subcommand takes Hydra-style ``key=value``
arguments; train, infer and pretokenize are Hydra apps (``-m`` sweeps, ``--cfg job``, ...).
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from cogview.config import CONF_DIR


@dataclass(frozen=True)
class Command:
    module: str  # its main(argv) (Hydra apps: main() reading sys.argv)
    summary: str
    hydra: bool = False  # a Hydra app: Hydra answers --help with its groups and config
    config: Path | None = None  # the yaml whose keys --help lists
    keys: str | None = None  # or "module:NAME", a dict of keys -> defaults (or (parser, default))


COMMANDS: dict[str, Command] = {
    "train": Command("cogview.training", "train a task: t2i, caption, sr or the VQ-VAE (vqvae)",
                     hydra=True),
    "infer": Command("cogview.inference", "run an export: t2i, caption, sr, complete, vqvae, "
                     "eval", hydra=True),
    "pretokenize": Command("cogview.data.pretokenize", "tokenize image-caption pairs once into "
                           "WebDataset shards (many ranks and nodes too)", hydra=True),
    "export": Command("cogview.export", "turn a training checkpoint (file or sharded "
                      "directory) into an inference directory", keys="cogview.export:CLI_KEYS"),
    "convert": Command("cogview.convert.__main__", "import CogView's released checkpoints",
                       config=CONF_DIR / "convert.yaml"),
    "app": Command("cogview.app", "serve the web demo", config=CONF_DIR / "app.yaml"),
    "demo": Command("cogview.demo", "the main job on shapes-zh: VQ-VAE, pretokenize, t2i, "
                    "caption, sr, a report with images", config=CONF_DIR / "demo.yaml"),
    "shapes": Command("cogview.data.shapes", "write shapes-zh image-caption shards",
                      keys="cogview.data.shapes:CLI_DEFAULTS"),
    "sentencepiece": Command("cogview.tokenization.train_sentencepiece", "train a SentencePiece "
                             "text tokenizer on captions",
                             keys="cogview.tokenization.train_sentencepiece:OPTIONS"),
}


def overview() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: cogview <command> [key=value ...]   (cogview <command> --help: its keys)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    return "\n".join(lines)


def config_groups(config: Path) -> list[str]:
    """`group (default; options: a, b)` for each config group the yaml's defaults list uses."""
    lines = []
    for entry in OmegaConf.to_container(OmegaConf.load(config)).get("defaults", []):
        if not isinstance(entry, dict):
            continue
        for group, default in entry.items():
            group = group.split("@")[0].lstrip("+/").removeprefix("override ")
            options = sorted(p.stem for p in (config.parent / group).glob("*.yaml"))
            lines.append(f"  {group}={default}   (options: {', '.join(options)})")
    return lines


def command_help(name: str) -> str:
    """Usage, summary, config groups and keys with their defaults."""
    command = COMMANDS[name]
    lines = [f"usage: cogview {name} [key=value ...]", "", f"{command.summary}."]
    if command.config is not None:
        groups = config_groups(command.config)
        if groups:
            lines += ["", "config groups:", *groups]
        values = OmegaConf.to_container(OmegaConf.load(command.config))
        values.pop("defaults", None)
        lines += ["", f"keys ({command.config.relative_to(CONF_DIR.parents[1])}):",
                  OmegaConf.to_yaml(values).rstrip()]
    if command.keys is not None:
        module, attribute = command.keys.split(":")
        keys = getattr(importlib.import_module(module), attribute)
        lines += ["", "keys:"]
        for key, default in keys.items():
            default = default[1] if isinstance(default, tuple) else default
            lines.append(f"  {key}={'(required)' if default is None else default}")
    return "\n".join(lines)


# The subcommand of a Hydra app, for the processes a launcher starts by re-running this
# program's sys.argv (Lightning's DDP: `cogview train trainer=ddp_cpu`), which holds only the
# key=value arguments Hydra reads.
COMMAND_ENV = "COGVIEW_COMMAND"


def run_command(name: str, argv: list[str]) -> int:
    """Runs subcommand `name` with `argv` (key=value ...); returns its exit status."""
    command = COMMANDS[name]
    module = importlib.import_module(command.module)
    if command.hydra:  # Hydra reads sys.argv, and answers --help itself (exit status 0)
        saved, saved_env = sys.argv, os.environ.get(COMMAND_ENV)
        sys.argv = [saved[0], *argv]
        os.environ[COMMAND_ENV] = name
        try:
            module.main()
        finally:
            sys.argv = saved
            if saved_env is None:
                os.environ.pop(COMMAND_ENV, None)
            else:
                os.environ[COMMAND_ENV] = saved_env
        return 0
    if any(arg in ("-h", "--help", "help") for arg in argv):
        print(command_help(name))
        return 0
    status = module.main(argv)
    return int(status or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(overview())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    relaunched = os.environ.get(COMMAND_ENV)
    if name not in COMMANDS and "=" in name and relaunched in COMMANDS and "LOCAL_RANK" in os.environ:
        name, rest = relaunched, argv  # a DDP rank re-running `cogview <relaunched> key=value ...`
    if name not in COMMANDS:
        print(f"cogview: unknown command {name!r}\n\n{overview()}", file=sys.stderr)
        return 2
    return run_command(name, rest)


if __name__ == "__main__":
    sys.exit(main())
