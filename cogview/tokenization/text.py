"""Text tokenizers: a character tokenizer (the default, needs no files) and a SentencePiece wrapper.

Both share one small interface:

    encode(text) -> list[int]     ids in the tokenizer's own space [0, vocab_size)
    decode(ids) -> str
    normalize(text) -> str        the form of `text` that decode(encode(text)) gives back
    vocab_size                    number of ids
    fingerprint() -> str          short stable hash of the tokenizer's identity
    config() -> dict              what tokenizer.json holds; save(dir) / load_text_tokenizer(dir)

The unified CogView vocabulary (vocab.py) shifts these ids by the number of image codes.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Protocol, runtime_checkable

import sentencepiece as spm

CONFIG_FILE = "tokenizer.json"
SPM_FILE = "spm.model"


@runtime_checkable
class TextTokenizer(Protocol):
    """What the rest of cogview needs from a text tokenizer."""

    kind: str

    @property
    def vocab_size(self) -> int: ...

    def normalize(self, text: str) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def fingerprint(self) -> str: ...

    def config(self) -> dict: ...

    def save(self, directory: str | Path) -> Path: ...


def _short_hash(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:16]


def _write_config(directory: str | Path, config: dict, fingerprint: str) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CONFIG_FILE
    text = json.dumps({**config, "fingerprint": fingerprint}, ensure_ascii=False, indent=2)
    path.write_text(text + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# Character tokenizer


def _gb2312_chars(first_rows: range) -> list[str]:
    """Every character of the given GB2312 rows (lead bytes), in code order."""
    chars = []
    for hi in first_rows:
        for lo in range(0xA1, 0xFF):
            try:
                chars.append(bytes([hi, lo]).decode("gb2312"))
            except UnicodeDecodeError:  # unassigned code point (e.g. the end of row 0xD7)
                continue
    return chars


def _nfkc_stable(ch: str) -> bool:
    return unicodedata.normalize("NFKC", ch) == ch


# Printable ASCII, space included (0x20..0x7E). Full-width forms such as '，' (U+FF0C), '：',
# '！', '？', '（', '）' normalise to these under NFKC, so captions written with full-width
# punctuation come back in the ASCII form: decode(encode('红色，蓝色')) == '红色,蓝色'.
ASCII_CHARS = "".join(chr(c) for c in range(0x20, 0x7F))
# CJK punctuation and symbols: GB2312 row 0xA1 minus what NFKC rewrites ('　' -> ' ',
# '…' -> '...', '～' -> '~', '℃' -> '°C', '№' -> 'No', ...: only their NFKC form is
# reachable), plus two marks IMEs type that GB2312 lacks: '—' (U+2014; GB2312 has U+2015)
# and '·' (U+00B7).
EXTRA_PUNCTUATION = "—·"


@lru_cache(maxsize=1)
def char_vocabulary() -> tuple[str, ...]:
    """The CharTokenizer's characters in id order: ASCII, CJK punctuation, 6763 GB2312 hanzi."""
    row1 = _gb2312_chars(range(0xA1, 0xA2))
    punctuation = [c for c in row1 if _nfkc_stable(c) and c not in ASCII_CHARS]
    punctuation += [c for c in EXTRA_PUNCTUATION if c not in punctuation]
    hanzi = _gb2312_chars(range(0xB0, 0xF8))  # rows 0xB0-0xF7: 3755 level-1 + 3008 level-2 hanzi
    chars = tuple(ASCII_CHARS) + tuple(punctuation) + tuple(hanzi)
    assert len(set(chars)) == len(chars) and all(_nfkc_stable(c) for c in chars)
    return chars


class CharTokenizer:
    """One id per character, with UTF-8 byte fallback so that no input ever fails.

    Normalisation (`normalize`): NFKC, then every run of whitespace (spaces, tabs, newlines,
    the ideographic space U+3000) becomes a single ' ' and leading/trailing whitespace is
    dropped, as SentencePiece's default normaliser does. decode(encode(t)) == normalize(t) for
    every string t (lone surrogates, which UTF-8 cannot encode, come back as '?').

    Ids: [0, n_chars) the characters of `char_vocabulary()` (printable ASCII, CJK punctuation,
    all 6763 GB2312 hanzi); [n_chars, n_chars + 256) the bytes 0x00..0xFF of the UTF-8
    encoding of any other character (emoji, rare hanzi, control characters).
    """

    kind = "char"
    VERSION = 1  # bump when the vocabulary or normalisation changes; part of the fingerprint

    def __init__(self) -> None:
        self.chars = char_vocabulary()
        self.char_to_id = {c: i for i, c in enumerate(self.chars)}
        self.byte_offset = len(self.chars)

    @property
    def vocab_size(self) -> int:
        return self.byte_offset + 256

    def normalize(self, text: str) -> str:
        """NFKC, whitespace runs collapsed to one ' ', stripped."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}: {text!r}")
        return " ".join(unicodedata.normalize("NFKC", text).split())

    def encode(self, text: str) -> list[int]:
        """Normalise `text` and map it to ids (characters, or UTF-8 bytes for unknown ones)."""
        ids = []
        for ch in self.normalize(text):
            i = self.char_to_id.get(ch)
            if i is not None:
                ids.append(i)
            else:
                ids.extend(self.byte_offset + b for b in ch.encode("utf-8", errors="replace"))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Map ids back to text; runs of byte ids are reassembled as UTF-8 (errors='replace')."""
        out: list[str] = []
        pending = bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(
                    f"text id {i} is outside the char tokenizer's range [0, {self.vocab_size})"
                )
            if i >= self.byte_offset:
                pending.append(i - self.byte_offset)
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            out.append(self.chars[i])
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def fingerprint(self) -> str:
        """Hash of kind, version, normalisation and the full character list."""
        identity = {"kind": self.kind, "version": self.VERSION, "normalize": "nfkc+collapse_ws",
                    "chars": "".join(self.chars), "byte_fallback": 256}
        return _short_hash(json.dumps(identity, ensure_ascii=False, sort_keys=True).encode("utf-8"))

    def config(self) -> dict:
        return {"kind": self.kind, "version": self.VERSION, "vocab_size": self.vocab_size}

    def save(self, directory: str | Path) -> Path:
        """Write DIRECTORY/tokenizer.json; returns its path."""
        return _write_config(directory, self.config(), self.fingerprint())

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


# ----------------------------------------------------------------------------------------------
# SentencePiece


class SentencePieceTokenizer:
    """Wraps a SentencePiece `.model`; ids are piece ids (CogView's 50,000-piece model included).

    Characters the model does not know become its <unk> piece unless it was trained with
    byte_fallback=true, so decode(encode(t)) == normalize(t) holds only for covered text.
    """

    kind = "sentencepiece"

    def __init__(self, model_file: str | Path) -> None:
        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise FileNotFoundError(
                f"SentencePiece model file {str(self.model_file)!r} does not exist; train one with "
                "`python -m cogview.tokenization.train_sentencepiece input=captions.txt out=DIR` "
                "or use the char tokenizer (kind=char)"
            )
        self.model_bytes = self.model_file.read_bytes()
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
        except RuntimeError as e:
            raise ValueError(
                f"{str(self.model_file)!r} is not a valid SentencePiece model: {e}"
            ) from e

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def normalize(self, text: str) -> str:
        """The model's own normaliser (nmt_nfkc by default: NFKC + whitespace cleanup)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}: {text!r}")
        # SentencePiece writes whitespace as U+2581 and (by default) prefixes one; decode undoes
        # both
        normalized = self.sp.normalize(text).replace("\u2581", " ")
        return normalized[1:] if normalized.startswith(" ") else normalized

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}: {text!r}")
        return list(self.sp.encode(text, out_type=int))

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"text id {bad[0]} is outside the SentencePiece model's range "
                f"[0, {self.vocab_size})"
            )
        return self.sp.decode(ids)

    def fingerprint(self) -> str:
        """Hash of the kind and the model file's bytes."""
        return _short_hash(self.kind.encode() + b"\0" + self.model_bytes)

    def config(self) -> dict:
        return {"kind": self.kind, "model_file": SPM_FILE, "vocab_size": self.vocab_size}

    def save(self, directory: str | Path) -> Path:
        """Write DIRECTORY/spm.model and DIRECTORY/tokenizer.json; returns the json's path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / SPM_FILE
        if not (target.exists() and target.resolve() == self.model_file.resolve()):
            target.write_bytes(self.model_bytes)
        return _write_config(directory, self.config(), self.fingerprint())

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.model_file)!r}, vocab_size={self.vocab_size})"


# ----------------------------------------------------------------------------------------------
# Factory, loading, caption encoding

TOKENIZER_KINDS = ("char", "sentencepiece")


def build_text_tokenizer(kind: str = "char", model_file: str | Path | None = None) -> TextTokenizer:
    """Build a text tokenizer: kind="char" (no files) or kind="sentencepiece" (needs model_file)."""
    if kind == "char":
        if model_file is not None:
            raise ValueError(
                f"model_file={str(model_file)!r} is only used by kind='sentencepiece', "
                "not by kind='char'"
            )
        return CharTokenizer()
    if kind in ("sentencepiece", "spm"):
        if model_file is None:
            raise ValueError("kind='sentencepiece' needs model_file=PATH/TO/spm.model")
        return SentencePieceTokenizer(model_file)
    raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {list(TOKENIZER_KINDS)}")


def load_text_tokenizer(directory: str | Path) -> TextTokenizer:
    """Rebuild a tokenizer saved with `save(directory)`, checking its fingerprint."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} not found: save the tokenizer there with tokenizer.save(dir)"
        )
    config = json.loads(path.read_text())
    kind = config.get("kind")
    model_file = directory / config["model_file"] if config.get("model_file") else None
    tokenizer = build_text_tokenizer(kind, model_file)
    expected = config.get("fingerprint")
    if expected is not None and expected != tokenizer.fingerprint():
        raise ValueError(
            f"tokenizer in {str(directory)!r} has fingerprint {tokenizer.fingerprint()} but "
            f"{CONFIG_FILE} records {expected}: the model file or the cogview version changed "
            "since it was saved"
        )
    return tokenizer


def encode_caption(
    tokenizer: TextTokenizer, caption: str, *, allow_empty: bool = False
) -> list[int]:
    """Encode a caption; an empty or whitespace-only one raises ValueError unless allow_empty."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}: {caption!r}")
    ids = tokenizer.encode(caption)
    if not ids and not allow_empty:
        raise ValueError(
            f"caption is empty: {caption!r} gives no text tokens after normalisation; give "
            "every image a non-empty caption (allow_empty=True is only for classifier-free-"
            "guidance caption dropout)"
        )
    return ids
