"""Benchmark: peak memory of converting a CogView transformer checkpoint, against its size.

    python benchmarks/convert_memory.py [--layers 16] [--hidden 1024] [--no-naive] [--out PATH]

Writes a synthetic fp16 checkpoint with CogView's exact key names in the Megatron/DeepSpeed
layout (a few hundred MB by default; the real cogview-base is 7.9 GB), then converts it in a
child process and reads that process's peak resident memory (VmHWM, which exec resets;
RUSAGE_CHILDREN's ru_maxrss would also count the parent's pages the child held between fork
and exec).
Reported: peak / checkpoint size, and (peak - the RSS after imports) / checkpoint size, which
is what scales to the 7.9 GB file. Beside it, the naive route (torch.load into memory, load
the state dict into a float32 CogViewTransformer, save_pretrained) for comparison. Target from
the issue: <= 1.3x.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import machine_info, write_json  # noqa: E402
from cogview.convert import convert_transformer  # noqa: E402
from cogview.convert.checkpoint import find_model_states  # noqa: E402
from cogview.convert.transformer import config_from_state, match_state  # noqa: E402
from cogview.modules.transformer import CogViewTransformer  # noqa: E402
from cogview.modules.vqvae import VQVAE, VQVAEConfig  # noqa: E402
from cogview.tokenization import CharTokenizer, CogViewVocab  # noqa: E402

LAYER_SHAPES = {  # CogView's per-layer tensors for hidden size h
    "input_layernorm": lambda h: [(h,), (h,)],
    "attention.query_key_value": lambda h: [(3 * h, h), (3 * h,)],
    "attention.dense": lambda h: [(h, h), (h,)],
    "third_layernorm": lambda h: [(h,), (h,)],
    "post_attention_layernorm": lambda h: [(h,), (h,)],
    "mlp.dense_h_to_4h": lambda h: [(4 * h, h), (4 * h,)],
    "mlp.dense_4h_to_h": lambda h: [(h, 4 * h), (h,)],
    "fourth_layernorm": lambda h: [(h,), (h,)],
}


def synthetic_state(layers: int, hidden: int, vocab: int, positions: int = 1089,
                    dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Random weights under CogView's Megatron key names (std 0.02, LayerNorm weights 1)."""

    def randn(*shape):
        return torch.randn(*shape, dtype=dtype) * 0.02

    state = {"word_embeddings.weight": randn(vocab, hidden),
             "transformer.position_embeddings.weight": randn(positions, hidden)}
    for index in range(layers):
        for part, shapes in LAYER_SHAPES.items():
            weight_shape, bias_shape = shapes(hidden)
            prefix = f"transformer.layers.{index}.{part}"
            is_norm = part.endswith("layernorm")
            state[f"{prefix}.weight"] = (torch.ones(weight_shape, dtype=dtype) if is_norm
                                         else randn(*weight_shape))
            state[f"{prefix}.bias"] = torch.zeros(bias_shape, dtype=dtype)
    state["transformer.final_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
    state["transformer.final_layernorm.bias"] = torch.zeros(hidden, dtype=dtype)
    return state


def save_megatron_checkpoint(directory: Path, state: dict[str, torch.Tensor],
                             iteration: int = 1000) -> Path:
    """CogView's layout: latest_checkpointed_iteration.txt + <iter>/mp_rank_00_model_states.pt
    with the weights under "module" and the command line as an argparse.Namespace."""
    step = directory / str(iteration)
    step.mkdir(parents=True, exist_ok=True)
    (directory / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    path = step / "mp_rank_00_model_states.pt"
    torch.save({"module": state, "iteration": iteration,
                "args": Namespace(num_layers=0, hidden_size=0, fp16=True)}, path)
    return path


def vm_kib(field: str) -> int:
    """A /proc/self/status field (VmHWM: peak RSS, VmRSS: current RSS) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(mode: str, src: str, out: str, vqvae: str, tokenizer: str, heads: int) -> None:
    """Runs one conversion in this (fresh) process and prints its memory as JSON."""
    baseline = vm_kib("VmRSS")
    start = time.perf_counter()
    if mode == "streaming":
        convert_transformer(src, out, vqvae=vqvae, tokenizer=tokenizer, heads=heads)
    else:  # naive: read the file into memory, load it into the model, save the model
        path = find_model_states(src)
        state = torch.load(path, map_location="cpu", weights_only=False)["module"]
        config = config_from_state(state, heads, str(path))
        model = CogViewTransformer(config)  # float32
        model.load_state_dict(match_state(state, config, str(path)))
        model.save_pretrained(out)
    seconds = time.perf_counter() - start
    print(json.dumps({"baseline_kib": baseline, "peak_kib": vm_kib("VmHWM"), "seconds": seconds}))


def measure(mode: str, src: Path, out: Path, vqvae: Path, tokenizer: Path, heads: int) -> dict:
    """Peak memory of ``child(mode, ...)`` run in a subprocess."""
    command = [sys.executable, __file__, "--child", mode, "--src", str(src), "--out-dir", str(out),
               "--vqvae", str(vqvae), "--tokenizer", str(tokenizer), "--heads", str(heads)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        raise RuntimeError(f"{mode} conversion failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_benchmark(layers: int, hidden: int, workdir: Path, naive: bool = True) -> dict:
    """Builds the synthetic checkpoint in ``workdir``, converts it, returns the numbers."""
    tokenizer_dir = workdir / "text_tokenizer"
    tokenizer = CharTokenizer()
    tokenizer.save(tokenizer_dir)
    vqvae_dir = workdir / "vqvae"
    VQVAE(VQVAEConfig.preset("tiny", num_codes=8192)).save_pretrained(vqvae_dir)
    vocab = CogViewVocab.for_tokenizer(tokenizer, 8192)
    ckpt_dir = workdir / "ckpt"
    state = synthetic_state(layers, hidden, vocab.size)
    path = save_megatron_checkpoint(ckpt_dir, state)
    del state
    size = path.stat().st_size
    heads = max(1, hidden // 64)
    result = {"machine": machine_info(), "layers": layers, "hidden": hidden, "heads": heads,
              "vocab": vocab.size, "dtype": "float16", "checkpoint_bytes": size}
    modes = ["streaming"] + (["naive"] if naive else [])
    for mode in modes:
        report = measure(mode, ckpt_dir, workdir / f"out_{mode}", vqvae_dir, tokenizer_dir, heads)
        peak, baseline = report["peak_kib"] * 1024, report["baseline_kib"] * 1024
        result[mode] = {
            "peak_rss_bytes": peak, "rss_after_imports_bytes": baseline,
            "peak_over_checkpoint": round(peak / size, 3),
            "added_over_checkpoint": round((peak - baseline) / size, 3),
            "seconds": round(report["seconds"], 2),
        }
        print(f"{mode:9s}: checkpoint {size / 2**20:7.1f} MiB, peak RSS {peak / 2**20:7.1f} MiB "
              f"({peak / size:.2f}x), above the {baseline / 2**20:.0f} MiB after imports: "
              f"{(peak - baseline) / size:.2f}x, {report['seconds']:.1f} s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--no-naive", action="store_true", help="skip the naive comparison")
    parser.add_argument("--workdir", help="where to write the checkpoint (default: a temp dir)")
    parser.add_argument("--out", help="JSON path (default bench_results/convert_memory.json)")
    # child mode (internal)
    parser.add_argument("--child", choices=("streaming", "naive"))
    parser.add_argument("--src")
    parser.add_argument("--out-dir")
    parser.add_argument("--vqvae")
    parser.add_argument("--tokenizer")
    parser.add_argument("--heads", type=int, default=16)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.src, args.out_dir, args.vqvae, args.tokenizer, args.heads)
        return
    if args.workdir:
        result = run_benchmark(args.layers, args.hidden, Path(args.workdir), not args.no_naive)
    else:
        with tempfile.TemporaryDirectory(prefix="convert_memory_") as workdir:
            result = run_benchmark(args.layers, args.hidden, Path(workdir), not args.no_naive)
    write_json(result, args.out, "convert_memory")


if __name__ == "__main__":
    main()
