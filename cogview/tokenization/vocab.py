"""The unified CogView vocabulary: image codes, then text ids, then command tokens.

    [0, K)              image codes (VQ-VAE code book of K entries)
    [K, K + T)          text ids: tokenizer id + K
    [K + T, K + T + 27) command tokens, in COMMAND_TOKENS order
    ... up to `size`    unused padding, `size` a multiple of 128

With K=8192 and CogView's 50,000-piece SentencePiece model this reproduces CogView's ids:
text = piece + 8192, [PAD] = 58192, [BOI1] = 58193, [ROI1] = 58199, [BASE] = 58208,
[POS8] = 58218, size 58240.
"""

from __future__ import annotations

import torch

from cogview.validate import check_int

COMMAND_TOKENS: tuple[str, ...] = (
    "[PAD]",
    "[BOI1]", "[BOI2]", "[BOI3]",  # begin of image (1: base image, 2: super-resolved, 3: spare)
    "[EOI1]", "[EOI2]", "[EOI3]",  # end of image
    "[ROI1]", "[ROI2]", "[ROI3]",  # reference (text) begins
    "[SEP]", "[MASK]", "[CLS]", "[ENC]",
    "[TINY]", "[SMALL]", "[BASE]", "[BIG]",  # image size markers
    *(f"[POS{i}]" for i in range(9)),  # super-resolution window index (3x3 windows)
)


class CogViewVocab:
    """Id map shared by the transformer, the layouts and the sampler.

    Each command token is also an attribute: `vocab.pad_id`, `vocab.boi1_id`, `vocab.roi1_id`,
    `vocab.base_id`, `vocab.pos8_id`, ...
    """

    def __init__(self, num_image_codes: int, text_vocab_size: int, pad_multiple: int = 128) -> None:
        for name, value in (("num_image_codes", num_image_codes),
                            ("text_vocab_size", text_vocab_size), ("pad_multiple", pad_multiple)):
            check_int(name, value)
        self.num_image_codes = num_image_codes
        self.text_vocab_size = text_vocab_size
        self.pad_multiple = pad_multiple
        self.command_start = num_image_codes + text_vocab_size
        self.num_used = self.command_start + len(COMMAND_TOKENS)
        self.size = -(-self.num_used // pad_multiple) * pad_multiple  # round up
        self.commands = {name: self.command_start + i for i, name in enumerate(COMMAND_TOKENS)}
        self.command_names = {i: name for name, i in self.commands.items()}
        for name, i in self.commands.items():
            setattr(self, name.strip("[]").lower() + "_id", i)

    @classmethod
    def for_tokenizer(cls, tokenizer, num_image_codes: int,
                      pad_multiple: int = 128) -> "CogViewVocab":
        """Vocabulary for a text tokenizer (anything with `vocab_size`) and a K-entry code book."""
        return cls(num_image_codes, tokenizer.vocab_size, pad_multiple)

    # ---- ranges and membership -----------------------------------------------------------------
    @property
    def image_range(self) -> tuple[int, int]:
        """(start, end), end exclusive."""
        return 0, self.num_image_codes

    @property
    def text_range(self) -> tuple[int, int]:
        """(start, end), end exclusive."""
        return self.num_image_codes, self.command_start

    @property
    def command_range(self) -> tuple[int, int]:
        return self.command_start, self.num_used

    def is_image(self, ids):
        """True where an id is an image code; works on ints and tensors (elementwise)."""
        return (ids >= 0) & (ids < self.num_image_codes)

    def is_text(self, ids):
        """True where an id is a text id; works on ints and tensors (elementwise)."""
        return (ids >= self.num_image_codes) & (ids < self.command_start)

    def is_command(self, ids):
        return (ids >= self.command_start) & (ids < self.num_used)

    def id_mask(self, kind: str) -> torch.Tensor:
        """BoolTensor [size], True on the ids of `kind` ("image" or "text"): for the span rule."""
        mask = torch.zeros(self.size, dtype=torch.bool)
        if kind == "image":
            mask[: self.num_image_codes] = True
        elif kind == "text":
            mask[self.num_image_codes : self.command_start] = True
        else:
            raise ValueError(f"unknown id kind {kind!r}; choose 'image' or 'text'")
        return mask

    # ---- command tokens ------------------------------------------------------------------------
    def command(self, name: str) -> int:
        """Id of a command token; accepts '[BOI1]', 'BOI1' or 'boi1'."""
        key = name if name.startswith("[") else f"[{name.upper()}]"
        if key not in self.commands:
            raise KeyError(f"unknown command token {name!r}; known: {', '.join(COMMAND_TOKENS)}")
        return self.commands[key]

    def __getitem__(self, name: str) -> int:
        return self.command(name)

    def token_str(self, i: int) -> str:
        """Readable name of one id: 'img:5', 'txt:3' (tokenizer space), '[PAD]', or '<unused:N>'."""
        i = int(i)
        if self.is_image(i):
            return f"img:{i}"
        if self.is_text(i):
            return f"txt:{i - self.num_image_codes}"
        if i in self.command_names:
            return self.command_names[i]
        return f"<unused:{i}>"

    # ---- text id conversion --------------------------------------------------------------------
    def text_to_vocab(self, ids):
        """Tokenizer ids -> vocabulary ids (+K). A tensor gives a tensor, anything else a list."""
        return self._shift(ids, 0, self.text_vocab_size, self.num_image_codes, "tokenizer text id")

    def vocab_to_text(self, ids):
        """Vocabulary text ids -> tokenizer ids (-K); raises on any non-text id."""
        return self._shift(ids, *self.text_range, -self.num_image_codes, "vocabulary text id")

    def _shift(self, ids, lo: int, hi: int, offset: int, what: str):
        if isinstance(ids, torch.Tensor):
            tensor = ids
        else:
            tensor = torch.as_tensor(list(ids), dtype=torch.long)
        bad = (tensor < lo) | (tensor >= hi)
        if bad.any():
            value = int(tensor[bad][0])
            raise ValueError(f"{what} {value} is outside [{lo}, {hi}) (vocab: {self!r})")
        shifted = tensor.long() + offset
        return shifted if isinstance(ids, torch.Tensor) else shifted.tolist()

    def check_image_codes(self, codes: torch.Tensor, name: str = "image codes") -> None:
        """Raise ValueError naming the first code outside [0, K)."""
        bad = (codes < 0) | (codes >= self.num_image_codes)
        if bad.any():
            pos = int(bad.flatten().nonzero()[0])
            raise ValueError(
                f"{name}: code {int(codes.flatten()[pos])} at index {pos} is outside "
                f"[0, {self.num_image_codes}); the VQ-VAE and the vocabulary must agree on "
                f"num_image_codes={self.num_image_codes}"
            )

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"num_image_codes": self.num_image_codes, "text_vocab_size": self.text_vocab_size,
                "pad_multiple": self.pad_multiple, "size": self.size,
                "command_tokens": list(COMMAND_TOKENS)}

    @classmethod
    def from_dict(cls, d: dict) -> "CogViewVocab":
        vocab = cls(int(d["num_image_codes"]), int(d["text_vocab_size"]),
                    int(d.get("pad_multiple", 128)))
        if "command_tokens" in d and list(d["command_tokens"]) != list(COMMAND_TOKENS):
            raise ValueError(f"saved command tokens {d['command_tokens']} differ from this "
                             f"version's {list(COMMAND_TOKENS)}")
        if "size" in d and int(d["size"]) != vocab.size:
            raise ValueError(f"saved vocabulary size {d['size']} differs from the rebuilt "
                             f"size {vocab.size}")
        return vocab

    def __eq__(self, other) -> bool:
        return isinstance(other, CogViewVocab) and self.to_dict() == other.to_dict()

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return (f"CogViewVocab(num_image_codes={self.num_image_codes}, "
                f"text_vocab_size={self.text_vocab_size}, size={self.size})")

