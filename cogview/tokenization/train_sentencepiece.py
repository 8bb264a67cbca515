"""Train a SentencePiece model on a caption corpus (one caption per line).

    python -m cogview.tokenization.train_sentencepiece input=captions.txt out=DIR vocab_size=N \
        model_type=unigram|bpe|char [character_coverage=0.9995] [byte_fallback=false] \
        [input_sentence_size=0] [num_threads=4]

Writes DIR/spm.model, DIR/spm.vocab and DIR/tokenizer.json (so that
`load_text_tokenizer(DIR)` or `tokenizer=sentencepiece tokenizer.model_file=DIR/spm.model`
picks it up).
"""

from __future__ import annotations

import sys
from pathlib import Path

import sentencepiece as spm

from cogview.tokenization.text import SPM_FILE, SentencePieceTokenizer
from cogview.validate import check_int

MODEL_TYPES = ("unigram", "bpe", "char")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


# key -> (type parser, default; None = required)
OPTIONS = {
    "input": (str, None),
    "out": (str, None),
    "vocab_size": (int, 8000),
    "model_type": (str, "unigram"),
    # 0.9995 is SentencePiece's advice for CJK; characters outside the coverage become <unk>
    "character_coverage": (float, 0.9995),
    "byte_fallback": (_parse_bool, False),  # needs vocab_size > 256 + the pieces you want
    "input_sentence_size": (int, 0),  # 0 = every line; else a random sample of that many lines
    "num_threads": (int, 4),
}


def train_sentencepiece(
    input: str | Path,
    out: str | Path,
    vocab_size: int = 8000,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    byte_fallback: bool = False,
    input_sentence_size: int = 0,
    num_threads: int = 4,
) -> SentencePieceTokenizer:
    """Train on INPUT (one caption per line), write OUT/spm.model (+ .vocab, tokenizer.json)."""
    input, out = Path(input), Path(out)
    if not input.is_file():
        raise FileNotFoundError(
            f"caption corpus {str(input)!r} does not exist (expected one caption per line)"
        )
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not one of {list(MODEL_TYPES)}")
    check_int("vocab_size", vocab_size, 4, meaning="<unk>, <s>, </s> take three ids")
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / Path(SPM_FILE).stem
    try:
        spm.SentencePieceTrainer.train(
            input=str(input), model_prefix=str(prefix), vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage, byte_fallback=byte_fallback,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=input_sentence_size > 0,
            num_threads=num_threads,
            # a char model's size is fixed by the corpus; let it come out below vocab_size
            hard_vocab_limit=model_type != "char",
            minloglevel=2,
        )
    except RuntimeError as e:
        raise RuntimeError(
            f"SentencePiece training on {str(input)!r} with vocab_size={vocab_size} failed: "
            f"{str(e).rstrip('.')}. "
            "If the vocabulary is too large for the corpus, lower vocab_size."
        ) from e
    tokenizer = SentencePieceTokenizer(out / SPM_FILE)
    tokenizer.save(out)
    return tokenizer


def parse_args(argv: list[str]) -> dict:
    """key=value arguments -> keyword arguments of train_sentencepiece; ValueError on bad ones."""
    kwargs = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ValueError(f"argument {arg!r} is not key=value; known keys: {', '.join(OPTIONS)}")
        if key not in OPTIONS:
            raise ValueError(f"unknown key {key!r}; known keys: {', '.join(OPTIONS)}")
        parser, _ = OPTIONS[key]
        try:
            kwargs[key] = parser(value)
        except ValueError as e:
            raise ValueError(f"bad value for {key}: {value!r} ({e})") from e
    missing = [k for k, (_, default) in OPTIONS.items() if default is None and k not in kwargs]
    if missing:
        raise ValueError(f"missing required argument(s): {', '.join(k + '=...' for k in missing)}")
    return kwargs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__)
        return 0
    try:
        kwargs = parse_args(argv)
    except ValueError as e:
        print(f"train_sentencepiece: {e}\n{__doc__}", file=sys.stderr)
        return 2
    try:
        tokenizer = train_sentencepiece(**kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"train_sentencepiece: {e}", file=sys.stderr)
        return 1
    print(f"wrote {tokenizer.model_file} (vocab_size={tokenizer.vocab_size}, "
          f"fingerprint={tokenizer.fingerprint()})")
    return 0


if __name__ == "__main__":
    from cogview.cli import run_command  # the same --help and exit codes as `cogview sentencepiece`

    sys.exit(run_command("sentencepiece", sys.argv[1:]))
