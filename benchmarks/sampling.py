"""Benchmark: tokens/s of KV-cached generation vs full recomputation at every step.

    python benchmarks/sampling.py [--threads 1] [--image-tokens 64] [--batch 8] [--out ...]

A random 4-layer, 128-wide CogViewTransformer over CogView's vocabulary (8192 image codes +
50,000 text pieces) samples ``image_tokens`` image codes for ``batch`` t2i prompts of
different lengths (left-padded), greedily so both paths must give the same codes, through
``generate_span(..., use_kv_cache=True | False)``. Both paths share the span-restricted
logits and the sampling; only the forward differs (one new token on the KV cache vs the
whole sequence again). The KV-cached path is also timed sampling with top-k=200 and one
generator per row (the per-sample seeding), to show what drawing costs over argmax.
Writes JSON with the machine info.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import interleaved_medians, machine_info, write_json  # noqa: E402
from cogview.generation import generate_span  # noqa: E402
from cogview.modules.transformer import CogViewTransformer, TransformerConfig  # noqa: E402
from cogview.tokenization import CogViewVocab, t2i_prompt  # noqa: E402




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--image-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    vocab = CogViewVocab(num_image_codes=8192, text_vocab_size=50000)
    torch.manual_seed(0)
    config = TransformerConfig(num_layers=args.layers, hidden_size=args.hidden, num_heads=4,
                               vocab_size=vocab.size)
    model = CogViewTransformer(config).eval()
    generator = torch.Generator().manual_seed(0)
    prompts = [t2i_prompt(vocab, torch.randint(0, vocab.text_vocab_size, (8 + 2 * i,),
                                               generator=generator))
               for i in range(args.batch)]

    def run(use_kv_cache: bool, greedy: bool = True) -> torch.Tensor:
        return generate_span(model, prompts, "image", args.image_tokens, vocab, greedy=greedy,
                             seeds=range(args.batch), top_k=200, use_kv_cache=use_kv_cache)

    same_codes = torch.equal(run(True), run(False))
    tokens = args.batch * args.image_tokens
    result = {"machine": machine_info(), "layers": args.layers, "hidden": args.hidden,
              "vocab_size": vocab.size, "batch": args.batch, "image_tokens": args.image_tokens,
              "prompt_tokens": [len(p) for p in prompts], "greedy_codes_identical": same_codes}
    cases = {"kv_cache": lambda: run(True), "recompute": lambda: run(False),
             "kv_cache_top_k_sampling": lambda: run(True, greedy=False)}
    for name, seconds in interleaved_medians(cases, args.repeats).items():
        result[name] = {"seconds": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1)}
    result["speedup"] = round(result["kv_cache"]["tokens_per_s"]
                              / result["recompute"]["tokens_per_s"], 2)
    write_json(result, args.out, "sampling")
    print(f"{args.batch} x {args.image_tokens} image tokens, {args.layers} layers x {args.hidden}: "
          f"KV cache {result['kv_cache']['tokens_per_s']} tok/s, recompute "
          f"{result['recompute']['tokens_per_s']} tok/s ({result['speedup']}x), KV cache sampling "
          f"{result['kv_cache_top_k_sampling']['tokens_per_s']} tok/s; "
          f"greedy codes identical: {same_codes}")


if __name__ == "__main__":
    main()
