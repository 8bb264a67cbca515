"""Benchmark: t2i sampling tokens/s, KV cache vs full recomputation, and vs HF GPT-2 `generate`.

    python benchmarks/sampling.py [--threads 2] [--cases 64x8,256x8,1024x1] [--preset small]

One run, two side-by-side sections, every timing interleaved (``interleaved_medians``) so that
load from other processes on a shared machine falls on all contenders alike:

1. ``kv_vs_recompute``: the ``--sweep-preset`` model (default ``tiny``, 4 x 128) samples
   ``image_tokens`` codes for ``batch`` t2i prompts of different lengths (left-padded), greedily so
   both paths must give the same codes, through ``generate_span(..., use_kv_cache=True | False)``.
   Both share the span-restricted logits and the sampling; only the forward differs (one new
   token on the KV cache vs the whole sequence again). One case per ``--cases`` entry
   (``<image tokens>x<batch>``); the KV-cached path is also timed drawing with top-k 200 and one
   generator per row (the per-sample seeding).
2. ``vs_hf_gpt2``: the ``--preset`` model (default ``small``, 12 x 512) through ``generate_images``
   vs ``transformers.GPT2LMHeadModel.generate`` with the same layers, width, heads, vocabulary,
   positions, prompts (the same left-padded ids and attention mask) and batch, random weights,
   ``min_new_tokens = max_new_tokens`` and ``use_cache=True``, greedy and top-k 200, in fp32 and
   with both models' weights cast to bf16 (what ``Pipeline.from_pretrained(dtype="bf16")`` runs).
   Two ablations tell the reasons apart: ``ours_gpt2_arch`` is our sampler on a CogViewTransformer
   with GPT-2's exact architecture (pre-LN, no PB-relax, SDPA) and the *same weights* as the HF
   model (their logits are compared), ``..._full_vocab_logits`` computes the head over the whole
   58,240-id vocabulary, as GPT-2 does, and then keeps the image slice.

Tokens/s counts generated image tokens (batch x image tokens) over the wall time of the whole
call, prefill included. Writes JSON (default bench_results/sampling.json) with machine info.
About 4 minutes of timed work on 2 AVX-512 cores, most of it recomputation at 1024 tokens
(``--cases 64x8`` for a quick run); far longer when other processes share the cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import interleaved_medians, machine_info, write_json  # noqa: E402
from cogview.config import CONF_DIR  # noqa: E402
from cogview.generation import generate_images, generate_span  # noqa: E402
from cogview.modules.transformer import CogViewTransformer, TransformerConfig  # noqa: E402
from cogview.precision import auto_precision  # noqa: E402
from cogview.tokenization import CogViewVocab, collate_layouts, t2i_prompt  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

PRESETS = CONF_DIR / "model"
TOP_K = 200  # CogView's default, as in conf and generate_images
# CogView's vocabulary: 8192 image codes, 50,000 text pieces, 27 commands, padded to 58,240.
VOCAB = CogViewVocab(num_image_codes=8192, text_vocab_size=50000)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The ablation that turns our model into GPT-2: pre-LN, plain softmax attention, plain LayerNorm.
GPT2_ARCHITECTURE = {"sandwich_ln": False, "pb_relax": False, "attention": "sdpa"}


# ------------------------------------------------------------------------------------------------
# models and prompts


def preset_config(preset: str, **overrides) -> TransformerConfig:
    """cogview/conf/model/<preset>.yaml as a TransformerConfig over VOCAB, with ``overrides`` applied."""
    path = PRESETS / f"{preset}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS.glob("*.yaml"))
        raise ValueError(f"model preset {preset!r} not found at {path}; pick one of {known}")
    values = OmegaConf.to_container(OmegaConf.load(path))
    values.update(vocab_size=VOCAB.size, dropout=0.0, attention_dropout=0.0, **overrides)
    return TransformerConfig.from_dict(values)


def build_model(config: TransformerConfig, seed: int = 0) -> CogViewTransformer:
    """A randomly initialised CogViewTransformer in eval mode."""
    torch.manual_seed(seed)
    return CogViewTransformer(config).eval()


def model_facts(model: CogViewTransformer, preset: str) -> dict:
    """The sizes a reader needs to place the numbers."""
    config = model.config
    return {"preset": preset, "layers": config.num_layers, "hidden": config.hidden_size,
            "heads": config.num_heads, "vocab_size": config.vocab_size,
            "max_positions": config.max_positions, "sandwich_ln": config.sandwich_ln,
            "pb_relax": config.pb_relax, "attention": config.attention,
            "parameters": model.num_parameters()}


def prompt_text_ids(batch: int, seed: int = 0) -> list[torch.Tensor]:
    """Random tokenizer-space captions of 8, 10, ..., 22 pieces (cycling): t2i prompts of 11..25
    tokens, so a batch is left-padded as in real use."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB.text_vocab_size, (8 + 2 * (i % 8),), generator=generator)
            for i in range(batch)]


class FullVocabLogitsTransformer(CogViewTransformer):
    """Ablation: the output head computed over the whole vocabulary, then sliced, as a sampler
    without span-restricted logits would (same weights, same result, more work)."""

    def logits(self, hidden: torch.Tensor, logits_range: tuple[int, int] | None = None):
        logits = F.linear(hidden, self.word_embeddings.weight)  # (..., V)
        return logits if logits_range is None else logits[..., logits_range[0]:logits_range[1]]


def full_vocab_copy(model: CogViewTransformer) -> FullVocabLogitsTransformer:
    """The same network and weights with the full-vocabulary output head."""
    copy = FullVocabLogitsTransformer(model.config).eval()
    copy.load_state_dict(model.state_dict())
    return copy.to(next(model.parameters()).dtype)


def hf_gpt2_from(model: CogViewTransformer):
    """transformers' GPT2LMHeadModel with ``model``'s shape and weights.

    ``model`` must have GPT2_ARCHITECTURE (pre-LN, no PB-relax); then the two compute the same
    function: learned positions, GELU(tanh), tied head, biases everywhere, LN eps 1e-5.
    """
    from transformers import GPT2Config, GPT2LMHeadModel  # deferred on purpose: a dev-only install

    config = model.config
    if config.sandwich_ln or config.pb_relax:
        raise ValueError("hf_gpt2_from needs a model built with sandwich_ln=False, pb_relax=False "
                         f"(GPT-2's architecture), got {config}")
    hf_config = GPT2Config(vocab_size=config.vocab_size, n_positions=config.max_positions,
                           n_embd=config.hidden_size, n_layer=config.num_layers,
                           n_head=config.num_heads, n_inner=config.mlp_ratio * config.hidden_size,
                           activation_function="gelu_new", layer_norm_epsilon=config.layernorm_eps,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                           tie_word_embeddings=True)
    hf = GPT2LMHeadModel(hf_config).eval()
    ours = model.state_dict()
    # HF's Conv1D stores weights as [in, out]: the transpose of nn.Linear's [out, in].
    renames = {"word_embeddings.weight": "transformer.wte.weight",
               "position_embeddings.weight": "transformer.wpe.weight",
               "final_layernorm.weight": "transformer.ln_f.weight",
               "final_layernorm.bias": "transformer.ln_f.bias"}
    per_layer = {"input_layernorm": ("ln_1", False),
                 "attention.query_key_value": ("attn.c_attn", True),
                 "attention.dense": ("attn.c_proj", True),
                 "post_attention_layernorm": ("ln_2", False),
                 "mlp.dense_h_to_4h": ("mlp.c_fc", True),
                 "mlp.dense_4h_to_h": ("mlp.c_proj", True)}  # ours -> (GPT-2's, transpose?)
    state = {new: ours[old] for old, new in renames.items()}
    for index in range(config.num_layers):
        for old, (new, transpose) in per_layer.items():
            weight = ours[f"layers.{index}.{old}.weight"]
            state[f"transformer.h.{index}.{new}.weight"] = weight.t() if transpose else weight
            state[f"transformer.h.{index}.{new}.bias"] = ours[f"layers.{index}.{old}.bias"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [key for key in missing if key != "lm_head.weight"]  # tied to wte
    if missing or unexpected:
        raise RuntimeError(f"GPT-2 weight mapping is incomplete: missing {missing}, "
                           f"unexpected {unexpected}")
    hf.tie_weights()
    return hf


@torch.inference_mode()
def same_function_check(model: CogViewTransformer, hf, text_ids: list[torch.Tensor]) -> float:
    """Max |logit difference| between ``model`` and ``hf`` on one unpadded t2i prompt."""
    input_ids = t2i_prompt(VOCAB, text_ids[0]).input_ids[None]  # (1, T)
    ours = model(input_ids)  # (1, T, V)
    theirs = hf(input_ids=input_ids).logits  # (1, T, V)
    return float((ours.float() - theirs.float()).abs().max())


# ------------------------------------------------------------------------------------------------
# 1. KV cache vs recomputation


def parse_cases(text: str) -> list[tuple[int, int]]:
    """'64x8,256x8' -> [(64, 8), (256, 8)]: (image tokens, batch) per case."""
    cases = []
    for item in text.split(","):
        try:
            tokens, batch = (int(part) for part in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--cases entry {item!r} is not '<image tokens>x<batch>', e.g. 64x8")
        if tokens < 1 or batch < 1:
            raise SystemExit(f"--cases entry {item!r} needs positive image tokens and batch")
        cases.append((tokens, batch))
    return cases


def kv_vs_recompute_case(model: CogViewTransformer, image_tokens: int, batch: int,
                         repeats: int) -> dict:
    """Tokens/s of the KV-cached and the recomputing decoder on one (length, batch) case."""
    prompts = [t2i_prompt(VOCAB, text) for text in prompt_text_ids(batch)]
    longest = max(len(p) for p in prompts)
    if longest + image_tokens - 1 > model.config.max_positions:
        raise SystemExit(f"{image_tokens} image tokens after a {longest}-token prompt exceed "
                         f"max_positions={model.config.max_positions}; use a shorter case")

    def run(use_kv_cache: bool, greedy: bool = True) -> torch.Tensor:
        return generate_span(model, prompts, "image", image_tokens, VOCAB, greedy=greedy,
                             seeds=range(batch), top_k=TOP_K, use_kv_cache=use_kv_cache)

    # Also the warm-up: every path has run once before the timed repeats.
    identical = torch.equal(run(True), run(False))
    run(True, greedy=False)
    timed = interleaved_medians({"kv_cache": lambda: run(True), "recompute": lambda: run(False),
                                 "kv_cache_top_k_sampling": lambda: run(True, greedy=False)},
                                repeats, warmup=0)
    tokens = batch * image_tokens
    case = {"image_tokens": image_tokens, "batch": batch,
            "prompt_tokens": [len(p) for p in prompts],
            "sequence_length": longest + image_tokens, "repeats": repeats,
            "greedy_codes_identical": identical}
    for name, seconds in timed.items():
        case[name] = {"seconds": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1)}
    case["speedup"] = round(timed["recompute"] / timed["kv_cache"], 2)
    print(f"  {image_tokens} image tokens x batch {batch}: KV cache "
          f"{case['kv_cache']['tokens_per_s']} tok/s, recompute "
          f"{case['recompute']['tokens_per_s']} tok/s -> {case['speedup']}x; "
          f"greedy codes identical: {identical}", flush=True)
    return case


# ------------------------------------------------------------------------------------------------
# 2. vs Hugging Face GPT-2 generate


def head_flops_share(config: TransformerConfig, prompt_len: int, image_tokens: int) -> dict:
    """Multiply-adds per generated token (mean over the span) in the layers and in the output
    head, ours (image slice, K ids) vs GPT-2's (the whole vocabulary)."""
    hidden, layers = config.hidden_size, config.num_layers
    mean_context = prompt_len + (image_tokens - 1) / 2
    per_layer = (4 + 2 * config.mlp_ratio) * hidden * hidden + 2 * mean_context * hidden
    body = layers * per_layer
    ours_head = VOCAB.num_image_codes * hidden
    full_head = config.vocab_size * hidden
    return {"layers_macs_per_token": int(body), "head_macs_per_token_ours": ours_head,
            "head_macs_per_token_gpt2": full_head,
            "gpt2_work_over_ours": round((body + full_head) / (body + ours_head), 2)}


def vs_hf_section(args) -> dict:
    """Our sampler vs transformers' GPT-2 generate, fp32 and bf16, in one interleaved run each."""
    import transformers  # deferred on purpose: a dev-only install

    transformers.logging.set_verbosity_error()
    batch, image_tokens = args.batch, args.image_tokens
    text_ids = prompt_text_ids(batch)
    prompts = collate_layouts([t2i_prompt(VOCAB, text) for text in text_ids], VOCAB.pad_id,
                              padding_side="left")
    input_ids, attention_mask = prompts["input_ids"], prompts["attention_mask"].long()  # (B, L)
    prompt_len = input_ids.shape[1]
    seeds = list(range(batch))

    ours = build_model(preset_config(args.preset), seed=0)
    gpt2_arch = build_model(preset_config(args.preset, **GPT2_ARCHITECTURE), seed=1)
    hf = hf_gpt2_from(gpt2_arch)
    section = {"model": model_facts(ours, args.preset),
               "gpt2_arch_model": model_facts(gpt2_arch, args.preset),
               "batch": batch, "image_tokens": image_tokens, "top_k": TOP_K,
               "prompt_tokens": [int(n) for n in prompts["attention_mask"].sum(1)],
               "sequence_length": prompt_len + image_tokens, "repeats": args.repeats,
               "hf": {"transformers": transformers.__version__, "model": "GPT2LMHeadModel",
                      "attn_implementation": hf.config._attn_implementation,
                      "cache": "default (DynamicCache), use_cache=True",
                      "generate": f"min_new_tokens=max_new_tokens={image_tokens}, greedy "
                                  f"(do_sample=False) or do_sample=True top_k={TOP_K}, "
                                  "under torch.inference_mode"},
               "work_per_token": head_flops_share(ours.config, prompt_len, image_tokens),
               "fairness": "same layers/width/heads/vocab/positions/batch/prompt ids and mask, "
                           "same torch threads, random weights; the HF model holds the weights "
                           "of ours_gpt2_arch (logits compared below); bf16 = both models' "
                           "weights cast to bfloat16 (our Pipeline's dtype='bf16'), no autocast "
                           "on either side; our sampler draws only image ids (8192 of 58,240), "
                           "GPT-2 generate draws from the whole vocabulary"}
    section["gpt2_arch_vs_hf_max_abs_logit_diff_fp32"] = same_function_check(
        gpt2_arch, hf, text_ids)

    for dtype_name in args.dtypes:
        # Module.to casts in place: every model holds this dtype's weights from here on.
        for model in (ours, gpt2_arch, hf):
            model.to(DTYPES[dtype_name])
        ours_full, gpt2_arch_full = full_vocab_copy(ours), full_vocab_copy(gpt2_arch)

        def ours_run(model, greedy=True):
            return lambda: generate_images(model, VOCAB, text_ids, image_tokens, seeds,
                                           greedy=greedy, top_k=TOP_K)

        def hf_run(greedy=True):
            def run():
                with torch.inference_mode():
                    out = hf.generate(input_ids=input_ids, attention_mask=attention_mask,
                                      max_new_tokens=image_tokens, min_new_tokens=image_tokens,
                                      do_sample=not greedy, top_k=TOP_K, top_p=1.0,
                                      temperature=1.0, use_cache=True, pad_token_id=VOCAB.pad_id,
                                      eos_token_id=VOCAB.sep_id)
                if out.shape != (batch, prompt_len + image_tokens):
                    raise RuntimeError(f"HF generate returned {tuple(out.shape)}, expected "
                                       f"{(batch, prompt_len + image_tokens)}")
                return out
            return run

        contenders = {
            "ours": ours_run(ours), "hf_gpt2": hf_run(),
            "ours_full_vocab_logits": ours_run(ours_full),
            "ours_gpt2_arch": ours_run(gpt2_arch),
            "ours_gpt2_arch_full_vocab_logits": ours_run(gpt2_arch_full),
            "ours_top_k": ours_run(ours, greedy=False), "hf_gpt2_top_k": hf_run(greedy=False),
        }
        timed = interleaved_medians(contenders, args.repeats, warmup=1)
        tokens = batch * image_tokens
        rows = {name: {"seconds": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1)}
                for name, seconds in timed.items()}
        ratios = {"ours_over_hf_greedy": timed["hf_gpt2"] / timed["ours"],
                  "ours_over_hf_top_k": timed["hf_gpt2_top_k"] / timed["ours_top_k"],
                  "span_logits_gain": timed["ours_full_vocab_logits"] / timed["ours"],
                  "gpt2_arch_over_hf": timed["hf_gpt2"] / timed["ours_gpt2_arch"],
                  "gpt2_arch_full_vocab_over_hf":
                      timed["hf_gpt2"] / timed["ours_gpt2_arch_full_vocab_logits"],
                  "cogview_arch_cost": timed["ours"] / timed["ours_gpt2_arch"]}
        section[dtype_name] = {**rows, "ratios": {k: round(v, 2) for k, v in ratios.items()}}
        print(f"  {dtype_name}: ours {rows['ours']['tokens_per_s']} tok/s vs HF GPT-2 "
              f"{rows['hf_gpt2']['tokens_per_s']} (greedy, {ratios['ours_over_hf_greedy']:.2f}x); "
              f"top-k {rows['ours_top_k']['tokens_per_s']} vs "
              f"{rows['hf_gpt2_top_k']['tokens_per_s']} "
              f"({ratios['ours_over_hf_top_k']:.2f}x)", flush=True)
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads for every contender")
    parser.add_argument("--sweep-preset", default="tiny", help="model of the KV-vs-recompute sweep")
    parser.add_argument("--cases", default="64x8,256x8,1024x1",
                        help="KV-vs-recompute cases, <image tokens>x<batch>, comma-separated")
    parser.add_argument("--sweep-repeats", type=int, default=5,
                        help="repeats of cases <= 64 tokens")
    parser.add_argument("--sweep-repeats-long", type=int, default=3,
                        help="repeats of longer cases (recomputation grows ~quadratically)")
    parser.add_argument("--preset", default="small", help="model of the HF GPT-2 comparison")
    parser.add_argument("--batch", type=int, default=8, help="batch of the HF comparison")
    parser.add_argument("--image-tokens", type=int, default=64,
                        help="image tokens of the HF comparison")
    parser.add_argument("--dtypes", default=None,
                        help=f"of {sorted(DTYPES)}, comma-separated (default: fp32,bf16 where "
                        "precision auto picks bf16 on this CPU, else fp32: emulated bf16 runs "
                        "hundreds of times slower)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the HF comparison")
    parser.add_argument("--skip", choices=("sweep", "hf"), action="append", default=[],
                        help="leave a section out (repeatable)")
    parser.add_argument("--out", help="JSON path (default bench_results/sampling.json)")
    args = parser.parse_args()
    if args.dtypes is None:
        args.dtypes = "fp32,bf16" if auto_precision("cpu")[0] == "bf16-mixed" else "fp32"
    args.dtypes = [name.strip() for name in args.dtypes.split(",")]
    unknown = [name for name in args.dtypes if name not in DTYPES]
    if unknown:
        raise SystemExit(f"--dtypes {unknown} not known; pick from {sorted(DTYPES)}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    result = {"machine": machine_info(), "command": " ".join(sys.argv[1:]),
              "tokens_per_s": "generated image tokens (batch x image tokens) / wall seconds of "
                              "the whole call, prefill included; medians of interleaved repeats"}
    if "sweep" not in args.skip:
        print(f"KV cache vs recomputation ({args.sweep_preset}, fp32, greedy):", flush=True)
        model = build_model(preset_config(args.sweep_preset))
        result["kv_vs_recompute"] = {
            "model": model_facts(model, args.sweep_preset), "dtype": "fp32",
            "cases": [kv_vs_recompute_case(model, tokens, batch,
                                           args.sweep_repeats if tokens <= 64
                                           else args.sweep_repeats_long)
                      for tokens, batch in parse_cases(args.cases)]}
        del model
    if "hf" not in args.skip:
        print(f"vs Hugging Face GPT-2 generate ({args.preset}, batch {args.batch}, "
              f"{args.image_tokens} image tokens):", flush=True)
        result["vs_hf_gpt2"] = vs_hf_section(args)
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    write_json(result, args.out, "sampling")


if __name__ == "__main__":
    main()
